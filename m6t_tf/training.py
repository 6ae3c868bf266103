"""The custom training loop: one `tf.function` step, dynamic loss scaling, checkpoints, logging.

`train(*, ...)` is keyword-only and configured by gin (`train.*` in gin/base.gin); the entry
point is `python -m m6t_tf.train`. The same step runs on one process and under Horovod: every
cross-worker operation goes through the context (`m6t_tf.parallel.context`).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from m6t_tf import checkpointing
from m6t_tf import cli
from m6t_tf import optimizers
from m6t_tf import storage
from m6t_tf.cli import ConfigError
from m6t_tf.models import m6_captioner
from m6t_tf.networks import m6_transformer
from m6t_tf.parallel import context as context_lib
from m6t_tf.parallel import watchdog as watchdog_lib

IMAGE_MODES = ("pixels", "features")


def check_model_dir(model_dir: str) -> None:
  """Fails at start-up, not at the first checkpoint, when `model_dir` cannot be written (on
  any TensorFlow filesystem: `storage.check_writable`)."""
  try:
    storage.check_writable(model_dir)
  except (OSError, tf.errors.OpError) as e:
    why = e.strerror if isinstance(e, OSError) and e.strerror else cli.one_line(e)
    if isinstance(e, tf.errors.UnimplementedError):
      why += "; s3://, hdfs:// and az:// need the tensorflow-io package (gs:// is built in)"
    raise ConfigError(f"model_dir={model_dir!r} is not writable ({why}); choose another "
                      f"--model_dir or free space there") from e


def build_model(network_fn=None, *, batch, mixed_precision: bool = False, network=None):
  """Builds the captioner (its network from gin) and creates its weights on `batch`."""
  if mixed_precision:
    keras.mixed_precision.set_global_policy("mixed_float16")
  if network is None:
    network = (network_fn or m6_transformer.M6Transformer)(name="m6")
  model = m6_captioner.M6Captioner(network=network)
  model.build_from_batch(batch)
  return model


class LossScale:
  """Dynamic loss scaling for mixed_float16 and for FP16 gradient communication (which sends
  the scaled gradients): ×2 after `period` finite steps, ÷2 on overflow.

  Overflowed steps are skipped on every worker (the finite flag is reduced over all of them)
  and counted in `skipped`.
  """

  def __init__(self, enabled: bool, initial: float = 2.0 ** 15, period: int = 2000):
    self.enabled = enabled
    self.period = period
    self.scale = tf.Variable(initial if enabled else 1.0, trainable=False, dtype=tf.float32,
                             name="loss_scale")
    self.good_steps = tf.Variable(0, trainable=False, dtype=tf.int64, name="good_steps")
    self.skipped = tf.Variable(0, trainable=False, dtype=tf.int64, name="skipped_steps")

  def update(self, finite):
    if not self.enabled:
      self.skipped.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
      return
    grow = tf.logical_and(finite, self.good_steps + 1 >= self.period)
    self.scale.assign(tf.where(grow, self.scale * 2.0,
                               tf.where(finite, self.scale, tf.maximum(self.scale / 2.0, 1.0))))
    self.good_steps.assign(tf.where(tf.logical_and(finite, tf.logical_not(grow)),
                                    self.good_steps + 1, 0))
    self.skipped.assign_add(tf.cast(tf.logical_not(finite), tf.int64))


class Trainer:
  """Owns the model, optimiser, step functions and checkpoint of one run."""

  def __init__(self, model, optimizer, *, ctx=None, clip_norm: float = 0.0,
               mixed_precision: bool = False, jit_compile: bool = False,
               skip_nonfinite: Optional[bool] = None, remat="none"):
    """See the class. `remat`: what the network recomputes in the backward pass instead of
    storing ("none" | "block" | "attention" | "experts" | a list of block names;
    `M6Transformer.set_remat`)."""
    self.model = model
    network = getattr(model, "network", None)
    if network is not None and hasattr(network, "set_remat"):
      network.set_remat(remat)
    elif remat != "none":
      raise ValueError(f"remat={remat!r} needs an M6Transformer network; this model has none")
    self.remat = remat
    self.optimizer = optimizer
    self.ctx = ctx or context_lib.LocalContext()
    self.clip_norm = clip_norm
    # FP16 gradient communication sends loss-scaled gradients (`reduce_gradients`), so it needs
    # the dynamic loss scale even when the compute is float32.
    fp16_wire = getattr(self.ctx, "gradient_compression", "none") == "fp16" and self.ctx.size > 1
    self.loss_scale = LossScale(mixed_precision or fp16_wire)
    # Without loss scaling, a non-finite step is a bug to stop on, not an overflow to skip.
    self.skip_nonfinite = self.loss_scale.enabled if skip_nonfinite is None else skip_nonfinite
    self.variables = model.trainable_variables
    self.rng_states = [v for v in model.variables if context_lib.is_rng_state(v)]
    self.optimizer.build(self.variables)
    # The steps use explicit tf.cond and Python loops over variables: no AutoGraph needed.
    self.train_step = tf.function(tf.autograph.experimental.do_not_convert(self._train_step),
                                  jit_compile=jit_compile)
    self.eval_step = tf.function(tf.autograph.experimental.do_not_convert(self._eval_step),
                                 jit_compile=jit_compile)

  def reseed(self, seed: int, step: int) -> None:
    """Sets every dropout RNG state to a function of (seed, worker rank, layer, step).

    Dropout then differs between workers and steps, yet a resumed run (on any worker count)
    draws exactly the masks it would have drawn, with no RNG state in the checkpoint.
    """
    for i, v in enumerate(self.rng_states):
      v.assign(np.array([seed * 7919 + self.ctx.rank * 104729 + i, step * 4096], np.int64)
               .astype(v.dtype))

  def compute_gradients(self, batch):
    """Forward, backward and cross-worker reduction of one step; changes no weight.

    The objective is the mean NLL over every worker's target tokens, Σ nll / N_global (plus the
    MoE losses), so W workers with B examples each equal one worker with W·B: each worker
    scales its sum by W / N_global, and `ctx.reduce_gradients` averages dense gradients over
    the W workers and divides the replica sum of expert gradients by W.

    Args:
      batch: this worker's batch.

    Returns:
      (grads, metrics): `grads` parallel to `self.variables`, float32, unscaled and reduced
      (None where a variable gets no gradient): what the optimiser receives, before clipping.
      Dense ones are the same on every worker; expert ones on every worker of a replica group.
      `metrics`: the model's, plus "loss" (the global mean NLL), "grad_norm" (of the whole
      sharded model) and "finite" (<bool>, the same on every worker).
    """
    with tf.GradientTape() as tape:
      _, metrics = self.model.losses_and_metrics(batch, training=True)
      n_global = self.ctx.sum_over_world(metrics["num_tokens"])
      w = tf.cast(self.ctx.size, tf.float32)
      loss = metrics["nll_sum"] * tf.math.divide_no_nan(w, n_global) + metrics["moe_loss"]
      scaled = loss * self.loss_scale.scale
    grads = tape.gradient(scaled, self.variables)
    # Unscaled after the reduction when gradients travel in float16 (FP16 communication), so
    # that the loss scale keeps them out of float16's subnormal range on the wire.
    grads = [None if g is None else tf.cast(g, tf.float32) for g in grads]
    grads = self.ctx.reduce_gradients(grads, self.variables, loss_scale=self.loss_scale.scale)
    norm = context_lib.global_norm(grads, self.variables, self.ctx)
    finite = self.ctx.all_finite(tf.math.is_finite(norm))
    metrics = dict(metrics)
    metrics["loss"] = tf.math.divide_no_nan(self.ctx.sum_over_world(metrics["nll_sum"]), n_global)
    metrics.update(grad_norm=norm, finite=finite)
    return grads, metrics

  def apply_gradients(self, grads, metrics) -> None:
    """Clips `grads` (from `compute_gradients`) to `clip_norm`, applies them unless the step
    was not finite (on every worker alike), and updates the loss scale."""
    norm, finite = metrics["grad_norm"], metrics["finite"]
    if self.clip_norm > 0:
      factor = self.clip_norm / tf.maximum(norm, self.clip_norm)
      grads = [None if g is None else g * factor for g in grads]
    pairs = [(g, v) for g, v in zip(grads, self.variables) if g is not None]

    def apply():
      self.optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
      return tf.constant(True)

    tf.cond(finite, apply, lambda: tf.constant(False))
    self.loss_scale.update(finite)

  def _train_step(self, batch):
    grads, metrics = self.compute_gradients(batch)
    # The rate this step applies: read before the update advances the optimiser's iterations
    # (read after, the log showed the next step's rate).
    lr = tf.cast(self.optimizer.learning_rate, tf.float32)
    self.apply_gradients(grads, metrics)
    # Routers with state (none yet) update it from the loads summed over all workers.
    for layer in getattr(self.model, "moe_layers", ()):
      layer.after_step(self.ctx.sum_over_world, metrics["finite"])
    metrics.update(finite=tf.cast(metrics["finite"], tf.float32), learning_rate=lr)
    return metrics

  def _eval_step(self, batch):
    _, metrics = self.model.losses_and_metrics(batch, training=False)
    return metrics

  def moe_stats(self) -> dict:
    """Per-MoE-layer routing statistics of the last step, for logging (numpy)."""
    out = {}
    for i, layer in enumerate(self.model.moe_layers):
      name = layer.path.split("/", 1)[-1] if hasattr(layer, "path") else f"moe_{i}"
      tokens = self.ctx.sum_over_expert_group(
          tf.cast(layer.stats["tokens_per_expert"], tf.float32)).numpy()
      mean = tokens.mean()
      out[f"{name}/load_cv"] = float(tokens.std() / mean) if mean > 0 else 0.0
      # The busiest expert against the mean: what a dropless layer's memory grows with.
      out[f"{name}/max_over_mean_load"] = float(tokens.max() / mean) if mean > 0 else 0.0
      out[f"{name}/dropped_fraction"] = float(layer.stats["dropped_fraction"].numpy())
      out[f"{name}/aux_loss"] = float(layer.stats["aux_loss"].numpy())
      out[f"{name}/z_loss"] = float(layer.stats["z_loss"].numpy())
      alltoall = layer.alltoall_bytes_per_step()
      if alltoall is not None:
        out[f"{name}/alltoall_bytes_per_step"] = alltoall
    return out


def dropless_warnings(model, stats: dict) -> list[str]:
  """One line per dropless MoE layer whose `max_tokens_per_expert_factor` ceiling dropped
  token choices in the last step (`stats` from `Trainer.moe_stats`)."""
  lines = []
  for i, layer in enumerate(model.moe_layers):
    name = layer.path.split("/", 1)[-1] if hasattr(layer, "path") else f"moe_{i}"
    line = layer.ceiling_warning(name, stats.get(f"{name}/dropped_fraction", 0.0),
                                 stats.get(f"{name}/max_over_mean_load", 0.0))
    if line is not None:
      lines.append(line)
  return lines


def variables_by_path(model, optimizer=None) -> dict:
  """Every variable of the run keyed by its Keras path, for `tf.train.Checkpoint`.

  Keras 3 layers are not tracked as a tf.train object graph (only a layer's own weights are),
  so checkpoints name variables by path instead: stable across processes and worker counts,
  and readable with `tf.train.load_checkpoint`.
  """
  out = {}
  for prefix, variables in (("model", model.variables),
                            ("optimizer", optimizer.variables if optimizer is not None else [])):
    for v in variables:
      if context_lib.is_rng_state(v):
        continue  # derived from (seed, rank, step) by `Trainer.reseed`, never stored
      key = f"{prefix}/{v.path}"
      if key in out:
        raise ValueError(f"two variables share the checkpoint key {key!r}; name the layers")
      out[key] = v
  return out


def check_free_space(model_dir: str, entries: dict, keep: int) -> None:
  """Fails at start-up when `model_dir` cannot hold the checkpoints the run will keep (a local
  disk only: remote storage reports no free space)."""
  import shutil
  if not storage.is_local(model_dir):
    return
  need = sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in entries.values())
  free = shutil.disk_usage(model_dir).free
  # keep + 1: a new checkpoint is complete before the oldest is deleted.
  if free < need * (keep + 1):
    raise ConfigError(f"model_dir={model_dir!r} has {free / 2**20:,.0f} MiB free, but "
                      f"{keep + 1} checkpoints of {need / 2**20:,.0f} MiB (this worker's share) "
                      f"need {need * (keep + 1) / 2**20:,.0f} MiB; free space or lower "
                      f"train.keep_checkpoints")


class LossLog:
  """Appends `{"step", "loss"}` lines to `losses.jsonl`; a restarted run appends again.

  The last line of a step wins, so the log of a run killed and resumed reads like the log of a
  run that was never interrupted (`read_loss_log`).
  """

  def __init__(self, path: str):
    self.path = path

  def write(self, step: int, loss: float) -> None:
    storage.append_text(self.path, json.dumps({"step": step, "loss": loss}) + "\n")


def read_loss_log(path: str) -> dict:
  """{step: loss} from `losses.jsonl`, later lines overriding earlier ones; a torn last line
  (the process was killed while writing it) is ignored."""
  out = {}
  if not storage.exists(path):
    return out
  with tf.io.gfile.GFile(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      out[int(row["step"])] = float(row["loss"])
  return out


class FaultInjection:
  """Test hook: `M6T_FAULT_INJECT="kind:step[:rank]"`, comma-separated, never set in real runs.

  kinds: `kill_in_save` (SIGKILL after this worker wrote its checkpoint shard, before the merge
  that would publish it), `kill_before_prune` (SIGKILL after `latest` names the new checkpoint,
  before older ones are pruned), `kill_after_step` (SIGKILL after the step), `nan_weight` (set the
  first expert weight to NaN before the step, to exercise the non-finite path), `stall` (sleep
  `M6T_FAULT_STALL_SECONDS`, default 3600, before the step's collectives: a rank that stalls),
  and `stall_in:<phase>:step[:rank]`, the same sleep where a phase of that step waits on
  storage: `input` (reading the step's batch), `save` (after writing this worker's checkpoint
  shard), `restore` (before reading the checkpoint of that step), `eval` (the evaluation at that
  step), `captions` (writing the caption samples decoded at that step).
  """

  KINDS = ("kill_in_save", "kill_before_prune", "kill_after_step", "nan_weight", "stall")
  STALL_PHASES = ("input", "save", "restore", "eval", "captions")

  def __init__(self, spec: str):
    self.faults = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
      parts = item.split(":")
      if parts[0] == "stall_in" and len(parts) > 1 and parts[1] in self.STALL_PHASES:
        parts = [f"stall_in:{parts[1]}"] + parts[2:]
      elif parts[0] not in self.KINDS:
        parts = []
      if len(parts) not in (2, 3):
        raise ValueError(f"M6T_FAULT_INJECT item {item!r}: expected kind:step[:rank] (kinds "
                         f"{self.KINDS}) or stall_in:<phase>:step[:rank] (phases "
                         f"{self.STALL_PHASES})")
      self.faults.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None))
    self.rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))

  @classmethod
  def from_env(cls) -> "FaultInjection":
    return cls(os.environ.get("M6T_FAULT_INJECT", ""))

  def _due(self, kind: str, step: int) -> bool:
    return any(k == kind and s == step and r in (None, self.rank) for k, s, r in self.faults)

  def maybe_kill(self, kind: str, step: int) -> None:
    if self._due(kind, step):
      import signal
      os.kill(os.getpid(), signal.SIGKILL)

  def maybe_stall(self, step: int) -> None:
    if self._due("stall", step):
      self._sleep(float(os.environ.get("M6T_FAULT_STALL_SECONDS", "3600")))

  def maybe_stall_in(self, phase: str, step: int) -> None:
    if self._due(f"stall_in:{phase}", step):
      self._sleep(float(os.environ.get("M6T_FAULT_STALL_SECONDS", "3600")))

  #: How a stall waits (tests may end it once the watchdog reported it).
  _sleep = staticmethod(time.sleep)

  def maybe_corrupt(self, step: int, model) -> None:
    if self._due("nan_weight", step):
      for layer in model.moe_layers:
        layer.experts.wi.assign(tf.fill(layer.experts.wi.shape, float("nan")))
        return


def first_nonfinite_layer(model, batch) -> str:
  """Runs `batch` through the model eagerly, recording each block's outputs; returns the name
  of the first non-finite one (or says that every output was finite: then the gradients were)."""
  probe = model.network.start_probe()
  try:
    model(batch, training=False)
  finally:
    model.network.stop_probe()
  for name, value in probe:
    if not bool(tf.reduce_all(tf.math.is_finite(tf.cast(value, tf.float32)))):
      return name
  return "none (every layer output was finite: the gradients overflowed)"


def evaluate_perplexity(trainer: Trainer, dataset, max_batches: Optional[int] = None, *,
                        watchdog=None) -> dict:
  """Teacher-forced perplexity over `dataset`: exp(Σ NLL / Σ target tokens), padding excluded.

  `watchdog`: a `StallWatchdog` in the caller's phase, told when this worker reads a batch
  (storage) and when it runs the batch's step (collectives); each batch is progress.
  """
  watchdog = watchdog or watchdog_lib.OFF
  nll_sum, count, batches = 0.0, 0.0, 0
  iterator = iter(dataset)
  while True:
    watchdog.enter(watchdog_lib.STORAGE)
    batch = next(iterator, None)
    if batch is None:
      break
    watchdog.enter(watchdog_lib.COLLECTIVES)
    out = trainer.eval_step(batch)
    m = {k: trainer.ctx.sum_over_world(out[k]) for k in ("nll_sum", "num_tokens")}
    nll_sum += float(m["nll_sum"])
    count += float(m["num_tokens"])
    batches += 1
    if max_batches and batches >= max_batches:
      break
  if count == 0:
    raise ValueError("evaluation saw no target tokens; is the validation split empty?")
  log_ppl = nll_sum / count
  return {"log_perplexity": log_ppl, "perplexity": math.exp(log_ppl), "tokens": int(count),
          "batches": batches}


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """One console line per `every` steps: step, loss, perplexity, lr, tokens/s, ETA."""

  def __init__(self, total: int, start: int, every: int, enabled: bool):
    self.total, self.every, self.enabled = total, every, enabled
    self.t0 = time.time()
    self.start = start

  def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
    if not self.enabled or (step % self.every and step != self.total):
      return
    done = step - self.start
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else 0.0
    bar_len = 20
    filled = int(bar_len * step / max(self.total, 1))
    line = (f"[{'#' * filled}{'.' * (bar_len - filled)}] step {step}/{self.total} | "
            f"loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.1f} | lr {lr:.2e} | "
            f"{tokens_per_s:,.0f} tok/s | ETA {format_duration(eta)}")
    print(line, flush=True)


def write_json(path: str, payload: dict) -> None:
  """Atomic JSON write (`storage.write_whole`): a crash never leaves half a file."""
  storage.write_whole(path, json.dumps(payload, indent=2, sort_keys=True))


def set_seeds(seed: int, deterministic: bool, rank: int = 0) -> None:
  """Seeds weight initialisation per worker and TensorFlow's global seed alike on all workers.

  Python's and NumPy's generators (which Keras initialisers draw from) get `seed + rank`, so
  each worker draws its own experts. TensorFlow's global seed, which every seeded
  `Dataset.shuffle` mixes in, gets `seed` on every worker: data order is a function of
  (seed, epoch) only, never of the rank. (Dropout has its own per-worker state, `reseed`.)
  """
  keras.utils.set_random_seed(seed + rank)
  tf.random.set_seed(seed)
  if deterministic:
    tf.config.experimental.enable_op_determinism()


def summary_scalars(writer, step: int, scalars: dict) -> None:
  if writer is None:
    return
  with writer.as_default(step=step):
    for k, v in scalars.items():
      tf.summary.scalar(k, v)


def numpy_metrics(metrics: dict) -> dict:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def per_worker_batch(batch_size_per_worker: int, global_batch_size: int, num_workers: int) -> int:
  """B: `train.global_batch_size / workers` when the global batch is set, else the per-worker
  batch. The evaluator uses it too: capacity, and so perplexity, depends on B."""
  if not global_batch_size:
    return batch_size_per_worker
  if global_batch_size % num_workers:
    raise ConfigError(f"train.global_batch_size={global_batch_size} is not divisible by the "
                      f"{num_workers} workers; use a multiple of {num_workers}")
  return global_batch_size // num_workers


def train_stream(train_data, *, ctx, seed: int, batch_size: int, max_len: int, image_mode: str,
                 shuffle_buffer: int, skip_batches: int = 0, on_bad_record: str = "skip",
                 counter=None, include_keys: bool = False):
  """This worker's training batches: its shard of `train_data` in the order of (seed, epoch).

  With `include_keys`, batches also carry "key" (<string>[B], each record's key).
  """
  from m6t_tf.data import pipeline  # local: keeps `import m6t_tf.training` light for tools
  shard, shards = ctx.data_shard()
  ds = pipeline.make_dataset(train_data, batch_size=batch_size, max_len=max_len, training=True,
                             seed=seed, shard_index=shard, num_shards=shards,
                             image_mode=image_mode, shuffle_buffer=shuffle_buffer,
                             skip_batches=skip_batches, on_bad_record=on_bad_record,
                             bad_record_counter=counter, include_text=include_keys)
  if include_keys:
    ds = ds.map(lambda b: {k: v for k, v in b.items() if k != "caption"})
  return ds


class DataKeyLog:
  """Appends `{"step", "keys"}` lines to `data_keys/rank<R>.jsonl`: the records each step of
  this worker trained on (`train.log_data_keys`), to audit sharding and resumption."""

  def __init__(self, model_dir: str, rank: int):
    folder = os.path.join(model_dir, "data_keys")
    storage.makedirs(folder)
    self.path = os.path.join(folder, f"rank{rank}.jsonl")

  def write(self, step: int, keys) -> None:
    storage.append_text(self.path, json.dumps(
        {"step": step, "keys": [k.decode("utf-8") for k in keys]}) + "\n")


def _batches_for_eval(eval_data, *, batch_size, max_len, image_mode, ctx):
  from m6t_tf.data import pipeline  # local: keeps `import m6t_tf.training` light for tools
  shard, shards = ctx.data_shard()
  n = pipeline.eval_num_batches(eval_data, batch_size=batch_size, num_shards=shards)
  return pipeline.make_dataset(eval_data, batch_size=batch_size, max_len=max_len, training=False,
                               shard_index=shard, num_shards=shards, image_mode=image_mode,
                               repeat=False, drop_remainder=False, num_batches=n)


class CaptionSamples:
  """Greedy captions of a few validation images beside their references, for TensorBoard.

  Every worker decodes (in lockstep: with experts sharded each decode step runs the
  all-to-alls), and the chief writes one `eval/captions` text summary: a Markdown table of
  image key, generated caption and references.
  """

  def __init__(self, eval_data: str, *, num_images: int, network, image_mode: str,
               max_len: int, ctx):
    from m6t_tf import decoding  # local: generation imports this module
    from m6t_tf import generation
    from m6t_tf.data import tokenizer as tokenizer_lib
    self.ctx = ctx
    self.items = self._first_items(eval_data, num_images, image_mode)
    self.feature = "image" if image_mode == "pixels" else "patch_features"
    self.tokenizer = tokenizer_lib.Tokenizer()
    options = decoding.DecodeOptions(method="greedy",
                                     max_len=min(max_len, network.max_text_length + 1))
    self.captioner = generation.Captioner(
        network, options, lockstep=ctx.size > 1,
        vocab=tokenizer_lib.load_vocab(self.tokenizer.vocab_path))
    self._decode_items = generation.decode_items

  @staticmethod
  def _first_items(pattern: str, num_images: int, image_mode: str) -> list:
    """The first `num_images` distinct images of the split, with the references found among
    its first records (the whole split is not read)."""
    from m6t_tf import generation
    from m6t_tf.data import records
    feature = "image" if image_mode == "pixels" else "patch_features"
    items = {}
    dataset = tf.data.TFRecordDataset(records.list_files(pattern)).take(64 * num_images).map(
        lambda x: records.parse_example(x, image_mode=image_mode))
    for ex in dataset.as_numpy_iterator():
      key = ex["key"].decode("utf-8")
      if key not in items and len(items) < num_images:
        items[key] = generation.Item(key=key, path=None, features=ex[feature], references=[])
      if key in items:
        items[key].references.append(ex["caption"].decode("utf-8"))
    return list(items.values())

  def rows(self) -> list[dict]:
    """Decodes the images (every worker must call it); rows on the chief."""
    return self._decode_items(self.items, self.captioner, feature=self.feature, ctx=self.ctx,
                              batch_size=len(self.items), tokenizer=self.tokenizer)

  @staticmethod
  def markdown(rows: list[dict]) -> str:
    cell = lambda t: str(t).replace("|", "\\|").replace("\n", " ")
    lines = ["| image | generated (log-prob) | references |", "|---|---|---|"]
    for r in rows:
      lines.append(f"| {cell(r['key'])} | {cell(r['caption'])} ({r['log_prob']:.2f}) | "
                   f"{cell(' / '.join(r['references']))} |")
    return "\n".join(lines)

  def write(self, writer, step: int, rows: Optional[list[dict]] = None) -> list[dict]:
    """Decodes (unless given the `rows`) and writes the summary on the chief; returns the rows."""
    rows = self.rows() if rows is None else rows
    if writer is not None and rows:
      with writer.as_default():
        tf.summary.text("eval/captions", self.markdown(rows), step=step)
      writer.flush()
    return rows


def train(*, model_dir: str, train_data: str, eval_data: Optional[str] = None,
          num_steps: int, batch_size_per_worker: int = 8, max_len: int = 64,
          truncate_captions: bool = False, image_mode: str = "pixels", optimizer: str = "adamw",
          learning_rate: float = 8e-5, warmup_steps: int = 500, warmup_fraction: float = 0.0,
          lr_decay: str = "constant", final_lr_fraction: float = 0.0,
          weight_decay: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.999,
          epsilon: float = 1e-6, clip_norm: float = 1.0, mixed_precision: bool = False,
          checkpoint_every: int = 500, keep_checkpoints: int = 3, log_every: int = 50,
          eval_every: int = 0, eval_batches: int = 0, seed: int = 0,
          deterministic: bool = False, jit_compile: bool = False, shuffle_buffer: int = 2048,
          global_batch_size: int = 0, on_bad_record: str = "skip", log_data_keys: bool = False,
          ctx=None, network_fn=None, stop_after: Optional[int] = None,
          stall_timeout_s: float = 300.0, remat="none", eval_captions: int = 4) -> dict:
  """Trains the M6 captioner; resumes from the latest checkpoint in `model_dir` if there is one.

  Args:
    model_dir: checkpoints, TensorBoard events, config.gin and metrics JSON go here.
    train_data, eval_data: TFRecord glob patterns (`m6t_tf.data.records` format).
    num_steps: total optimiser steps of the run (the schedule's horizon).
    batch_size_per_worker: B (8 per GPU in the paper; global batch = B × workers).
    global_batch_size: if set, overrides B with global / workers (must divide).
    on_bad_record: "skip" (drop and count malformed records; TensorBoard `data/bad_records/*`)
      or "fail" (stop naming the file and record index).
    log_data_keys: every worker appends the keys of the records each step trained on to
      `model_dir/data_keys/rank<R>.jsonl` (to audit what each worker read).
    max_len: caption length L in tokens, [CLS] and [SEP] included (gin: the MAX_LEN macro,
      which also sizes the network; `MAX_LEN = None` follows the data, `configurables.parse`).
    truncate_captions: cut captions longer than max_len (keeping [SEP]); False: data whose
      metadata.json says it has longer captions is a configuration error.
    image_mode: "pixels" or "features" (precomputed patch features).
    optimizer: "adamw" or "adafactor" (1T).  learning_rate, warmup_steps, lr_decay,
      final_lr_fraction: the `WarmupSchedule`.  warmup_fraction: with warmup_steps = 0, the
      warmup is this fraction of num_steps (gin/demo.gin: 0.1, so any num_steps works).
      weight_decay, beta_1, beta_2, epsilon: AdamW.
    clip_norm: global gradient-norm clipping over the whole (sharded) model; 0 = off.
    mixed_precision: mixed_float16 compute with dynamic loss scaling (router stays float32).
    checkpoint_every, keep_checkpoints: checkpoint period (steps) and how many to keep.
    log_every: console and TensorBoard period.  eval_every, eval_batches: periodic validation
      (0 = only at the end; eval_batches 0 = the whole split).
    seed: weights, dropout and data order.  deterministic: TF deterministic ops (exact resume).
    jit_compile: XLA-compile the step.  shuffle_buffer: records in the shuffle buffer.
    ctx: the worker context (`LocalContext` by default; Horovod's under horovodrun).
    network_fn: builds the network (gin's `M6Transformer` by default).
    stop_after: stop (with a checkpoint) after this many steps of *this* invocation — used to
      test that N steps then M steps equal N+M straight.
    stall_timeout_s: a phase that makes no progress for this long ends the run (under
      Horovod, the job), naming the rank, the phase (the start-up, a step, a checkpoint save or
      restore, an evaluation, caption decoding), the last completed step and the checkpoint to
      resume from (`m6t_tf.parallel.watchdog`). Phases that wait on storage are watched in
      every run (checkpoints get the time to move their bytes on top); phases that wait on the
      other ranks, under Horovod only. 0 = off.
    remat: recomputation in the backward pass, trading compute for activation memory: "none",
      "block" (each Transformer block whole; its MoE all-to-alls run again), "attention",
      "experts" (the expert FFNs between the all-to-alls, dense FFNs whole), or a list of
      block names to recompute whole (["block_0", "block_1"]). Gradients are those of
      "none" (same routing, same dropout masks); `tools/plan.py` gives the memory saved.
    eval_captions: at every evaluation, greedy captions of this many validation images are
      written beside their references as the TensorBoard text summary `eval/captions`
      (0 = off).

  Returns:
    A summary dict: final step, the per-step losses of this invocation, final evaluation.
  """
  from m6t_tf.data import pipeline  # local: keeps `import m6t_tf.training` light for tools
  from m6t_tf.data import metadata
  from m6t_tf.data import records
  # Everything that can be checked without building data or weights is checked first, each
  # failure a ConfigError naming the binding and the fix (m6t_tf.cli).
  if image_mode not in IMAGE_MODES:
    raise ConfigError(f"train.image_mode={image_mode!r}; allowed: {IMAGE_MODES}")
  for name, value in (("num_steps", num_steps), ("batch_size_per_worker", batch_size_per_worker),
                      ("checkpoint_every", checkpoint_every), ("log_every", log_every)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f"train.{name}={value!r} must be an integer >= 1")
  if not 0.0 <= warmup_fraction < 1.0:
    raise ConfigError(f"train.warmup_fraction={warmup_fraction} must be in [0, 1)")
  warmup = warmup_steps if warmup_steps else round(warmup_fraction * num_steps)
  if lr_decay != "constant" and num_steps <= warmup:
    raise ConfigError(
        f"train.lr_decay={lr_decay!r} decays after the warmup, but train.num_steps={num_steps} "
        f"is not more than the {warmup} warmup steps (train.warmup_steps): pass "
        f"--gin_bindings=train.warmup_steps={max(num_steps // 10, 1)} or more steps")
  try:
    schedule = optimizers.WarmupSchedule(learning_rate, warmup, decay=lr_decay,
                                         total_steps=num_steps, final_fraction=final_lr_fraction)
  except ValueError as e:
    raise ConfigError(f"train's learning-rate schedule: {e}") from None
  if optimizer not in optimizers.OPTIMIZERS:
    raise ConfigError(f"train.optimizer={optimizer!r}; allowed: {optimizers.OPTIMIZERS}")
  ctx = ctx or context_lib.LocalContext()
  batch_size_per_worker = per_worker_batch(batch_size_per_worker, global_batch_size, ctx.size)
  if jit_compile and ctx.size > 1:
    raise ConfigError("train.jit_compile=True cannot run under Horovod (its collectives have no "
                      "XLA kernels); set train.jit_compile=False")
  # The data against the config, from metadata.json next to the files (or their first record).
  data_facts = [metadata.read(train_data, binding="train.train_data")]
  if eval_data:
    data_facts.append(metadata.read(eval_data, binding="train.eval_data"))
    metadata.check_same_images(data_facts[0], data_facts[1], image_mode)
  if max_len is None:
    raise ConfigError("train.max_len is None (MAX_LEN = None: follow the data), which "
                      "m6t_tf.configurables.parse resolves from the data; call it, or pin "
                      "--gin_bindings=MAX_LEN=<caption tokens incl. [CLS]/[SEP]>")
  for facts in data_facts:
    metadata.check_config(facts, image_mode=image_mode, max_len=max_len,
                          truncate_captions=truncate_captions)
  if not (isinstance(eval_captions, int) and not isinstance(eval_captions, bool)
          and eval_captions >= 0):
    raise ConfigError(f"train.eval_captions={eval_captions!r} must be an integer >= 0 (0 = off)")
  if not (isinstance(stall_timeout_s, (int, float)) and stall_timeout_s >= 0):
    raise ValueError(f"train.stall_timeout_s={stall_timeout_s!r} must be a number of seconds "
                     f">= 0 (0 = off)")
  # From here on every phase that can wait on storage or on the other ranks is watched.
  watchdog = watchdog_lib.StallWatchdog(ctx.rank, stall_timeout_s, multi_rank=ctx.size > 1)
  watchdog.start()
  faults = FaultInjection.from_env()
  with watchdog.phase("start-up", watchdog_lib.STORAGE):
    check_model_dir(model_dir)
  # Initial weights differ per worker (seed + rank: each draws its own experts) and are made
  # identical where replicated by the broadcast below, or come from the checkpoint. Data order
  # does not depend on the rank (`set_seeds`).
  set_seeds(seed, deterministic, rank=ctx.rank)
  if mixed_precision:
    keras.mixed_precision.set_global_policy("mixed_float16")
  # Constructing the network validates its whole config (sizes, MoE arguments) before any data
  # is read or weight created: a ValueError there is the config's.
  try:
    network = (network_fn or m6_transformer.M6Transformer)(name="m6")
  except ValueError as e:
    raise ConfigError(f"the network config (M6Transformer.*, MoEConfig.*): {cli.one_line(e)}"
                      ) from e
  try:
    network.set_remat(remat)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"train.remat: {cli.one_line(e)}") from e
  if max_len - 1 > network.max_text_length:
    longest = max((f.max_caption_tokens or 0) for f in data_facts)
    raise ConfigError(
        f"train.max_len={max_len} feeds {max_len - 1} caption positions, more than "
        f"M6Transformer.max_text_length={network.max_text_length}: set both with "
        f"--gin_bindings=MAX_LEN={max_len}"
        + (f" (the data's longest caption is {longest} tokens)" if longest else ""))
  def stream(skip, counter=None):
    return train_stream(train_data, ctx=ctx, seed=seed, batch_size=batch_size_per_worker,
                        max_len=max_len, image_mode=image_mode, shuffle_buffer=shuffle_buffer,
                        skip_batches=skip, on_bad_record=on_bad_record, counter=counter,
                        include_keys=log_data_keys)

  first = stream(0).take(1)  # building the pipeline traces its functions: local work
  with watchdog.phase("start-up (reading the first batch)", watchdog_lib.STORAGE):
    first = dict(next(iter(first)))
  first.pop("key", None)
  model = build_model(batch=first, mixed_precision=mixed_precision, network=network)
  opt = optimizers.make_optimizer(optimizer, schedule, weight_decay=weight_decay, beta_1=beta_1,
                                  beta_2=beta_2, epsilon=epsilon)
  trainer = Trainer(model, opt, ctx=ctx, clip_norm=clip_norm, mixed_precision=mixed_precision,
                    jit_compile=jit_compile, remat=remat)
  step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
  entries = variables_by_path(model, opt)
  entries.update({"train/step": step_var, "train/loss_scale": trainer.loss_scale.scale,
                  "train/good_steps": trainer.loss_scale.good_steps,
                  "train/skipped_steps": trainer.loss_scale.skipped})
  # Bad records skipped so far, summed over workers: a replicated total carried by checkpoints.
  bad_total = tf.Variable(tf.zeros([len(records.REASON_NAMES)], tf.int64), trainable=False,
                          name="bad_records")
  entries["train/bad_records"] = bad_total
  num_experts = model.moe_layers[0].num_experts if model.moe_layers else 0
  with watchdog.phase("start-up", watchdog_lib.STORAGE):
    checkpointer = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"), entries,
                                              ctx=ctx, num_experts=num_experts,
                                              max_to_keep=keep_checkpoints, watchdog=watchdog)
    if model.moe_layers:
      # A capacity that differs between workers would deadlock the first all-to-all: compare
      # before any step.
      watchdog.enter(watchdog_lib.COLLECTIVES)
      ctx.check_consistent(context_lib.capacity_fingerprint(model.moe_layers,
                                                batch_size_per_worker * (max_len - 1 + 16)))
      watchdog.enter(watchdog_lib.STORAGE)
    check_free_space(model_dir, entries, keep_checkpoints)
    latest = checkpointer.latest()
  checkpointer.before_merge = lambda s: (faults.maybe_kill("kill_in_save", s),
                                         faults.maybe_stall_in("save", s))
  checkpointer.before_prune = lambda s: faults.maybe_kill("kill_before_prune", s)
  checkpointer.before_read = lambda p: faults.maybe_stall_in("restore", checkpointing.step_of(p))
  if latest:
    watchdog.step_done(checkpointing.step_of(latest))
    watchdog.set_last_checkpoint(latest)
    checkpointer.restore(latest)
    logging.info("resumed from %s at step %d", latest, int(step_var))
    if ctx.is_chief:
      print(f"Resumed from {latest} at step {int(step_var)}", flush=True)
  else:
    with watchdog.phase("start-up", watchdog_lib.COLLECTIVES):
      ctx.broadcast_state([v for v in model.variables if not context_lib.is_rng_state(v)])
  # The input stream is a pure function of (seed, shard, step): resuming skips the records of
  # the steps already taken (before parsing), so it continues exactly, on any worker count
  # that keeps the same sharding.
  counter = pipeline.BadRecordCounter()
  bad_at_start = bad_total.numpy().copy()
  iterator = stream(int(step_var), counter)
  with watchdog.phase("start-up", watchdog_lib.STORAGE):
    iterator = iter(iterator)

  def bad_records() -> np.ndarray:
    """Per-reason bad records of the whole run so far (collective: every worker calls it)."""
    return bad_at_start + np.asarray(ctx.sum_over_world(counter.as_tensor()))

  def save(step):
    with watchdog.phase(f"checkpoint save at step {step}", watchdog_lib.COLLECTIVES):
      bad_total.assign(bad_records())
    watchdog.set_last_checkpoint(checkpointer.save(step))
  start = int(step_var)
  positions_per_step = batch_size_per_worker * (max_len - 1 + 16)  # per worker
  writer = tf.summary.create_file_writer(os.path.join(model_dir, "train")) if ctx.is_chief else None
  if ctx.is_chief:
    try:
      import gin
      with watchdog.phase("start-up (writing config.gin)", watchdog_lib.STORAGE):
        storage.write_text(os.path.join(model_dir, "config.gin"), gin.config_str())
    except ImportError:
      pass
    n_params = model.count_params()
    print(f"Model: {n_params:,} parameters on this worker; {len(model.moe_layers)} MoE layers; "
          f"{ctx.describe()}; steps {start}→{num_steps}", flush=True)
    if model.moe_layers:
      print(model.moe_layers[0].capacity_summary(positions_per_step), flush=True)
  progress = Progress(num_steps, start, log_every, ctx.is_chief)
  with watchdog.phase("start-up (reading the caption images)", watchdog_lib.STORAGE):
    samples = (CaptionSamples(eval_data, num_images=eval_captions, network=model.network,
                              image_mode=image_mode, max_len=max_len, ctx=ctx)
               if eval_data and eval_captions else None)
  # Real (routed) positions since the last log: patches of real examples plus non-padding
  # caption inputs; the rest of a padded batch is computed by attention but never routed.
  real_positions = 0
  losses = []
  last_log_time, last_log_step = time.time(), start
  dropless_ceiling_hits = 0  # (layer, log step) pairs where a dropless ceiling dropped tokens
  end = num_steps if stop_after is None else min(num_steps, start + stop_after)
  eval_result = None
  step = start
  loss_log = LossLog(os.path.join(model_dir, "losses.jsonl")) if ctx.is_chief else None
  key_log = DataKeyLog(model_dir, ctx.rank) if log_data_keys else None

  def evaluate(step):
    """Validation perplexity at `step` (collective), written to TensorBoard on the chief."""
    with watchdog.phase(f"evaluation at step {step}", watchdog_lib.STORAGE):
      faults.maybe_stall_in("eval", step)
      result = evaluate_perplexity(trainer, _batches_for_eval(
          eval_data, batch_size=batch_size_per_worker, max_len=max_len, image_mode=image_mode,
          ctx=ctx), eval_batches or None, watchdog=watchdog)
      watchdog.enter(watchdog_lib.STORAGE)
      summary_scalars(writer, step, {"eval/log_perplexity": result["log_perplexity"],
                                     "eval/perplexity": result["perplexity"]})
    return result

  def caption_samples(step):
    """Greedy captions of the sample images (every worker decodes, in lockstep)."""
    with watchdog.phase(f"caption decoding at step {step}", watchdog_lib.COLLECTIVES):
      rows = samples.rows()
      watchdog.enter(watchdog_lib.STORAGE)
      faults.maybe_stall_in("captions", step)
      return samples.write(writer, step, rows)

  for step in range(start + 1, end + 1):
    t_step = time.time()
    faults.maybe_corrupt(step, model)
    trainer.reseed(seed, step)
    with watchdog.phase(f"step {step} (reading its batch)", watchdog_lib.STORAGE):
      faults.maybe_stall_in("input", step)
      batch = next(iterator)
    watchdog.enter(watchdog_lib.LOCAL, f"step {step}")
    inputs = batch["tokens"].numpy()[:, :-1]
    real_positions += 16 * int(np.count_nonzero(inputs[:, 0])) + int(np.count_nonzero(inputs))
    if key_log is not None:
      batch = dict(batch)
      keys = batch.pop("key").numpy()
    faults.maybe_stall(step)
    if step == start + 1:
      # Tracing the step is local work that grows with the model, and waits on nothing: it
      # is not watched (the first call then finds it traced).
      watchdog.idle()
      trainer.train_step.get_concrete_function(batch)
    watchdog.enter(watchdog_lib.COLLECTIVES, f"step {step}")
    metrics = trainer.train_step(batch)
    loss = float(metrics["loss"])
    if not float(metrics["finite"]) and not trainer.skip_nonfinite:
      # The update was not applied (the step's tf.cond), so the weights are still those of
      # step - 1, and the last checkpoint is intact: report and stop.
      where = first_nonfinite_layer(model, batch)
      raise FloatingPointError(
          f"non-finite loss or gradients at step {step} (loss {loss}); first non-finite "
          f"layer output: {where}. Nothing was applied; the last good checkpoint is "
          f"{checkpointer.latest()}. Re-run with --check_numerics for the failing op.")
    step_var.assign(step)
    losses.append(loss)
    with watchdog.phase(f"step {step} (writing logs)", watchdog_lib.STORAGE):
      if loss_log is not None:
        loss_log.write(step, loss)
      if key_log is not None:
        key_log.write(step, keys)
    faults.maybe_kill("kill_after_step", step)
    if step % log_every == 0 or step == end:
      elapsed = time.time() - last_log_time
      # Real tokens per second over all workers (each worker counts its own batch).
      steps_logged = step - last_log_step
      real_total = float(ctx.sum_over_world(tf.constant(float(real_positions))))
      tok_s = real_total / max(elapsed, 1e-9)
      padded_fraction = 1.0 - real_total / (positions_per_step * ctx.size * steps_logged)
      m = numpy_metrics(ctx.mean_metrics({k: metrics[k] for k in ("loss", "moe_loss", "grad_norm")}))
      lr = float(metrics["learning_rate"])
      progress.update(step, m["loss"], lr, tok_s)
      scalars = {"loss": m["loss"], "log_perplexity": m["loss"], "learning_rate": lr,
                 "moe_loss": m["moe_loss"], "grad_norm": m["grad_norm"],
                 "step_time_s": time.time() - t_step, "tokens_per_s": tok_s,
                 "data/padded_fraction": padded_fraction,
                 "skipped_steps": float(trainer.loss_scale.skipped.numpy())}
      moe_stats = trainer.moe_stats()
      scalars.update({f"moe/{k}": v for k, v in moe_stats.items()})
      warnings = dropless_warnings(model, moe_stats)
      dropless_ceiling_hits += len(warnings)
      scalars["moe/dropless_ceiling_hits"] = float(dropless_ceiling_hits)
      if ctx.is_chief:
        for line in warnings:
          print(line, flush=True)
      bad = bad_records()
      scalars.update({f"data/bad_records/{r}": float(n) for r, n in zip(records.REASON_NAMES, bad)})
      scalars["data/bad_records_total"] = float(bad.sum())
      # γ the routed tokens got (the first layer with a capacity reports it).
      real_per_worker = real_total / (ctx.size * steps_logged)
      gammas = [g for g in (l.effective_capacity_factor(real_per_worker)
                            for l in model.moe_layers) if g is not None]
      if gammas:
        scalars["moe/effective_capacity_factor"] = gammas[0]
      with watchdog.phase(f"step {step} (writing logs)", watchdog_lib.STORAGE):
        summary_scalars(writer, step, scalars)
      last_log_time, last_log_step, real_positions = time.time(), step, 0
    watchdog.step_done(step)
    if step % checkpoint_every == 0 and step != end:
      save(step)
    if eval_data and eval_every and step % eval_every == 0 and step != end:
      r = evaluate(step)
      if samples is not None:
        caption_samples(step)
      if ctx.is_chief:
        print(f"  eval @ {step}: perplexity {r['perplexity']:.2f}", flush=True)
  if end > start or stop_after == 0:
    save(end)
  if eval_data and end == num_steps:
    eval_result = evaluate(end)
    if samples is not None:
      rows = caption_samples(end)
      if ctx.is_chief:
        eval_result["captions"] = [{k: r[k] for k in ("key", "caption", "references")}
                                   for r in rows]
  with watchdog.phase("the end of the run", watchdog_lib.COLLECTIVES):
    bad = bad_records()
    summary = {"step": end, "losses": losses, "eval": eval_result,
               "skipped_steps": int(trainer.loss_scale.skipped.numpy()),
               "bad_records": {r: int(n) for r, n in zip(records.REASON_NAMES, bad) if n}}
    if ctx.is_chief and bad.sum():
      print(f"Skipped {int(bad.sum())} bad records: {summary['bad_records']}", flush=True)
    watchdog.enter(watchdog_lib.STORAGE)
    if ctx.is_chief:
      write_json(os.path.join(model_dir, "train_summary.json"),
                 {k: v for k, v in summary.items() if k != "losses"})
    if writer is not None:
      writer.flush()
    watchdog.enter(watchdog_lib.COLLECTIVES)
    ctx.barrier()
  watchdog.stop()
  summary["model"] = model  # for callers that inspect the trained weights (tests, tools)
  return summary
