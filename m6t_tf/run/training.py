"""The training run: `train(**bindings)` and the loop that steps the `Trainer` and its hooks.

`train` is what gin configures (`train.*` in gin/base.gin; the entry point is
`python -m m6t_tf.train`). It is a short composition:

    config = RunConfig.from_bindings(**bindings).validate(workers)   # no data, no weights yet
    run = Run(config, ctx=ctx, network_fn=network_fn)    # data checks, model, restore
    return run.run(stop_after)                           # steps, with hooks (run.hooks)

`Run` sets up in order of what can fail cheaply first: the data against the config
(metadata.json), the model_dir, the network's own config, then the first batch, the weights,
the optimiser and the checkpoint to resume from. Its loop reads a batch, calls
`Trainer.train_step`, and hands the result to the hooks (`m6t_tf.run.hooks`). Every phase that
can wait on storage or on the other ranks is watched (`m6t_tf.parallel.watchdog`).
"""

from __future__ import annotations

import inspect
import itertools
import os
import time
from typing import Optional

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from m6t_tf import errors
from m6t_tf import optimizers
from m6t_tf import storage
from m6t_tf.data import metadata
from m6t_tf.data import pipeline
from m6t_tf.data import records
from m6t_tf.errors import ConfigError
from m6t_tf.layers import embeddings
from m6t_tf.networks import m6_transformer
from m6t_tf.parallel import context as context_lib
from m6t_tf.parallel import watchdog as watchdog_lib
from m6t_tf.run import captioning
from m6t_tf.run import checkpointing
from m6t_tf.run import config as config_lib
from m6t_tf.run import faults as faults_lib
from m6t_tf.run import hooks as hooks_lib
from m6t_tf.run import inputs
from m6t_tf.run import logs
from m6t_tf.run import trainer as trainer_lib

NUM_PATCHES = embeddings.NUM_PATCHES


def train(**bindings) -> dict:
  """Trains the M6 captioner; resumes from the latest checkpoint in `model_dir` if there is one.

  Args:
    **bindings: the `train.*` settings (`config.RunConfig`; `config.docs()` lists them by
      group), plus three that gin does not configure:
      ctx: the worker context (`LocalContext` by default; Horovod's under horovodrun).
      network_fn: builds the network (gin's `M6Transformer` by default).
      stop_after: stop (with a checkpoint) after this many steps of *this* invocation — to
        test that N steps then M steps equal N+M straight.

  Returns:
    A summary dict: final step, the per-step losses of this invocation, final evaluation,
    skipped steps, bad records, and "model" (the trained model, for tests and tools).

  Raises:
    ConfigError: a setting, the data or the model_dir that the user must fix (one line).
  """
  ctx = bindings.pop("ctx", None) or context_lib.LocalContext()
  network_fn = bindings.pop("network_fn", None)
  stop_after = bindings.pop("stop_after", None)
  config = config_lib.RunConfig.from_bindings(**bindings).validate(ctx.size)
  return Run(config, ctx=ctx, network_fn=network_fn).run(stop_after)


train.__signature__ = config_lib.signature(extra=tuple(
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
    for name in ("ctx", "network_fn", "stop_after")))


def build_network(config: config_lib.RunConfig, network_fn=None,
                  longest_caption: Optional[int] = None):
  """The network of `config` (gin's `M6Transformer` by default), its recomputation set, with
  no weights yet: constructing it validates its whole config (sizes, MoE options).

  Raises:
    ConfigError: the network's config, train.remat, or a caption length the network cannot
      hold (`longest_caption`: the data's, for the message).
  """
  try:
    network = (network_fn or m6_transformer.M6Transformer)(name="m6")
  except (ValueError, TypeError) as e:
    raise ConfigError(f"the network config (M6Transformer.*, MoEConfig.*): "
                      f"{errors.one_line(e)}") from e
  try:
    network.set_remat(config.execution.remat)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"train.remat: {errors.one_line(e)}") from e
  max_len = config.data.max_len
  if max_len is not None and max_len - 1 > network.max_text_length:
    raise ConfigError(
        f"train.max_len={max_len} feeds {max_len - 1} caption positions, more than "
        f"M6Transformer.max_text_length={network.max_text_length}: set both with "
        f"--gin_bindings=MAX_LEN={max_len}"
        + (f" (the data's longest caption is {longest_caption} tokens)"
           if longest_caption else ""), fix=(f"MAX_LEN={max_len}",))
  return network


def check_data(config: config_lib.RunConfig) -> list:
  """The data against the config, from metadata.json next to the files (or their first
  record): image size and mode, caption length. Returns the facts of each split."""
  data = config.data
  facts = [metadata.read(data.train_data, binding="train.train_data")]
  if data.eval_data:
    facts.append(metadata.read(data.eval_data, binding="train.eval_data"))
    metadata.check_same_images(facts[0], facts[1], data.image_mode)
  if data.max_len is None:
    raise ConfigError("train.max_len is None (MAX_LEN = None: follow the data), which "
                      "m6t_tf.run.configurables.parse resolves from the data; call it, or pin "
                      "--gin_bindings=MAX_LEN=<caption tokens incl. [CLS]/[SEP]>")
  for f in facts:
    metadata.check_config(f, image_mode=data.image_mode, max_len=data.max_len,
                          truncate_captions=data.truncate_captions)
  return facts


def make_optimizer(config: config_lib.RunConfig):
  """The optimiser of `config` with its warmup schedule (rules checked by `validate`)."""
  o = config.optimization
  schedule = optimizers.WarmupSchedule(o.learning_rate, o.warmup(config.num_steps),
                                       decay=o.lr_decay, total_steps=config.num_steps,
                                       final_fraction=o.final_lr_fraction)
  return optimizers.make_optimizer(o.optimizer, schedule, weight_decay=o.weight_decay,
                                   beta_1=o.beta_1, beta_2=o.beta_2, epsilon=o.epsilon)


class Run:
  """One training run on this worker: set up in the constructor, stepped by `run`.

  Attributes the hooks read: config, ctx, model, trainer, writer (TensorBoard, chief only),
  watchdog, faults, step_var, bad_total, bad_records(), step_logs.
  """

  def __init__(self, config: config_lib.RunConfig, *, ctx, network_fn=None):
    self.config, self.ctx = config, ctx
    data, x = config.data, config.execution
    self.batch_size = config.batch_size_per_worker(ctx.size)
    facts = check_data(config)
    # From here on every phase that can wait on storage or on the other ranks is watched.
    self.watchdog = watchdog_lib.StallWatchdog(ctx.rank, x.stall_timeout_s,
                                               multi_rank=ctx.size > 1)
    self.watchdog.start()
    self.faults = faults_lib.FaultInjection.from_env()
    with self.watchdog.phase("start-up", watchdog_lib.STORAGE):
      checkpointing.check_model_dir(config.model_dir)
    # Initial weights differ per worker (seed + rank: each draws its own experts) and are
    # made identical where replicated by the broadcast below, or come from the checkpoint.
    # Data order does not depend on the rank (`set_seeds`).
    trainer_lib.set_seeds(config.seed, x.deterministic, rank=ctx.rank)
    if config.optimization.mixed_precision:
      keras.mixed_precision.set_global_policy("mixed_float16")
    network = build_network(config, network_fn,
                            max((f.max_caption_tokens or 0) for f in facts))
    # The stream of a run from step 0: its first batch gives the model its shapes, and is
    # then step 1's batch (a resumed run builds the stream again below, from its step).
    # Building the pipeline traces its functions: local work, not watched.
    self.counter = pipeline.BadRecordCounter()
    stream = iter(self._stream(0, self.counter))
    with self.watchdog.phase("start-up (reading the first batch)", watchdog_lib.STORAGE):
      first = inputs.next_batch(stream, train_data=data.train_data, step=1)
    shapes = {k: v for k, v in first.items() if k != "key"}
    self.model = trainer_lib.build_model(batch=shapes, network=network,
                                         mixed_precision=config.optimization.mixed_precision)
    optimizer = make_optimizer(config)
    self.trainer = trainer_lib.Trainer(
        self.model, optimizer, ctx=ctx, clip_norm=config.optimization.clip_norm,
        mixed_precision=config.optimization.mixed_precision, jit_compile=x.jit_compile,
        remat=x.remat)
    self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    # Bad records skipped so far, summed over workers: a replicated total that checkpoints carry.
    self.bad_total = tf.Variable(tf.zeros([len(records.REASON_NAMES)], tf.int64),
                                 trainable=False, name="bad_records")
    self.checkpointer = self._restore(optimizer)
    # The input stream is a pure function of (seed, shard, step): resuming skips the records
    # of the steps already taken (before parsing), so it continues exactly, on any worker
    # count that keeps the same sharding.
    self.bad_at_start = self.bad_total.numpy().copy()
    if int(self.step_var) == 0:
      self.iterator = itertools.chain([first], stream)
    else:
      self.counter = pipeline.BadRecordCounter()  # counts from the resumed step on
      with self.watchdog.phase("start-up", watchdog_lib.STORAGE):
        self.iterator = iter(self._stream(int(self.step_var), self.counter))
    self.writer = (tf.summary.create_file_writer(os.path.join(config.model_dir, "train"))
                   if ctx.is_chief else None)
    if ctx.is_chief:
      with self.watchdog.phase("start-up (writing config.gin)", watchdog_lib.STORAGE):
        storage.write_text(os.path.join(config.model_dir, "config.gin"), gin.config_str())
      self._describe()

  # -- set-up ----------------------------------------------------------------------------

  def _stream(self, skip: int, counter=None):
    data = self.config.data
    return inputs.train_stream(
        data.train_data, ctx=self.ctx, seed=self.config.seed, batch_size=self.batch_size,
        max_len=data.max_len, image_mode=data.image_mode, shuffle_buffer=data.shuffle_buffer,
        skip_batches=skip, on_bad_record=data.on_bad_record,
        counter=counter if data.on_bad_record == "skip" else None,  # 'fail' drops nothing
        include_keys=data.log_data_keys)

  @property
  def positions_per_step(self) -> int:
    """Positions of this worker's batch: 16 patches and L - 1 caption inputs per example."""
    return self.batch_size * (self.config.data.max_len - 1 + NUM_PATCHES)

  def _restore(self, optimizer):
    """The checkpointer; restores the latest checkpoint, or broadcasts the initial weights."""
    ctx, model, watchdog, faults = self.ctx, self.model, self.watchdog, self.faults
    entries = trainer_lib.variables_by_path(model, optimizer)
    entries.update({"train/step": self.step_var,
                    "train/loss_scale": self.trainer.loss_scale.scale,
                    "train/good_steps": self.trainer.loss_scale.good_steps,
                    "train/skipped_steps": self.trainer.loss_scale.skipped,
                    "train/bad_records": self.bad_total})
    keep = self.config.checkpoint.keep_checkpoints
    num_experts = model.moe_layers[0].num_experts if model.moe_layers else 0
    with watchdog.phase("start-up", watchdog_lib.STORAGE):
      checkpointer = checkpointing.Checkpointer(
          os.path.join(self.config.model_dir, "checkpoints"), entries, ctx=ctx,
          num_experts=num_experts, max_to_keep=keep, watchdog=watchdog)
      if model.moe_layers:
        # A capacity that differs between workers would deadlock the first all-to-all:
        # compare before any step.
        watchdog.enter(watchdog_lib.COLLECTIVES)
        ctx.check_consistent(context_lib.capacity_fingerprint(model.moe_layers,
                                                              self.positions_per_step))
        watchdog.enter(watchdog_lib.STORAGE)
      checkpointing.check_free_space(self.config.model_dir, entries, keep)
      latest = checkpointer.latest()
    checkpointer.before_merge = lambda s: (faults.maybe_kill("kill_in_save", s),
                                           faults.maybe_stall_in("save", s))
    checkpointer.before_prune = lambda s: faults.maybe_kill("kill_before_prune", s)
    checkpointer.before_read = lambda p: faults.maybe_stall_in("restore",
                                                              checkpointing.step_of(p))
    if latest:
      watchdog.step_done(checkpointing.step_of(latest))
      watchdog.set_last_checkpoint(latest)
      checkpointer.restore(latest)
      logging.info("resumed from %s at step %d", latest, int(self.step_var))
      if ctx.is_chief:
        print(f"Resumed from {latest} at step {int(self.step_var)}", flush=True)
    else:
      with watchdog.phase("start-up", watchdog_lib.COLLECTIVES):
        ctx.broadcast_state([v for v in model.variables if not context_lib.is_rng_state(v)])
    return checkpointer

  def _describe(self) -> None:
    """The chief's start-up lines: the model, the workers, the steps and expert capacity."""
    model, positions = self.model, self.positions_per_step
    print(f"Model: {model.count_params():,} parameters on this worker; "
          f"{len(model.moe_layers)} MoE layers; {self.ctx.describe()}; steps "
          f"{int(self.step_var)}→{self.config.num_steps}", flush=True)
    if model.moe_layers:
      print(model.moe_layers[0].capacity_summary(positions), flush=True)

  def bad_records(self) -> np.ndarray:
    """Per-reason bad records of the whole run so far (collective: every worker calls it)."""
    return self.bad_at_start + np.asarray(self.ctx.sum_over_world(self.counter.as_tensor()))

  def make_hooks(self, start: int, end: int, stop_after: Optional[int]) -> list:
    """The periodic work of this run, in the order the loop calls it (`m6t_tf.run.hooks`)."""
    config, ctx = self.config, self.ctx
    self.step_logs = hooks_lib.StepLogs(config.model_dir, rank=ctx.rank, is_chief=ctx.is_chief,
                                        log_data_keys=config.data.log_data_keys)
    out = [self.step_logs, hooks_lib.Faults(),
           hooks_lib.Metrics(log_every=config.log_every, start=start, end=end,
                             num_steps=config.num_steps,
                             positions_per_step=self.positions_per_step, is_chief=ctx.is_chief),
           hooks_lib.Progress(),
           hooks_lib.Checkpoints(self.checkpointer, every=config.checkpoint.checkpoint_every,
                                 end=end, save_at_end=end > start or stop_after == 0)]
    data, evaluation = config.data, config.evaluation
    if data.eval_data:
      samples = None
      if evaluation.eval_captions:
        with self.watchdog.phase("start-up (reading the caption images)", watchdog_lib.STORAGE):
          samples = captioning.CaptionSamples(
              data.eval_data, num_images=evaluation.eval_captions, network=self.model.network,
              image_mode=data.image_mode, max_len=data.max_len, ctx=ctx)
      out.append(hooks_lib.Evaluation(
          data.eval_data, every=evaluation.eval_every, max_batches=evaluation.eval_batches,
          batch_size=self.batch_size, max_len=data.max_len, image_mode=data.image_mode,
          end=end, num_steps=config.num_steps, samples=samples))
    return out

  # -- the loop ----------------------------------------------------------------------------

  def step(self, step: int, hooks: list) -> hooks_lib.StepResult:
    """Reads this worker's batch and applies one optimiser step; returns what the hooks get."""
    started = time.time()
    for hook in hooks:
      hook.before_step(self, step)
    self.trainer.reseed(self.config.seed, step)
    with self.watchdog.phase(f"step {step} (reading its batch)", watchdog_lib.STORAGE):
      self.faults.maybe_stall_in("input", step)
      batch = inputs.next_batch(self.iterator, train_data=self.config.data.train_data,
                                step=step)
    self.watchdog.enter(watchdog_lib.LOCAL, f"step {step}")
    positions = inputs.real_positions(batch)
    keys = None
    if self.config.data.log_data_keys:
      batch = dict(batch)
      keys = batch.pop("key").numpy()
    self.faults.maybe_stall(step)
    if step == self.first_step:
      # Tracing the step is local work that grows with the model, and waits on nothing: it
      # is not watched (the first call then finds it traced).
      self.watchdog.idle()
      self.trainer.train_step.get_concrete_function(batch)
    self.watchdog.enter(watchdog_lib.COLLECTIVES, f"step {step}")
    metrics = self.trainer.train_step(batch)
    loss = float(metrics["loss"])
    if not float(metrics["finite"]) and not self.trainer.skip_nonfinite:
      # The update was not applied (the step's tf.cond), so the weights are still those of
      # step - 1, and the last checkpoint is intact: report and stop.
      where = trainer_lib.first_nonfinite_layer(self.model, batch)
      raise FloatingPointError(
          f"non-finite loss or gradients at step {step} (loss {loss}); first non-finite "
          f"layer output: {where}. Nothing was applied; the last good checkpoint is "
          f"{self.checkpointer.latest()}. Re-run with --check_numerics for the failing op.")
    self.step_var.assign(step)
    return hooks_lib.StepResult(step=step, loss=loss, metrics=metrics,
                                real_positions=positions, keys=keys, started=started)

  def run(self, stop_after: Optional[int] = None) -> dict:
    """Steps to `num_steps` (or `stop_after` steps of this invocation), calling the hooks;
    returns the summary (module docstring of `train`)."""
    start = int(self.step_var)
    end = (self.config.num_steps if stop_after is None
           else min(self.config.num_steps, start + stop_after))
    hooks = self.make_hooks(start, end, stop_after)
    self.first_step = start + 1
    losses = []
    for step in range(start + 1, end + 1):
      result = self.step(step, hooks)
      losses.append(result.loss)
      for hook in hooks:
        hook.after_step(self, result)
    for hook in hooks:
      hook.at_end(self, end)
    evaluation = [h for h in hooks if isinstance(h, hooks_lib.Evaluation)]
    summary = self._finish(end, losses, evaluation[0].final if evaluation else None)
    summary["model"] = self.model  # for callers that inspect the trained weights
    return summary

  def _finish(self, end: int, losses: list, eval_result: Optional[dict]) -> dict:
    """The run's summary, train_summary.json on the chief, and the workers' last barrier."""
    ctx, watchdog = self.ctx, self.watchdog
    with watchdog.phase("the end of the run", watchdog_lib.COLLECTIVES):
      bad = self.bad_records()
      summary = {"step": end, "losses": losses, "eval": eval_result,
                 "skipped_steps": int(self.trainer.loss_scale.skipped.numpy()),
                 "bad_records": {r: int(n) for r, n in zip(records.REASON_NAMES, bad) if n}}
      if ctx.is_chief and bad.sum():
        print(f"Skipped {int(bad.sum())} bad records: {summary['bad_records']}", flush=True)
      watchdog.enter(watchdog_lib.STORAGE)
      if ctx.is_chief:
        logs.write_json(os.path.join(self.config.model_dir, "train_summary.json"),
                        {k: v for k, v in summary.items() if k != "losses"})
      if self.writer is not None:
        self.writer.flush()
      watchdog.enter(watchdog_lib.COLLECTIVES)
      ctx.barrier()
    watchdog.stop()
    return summary
