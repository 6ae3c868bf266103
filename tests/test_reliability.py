"""Failure behaviour: SIGKILL at any moment then resume == never killed; a lost worker ends the
job quickly instead of hanging; non-finite numbers stop the run with the last checkpoint intact
(or, under loss scaling, skip the step and count it)."""

import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.errors import ConfigError
from m6t_tf.run import logs
from m6t_tf.run import trainer as trainer_lib
from tests import jobs
from tests import support
from tests.support import DEMO, REPO

STEPS = support.REFERENCE_STEPS


def _command(model_dir, ranks, extra_bindings=()):
  return support.train_command(model_dir, ranks, extra_bindings)


def _start(model_dir, ranks, **env):
  return jobs.start_job(_command(model_dir, ranks), **env)


def _run(model_dir, ranks, timeout=300, **env):
  proc = _start(model_dir, ranks, **env)
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _model_tensors(model_dir, step):
  reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints", f"ckpt-{step}"))
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if k.startswith(("model/", "optimizer/"))}


_TMPDIRS = []


def _tmpdir():
  _TMPDIRS.append(tempfile.mkdtemp(prefix="m6t_reliability_", dir=os.path.join(REPO, "runs")))
  return _TMPDIRS[-1]


def tearDownModule():
  for d in _TMPDIRS:
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.multiprocess
class KillAndResumeTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    support.require_demo()
    os.makedirs(os.path.join(REPO, "runs"), exist_ok=True)

  def _kill_and_resume(self, ranks, *, first_phases=None, lost_rank_phase=None):
    """Kills a run of `ranks` ranks in turn inside a checkpoint save, right after a step, then
    (`lost_rank_phase(model_dir)`, if given) one rank alone, and at a random moment; restarts
    it until done and compares it with the straight reference run. `first_phases(model_dir)`
    runs first on the same model dir: the first kill's launch is its restart."""
    reference = support.reference_run(ranks)
    killed = _tmpdir()
    last_rank = ranks - 1
    if first_phases is not None:
      first_phases(killed)
    # 1. Killed while writing the checkpoint of step 6: shards written, nothing published.
    code, out = _run(killed, ranks, M6T_FAULT_INJECT=f"kill_in_save:6:{last_rank}")
    self.assertNotEqual(code, 0, out[-2000:])
    if first_phases is not None:
      self.assertTrue(re.search(r"Resumed from \S*ckpt-3 at step 3", out), out[-3000:])
    latest = os.path.join(killed, "checkpoints", "latest")
    with open(latest) as f:
      self.assertIn('"latest": 3', f.read())  # the partial ckpt-6 was never published
    self.assertFalse(os.path.exists(os.path.join(killed, "checkpoints", "ckpt-6.index")))
    # 2. Killed right after a step, between checkpoints.
    code, out = _run(killed, ranks, M6T_FAULT_INJECT="kill_after_step:5:0")
    self.assertNotEqual(code, 0, out[-2000:])
    self.assertTrue("Resumed from" in out, out[-3000:])
    if lost_rank_phase is not None:
      lost_rank_phase(killed)
    # 3. Killed at a random moment (seeded), whatever it is doing.
    delay = random.Random(1234).uniform(4.0, 12.0)
    proc = _start(killed, ranks)
    try:
      proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
    # 4. Restarted until done.
    code, out = _run(killed, ranks)
    self.assertEqual(code, 0, out[-3000:])

    self.assertEqual(logs.read_loss_log(os.path.join(killed, "losses.jsonl")),
                     logs.read_loss_log(os.path.join(reference, "losses.jsonl")))
    # Every step of the resumed run read the records the straight run read at that step.
    for rank in range(ranks):
      keys = support.data_keys(killed, rank)
      self.assertEqual(sorted(keys), list(range(1, STEPS + 1)))
      self.assertEqual(keys, support.data_keys(reference, rank), f"rank {rank}")
    want, got = _model_tensors(reference, STEPS), _model_tensors(killed, STEPS)
    self.assertEqual(sorted(want), sorted(got))
    for k in want:
      self.assertAllEqual(want[k], got[k], msg=k)
    self.assertEqual(glob.glob(os.path.join(killed, "checkpoints", "tmp-*")), [])

  def _stalled_rank_ends_job_naming_itself(self, model_dir):
    # Rank 1 of 2 sleeps (an hour) before the collectives of step 5; rank 0 waits in them.
    # The restart (the next phase's launch) resumes from ckpt-3.
    limit = 10
    proc = jobs.start_job(_command(model_dir, 2, [f"train.stall_timeout_s={limit}"]),
                          M6T_FAULT_INJECT="stall:5:1")
    out, step_4_at, ended_at = jobs.watch(proc, "step 4/")
    self.assertNotEqual(proc.returncode, -signal.SIGKILL, "the job hung: " + out[-3000:])
    self.assertNotEqual(proc.returncode, 0, out[-3000:])
    self.assertIsNotNone(step_4_at, out[-3000:])
    # Ended after the limit, well within 60 s of the stall (limit, grace, launcher teardown).
    self.assertBetween(ended_at - step_4_at, limit, 60)
    self.assertTrue(re.search(r"rank 1 stalled in step 5: no progress for [\d.]+ s \(limit 10 "
                              r"s\) outside the collectives .* after completing step 4", out),
                    out[-3000:])
    self.assertTrue(re.search(r"Last checkpoint: \S*ckpt-3 \(a restart resumes from it\)", out),
                    out[-3000:])

  def _lost_rank_ends_job_within_60s(self, model_dir):
    # Rank 1 of 2 is SIGKILLed after step 7 (resumed from ckpt-3, it published ckpt-6); rank
    # 0 logs step 6 and waits for rank 1 in the collectives of step 7 or 8: the job must end
    # by itself, soon. The next phase's launch resumes from ckpt-6.
    proc = jobs.start_job(_command(model_dir, 2), M6T_FAULT_INJECT="kill_after_step:7:1")
    out, step_6_at, ended_at = jobs.watch(proc, "step 6/")
    self.assertNotEqual(proc.returncode, -signal.SIGKILL, "the job hung: " + out[-3000:])
    self.assertNotEqual(proc.returncode, 0, out[-3000:])
    self.assertTrue(re.search(r"Resumed from \S*ckpt-3 at step 3", out), out[-3000:])
    self.assertIsNotNone(step_6_at, out[-3000:])
    self.assertLess(ended_at - step_6_at, 60, out[-3000:])
    # horovodrun names the first rank that died and its exit status (137 = SIGKILL).
    self.assertTrue(re.search(r"Process name: 1\s+Exit code: 137", out), out[-3000:])
    with open(os.path.join(model_dir, "checkpoints", "latest")) as f:
      self.assertIn('"latest": 6', f.read())

  def test_kill_between_publish_and_prune(self):
    # SIGKILL after `latest` names ckpt-9 (flushed), before ckpt-3 (beyond keep_checkpoints=2)
    # is pruned: the old checkpoint is a mere leftover; the restart resumes from step 9, prunes
    # it, and ends exactly as a run that was never killed.
    reference = support.reference_run(1)
    killed = _tmpdir()
    checkpoints = os.path.join(killed, "checkpoints")
    code, out = _run(killed, 1, M6T_FAULT_INJECT="kill_before_prune:9")
    self.assertNotEqual(code, 0, out[-2000:])
    with open(os.path.join(checkpoints, "latest")) as f:
      self.assertEqual(json.load(f), {"latest": 9, "all": [6, 9]})
    self.assertTrue(os.path.exists(os.path.join(checkpoints, "ckpt-3.index")))  # not pruned
    code, out = _run(killed, 1)
    self.assertEqual(code, 0, out[-3000:])
    self.assertTrue(re.search(r"Resumed from \S*ckpt-9 at step 9", out), out[-3000:])
    self.assertEqual(sorted(n for n in os.listdir(checkpoints) if n.endswith(".index")),
                     ["ckpt-10.index", "ckpt-9.index"])
    self.assertEqual(logs.read_loss_log(os.path.join(killed, "losses.jsonl")),
                     logs.read_loss_log(os.path.join(reference, "losses.jsonl")))
    want, got = _model_tensors(reference, STEPS), _model_tensors(killed, STEPS)
    for k in want:
      self.assertAllEqual(want[k], got[k], msg=k)

  def test_kill_and_resume_one_process(self):
    self._kill_and_resume(1)

  def test_two_ranks_stall_lost_rank_kills_and_resume(self):
    # One 2-rank model dir through every failure, each fault's restart the next one's launch:
    # a stalled rank, a kill inside a save, a kill after a step, one rank lost, a random kill;
    # then it ends exactly as the straight run.
    self._kill_and_resume(2, first_phases=self._stalled_rank_ends_job_naming_itself,
                          lost_rank_phase=self._lost_rank_ends_job_within_60s)


@pytest.mark.slow
class BadDataTrainingTest(tf.test.TestCase):
  """The trainer on a training set with broken records: skip and count, or fail naming them."""

  def setUp(self):
    super().setUp()
    import gin
    from m6t_tf.data import records
    self.data_dir = _tmpdir()
    good = records.read_serialized(os.path.join(DEMO, "train-00000-of-*.tfrecord"))[:40]
    records.write_records(os.path.join(self.data_dir, "train-0.tfrecord"), good[:20])
    bad_path = os.path.join(self.data_dir, "train-1.tfrecord")
    records.write_records(bad_path, good[20:])
    with open(bad_path, "r+b") as f:  # flip bytes inside the 5th record: its CRC breaks
      f.seek(5 * (len(good[20]) + 16) + 100)
      f.write(b"\xff\xfe\xfd\xfc")
    self.bad_path = bad_path
    gin.clear_config()

  def _train(self, mode):
    import gin
    from m6t_tf.run import configurables
    gin.clear_config()
    configurables.parse([os.path.join(REPO, "gin", "demo.gin"), os.path.join(REPO, "gin", "tiny.gin")],
                        [f"train.train_data = '{self.data_dir}/train-*.tfrecord'",
                         "train.eval_data = None", "train.num_steps = 12",
                         f"train.on_bad_record = '{mode}'"], [REPO])
    return configurables.run_train(model_dir=_tmpdir())

  def test_skip_counts_corrupt_records(self):
    summary = self._train("skip")
    self.assertLen(summary["losses"], 12)
    self.assertGreaterEqual(summary["bad_records"].get("corrupt_file", 0), 1)

  def test_fail_names_file_and_record(self):
    # One line naming the file, the record and the fix (the CLI prints it and exits 2).
    with self.assertRaisesRegex(ConfigError, r"train-1\.tfrecord record \d+: corrupt_file.*"
                                             r"on_bad_record='skip'"):
      self._train("fail")


class NonFiniteTest(tf.test.TestCase):

  def tearDown(self):
    keras.mixed_precision.set_global_policy("float32")
    super().tearDown()

  @pytest.mark.multiprocess
  def test_nonfinite_stops_naming_step_and_layer_checkpoint_intact(self):
    model_dir = _tmpdir()
    code, out = _run(model_dir, 1, M6T_FAULT_INJECT="nan_weight:5")
    self.assertNotEqual(code, 0)
    self.assertTrue("non-finite loss or gradients at step 5" in out, out[-3000:])
    self.assertTrue("first non-finite layer output: block_0/moe" in out, out[-3000:])
    with open(os.path.join(model_dir, "checkpoints", "latest")) as f:
      self.assertIn('"latest": 3', f.read())
    for v in _model_tensors(model_dir, 3).values():
      if v.dtype.kind == "f":
        self.assertTrue(np.all(np.isfinite(v)))

  def test_loss_scale_overflow_skips_step_and_counts_it(self):
    from m6t_tf import optimizers
    from m6t_tf.layers import moe as moe_lib
    keras.mixed_precision.set_global_policy("mixed_float16")

    class Tiny(keras.Model):
      def __init__(self):
        super().__init__(name="tiny")
        self.moe = moe_lib.MoE(4, 8, k=1, capacity_factor=4.0)
        self.moe_layers = [self.moe]

      def call(self, batch, training=None):
        return self.moe(batch["x"], training=training)

      def losses_and_metrics(self, batch, training):
        y = tf.cast(self(batch, training=training), tf.float32)
        nll = tf.reduce_sum(tf.square(y))
        return nll, {"nll_sum": nll, "num_tokens": tf.constant(1.0), "loss": nll,
                     "moe_loss": tf.constant(0.0)}

    model = Tiny()
    batch = {"x": tf.random.normal([6, 5])}
    model(batch)
    opt = optimizers.make_optimizer("adamw", 1e-3)
    trainer = trainer_lib.Trainer(model, opt, mixed_precision=True)
    trainer.loss_scale.scale.assign(1e38)  # the scaled float16 gradients overflow
    before = [v.numpy().copy() for v in model.trainable_variables]
    metrics = trainer.train_step(batch)
    self.assertEqual(float(metrics["finite"]), 0.0)
    self.assertEqual(int(trainer.loss_scale.skipped.numpy()), 1)
    self.assertAllClose(trainer.loss_scale.scale.numpy(), 5e37)
    for b, v in zip(before, model.trainable_variables):
      self.assertAllEqual(b, v.numpy())
    trainer.loss_scale.scale.assign(1.0)
    metrics = trainer.train_step(batch)
    self.assertEqual(float(metrics["finite"]), 1.0)
    self.assertNotAllEqual(before[0], model.trainable_variables[0].numpy())


if __name__ == "__main__":
  tf.test.main()
