"""The periodic work of a training run, one object each, called by the loop (`run.training`).

After every step the loop calls each hook's `after_step` in order, and `at_end` once when the
run stops; `before_step` runs before the step reads its batch. The order is the run's:

    StepLogs      losses.jsonl and the data-key logs, a line per step (buffered remotely)
    Faults        the failure tests' kills and corrupted weights (`M6T_FAULT_INJECT`)
    Metrics       every log_every steps: the console line and the TensorBoard scalars
    Progress      tells the stall watchdog the step completed
    Checkpoints   every checkpoint_every steps, and at the end
    Evaluation    every eval_every steps, and at the end: perplexity and caption samples

A hook reads what it needs from the `Run` it is given (the config, the worker context, the
trainer, the TensorBoard writer, the watchdog) and does its own work inside a watchdog phase
that names it, so that a stalled hook is reported by name.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from m6t_tf.data import records
from m6t_tf.parallel import watchdog as watchdog_lib
from m6t_tf.run import inputs
from m6t_tf.run import logs
from m6t_tf.run import trainer as trainer_lib


@dataclasses.dataclass
class StepResult:
  """What one completed step hands the hooks.

  Attributes:
    step: the step number (1-based).
    loss: the global mean NLL of the step (the same on every worker).
    metrics: the step's tensors (`Trainer.train_step`): loss, moe_loss, grad_norm,
      learning_rate, finite, ...
    real_positions: routed (non-padding) positions of this worker's batch.
    keys: the batch's record keys (with `train.log_data_keys`), else None.
    started: `time.time()` when the step began.
  """
  step: int
  loss: float
  metrics: dict
  real_positions: int
  keys: Optional[np.ndarray]
  started: float


class Hook:
  """Periodic work of a run; every method is optional."""

  def before_step(self, run, step: int) -> None:
    """Before step `step` reads its batch."""

  def after_step(self, run, result: StepResult) -> None:
    """After step `result.step` is applied (`run.step_var` holds it)."""

  def at_end(self, run, end: int) -> None:
    """Once, when the run stops at step `end` (its last step, or the `stop_after` one)."""


def _due(step: int, every: int, end: int) -> bool:
  """Periodic work at `step`: every `every` steps, never at the end (the end has its own)."""
  return bool(every) and step % every == 0 and step != end


class StepLogs(Hook):
  """`losses.jsonl` (chief) and `data_keys/rank<R>.jsonl` (`train.log_data_keys`): a line per
  step, flushed at logging cadence, before every checkpoint and at the end (`logs.StepLog`)."""

  def __init__(self, model_dir: str, *, rank: int, is_chief: bool, log_data_keys: bool):
    self.loss_log = logs.LossLog(os.path.join(model_dir, "losses.jsonl")) if is_chief else None
    self.key_log = logs.DataKeyLog(model_dir, rank) if log_data_keys else None

  def after_step(self, run, result: StepResult) -> None:
    with run.watchdog.phase(f"step {result.step} (writing logs)", watchdog_lib.STORAGE):
      if self.loss_log is not None:
        self.loss_log.write(result.step, result.loss)
      if self.key_log is not None:
        self.key_log.write(result.step, result.keys)

  def flush(self) -> None:
    for log in (self.loss_log, self.key_log):
      if log is not None:
        log.flush()

  def at_end(self, run, end: int) -> None:
    self.flush()


class Faults(Hook):
  """The failure tests' faults at chosen steps (`faults.FaultInjection`): weights set to NaN
  before a step, a SIGKILL after one. Kills in a checkpoint and stalls in a phase are the
  checkpointer's and the phases' own (`Run`)."""

  def before_step(self, run, step: int) -> None:
    run.faults.maybe_corrupt(step, run.model)

  def after_step(self, run, result: StepResult) -> None:
    run.faults.maybe_kill("kill_after_step", result.step)


class Metrics(Hook):
  """Every `log_every` steps (and at the last step): the console progress line and the
  TensorBoard scalars — losses, learning rate, gradient norm, real tokens per second, padding,
  skipped steps, every MoE layer's routing statistics and warnings, bad records."""

  def __init__(self, *, log_every: int, start: int, end: int, num_steps: int,
               positions_per_step: int, is_chief: bool):
    self.log_every, self.end = log_every, end
    self.positions_per_step = positions_per_step  # per worker
    self.progress = logs.Progress(num_steps, start, log_every, is_chief)
    self.real_positions = 0  # since the last log
    self.last_time, self.last_step = time.time(), start
    self.dropless_ceiling_hits = 0  # (layer, log step) pairs where a ceiling dropped tokens

  def after_step(self, run, result: StepResult) -> None:
    self.real_positions += result.real_positions
    step = result.step
    if step % self.log_every and step != self.end:
      return
    run.step_logs.flush()
    ctx, metrics = run.ctx, result.metrics
    elapsed = time.time() - self.last_time
    steps_logged = step - self.last_step
    # Real tokens per second over all workers (each worker counts its own batch).
    real_total = float(ctx.sum_over_world(tf.constant(float(self.real_positions))))
    tok_s = real_total / max(elapsed, 1e-9)
    m = logs.numpy_metrics(ctx.mean_metrics({k: metrics[k]
                                             for k in ("loss", "moe_loss", "grad_norm")}))
    lr = float(metrics["learning_rate"])
    self.progress.update(step, m["loss"], lr, tok_s)
    scalars = {"loss": m["loss"], "log_perplexity": m["loss"], "learning_rate": lr,
               "moe_loss": m["moe_loss"], "grad_norm": m["grad_norm"],
               "step_time_s": time.time() - result.started, "tokens_per_s": tok_s,
               "data/padded_fraction": 1.0 - real_total / (
                   self.positions_per_step * ctx.size * steps_logged),
               "skipped_steps": float(run.trainer.loss_scale.skipped.numpy())}
    moe_stats = run.trainer.moe_stats()
    scalars.update({f"moe/{k}": v for k, v in moe_stats.items()})
    warnings = trainer_lib.dropless_warnings(run.model, moe_stats)
    self.dropless_ceiling_hits += len(warnings)
    scalars["moe/dropless_ceiling_hits"] = float(self.dropless_ceiling_hits)
    if ctx.is_chief:
      for line in warnings:
        print(line, flush=True)
    bad = run.bad_records()
    scalars.update({f"data/bad_records/{r}": float(n) for r, n in zip(records.REASON_NAMES, bad)})
    scalars["data/bad_records_total"] = float(bad.sum())
    if real_total > 0:
      # γ the routed tokens got (the first layer with a capacity reports it).
      real_per_worker = real_total / (ctx.size * steps_logged)
      gammas = [g for g in (layer.effective_capacity_factor(real_per_worker)
                            for layer in run.model.moe_layers) if g is not None]
      if gammas:
        scalars["moe/effective_capacity_factor"] = gammas[0]
    with run.watchdog.phase(f"step {step} (writing logs)", watchdog_lib.STORAGE):
      logs.summary_scalars(run.writer, step, scalars)
    self.last_time, self.last_step, self.real_positions = time.time(), step, 0


class Progress(Hook):
  """Tells the stall watchdog that the step completed (the last step its messages name)."""

  def after_step(self, run, result: StepResult) -> None:
    run.watchdog.step_done(result.step)


class Checkpoints(Hook):
  """A checkpoint every `checkpoint_every` steps and one at the end (when the run made a step,
  or was asked for a step-0 checkpoint with stop_after = 0). The per-step logs are flushed
  first, so a checkpoint never runs ahead of the logs of the steps it holds."""

  def __init__(self, checkpointer, *, every: int, end: int, save_at_end: bool):
    self.checkpointer, self.every, self.end = checkpointer, every, end
    self.save_at_end = save_at_end

  def save(self, run, step: int) -> None:
    with run.watchdog.phase(f"checkpoint save at step {step}", watchdog_lib.COLLECTIVES):
      run.bad_total.assign(run.bad_records())
    with run.watchdog.phase(f"checkpoint save at step {step} (writing logs)",
                            watchdog_lib.STORAGE):
      run.step_logs.flush()
    run.watchdog.set_last_checkpoint(self.checkpointer.save(step))

  def after_step(self, run, result: StepResult) -> None:
    if _due(result.step, self.every, self.end):
      self.save(run, result.step)

  def at_end(self, run, end: int) -> None:
    if self.save_at_end:
      self.save(run, end)


class Evaluation(Hook):
  """Validation perplexity every `eval_every` steps and at the last step of the run, with the
  greedy captions of a few validation images (`captioning.CaptionSamples`) beside it.

  `final` holds the evaluation at the run's last step (None before, or if the run stopped
  early), with its caption rows under "captions" on the chief.
  """

  def __init__(self, eval_data: str, *, every: int, max_batches: int, batch_size: int,
               max_len: int, image_mode: str, end: int, num_steps: int, samples=None):
    self.eval_data, self.every, self.max_batches = eval_data, every, max_batches
    self.batch_size, self.max_len, self.image_mode = batch_size, max_len, image_mode
    self.end, self.num_steps, self.samples = end, num_steps, samples
    self.final = None

  def evaluate(self, run, step: int) -> dict:
    """Validation perplexity at `step` (collective), written to TensorBoard on the chief."""
    with run.watchdog.phase(f"evaluation at step {step}", watchdog_lib.STORAGE):
      run.faults.maybe_stall_in("eval", step)
      result = trainer_lib.evaluate_perplexity(
          run.trainer, inputs.eval_stream(self.eval_data, batch_size=self.batch_size,
                                          max_len=self.max_len, image_mode=self.image_mode,
                                          ctx=run.ctx),
          self.max_batches or None, watchdog=run.watchdog)
      run.watchdog.enter(watchdog_lib.STORAGE)
      logs.summary_scalars(run.writer, step, {"eval/log_perplexity": result["log_perplexity"],
                                              "eval/perplexity": result["perplexity"]})
    return result

  def caption_samples(self, run, step: int) -> list:
    """Greedy captions of the sample images (every worker decodes, in lockstep)."""
    with run.watchdog.phase(f"caption decoding at step {step}", watchdog_lib.COLLECTIVES):
      rows = self.samples.rows()
      run.watchdog.enter(watchdog_lib.STORAGE)
      run.faults.maybe_stall_in("captions", step)
      return self.samples.write(run.writer, step, rows)

  def after_step(self, run, result: StepResult) -> None:
    if not _due(result.step, self.every, self.end):
      return
    r = self.evaluate(run, result.step)
    if self.samples is not None:
      self.caption_samples(run, result.step)
    if run.ctx.is_chief:
      print(f"  eval @ {result.step}: perplexity {r['perplexity']:.2f}", flush=True)

  def at_end(self, run, end: int) -> None:
    if end != self.num_steps:
      return
    self.final = self.evaluate(run, end)
    if self.samples is not None:
      rows = self.caption_samples(run, end)
      if run.ctx.is_chief:
        self.final["captions"] = [{k: r[k] for k in ("key", "caption", "references")}
                                  for r in rows]
