r"""MoE vs dense at the same wall-clock budget, the method of Du et al. 2024 (SPEC §4).

  python tools/compare_dense.py --dense_gin=gin/demo.gin --moe_gin=gin/demo.gin
  python tools/compare_dense.py --dense_gin=gin/demo.gin \
      --moe_gin=tools/experiments/gin/top1.gin --moe_gin=tools/experiments/gin/top2_cap_k.gin
  python tools/compare_dense.py --dense_gin=gin/revisit_moe.gin,gin/tiny.gin \
      --moe_gin=gin/revisit_moe.gin,gin/tiny.gin --steps_to_time=5 --format=json
  python tools/compare_dense.py --dense_gin=gin/demo.gin --upcycle_moe_gin=gin/demo.gin \
      --upcycle_at=150 --upcycle_budget_steps=300 --upcycle_dir=runs/upcycle_demo

A model is one `--dense_gin` / `--moe_gin` value: a gin file, or several joined by commas
(later ones override earlier ones, e.g. a size file and `gin/tiny.gin`). `--gin_bindings` apply
to every model. The dense model is its config's *dense twin*: `--dense_gin` plus
`M6Transformer.moe_placement = 'none'` (same backbone, a dense FFN of intermediate size I in
every layer), so `--dense_gin` is normally the MoE's own file.

Method:
  1. Build every model from its gin config with the trainer's pieces (`trainer_lib.build_model`,
     `optimizers.make_optimizer` with the config's `train.*` values, `trainer_lib.Trainer`), on a
     real training batch of the config's `train.train_data` (a synthetic batch of the same shape
     if the files are missing; the JSON says which).
  2. Step time: `Trainer.train_step` (the trainer's compiled `tf.function`: forward, backward,
     clipping, optimizer update). `--warmup_steps` calls per model are excluded (the first
     traces and compiles). Then `--steps_to_time` rounds; each round runs one step of every
     model, in an order rotated every round, so load from other jobs on a shared machine falls
     on all models alike. The dense step time is the median of its rounds; an MoE's ratio to
     dense is the median over rounds of (MoE step / dense step of the same round), and its
     step time is dense × ratio (so the budget arithmetic below is exactly consistent).
     `median_step_time_s` is each model's own median, for scale only.
  3. Budget (Chinchilla, Hoffmann et al. 2022: ~20 training tokens per parameter):
        budget_tokens = tokens_per_param × N_dense
        dense_steps   = budget_tokens / dense tokens_per_step
        budget_s      = dense_steps × dense step time
        moe_steps     = budget_s / MoE step time;  moe_tokens = moe_steps × MoE tokens_per_step
     N_dense is the dense twin's *total* trainable parameter count by default, embeddings
     included: that is what Chinchilla counted (Kaplan et al. 2020 counted non-embedding
     parameters; Pearce & Song 2024 trace most of the two laws' disagreement to that choice).
     `--param_count=non_embedding` uses the count without the token table, positions, patch
     projection and output bias (`m6t_tf.run.planning`'s "embeddings" component). With a
     21128-entry vocabulary and a small M the two differ by ~7× (the demo), so both are printed.
     A token is one position the model computes on: tokens_per_step = B × (16 patches +
     max_len − 1 caption inputs) × workers, the trainer's own `tokens_per_s` definition
     (padding positions included; scored caption tokens are fewer).

Scope: one process (D = 1), so the measured step contains no all-to-all; under expert
parallelism the MoE's step also pays two all-to-alls per MoE layer (Du et al.'s reason for
timing steps instead of counting FLOPs), which this single-process measurement cannot see.
The reference result: their dense→MoE step-time increase stays under ~20% (85M/32E: +6%,
1.2B/256E: +17.4%); `within_20pct` flags that.

Upcycling run (`--upcycle_moe_gin=<MoE spec> --upcycle_at=N [--upcycle_budget_steps=S]`): the
dense twin trained N steps, upcycled into the MoE and continued, against the dense twin continued
and the MoE trained from scratch, at one wall-clock budget. The MoE is timed with the dense twin
in the rounds of step 2 (it gets its row in the table above) and its paired ratio r sets the
steps. Budget: S dense steps at the measured dense step time (default S = 2N). Rule: *fixed
step counts*, each arm the whole steps that fit (floor), not runs stopped by a clock (on a
shared machine a clock would measure the neighbours' load):
    dense        S dense steps: one `m6t_tf.train` run with horizon S, stopped at N (its
                 step-N checkpoint is the upcycling point) and resumed to S;
    upcycled     the same N dense steps, then `tools/upcycle.py`'s `upcycle()` of that
                 checkpoint (experts = copies of the FFN, fresh routers and optimiser state,
                 step 0) and floor((S − N) / r) MoE steps: a new run with its own schedule over
                 those steps (the config's warmup and decay), its data stream from the start;
    moe_scratch  floor(S / r) MoE steps from the MoE's own initialisation.
The conversion, model builds, tracing, checkpoints and evaluations are not charged to any arm
(`upcycle_s` and each arm's `train_wall_s`, everything included, are reported). The arms run in
this process under `--upcycle_dir` (dense/, upcycled/, moe_scratch/; it must be empty), with
`--gin_bindings`, periodic evaluation off (`train.eval_every = 0`) and caption decoding off.
Reported per arm: validation log-perplexity at the end of its budget (the trainer's final
evaluation: `train.eval_data`, `train.eval_batches`), the training loss at an equal step count
(the fewest steps any arm ran: mean of a window ending there; dropout on, and the upcycled arm
re-reads the stream from its start, so only a rough guide), the final training loss, and the
start point: the validation log-perplexity of the dense step-N checkpoint and of the upcycled
checkpoint before its first step (equal when the MoE computes the dense function: top-k with
renormalised gates and no drops; prototype or un-renormalised gates and capacity drops move it).

JSON (--format=json), schema_version 1:
  {"schema_version", "tool", "argv", "machine": {"nproc", "cpu_model", "loadavg_start",
   "loadavg_end", "python", "tensorflow", "keras"},
   "method": {"tokens_per_param", "param_count", "warmup_steps", "steps_to_time", "workers",
              "tokens_definition", "step_time_definition"},
   "dense": {"name", "gin_files", "gin_bindings", "batch_source", "params_total",
             "params_non_embedding", "params_embedding", "params_activated", "budget_params",
             "tokens_per_step", "step_time_s", "median_step_time_s", "times_s",
             "budget_tokens", "steps", "budget_s"},
   "moe": [{"name", "gin_files", "gin_bindings", "batch_source", "params_total",
            "params_non_embedding", "params_embedding", "params_activated", "moe_layers",
            "num_experts", "routing", "k", "capacity_mode", "tokens_per_step",
            "step_time_ratio", "step_time_s", "median_step_time_s", "times_s",
            "step_time_increase_pct", "within_20pct", "steps", "tokens",
            "tokens_vs_dense", "steps_vs_dense"}],
   "upcycle" (with --upcycle_moe_gin only):
     {"moe_gin_files", "moe_name", "upcycle_at", "budget_dense_steps", "budget_s",
      "dense_step_time_s", "moe_step_time_s", "step_time_ratio", "noise_std", "upcycle_s",
      "upcycled_experts", "upcycled_moe_layers", "rule",
      "start": {"dense_val_log_perplexity_at_upcycle", "upcycled_val_log_perplexity_at_0",
                "dense_checkpoint", "dense_loss_at_upcycle", "dense_loss_next_step",
                "upcycled_first_loss"},
      "equal_steps": {"step", "window", "definition"},
      "arms": [{"arm": "dense" | "upcycled" | "moe_scratch", "name", "model_dir",
                "dense_steps", "moe_steps", "steps", "budget_used_s", "budget_fraction",
                "tokens", "train_wall_s", "final_loss", "train_loss_at_equal_steps",
                "val_log_perplexity", "val_perplexity", "losses"}]}}
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shlex
import statistics
import sys
import time

from m6t_tf import cli

from m6t_tf import errors
from m6t_tf.machine import machine_info

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SCHEMA_VERSION = 1
TOOL = "tools/compare_dense.py"
DENSE_BINDING = "M6Transformer.moe_placement = 'none'"
# Du et al. 2024: the dense→MoE step-time increase of their 3D-sharded MoEs stays under ~20%.
THEIR_MAX_INCREASE_PCT = 20.0
NUM_PATCHES = 16
# Variables of the input and output maps (`m6t_tf.run.planning`'s "embeddings" component).
EMBEDDING_NAMES = ("token_embedding", "position_embedding", "patch_embedding", "output_bias")


def parse_args(argv):
  p = cli.ArgumentParser(description=__doc__.split("\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dense_gin", required=True,
                 help="the dense twin's gin file(s), comma-separated; moe_placement='none' is "
                      "added")
  p.add_argument("--moe_gin", action="append", default=[],
                 help="an MoE model's gin file(s), comma-separated; repeat for several MoEs")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help="bindings applied to every model, e.g. \"train.batch_size_per_worker=8\"")
  p.add_argument("--gin_search_paths", action="append", default=None,
                 help="folders searched for gin includes (default: .)")
  p.add_argument("--steps_to_time", type=int, default=20,
                 help="timed rounds; each times one step of every model (default 20)")
  p.add_argument("--warmup_steps", type=int, default=3,
                 help="untimed steps per model first (tracing, compilation; default 3)")
  p.add_argument("--tokens_per_param", type=float, default=20.0,
                 help="Chinchilla's rule: training tokens per dense parameter (default 20)")
  p.add_argument("--param_count", choices=("total", "non_embedding"), default="total",
                 help="which dense parameter count the budget uses (default total, as "
                      "Chinchilla counted)")
  g = p.add_argument_group("upcycling run (dense N steps → upcycled MoE, against dense "
                           "continued and MoE from scratch, at one wall-clock budget)")
  g.add_argument("--upcycle_moe_gin", default=None,
                 help="the MoE config (gin files, comma-separated) that --dense_gin's dense "
                      "twin is upcycled into and that trains from scratch; same backbone")
  g.add_argument("--upcycle_at", type=int, default=None,
                 help="dense steps N before upcycling (required with --upcycle_moe_gin)")
  g.add_argument("--upcycle_budget_steps", type=int, default=None,
                 help="the wall-clock budget, in dense steps at the measured dense step time "
                      "(default 2 × --upcycle_at)")
  g.add_argument("--upcycle_dir", default=os.path.join("runs", "upcycle_compare"),
                 help="the arms' model_dirs go under it (dense/, upcycled/, moe_scratch/); "
                      "they must not exist yet (default runs/upcycle_compare)")
  g.add_argument("--upcycle_noise_std", type=float, default=0.0,
                 help="tools/upcycle.py's --noise_std for the expert copies (default 0)")
  p.add_argument("--format", choices=("json", "table"), default="table")
  p.add_argument("--out", default=None, help="also write the JSON report to this path")
  args = p.parse_args(argv)
  if args.steps_to_time < 1:
    p.error("--steps_to_time must be >= 1")
  if args.warmup_steps < 1:
    p.error("--warmup_steps must be >= 1 (the first call traces the step)")
  if not args.tokens_per_param > 0:
    p.error("--tokens_per_param must be > 0")
  if not args.moe_gin and not args.upcycle_moe_gin:
    p.error("give an MoE to compare: --moe_gin (one or more) and/or --upcycle_moe_gin")
  if args.upcycle_moe_gin:
    if args.upcycle_at is None:
      p.error("--upcycle_moe_gin needs --upcycle_at=N (dense steps before upcycling)")
    if args.upcycle_at < 1:
      p.error(f"--upcycle_at={args.upcycle_at} must be >= 1")
    if args.upcycle_budget_steps is None:
      args.upcycle_budget_steps = 2 * args.upcycle_at
    if args.upcycle_budget_steps <= args.upcycle_at:
      p.error(f"--upcycle_budget_steps={args.upcycle_budget_steps} must exceed --upcycle_at="
              f"{args.upcycle_at}")
    if not args.upcycle_noise_std >= 0:
      p.error(f"--upcycle_noise_std={args.upcycle_noise_std} must be >= 0")
    if os.path.exists(args.upcycle_dir) and os.listdir(args.upcycle_dir):
      p.error(f"--upcycle_dir={args.upcycle_dir} is not empty: the arms would resume old runs; "
              f"delete it or choose another")
  elif any(v is not None for v in (args.upcycle_at, args.upcycle_budget_steps)):
    p.error("--upcycle_at and --upcycle_budget_steps need --upcycle_moe_gin")
  args.gin_search_paths = args.gin_search_paths or ["."]
  return args




def split_files(spec: str) -> list[str]:
  files = [f.strip() for f in spec.split(",") if f.strip()]
  if not files:
    raise ValueError(f"empty gin spec {spec!r}")
  return files


def model_name(files: list[str], dense: bool) -> str:
  stems = "+".join(os.path.splitext(os.path.basename(f))[0] for f in files)
  return f"dense({stems})" if dense else stems


# --------------------------------------------------------------------------------------------
# Building one model from its gin config


def _train_values() -> dict:
  """The `train.*` values of the parsed config (the signature's default where unbound)."""
  import inspect
  import gin
  from m6t_tf.run import configurables
  from m6t_tf.run import training
  defaults = {k: p.default for k, p in inspect.signature(training.train).parameters.items()
              if p.default is not inspect.Parameter.empty}
  out = {}
  for name in ("train_data", "num_steps", "batch_size_per_worker", "max_len", "image_mode",
               "optimizer", "learning_rate", "warmup_steps", "lr_decay", "final_lr_fraction",
               "weight_decay", "beta_1", "beta_2", "epsilon", "clip_norm", "mixed_precision",
               "jit_compile", "seed", "global_batch_size"):
    value = configurables.query(f"train.{name}", defaults.get(name))
    if value is gin.REQUIRED or type(value).__name__ == "ConfigurableReference":
      value = defaults.get(name)   # %gin.REQUIRED and not needed to time a step
    out[name] = value
  return out


def _synthetic_batch(batch_size: int, max_len: int, image_mode: str):
  """A batch of the pipeline's shapes: 64×64 images (or 16×2048 features), 6-token captions."""
  import numpy as np
  import tensorflow as tf
  rng = np.random.default_rng(0)
  tokens = np.zeros((batch_size, max_len), np.int32)
  length = min(max_len, 8)
  tokens[:, 0] = 101                                              # [CLS]
  tokens[:, 1:length - 1] = rng.integers(670, 8000, (batch_size, length - 2))
  tokens[:, length - 1] = 102                                     # [SEP]
  batch = {"tokens": tf.constant(tokens)}
  if image_mode == "features":
    batch["patch_features"] = tf.constant(rng.normal(size=(batch_size, NUM_PATCHES, 2048))
                                          .astype(np.float32))
  else:
    batch["image"] = tf.constant(rng.integers(0, 256, (batch_size, 64, 64, 3), dtype=np.uint8))
  return batch


def _batch(values: dict, batch_size: int):
  """(one training batch of the config's data, "data" | "synthetic (...)")."""
  from m6t_tf.data import pipeline
  pattern = values["train_data"]
  if isinstance(pattern, str) and glob.glob(pattern):
    ds = pipeline.make_dataset(pattern, batch_size=batch_size, max_len=values["max_len"],
                               training=True, seed=values["seed"] or 0,
                               image_mode=values["image_mode"], shuffle_buffer=256)
    return next(iter(ds.take(1))), "data"
  return (_synthetic_batch(batch_size, values["max_len"], values["image_mode"]),
          f"synthetic (train.train_data={pattern!r} matches no file)")


def count_params(model) -> dict:
  total = embedding = 0
  for v in model.trainable_variables:
    n = int(math.prod(v.shape))
    total += n
    if any(name in v.path for name in EMBEDDING_NAMES):
      embedding += n
  return {"params_total": total, "params_embedding": embedding,
          "params_non_embedding": total - embedding}


def _activated_params(model) -> int:
  """Every non-expert parameter plus the k experts a token visits in each MoE layer."""
  expert_ids = set()
  out = 0
  for layer in model.moe_layers:
    for v in layer.experts.trainable_variables:
      expert_ids.add(id(v))
      out += int(math.prod(v.shape)) // layer.num_experts * layer.k
  return out + sum(int(math.prod(v.shape)) for v in model.trainable_variables
                   if id(v) not in expert_ids)


class Candidate:
  """One model ready to step: its Trainer, its batch and what the report says about it."""

  def __init__(self, name, files, bindings, dense, search_paths):
    self.name, self.files, self.bindings, self.dense = name, files, bindings, dense
    self.search_paths = search_paths
    self.times: list[float] = []

  def build(self) -> None:
    import gin
    import keras
    from m6t_tf.run import configurables
    from m6t_tf import optimizers
    from m6t_tf.run import trainer as trainer_lib
    gin.clear_config()
    configurables.parse(self.files, self.bindings, self.search_paths)
    values = _train_values()
    batch_size = values["batch_size_per_worker"]
    if values["global_batch_size"]:
      batch_size = values["global_batch_size"]      # one worker holds the global batch
    mixed = bool(values["mixed_precision"])
    # The policy is process-global: set it for this model, whatever the previous one used.
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    network = configurables.network_fn()(name="m6")
    self.batch, self.batch_source = _batch(values, batch_size)
    model = trainer_lib.build_model(batch=self.batch, mixed_precision=mixed, network=network)
    total_steps = values["num_steps"] if isinstance(values["num_steps"], int) else 0
    decay = values["lr_decay"] if total_steps > values["warmup_steps"] else "constant"
    schedule = optimizers.WarmupSchedule(values["learning_rate"], values["warmup_steps"],
                                         decay=decay, total_steps=total_steps,
                                         final_fraction=values["final_lr_fraction"])
    opt = optimizers.make_optimizer(values["optimizer"], schedule,
                                    weight_decay=values["weight_decay"], beta_1=values["beta_1"],
                                    beta_2=values["beta_2"], epsilon=values["epsilon"])
    self.trainer = trainer_lib.Trainer(model, opt, clip_norm=values["clip_norm"],
                                    mixed_precision=mixed, jit_compile=bool(values["jit_compile"]))
    self.tokens_per_step = batch_size * (NUM_PATCHES + values["max_len"] - 1)
    self.params = count_params(model)
    self.params["params_activated"] = _activated_params(model)
    layers = model.moe_layers
    self.moe = {"moe_layers": len([l for l in layers if l.expert_type == "ffn"]),
                "num_experts": layers[0].num_experts if layers else 0,
                "routing": layers[0].routing if layers else None,
                "k": layers[0].k if layers else 0,
                "capacity_mode": layers[0].capacity_mode if layers else None}
    gin.clear_config()

  def step(self) -> float:
    start = time.perf_counter()
    metrics = self.trainer.train_step(self.batch)
    float(metrics["loss"])                           # waits for the step's result
    return time.perf_counter() - start


def time_interleaved(cands: list[Candidate], rounds: int, warmup: int, log) -> None:
  for c in cands:
    for _ in range(warmup):
      c.step()
  for r in range(rounds):
    shift = r % len(cands)
    for c in cands[shift:] + cands[:shift]:
      c.times.append(c.step())
    if (r + 1) % 5 == 0 or r + 1 == rounds:
      log(f"  round {r + 1}/{rounds}")


# --------------------------------------------------------------------------------------------
# The budget arithmetic (pure: tested on its own)


def budget(*, dense_params: int, tokens_per_param: float, dense_tokens_per_step: int,
           dense_step_time_s: float) -> dict:
  tokens = tokens_per_param * dense_params
  steps = tokens / dense_tokens_per_step
  return {"budget_params": dense_params, "budget_tokens": tokens, "steps": steps,
          "budget_s": steps * dense_step_time_s}


def moe_at_budget(*, budget_s: float, dense_steps: float, dense_tokens: float,
                  dense_step_time_s: float, ratio: float, tokens_per_step: int) -> dict:
  step_time = dense_step_time_s * ratio
  steps = budget_s / step_time
  tokens = steps * tokens_per_step
  increase = (ratio - 1.0) * 100.0
  return {"step_time_ratio": ratio, "step_time_s": step_time,
          "step_time_increase_pct": increase,
          "within_20pct": bool(increase <= THEIR_MAX_INCREASE_PCT), "steps": steps,
          "tokens": tokens, "steps_vs_dense": steps / dense_steps,
          "tokens_vs_dense": tokens / dense_tokens}


def paired_ratio(times: list[float], base: list[float]) -> float:
  return statistics.median(a / b for a, b in zip(times, base))


def report(args, dense: Candidate, moes: list[Candidate], machine: dict, argv) -> dict:
  def common(c: Candidate) -> dict:
    return {"name": c.name, "gin_files": c.files, "gin_bindings": c.bindings,
            "batch_source": c.batch_source, **c.params, "tokens_per_step": c.tokens_per_step,
            "median_step_time_s": statistics.median(c.times), "times_s": c.times}

  dense_time = statistics.median(dense.times)
  n = dense.params["params_total" if args.param_count == "total" else "params_non_embedding"]
  b = budget(dense_params=n, tokens_per_param=args.tokens_per_param,
             dense_tokens_per_step=dense.tokens_per_step, dense_step_time_s=dense_time)
  dense_row = {**common(dense), "step_time_s": dense_time, **b}
  rows = []
  for c in moes:
    rows.append({**common(c), **c.moe, **moe_at_budget(
        budget_s=b["budget_s"], dense_steps=b["steps"], dense_tokens=b["budget_tokens"],
        dense_step_time_s=dense_time, ratio=paired_ratio(c.times, dense.times),
        tokens_per_step=c.tokens_per_step)})
  return {
      "schema_version": SCHEMA_VERSION, "tool": TOOL, "argv": list(argv), "machine": machine,
      "method": {
          "tokens_per_param": args.tokens_per_param, "param_count": args.param_count,
          "warmup_steps": args.warmup_steps, "steps_to_time": args.steps_to_time,
          "workers": 1,
          "tokens_definition": "positions computed per step: B × (16 patches + max_len − 1) × "
                               "workers (padding included), as the trainer's tokens_per_s",
          "step_time_definition": "Trainer.train_step, warm-up excluded; dense: median over "
                                  "rounds; MoE: dense × median over rounds of the paired "
                                  "ratio (models interleaved, order rotated each round)"},
      "dense": dense_row, "moe": rows}


# --------------------------------------------------------------------------------------------
# Upcycling at the same wall-clock budget (--upcycle_moe_gin)

ARMS = ("dense", "upcycled", "moe_scratch")
# The arms' runs evaluate once, at their end: periodic evaluation and caption decoding would
# only add wall time that no arm's step budget counts.
ARM_BINDINGS = ("train.eval_every = 0",)


def upcycle_budgets(*, upcycle_at: int, budget_steps: int, dense_step_time_s: float,
                    ratio: float) -> dict:
  """Steps of the three arms inside the wall-clock of `budget_steps` dense steps.

  Each arm gets the whole steps that fit (floor), its MoE steps costing `ratio` dense steps:
    budget_s     = budget_steps × dense step time
    dense        = budget_steps dense steps (upcycle_at of them before the upcycling point)
    upcycled     = upcycle_at dense steps + floor((budget_steps − upcycle_at) / ratio) MoE steps
    moe_scratch  = floor(budget_steps / ratio) MoE steps

  Args:
    upcycle_at: dense steps N before the upcycling.
    budget_steps: the budget S in dense steps (S > N).
    dense_step_time_s: the dense twin's measured step time.
    ratio: MoE step time / dense step time (the paired ratio of the timing rounds).

  Returns:
    {"budget_s", "moe_step_time_s", "arms": {arm: {"dense_steps", "moe_steps", "steps",
     "budget_used_s", "budget_fraction"}}}.

  Raises:
    ValueError: N < 1, S <= N, a ratio <= 0, or an upcycled arm left with no MoE step.
  """
  if upcycle_at < 1:
    raise ValueError(f"--upcycle_at={upcycle_at} must be >= 1 dense step")
  if budget_steps <= upcycle_at:
    raise ValueError(f"--upcycle_budget_steps={budget_steps} must exceed --upcycle_at="
                     f"{upcycle_at}: the budget must leave time after the upcycling")
  if not ratio > 0 or not dense_step_time_s > 0:
    raise ValueError(f"step times must be > 0 (dense {dense_step_time_s} s, ratio {ratio})")
  moe_time = dense_step_time_s * ratio
  budget_s = budget_steps * dense_step_time_s
  # The 1e-9 keeps a budget that is exactly k MoE steps from flooring to k − 1.
  fit = lambda dense_steps: math.floor((budget_steps - dense_steps) / ratio + 1e-9)
  steps = {"dense": (budget_steps, 0), "upcycled": (upcycle_at, fit(upcycle_at)),
           "moe_scratch": (0, fit(0))}
  if steps["upcycled"][1] < 1:
    raise ValueError(f"the MoE step is {ratio:.2f}× the dense one: {budget_steps - upcycle_at} "
                     f"dense steps after --upcycle_at={upcycle_at} fit no MoE step; raise "
                     f"--upcycle_budget_steps")
  arms = {}
  for arm, (d, m) in steps.items():
    used = d * dense_step_time_s + m * moe_time
    arms[arm] = {"dense_steps": d, "moe_steps": m, "steps": d + m, "budget_used_s": used,
                 "budget_fraction": used / budget_s}
  return {"budget_s": budget_s, "moe_step_time_s": moe_time, "arms": arms}


def window_mean(losses: list[float], end_step: int, window: int) -> float:
  """Mean of the losses of steps end_step − window + 1 … end_step (losses[0] is step 1)."""
  return statistics.fmean(losses[end_step - window:end_step])


def _set_float32_policy() -> None:
  import keras
  # The timing phase may leave mixed_float16 set process-wide; `training.train` sets it again
  # for a mixed-precision config.
  keras.mixed_precision.set_global_policy("float32")


def _run_arm(files, bindings, search_paths, model_dir, **overrides):
  """One `m6t_tf.train` invocation in this process; (summary, wall seconds)."""
  import contextlib
  import gin
  from m6t_tf.run import configurables
  _set_float32_policy()
  gin.clear_config()
  configurables.parse(files, bindings, search_paths)
  start = time.perf_counter()
  # The trainer's console lines go to stderr: stdout carries the report.
  with contextlib.redirect_stdout(sys.stderr):
    summary = configurables.run_train(model_dir=model_dir, **overrides)
  wall = time.perf_counter() - start
  summary.pop("model", None)
  gin.clear_config()
  return summary, wall


def checkpoint_log_perplexity(model_dir: str, search_paths) -> dict:
  """Validation log-perplexity of `model_dir`'s latest checkpoint, evaluated as the trainer's
  final evaluation does (its `config.gin`: eval data, batch size, `train.eval_batches`)."""
  import gin
  from m6t_tf.run import checkpointing
  from m6t_tf.run import configurables
  from m6t_tf.run import config as config_lib
  from m6t_tf.run import evaluation
  from m6t_tf.run import inputs
  from m6t_tf.run import trainer as trainer_lib
  from m6t_tf.parallel import context as context_lib
  _set_float32_policy()
  gin.clear_config()
  configurables.parse([os.path.join(model_dir, "config.gin")], [], search_paths)
  q = lambda name: configurables.query(f"train.{name}")
  ctx = context_lib.LocalContext()
  batch_size = config_lib.per_worker_batch(q("batch_size_per_worker"), q("global_batch_size") or 0,
                                         1)
  dataset = inputs.eval_stream(q("eval_data"), batch_size=batch_size,
                                       max_len=q("max_len"), image_mode=q("image_mode"), ctx=ctx)
  model = trainer_lib.build_model(configurables.network_fn(), batch=next(iter(dataset.take(1))))
  num_experts = model.moe_layers[0].num_experts if model.moe_layers else 0
  checkpointer = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"),
                                            trainer_lib.variables_by_path(model), ctx=ctx,
                                            num_experts=num_experts)
  path = checkpointer.latest()
  checkpointer.restore(path)
  trainer = trainer_lib.Trainer(model, evaluation._NoOpt(), ctx=ctx)
  out = trainer_lib.evaluate_perplexity(trainer, dataset, q("eval_batches") or None)
  gin.clear_config()
  return {"checkpoint": path, "log_perplexity": out["log_perplexity"],
          "perplexity": out["perplexity"], "batches": out["batches"]}


def run_upcycle(args, dense: Candidate, target: Candidate, log) -> dict:
  """The three arms of --upcycle_moe_gin (module docstring); returns the report's "upcycle"."""
  import inspect
  from m6t_tf.run import training
  here = os.path.dirname(os.path.abspath(__file__))
  if here not in sys.path:
    sys.path.insert(0, here)
  import upcycle as upcycle_lib  # tools/upcycle.py, beside this file
  dense_time = statistics.median(dense.times)
  ratio = paired_ratio(target.times, dense.times)
  plan = upcycle_budgets(upcycle_at=args.upcycle_at, budget_steps=args.upcycle_budget_steps,
                         dense_step_time_s=dense_time, ratio=ratio)
  steps = {arm: plan["arms"][arm]["steps"] for arm in ARMS}
  dirs = {arm: os.path.join(args.upcycle_dir, arm) for arm in ARMS}
  common = list(args.gin_bindings) + list(ARM_BINDINGS)
  if "eval_captions" in inspect.signature(training.train).parameters:
    common.append("train.eval_captions = 0")
  dense_bindings = common + [DENSE_BINDING, f"train.num_steps = {steps['dense']}"]
  sp = args.gin_search_paths
  n = args.upcycle_at
  log(f"upcycling run in {args.upcycle_dir}: budget {args.upcycle_budget_steps} dense steps = "
      f"{plan['budget_s']:.1f} s; MoE step {ratio:.3f}× dense; steps {steps}")

  log(f"[dense] steps 0→{n}")
  first, wall_a = _run_arm(dense.files, dense_bindings, sp, dirs["dense"], stop_after=n)
  dense_at_n = checkpoint_log_perplexity(dirs["dense"], sp)
  log(f"[upcycle] {dense_at_n['checkpoint']} → {dirs['upcycled']}")
  _set_float32_policy()
  start = time.perf_counter()
  made = upcycle_lib.upcycle(
      dense_model_dir=dirs["dense"], moe_gin=[",".join(target.files)],
      gin_bindings=common + [f"train.num_steps = {plan['arms']['upcycled']['moe_steps']}"],
      model_dir=dirs["upcycled"], noise_std=args.upcycle_noise_std, search_paths=sp)
  upcycle_s = time.perf_counter() - start
  upcycled_at_0 = checkpoint_log_perplexity(dirs["upcycled"], sp)
  log(f"[dense] steps {n}→{steps['dense']}")
  rest, wall_b = _run_arm(dense.files, dense_bindings, sp, dirs["dense"])
  runs = {"dense": (first["losses"] + rest["losses"], rest["eval"], wall_a + wall_b)}
  log(f"[upcycled] MoE steps 0→{plan['arms']['upcycled']['moe_steps']}")
  up, wall = _run_arm([os.path.join(dirs["upcycled"], "config.gin")], [], sp, dirs["upcycled"])
  runs["upcycled"] = (first["losses"] + up["losses"], up["eval"], wall_a + wall)
  log(f"[moe_scratch] MoE steps 0→{steps['moe_scratch']}")
  scratch, wall = _run_arm(target.files, common + [f"train.num_steps = {steps['moe_scratch']}"],
                           sp, dirs["moe_scratch"])
  runs["moe_scratch"] = (scratch["losses"], scratch["eval"], wall)

  equal_step = min(steps.values())
  window = max(1, min(20, equal_step // 10))
  arms = []
  for arm in ARMS:
    losses, evaluation, wall = runs[arm]
    if len(losses) != steps[arm]:
      raise RuntimeError(f"the {arm} arm logged {len(losses)} losses for {steps[arm]} steps")
    a = plan["arms"][arm]
    arms.append({
        "arm": arm, "name": dense.name if arm == "dense" else target.name,
        "model_dir": dirs[arm], **a,
        "tokens": (a["dense_steps"] * dense.tokens_per_step
                   + a["moe_steps"] * target.tokens_per_step),
        "train_wall_s": wall, "final_loss": losses[-1],
        "train_loss_at_equal_steps": window_mean(losses, equal_step, window),
        "val_log_perplexity": evaluation["log_perplexity"],
        "val_perplexity": evaluation["perplexity"], "losses": losses})
  up_losses = runs["upcycled"][0]
  return {
      "moe_gin_files": target.files, "moe_name": target.name, "upcycle_at": n,
      "budget_dense_steps": args.upcycle_budget_steps, "budget_s": plan["budget_s"],
      "dense_step_time_s": dense_time, "moe_step_time_s": plan["moe_step_time_s"],
      "step_time_ratio": ratio, "noise_std": args.upcycle_noise_std, "upcycle_s": upcycle_s,
      "upcycled_experts": made["num_experts"], "upcycled_moe_layers": made["moe_layers"],
      "rule": "fixed step counts: each arm gets floor(remaining budget / its measured step "
              "time) steps (dense and MoE step times of the timing rounds); the conversion "
              "(upcycle_s), model builds, tracing, checkpoints and evaluations are not charged",
      "start": {"dense_val_log_perplexity_at_upcycle": dense_at_n["log_perplexity"],
                "upcycled_val_log_perplexity_at_0": upcycled_at_0["log_perplexity"],
                "dense_checkpoint": dense_at_n["checkpoint"],
                "dense_loss_at_upcycle": up_losses[n - 1],
                "dense_loss_next_step": runs["dense"][0][n],
                "upcycled_first_loss": up_losses[n]},
      "equal_steps": {"step": equal_step, "window": window,
                      "definition": "mean training loss of the steps (dense steps included) "
                                    "ending at this one; dropout on, each arm's own batches"},
      "arms": arms}


def upcycle_table(u: dict) -> list[str]:
  s, e = u["start"], u["equal_steps"]
  lines = [
      "", f"Upcycling at the same wall-clock budget: {u['budget_dense_steps']} dense steps × "
      f"{u['dense_step_time_s'] * 1e3:.1f} ms = {u['budget_s']:.1f} s; the MoE "
      f"({u['moe_name']}) step is {u['step_time_ratio']:.3f}× the dense one "
      f"({u['moe_step_time_s'] * 1e3:.1f} ms). Rule: each arm runs the whole steps that fit "
      f"the budget at the measured step times (not stopped by a clock); the conversion "
      f"({u['upcycle_s']:.1f} s), builds and evaluations are not charged. Upcycled at dense "
      f"step {u['upcycle_at']}: validation log-ppl {s['dense_val_log_perplexity_at_upcycle']:.4f}"
      f" (dense) → {s['upcycled_val_log_perplexity_at_0']:.4f} (upcycled, before its first "
      f"step); its first training loss {s['upcycled_first_loss']:.4f} vs the dense arm's "
      f"{s['dense_loss_next_step']:.4f} at step {u['upcycle_at'] + 1} (another batch).", "",
      f"| arm | dense + MoE steps | budget used | train wall s | train loss @ step "
      f"{e['step']} (mean of {e['window']}) | final train loss | val log-ppl | val ppl |",
      "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for a in u["arms"]:
    lines.append(
        f"| {a['arm']} ({a['name']}) | {a['dense_steps']} + {a['moe_steps']} | "
        f"{a['budget_fraction'] * 100:.1f}% | {a['train_wall_s']:.1f} | "
        f"{a['train_loss_at_equal_steps']:.4f} | {a['final_loss']:.4f} | "
        f"{a['val_log_perplexity']:.4f} | {a['val_perplexity']:.2f} |")
  return lines


# --------------------------------------------------------------------------------------------
# Output


def _si(x: float) -> str:
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.2f}{unit}"
  return f"{x:.0f}"


def table(r: dict) -> str:
  d, m = r["dense"], r["method"]
  lines = [
      f"`python {r['tool']} {' '.join(shlex.quote(a) for a in r['argv'])}`", "",
      f"Dense twin {d['name']}: {d['params_total']:,} parameters "
      f"({d['params_non_embedding']:,} non-embedding); the budget uses "
      f"{m['param_count']} = {d['budget_params']:,} × {m['tokens_per_param']:g} tokens/param "
      f"= {_si(d['budget_tokens'])} tokens = {d['steps']:,.0f} dense steps of "
      f"{d['tokens_per_step']:,} tokens × {d['step_time_s'] * 1e3:.1f} ms = "
      f"{d['budget_s'] / 3600:,.2f} h on this machine.",
      f"Step times: Trainer.train_step, {m['steps_to_time']} interleaved rounds after "
      f"{m['warmup_steps']} warm-up steps; MoE time = dense median × median paired ratio. "
      f"One process (no all-to-all). Machine: {r['machine']['nproc']} × "
      f"{r['machine']['cpu_model']}, load {r['machine']['loadavg_start'][0]:.2f}.",
      "",
      "| model | params | activated | ms/step | vs dense | steps in budget | tokens in budget "
      "| tokens vs dense |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
      f"| {d['name']} | {_si(d['params_total'])} | {_si(d['params_activated'])} | "
      f"{d['step_time_s'] * 1e3:.1f} | — | {d['steps']:,.0f} | {_si(d['budget_tokens'])} "
      f"| 1.00 |"]
  for row in r["moe"]:
    flag = "" if row["within_20pct"] else " (> 20%)"
    lines.append(
        f"| {row['name']} | {_si(row['params_total'])} | {_si(row['params_activated'])} | "
        f"{row['step_time_s'] * 1e3:.1f} | {row['step_time_increase_pct']:+.1f}%{flag} | "
        f"{row['steps']:,.0f} | {_si(row['tokens'])} | {row['tokens_vs_dense']:.2f} |")
  if "upcycle" in r:
    lines += upcycle_table(r["upcycle"])
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  import tensorflow as tf
  # Each model has its own Trainer and tf.functions; TF would call that "retracing".
  tf.get_logger().setLevel("ERROR")
  try:
    dense_files = split_files(args.dense_gin)
    dense = Candidate(model_name(dense_files, True), dense_files,
                      list(args.gin_bindings) + [DENSE_BINDING], True, args.gin_search_paths)
    moes = []
    for spec in args.moe_gin:
      files = split_files(spec)
      moes.append(Candidate(model_name(files, False), files, list(args.gin_bindings), False,
                            args.gin_search_paths))
    target = None
    if args.upcycle_moe_gin:
      # The upcycling target is timed with the others (and so gets its own row below).
      files = split_files(args.upcycle_moe_gin)
      target = next((c for c in moes if c.files == files), None)
      if target is None:
        target = Candidate(model_name(files, False), files, list(args.gin_bindings), False,
                           args.gin_search_paths)
        moes.append(target)
    machine = machine_info()
    for c in [dense] + moes:
      log(f"building {c.name}")
      c.build()
      if not c.dense and not c.moe["moe_layers"]:
        raise ValueError(f"--moe_gin={','.join(c.files)} builds no MoE layer "
                         f"(M6Transformer.moe_placement is 'none'?)")
  except (ValueError, OSError) as e:
    # Building the models from their gin configs: an error here is the configs'.
    raise errors.ConfigError(errors.one_line(e)) from e
  log(f"timing {1 + len(moes)} models: {args.warmup_steps} warm-up + {args.steps_to_time} rounds")
  time_interleaved([dense] + moes, args.steps_to_time, args.warmup_steps, log)
  for c in [dense] + moes:
    c.trainer = c.batch = None                     # the arms build their own
  upcycle_result = None
  if target is not None:
    try:
      upcycle_result = run_upcycle(args, dense, target, log)
    except ValueError as e:
      raise errors.ConfigError(errors.one_line(e)) from e
  machine["loadavg_end"] = list(os.getloadavg())
  result = report(args, dense, moes, machine, argv)
  if upcycle_result is not None:
    result["upcycle"] = upcycle_result
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1) if args.format == "json" else table(result))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
