"""Tests of m6t_tf.run.checkpointing in one process: round trip, and the durable publish order
(flush → rename → flush → prune) recorded through the checkpointer's file operations.

Killing a real training run between publish and prune is in tests/test_reliability.py
(`kill_before_prune`); restoring onto other worker counts in tests/test_parallel_training.py.
"""

import json
import os
import shutil
import tempfile
from unittest import mock

import keras
import numpy as np
import tensorflow as tf

from m6t_tf import optimizers
from m6t_tf.layers import moe as moe_lib
from m6t_tf.parallel import communicator as comm_lib
from m6t_tf.run import checkpointing
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.parallel import context as context_lib


class RecordingFileOps(checkpointing.LocalFileOps):
  """LocalFileOps that also records every operation as (name, path relative to `root`)."""

  def __init__(self, root, fail_on=None):
    super().__init__(flush=True)
    self.root = root
    self.events = []
    self.fail_on = fail_on

  def _record(self, name, path):
    self.events.append((name, os.path.relpath(path, self.root)))
    if self.fail_on == name:
      raise OSError(5, f"injected {name} failure", path)

  def flush_file(self, path):
    self._record("flush_file", path)
    super().flush_file(path)

  def flush_dir(self, path):
    self._record("flush_dir", path)
    super().flush_dir(path)

  def replace(self, src, dst):
    self._record("replace", dst)
    super().replace(src, dst)

  def remove(self, path):
    self._record("remove", path)
    super().remove(path)


class CheckpointerTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp(prefix="m6t_ckpt_")
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
    self.dir = os.path.join(self.root, "checkpoints")
    # One replicated and one expert variable (E = 3 experts, all on this one worker).
    self.entries = {"model/dense/kernel": tf.Variable(np.arange(6.0).reshape(2, 3)),
                    "model/moe/experts/wi": tf.Variable(np.arange(12.0).reshape(3, 2, 2))}
    comm_lib.mark_expert_sharded(self.entries["model/moe/experts/wi"])

  def _checkpointer(self, file_ops=None, max_to_keep=1):
    return checkpointing.Checkpointer(self.dir, self.entries, ctx=context_lib.LocalContext(),
                                      num_experts=3, max_to_keep=max_to_keep, file_ops=file_ops)

  def _set(self, value):
    for v in self.entries.values():
      v.assign(tf.fill(v.shape, tf.constant(value, v.dtype)))

  def _latest(self):
    with open(os.path.join(self.dir, checkpointing.LATEST)) as f:
      return json.load(f)

  def test_expert_entries_are_the_marked_variables_and_their_slots(self):
    # An MoE layer's experts and every optimizer slot of theirs are expert shards; a dense
    # layer that happens to be named "experts" is not (a name rule took it for one).
    inputs = keras.Input((5, 6))
    hidden = moe_lib.MoE(4, 8, name="moe")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(6, name="experts")(hidden))
    for name, slots in (("adamw", ("momentum", "velocity")), ("adafactor", ("col", "row"))):
      with self.subTest(name):
        opt = optimizers.make_optimizer(name, 1e-3)
        opt.build(model.trainable_variables)
        ckpt = checkpointing.Checkpointer(self.dir, trainer_lib.variables_by_path(model, opt),
                                          ctx=context_lib.LocalContext(), num_experts=4)
        self.assertEqual(sorted(ckpt.expert_keys), sorted(
            ["model/moe/experts/wi", "model/moe/experts/wo"]
            + [f"optimizer/{name}/moe_experts_{w}_{s}" for w in ("wi", "wo") for s in slots]))

  def test_round_trip(self):
    ckpt = self._checkpointer()
    self._set(1.0)
    ckpt.save(1)
    self._set(2.0)
    ckpt.restore(ckpt.latest())
    for v in self.entries.values():
      self.assertAllEqual(v, tf.ones_like(v))

  def test_publish_order_is_flush_rename_flush_prune(self):
    ops = RecordingFileOps(self.dir)
    ckpt = self._checkpointer(ops)
    ckpt.before_prune = lambda step: ops.events.append(("before_prune", step))
    ckpt.save(1)
    ops.events.clear()
    ckpt.save(2)   # max_to_keep = 1: prunes ckpt-1
    tmp_latest = f"latest.tmp-{os.getpid()}"
    self.assertEqual(ops.events, [
        # 1. flush: this worker's shard, the merged checkpoint, then their directory entries.
        ("flush_file", "tmp-2/shard-00000.data-00000-of-00001"),
        ("flush_file", "tmp-2/shard-00000.index"),
        ("flush_file", "ckpt-2.data-00000-of-00001"),
        ("flush_file", "ckpt-2.index"),
        ("flush_dir", "."),
        # 2. publish: `latest` written whole and flushed, then renamed into place.
        ("flush_file", tmp_latest),
        ("replace", "latest"),
        # 3. the rename flushed, 4. only then older checkpoints pruned.
        ("flush_dir", "."),
        ("before_prune", 2),
        ("remove", "ckpt-1.data-00000-of-00001"),
        ("remove", "ckpt-1.index"),
    ])
    self.assertEqual(self._latest(), {"latest": 2, "all": [2]})
    self.assertEqual(sorted(os.listdir(self.dir)),
                     ["ckpt-2.data-00000-of-00001", "ckpt-2.index", "latest"])

  def test_max_to_keep_below_one_is_refused(self):
    # `kept[-0:]` is the whole list: max_to_keep=0 kept every checkpoint instead of none.
    for bad in (0, -1, 1.5, True):
      with self.subTest(max_to_keep=bad), self.assertRaisesRegex(
          ValueError, rf"max_to_keep={bad!r} must be an integer >= 1"):
        self._checkpointer(max_to_keep=bad)
    ckpt = self._checkpointer(max_to_keep=2)
    for step in (1, 2, 3):
      ckpt.save(step)
    self.assertEqual(self._latest(), {"latest": 3, "all": [2, 3]})

  def test_flushes_reach_the_disk(self):
    # The flushes are real fsync calls on the files and the directory named above.
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
      synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), self.dir))
      real_fsync(fd)

    ckpt = self._checkpointer()
    with mock.patch.object(os, "fsync", recording_fsync):
      ckpt.save(1)
    self.assertEqual(synced, ["tmp-1/shard-00000.data-00000-of-00001", "tmp-1/shard-00000.index",
                              "ckpt-1.data-00000-of-00001", "ckpt-1.index", ".",
                              f"latest.tmp-{os.getpid()}", "."])
    synced.clear()
    ckpt = self._checkpointer(checkpointing.LocalFileOps(flush=False))
    with mock.patch.object(os, "fsync", recording_fsync):
      ckpt.save(2)
    self.assertEqual(synced, [])

  def test_failed_flush_publishes_nothing(self):
    # A flush that fails (an I/O error) stops the save before `latest` moves: the previous
    # checkpoint stays published and intact.
    self._set(1.0)
    self._checkpointer().save(1)
    self._set(2.0)
    ops = RecordingFileOps(self.dir, fail_on="flush_dir")
    with self.assertRaisesRegex(OSError, "injected flush_dir failure"):
      self._checkpointer(ops).save(2)
    self.assertNotIn(("replace", "latest"), ops.events)
    self.assertEqual(self._latest(), {"latest": 1, "all": [1]})
    ckpt = self._checkpointer()   # a restart: drops the unpublished shards, restores step 1
    self.assertEqual([n for n in os.listdir(self.dir) if n.startswith("tmp-")], [])
    ckpt.restore(ckpt.latest())
    for v in self.entries.values():
      self.assertAllEqual(v, tf.ones_like(v))


if __name__ == "__main__":
  tf.test.main()
