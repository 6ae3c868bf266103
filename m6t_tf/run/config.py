"""The run configuration: every `train.*` binding, grouped, typed and checked in one place.

Gin configures `train` with flat bindings (`train.num_steps = 1000`, `train.eval_every = 250`),
as every gin file and command of this project writes them; `RunConfig.from_bindings` groups them
the way t5x groups its own (`DatasetConfig`, `CheckpointConfig`, ...):

    RunConfig       model_dir, num_steps, seed, log_every
      .data         DataConfig: the records, their shapes and order, the batch
      .optimization OptimizationConfig: optimiser, schedule, clipping, precision
      .checkpoint   CheckpointConfig: how often, how many kept
      .evaluation   EvaluationConfig: periodic validation and caption samples
      .execution    ExecutionConfig: recomputation, XLA, determinism, the stall watchdog

Each field is declared once, with its default, its check and its doc; `train`'s signature is
made from these fields (`signature`), so gin rejects an unknown `train.*` binding and the
operative config lists them all. `RunConfig.validate` checks everything that needs neither data
nor weights — the types and ranges of every field and the rules between them — and raises a
`ConfigError` naming the binding and a fix that is itself valid (`ConfigError.fix`).
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import Any, Callable, Optional

from m6t_tf.errors import ConfigError
from m6t_tf.errors import bindings_flag

IMAGE_MODES = ("pixels", "features")
ON_BAD_RECORD = ("skip", "fail")
OPTIMIZERS = ("adamw", "adafactor")
LR_DECAYS = ("constant", "linear", "cosine")
REMAT_OPTIONS = ("none", "block", "attention", "experts")

#: A field gin must bind (`train.train_data`, `train.num_steps`, `train.model_dir`).
REQUIRED = inspect.Parameter.empty


# ------------------------------------------------------------------------------------------
# What a field accepts. Each check returns None, or the end of the error message ("must be an
# integer >= 1"); `_field` turns it into a ConfigError naming the binding, with the default as
# the fix where the default is valid.

def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def integer(minimum: int) -> Callable[[Any], Optional[str]]:
  return lambda x: None if _is_int(x) and x >= minimum else f"must be an integer >= {minimum}"


def number(minimum: float = None, maximum: float = None, *, below: float = None,
           above: float = None) -> Callable[[Any], Optional[str]]:
  """A real number in [minimum, maximum] (or (above, below) for open ends)."""
  lo = (f"[{minimum:g}" if minimum is not None else f"({above:g}" if above is not None
        else "(-inf")
  hi = (f"{maximum:g}]" if maximum is not None else f"{below:g})" if below is not None
        else "inf)")

  def check(x):
    ok = (_is_number(x) and x == x
          and (minimum is None or x >= minimum) and (maximum is None or x <= maximum)
          and (below is None or x < below) and (above is None or x > above))
    return None if ok else f"must be a number in {lo}, {hi}"
  return check


def _choices(choices) -> str:
  names = [repr(c) for c in choices]
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def one_of(*choices) -> Callable[[Any], Optional[str]]:
  return lambda x: (None if isinstance(x, str) and x in choices
                    else f"; allowed: {_choices(choices)}")


def seconds(x) -> Optional[str]:
  return None if _is_number(x) and x == x and x >= 0 else "must be a number of seconds >= 0"


def boolean(x) -> Optional[str]:
  return None if isinstance(x, bool) else "must be True or False"


def optional_string(x) -> Optional[str]:
  return None if x is None or (isinstance(x, str) and x) else "must be a non-empty string or None"


def string(x) -> Optional[str]:
  return None if isinstance(x, str) and x else "must be a non-empty string"


def remat_option(x) -> Optional[str]:
  if isinstance(x, str) and x in REMAT_OPTIONS:
    return None
  if isinstance(x, (list, tuple)) and x and all(isinstance(b, str) and b for b in x):
    return None  # block names; the network checks they exist
  return f"; allowed: {_choices(REMAT_OPTIONS)} or a list of block names such as ['block_0']"


def optional_caption_length(x) -> Optional[str]:
  # None: MAX_LEN = None follows the data (`configurables.parse` binds it from metadata.json).
  return None if x is None or (_is_int(x) and x >= 3) else (
      "must be an integer >= 3 (caption tokens with [CLS] and [SEP]) or None (follow the data)")


def _literal(value) -> str:
  """A value as gin reads it (`300` for 300.0: the shorter of the two)."""
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return repr(value)


def _field(default, check, doc: str, why: Optional[str] = None):
  """A setting: its default, its check, its doc, and `why` its rule is what it is (said in
  the error message)."""
  return dataclasses.field(default=default, metadata={"check": check, "doc": doc, "why": why})


# ------------------------------------------------------------------------------------------
# The groups. Field names are the `train.*` binding names.

@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The records, their shapes and order, and the batch."""
  train_data: str = _field(REQUIRED, string,
                           "TFRecord glob of the training split (m6t_tf.data.records format).")
  eval_data: Optional[str] = _field(None, optional_string,
                                    "TFRecord glob of the validation split; None: no evaluation.")
  max_len: Optional[int] = _field(
      64, optional_caption_length,
      "Caption length L with [CLS]/[SEP] (the MAX_LEN macro; None follows the data).")
  truncate_captions: bool = _field(
      False, boolean, "Cut longer captions (keeping [SEP]); False: longer data is an error.")
  image_mode: str = _field("pixels", one_of(*IMAGE_MODES),
                           "'pixels' or 'features' (precomputed patch features).")
  batch_size_per_worker: int = _field(8, integer(1), "B: examples per worker and step.")
  global_batch_size: int = _field(
      0, integer(0), "If set, B = global_batch_size / workers (must divide); 0 = off.")
  shuffle_buffer: int = _field(
      2048, integer(1), "Records shuffled together (1 = none: only the file order changes).",
      why="the records shuffled together; 1 = none, only the file order changes between epochs")
  on_bad_record: str = _field(
      "skip", one_of(*ON_BAD_RECORD),
      "'skip' (drop and count malformed records) or 'fail' (stop at the first, naming it).",
      why="'skip' drops and counts bad records, 'fail' stops at the first, naming it")
  log_data_keys: bool = _field(
      False, boolean, "Log each step's record keys per worker (model_dir/data_keys/).")


@dataclasses.dataclass(frozen=True)
class OptimizationConfig:
  """The optimiser, its learning-rate schedule, clipping and precision."""
  optimizer: str = _field("adamw", one_of(*OPTIMIZERS), "'adamw' or 'adafactor' (1T).")
  learning_rate: float = _field(8e-5, number(above=0.0), "Peak learning rate.")
  warmup_steps: int = _field(500, integer(0), "Linear warmup steps (0: warmup_fraction).")
  warmup_fraction: float = _field(
      0.0, number(0.0, below=1.0), "With warmup_steps = 0: warmup as a fraction of num_steps.")
  lr_decay: str = _field("constant", one_of(*LR_DECAYS), "After the warmup.")
  final_lr_fraction: float = _field(0.0, number(0.0, 1.0),
                                    "Decayed learning rate at num_steps / peak.")
  weight_decay: float = _field(0.01, number(0.0), "AdamW's decoupled weight decay.")
  beta_1: float = _field(0.9, number(0.0, below=1.0), "AdamW's first-moment decay.")
  beta_2: float = _field(0.999, number(0.0, below=1.0), "AdamW's second-moment decay.")
  epsilon: float = _field(1e-6, number(above=0.0), "AdamW's epsilon.")
  clip_norm: float = _field(1.0, number(0.0), "Global gradient-norm clipping; 0 = off.")
  mixed_precision: bool = _field(
      False, boolean, "mixed_float16 compute with dynamic loss scaling (routers float32).")

  def warmup(self, num_steps: int) -> int:
    """The warmup steps of a run of `num_steps`."""
    return self.warmup_steps if self.warmup_steps else round(self.warmup_fraction * num_steps)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """How often the run checkpoints and how many checkpoints it keeps."""
  checkpoint_every: int = _field(500, integer(1), "Checkpoint period in steps.")
  keep_checkpoints: int = _field(
      3, integer(1), "Checkpoints kept (>= 1: the one a restart resumes from).",
      why="a run keeps at least the checkpoint it would resume from")


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
  """Periodic validation and the caption samples written beside it."""
  eval_every: int = _field(0, integer(0), "Validation period in steps; 0 = only at the end.")
  eval_batches: int = _field(0, integer(0), "Validation batches; 0 = the whole split.")
  eval_captions: int = _field(
      4, integer(0), "Greedy captions of this many validation images per evaluation (0 = off).")


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """How the step runs: recomputation, XLA, determinism, and the stall watchdog."""
  remat: Any = _field("none", remat_option,
                      "Recomputation: 'none', 'block', 'attention', 'experts' or block names.")
  jit_compile: bool = _field(False, boolean, "XLA-compile the step (one process only).")
  deterministic: bool = _field(False, boolean, "TensorFlow deterministic ops (exact resume).")
  stall_timeout_s: float = _field(
      300.0, seconds, "A phase without progress for this long ends the run; 0 = off.",
      why="0 = off")


GROUPS = {"data": DataConfig, "optimization": OptimizationConfig,
          "checkpoint": CheckpointConfig, "evaluation": EvaluationConfig,
          "execution": ExecutionConfig}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One training run: its folder, length, seed and logging, and the five groups."""
  model_dir: str = _field(REQUIRED, string,
                          "Checkpoints, TensorBoard events, config.gin and logs go here.")
  num_steps: int = _field(REQUIRED, integer(1), "Optimiser steps of the run (its horizon).")
  seed: int = _field(0, integer(0), "Weights, dropout and data order.")
  log_every: int = _field(50, integer(1), "Console and TensorBoard period in steps.")
  data: DataConfig = None
  optimization: OptimizationConfig = dataclasses.field(default_factory=OptimizationConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
  execution: ExecutionConfig = dataclasses.field(default_factory=ExecutionConfig)

  @classmethod
  def from_bindings(cls, **bindings) -> "RunConfig":
    """Groups flat `train.*` values (missing ones take their defaults).

    Raises:
      ConfigError: an unknown name, or a required one (train_data, num_steps, model_dir)
        missing.
    """
    known = {name for name, _ in fields()}
    unknown = sorted(set(bindings) - known)
    if unknown:
      raise ConfigError(f"train has no setting {unknown[0]!r}; its settings: {sorted(known)}")
    for name, f in fields():
      if f.default is REQUIRED and name not in bindings:
        raise ConfigError(f"train.{name} is required: pass --gin_bindings="
                          f"{_EXAMPLES.get(name, f'train.{name}=...')}")
    groups = {g: c(**{f.name: bindings[f.name] for f in dataclasses.fields(c)
                      if f.name in bindings}) for g, c in GROUPS.items()}
    top = {f.name: bindings[f.name] for f in dataclasses.fields(cls)
           if f.name in bindings and f.name not in GROUPS}
    return cls(**top, **groups)

  def bindings(self) -> dict:
    """The flat `train.*` values, every field (the inverse of `from_bindings`)."""
    out = {}
    for name, _ in fields():
      out[name] = getattr(self._owner(name), name)
    return out

  def _owner(self, name: str):
    for g in GROUPS:
      if name in {f.name for f in dataclasses.fields(GROUPS[g])}:
        return getattr(self, g)
    return self

  def replace(self, **bindings) -> "RunConfig":
    """A copy with some `train.*` values changed."""
    return RunConfig.from_bindings(**{**self.bindings(), **bindings})

  def validate(self, num_workers: int = 1) -> "RunConfig":
    """Checks every field and the rules between them, before any data or weight exists.

    Args:
      num_workers: W, the worker count the run starts with (the global batch must divide).

    Returns:
      self, for chaining.

    Raises:
      ConfigError: the first broken rule, naming the binding and a fix.
    """
    for name, f in fields():
      value = getattr(self._owner(name), name)
      problem = f.metadata["check"](value)
      if problem:
        fix = ()
        if f.default is not REQUIRED and not f.metadata["check"](f.default):
          fix = (f"train.{name}={_literal(f.default)}",)
        elif name in _FIX_EXAMPLES:
          fix = (_FIX_EXAMPLES[name],)
        sep = "" if problem.startswith(";") else " "
        why = f" ({f.metadata['why']})" if f.metadata["why"] else ""
        raise ConfigError(f"train.{name}={value!r}{sep}{problem}{why}"
                          + (f", e.g. {bindings_flag(fix)}" if fix else ""), fix=fix)
    self._check_rules(num_workers)
    return self

  def _check_rules(self, num_workers: int) -> None:
    data, opt = self.data, self.optimization
    warmup = opt.warmup(self.num_steps)
    if opt.lr_decay != "constant" and self.num_steps <= warmup:
      fix = shorter_warmup(self.num_steps)
      raise ConfigError(
          f"train.lr_decay={opt.lr_decay!r} decays after the warmup, but train.num_steps="
          f"{self.num_steps} is not more than the {warmup} warmup steps (train.warmup_steps): "
          f"pass {bindings_flag(fix)} or more steps", fix=fix)
    if data.global_batch_size and data.global_batch_size % num_workers:
      fix = (f"train.global_batch_size="
             f"{max(data.global_batch_size // num_workers, 1) * num_workers}",)
      raise ConfigError(f"train.global_batch_size={data.global_batch_size} is not divisible by "
                        f"the {num_workers} workers; use a multiple of {num_workers}, e.g. "
                        f"{bindings_flag(fix)}", fix=fix)
    if self.execution.jit_compile and num_workers > 1:
      fix = ("train.jit_compile=False",)
      raise ConfigError("train.jit_compile=True cannot run under Horovod (its collectives have "
                        "no XLA kernels); pass --gin_bindings=train.jit_compile=False", fix=fix)

  def batch_size_per_worker(self, num_workers: int) -> int:
    """B of this run on `num_workers` workers (`per_worker_batch`)."""
    return per_worker_batch(self.data.batch_size_per_worker, self.data.global_batch_size,
                            num_workers)


def per_worker_batch(batch_size_per_worker: int, global_batch_size: int, num_workers: int) -> int:
  """B: `train.global_batch_size / workers` when the global batch is set, else the per-worker
  batch. The evaluator uses it too: capacity, and so perplexity, depends on B.

  Raises:
    ConfigError: a global batch the workers do not divide.
  """
  if not global_batch_size:
    return batch_size_per_worker
  if global_batch_size % num_workers:
    fix = (f"train.global_batch_size={max(global_batch_size // num_workers, 1) * num_workers}",)
    raise ConfigError(f"train.global_batch_size={global_batch_size} is not divisible by the "
                      f"{num_workers} workers; use a multiple of {num_workers}, e.g. "
                      f"{bindings_flag(fix)}", fix=fix)
  return global_batch_size // num_workers


_EXAMPLES = {"train_data": "\"train.train_data='data/mine/train-*.tfrecord'\"",
             "num_steps": "train.num_steps=1000", "model_dir": "--model_dir=runs/mine"}
# Valid values of the required settings, offered as the fix of an invalid one.
_FIX_EXAMPLES = {"num_steps": "train.num_steps=1000"}


def shorter_warmup(num_steps: int) -> tuple:
  """Bindings of a warmup shorter than `num_steps`: `num_steps // 10` steps (at least one);
  a run of one step has no positive warmup that leaves a step to decay over, so there the fix
  is no warmup at all (both of its settings 0)."""
  if num_steps >= 2:
    return (f"train.warmup_steps={max(num_steps // 10, 1)}",)
  return ("train.warmup_steps=0", "train.warmup_fraction=0.0")


def fields():
  """(name, dataclasses.Field) of every `train.*` setting, in signature order."""
  out = []
  for f in dataclasses.fields(RunConfig):
    if f.name in GROUPS:
      out.extend((g.name, g) for g in dataclasses.fields(GROUPS[f.name]))
    else:
      out.append((f.name, f))
  return out


def signature(extra: tuple = ()) -> inspect.Signature:
  """`train`'s keyword-only signature: every field with its default (required ones without),
  then `extra` parameters (not gin-configurable: ctx, network_fn, stop_after)."""
  params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
            for name, f in fields()]
  params.sort(key=lambda p: p.default is not REQUIRED)  # required first, as Python writes it
  return inspect.Signature(params + list(extra))


def docs() -> str:
  """One line per `train.*` setting, by group: for `train`'s docstring and the docs."""
  lines = []
  for f in dataclasses.fields(RunConfig):
    if f.name in GROUPS:
      lines.append(f"  {f.name} ({GROUPS[f.name].__name__}):")
      lines.extend(f"    {g.name}: {g.metadata['doc']}" for g in dataclasses.fields(GROUPS[f.name]))
    else:
      lines.append(f"  {f.name}: {f.metadata['doc']}")
  return "\n".join(lines)
