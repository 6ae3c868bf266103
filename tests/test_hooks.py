"""Each hook of the training loop on its own (`m6t_tf.run.hooks`), with a stand-in run.

The loop's end-to-end behaviour (losses, resume, kills) is tested through `train` elsewhere
(test_training, test_reliability, test_storage, test_parallel_watchdog); here each hook's own
rule: when it acts, what it writes, and in which watchdog phase.
"""

import contextlib
import json
import os
import types

import numpy as np
import tensorflow as tf

from m6t_tf.run import hooks
from m6t_tf.run import logs
from m6t_tf.parallel import context


class _Watchdog:
  """Records the phases entered and the steps reported done."""

  def __init__(self):
    self.phases, self.done, self.checkpoints = [], [], []

  @contextlib.contextmanager
  def phase(self, name, kind):
    self.phases.append((name, kind))
    yield

  def enter(self, kind, what=None):
    del kind, what

  def step_done(self, step):
    self.done.append(step)

  def set_last_checkpoint(self, path):
    self.checkpoints.append(path)


class _Faults:
  def __init__(self):
    self.calls = []

  def maybe_corrupt(self, step, model):
    self.calls.append(("corrupt", step))

  def maybe_kill(self, kind, step):
    self.calls.append((kind, step))

  def maybe_stall_in(self, phase, step):
    self.calls.append(("stall_in:" + phase, step))


def _run(**attrs):
  run = types.SimpleNamespace(watchdog=_Watchdog(), faults=_Faults(),
                              ctx=context.LocalContext(), writer=None, model=None)
  run.__dict__.update(attrs)
  return run


def _result(step, loss=1.0, positions=10, keys=None):
  return hooks.StepResult(step=step, loss=loss, metrics={}, real_positions=positions, keys=keys,
                          started=0.0)


class StepLogsTest(tf.test.TestCase):

  def test_a_line_per_step_and_keys_per_rank_in_the_logs_phase(self):
    model_dir = self.get_temp_dir()
    hook = hooks.StepLogs(model_dir, rank=1, is_chief=True, log_data_keys=True)
    run = _run()
    for step in (1, 2):
      hook.after_step(run, _result(step, loss=step / 10, keys=np.array([b"a", b"b"])))
    hook.at_end(run, 2)
    self.assertEqual(logs.read_loss_log(os.path.join(model_dir, "losses.jsonl")),
                     {1: 0.1, 2: 0.2})
    with open(os.path.join(model_dir, "data_keys", "rank1.jsonl")) as f:
      self.assertEqual([json.loads(l) for l in f],
                       [{"step": 1, "keys": ["a", "b"]}, {"step": 2, "keys": ["a", "b"]}])
    self.assertEqual(run.watchdog.phases, [("step 1 (writing logs)", "storage"),
                                           ("step 2 (writing logs)", "storage")])

  def test_a_worker_that_is_not_the_chief_writes_no_loss_log(self):
    model_dir = self.get_temp_dir()
    hook = hooks.StepLogs(model_dir, rank=3, is_chief=False, log_data_keys=False)
    hook.after_step(_run(), _result(1))
    hook.at_end(_run(), 1)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "losses.jsonl")))


class FaultsTest(tf.test.TestCase):

  def test_corrupts_before_and_kills_after_the_step(self):
    run = _run()
    hook = hooks.Faults()
    hook.before_step(run, 4)
    hook.after_step(run, _result(4))
    self.assertEqual(run.faults.calls, [("corrupt", 4), ("kill_after_step", 4)])


class ProgressTest(tf.test.TestCase):

  def test_reports_each_completed_step_to_the_watchdog(self):
    run = _run()
    for step in (1, 2, 3):
      hooks.Progress().after_step(run, _result(step))
    self.assertEqual(run.watchdog.done, [1, 2, 3])


class _Checkpointer:
  def __init__(self):
    self.saved = []

  def save(self, step):
    self.saved.append(step)
    return f"ckpt-{step}"


class CheckpointsTest(tf.test.TestCase):

  def _run_steps(self, *, every, start, end, save_at_end):
    checkpointer, flushed = _Checkpointer(), []
    run = _run(bad_total=tf.Variable([0, 0], dtype=tf.int64),
               bad_records=lambda: np.array([2, 1]),
               step_logs=types.SimpleNamespace(flush=lambda: flushed.append(True)))
    hook = hooks.Checkpoints(checkpointer, every=every, end=end, save_at_end=save_at_end)
    for step in range(start + 1, end + 1):
      hook.after_step(run, _result(step))
    hook.at_end(run, end)
    return checkpointer.saved, run, flushed

  def test_every_n_steps_and_once_at_the_end(self):
    saved, run, flushed = self._run_steps(every=3, start=0, end=10, save_at_end=True)
    self.assertEqual(saved, [3, 6, 9, 10])
    # The logs are flushed before every save, and the bad-record total rides along.
    self.assertLen(flushed, 4)
    self.assertAllEqual(run.bad_total.numpy(), [2, 1])
    self.assertEqual(run.watchdog.checkpoints, ["ckpt-3", "ckpt-6", "ckpt-9", "ckpt-10"])
    self.assertIn(("checkpoint save at step 3", "collectives"), run.watchdog.phases)

  def test_a_period_that_ends_the_run_saves_once(self):
    saved, _, _ = self._run_steps(every=5, start=5, end=10, save_at_end=True)
    self.assertEqual(saved, [10])

  def test_no_save_at_the_end_when_the_run_made_no_step(self):
    saved, _, _ = self._run_steps(every=3, start=10, end=10, save_at_end=False)
    self.assertEqual(saved, [])


class EvaluationTest(tf.test.TestCase):

  def test_every_n_steps_and_at_the_last_step_with_captions(self):
    done = []

    class Samples:
      def rows(self):
        return [{"key": "k", "caption": "c", "references": ["r"], "log_prob": -1.0}]

      def write(self, writer, step, rows):
        done.append(("captions", step))
        return rows

    hook = hooks.Evaluation("unused", every=4, max_batches=0, batch_size=2, max_len=12,
                            image_mode="pixels", end=10, num_steps=10, samples=Samples())
    hook.evaluate = lambda run, step: done.append(("eval", step)) or {"perplexity": 2.0}
    run = _run()
    for step in range(1, 11):
      hook.after_step(run, _result(step))
    hook.at_end(run, 10)
    self.assertEqual(done, [("eval", 4), ("captions", 4), ("eval", 8), ("captions", 8),
                            ("eval", 10), ("captions", 10)])
    self.assertEqual(hook.final["captions"], [{"key": "k", "caption": "c", "references": ["r"]}])
    self.assertIn(("caption decoding at step 4", "collectives"), run.watchdog.phases)

  def test_a_run_stopped_early_has_no_final_evaluation(self):
    hook = hooks.Evaluation("unused", every=0, max_batches=0, batch_size=2, max_len=12,
                            image_mode="pixels", end=5, num_steps=10)
    hook.evaluate = lambda run, step: self.fail("evaluated a run that stopped before its end")
    hook.at_end(_run(), 5)
    self.assertIsNone(hook.final)


class MetricsTest(tf.test.TestCase):

  def test_logs_at_its_period_and_at_the_last_step(self):
    written, flushed = [], []
    hook = hooks.Metrics(log_every=3, start=0, end=7, num_steps=7, positions_per_step=20,
                         is_chief=False)

    class Trainer:
      loss_scale = types.SimpleNamespace(skipped=tf.constant(0))

      def moe_stats(self):
        return {}

    run = _run(trainer=Trainer(), model=types.SimpleNamespace(moe_layers=[]),
               bad_records=lambda: np.array([0, 0, 0, 0, 0, 0]),
               step_logs=types.SimpleNamespace(flush=lambda: flushed.append(True)))
    original = logs.summary_scalars
    logs.summary_scalars = lambda writer, step, scalars: written.append((step, scalars))
    try:
      for step in range(1, 8):
        r = _result(step, positions=15)
        r.metrics = {"loss": tf.constant(2.0), "moe_loss": tf.constant(0.1),
                     "grad_norm": tf.constant(0.5), "learning_rate": tf.constant(1e-3)}
        hook.after_step(run, r)
    finally:
      logs.summary_scalars = original
    self.assertEqual([s for s, _ in written], [3, 6, 7])
    self.assertLen(flushed, 3)
    scalars = written[0][1]
    self.assertEqual(scalars["loss"], 2.0)
    # 3 steps of 15 real positions out of 20: a quarter was padding.
    self.assertAllClose(scalars["data/padded_fraction"], 0.25)


if __name__ == "__main__":
  tf.test.main()
