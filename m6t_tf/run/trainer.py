"""One training step on one worker or many: the `Trainer`, its dynamic loss scale, and the
model it steps.

`Trainer.compute_gradients` is forward, backward and the cross-worker reduction; `apply_gradients`
clips and applies them unless the step overflowed (on every worker alike). The same step runs on
one process and under Horovod: every cross-worker operation goes through the context
(`m6t_tf.parallel.context`).
"""

from __future__ import annotations

import math
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from m6t_tf.models import m6_captioner
from m6t_tf.networks import m6_transformer
from m6t_tf.parallel import context as context_lib
from m6t_tf.parallel import watchdog as watchdog_lib

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
    # Routers with state update it from the loads summed over all workers (`MoE.after_step`).
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
