"""model_dir on a non-local TensorFlow filesystem: TensorFlow's in-memory `ram://`.

`ram://` lives inside one process, so everything here runs in this process:
  * a run interrupted where a SIGKILL would stop it (inside a checkpoint save, after shards were
    written and before `latest` names them; right after a step) and resumed by a fresh `train()`
    call ends with the losses and weights of a run that was never interrupted. The fault hooks
    raise instead of killing the process, which would take the filesystem with it;
  * two workers (threads sharing one barrier, each its own `Checkpointer` and expert slice, as
    two ranks on shared storage) write one checkpoint to `ram://`, restored by one worker
    holding every expert (2 → 1);
  * the evaluator reads config.gin and the checkpoint from `ram://` and writes eval.json there;
    the caption generator restores the model from there.
Killing real processes and resharding across real Horovod ranks are in tests/test_reliability.py
and tests/test_parallel_training.py (local disk); the file operations are the same calls.
"""

import json
import os
import threading
import uuid
from unittest import mock

import gin
import numpy as np
import pytest
import tensorflow as tf

from m6t_tf import checkpointing
from m6t_tf import configurables
from m6t_tf import evaluation
from m6t_tf.cli import ConfigError
from m6t_tf import generation
from m6t_tf import storage
from m6t_tf import training
from m6t_tf.data import records
from tests import support
from tests.support import DEMO, REPO

STEPS = 6


def _ram_dir(name):
  return f"ram://m6t_storage_test/{uuid.uuid4().hex[:8]}/{name}"


class _Killed(Exception):
  """Where a fault-injected SIGKILL would have stopped the process."""


def _raise_instead_of_kill(self, kind, step):
  if self._due(kind, step):  # pylint: disable=protected-access
    raise _Killed(f"{kind}:{step}")


@pytest.mark.slow
class RamModelDirTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    support.require_demo()
    # A small validation file (local: data stays where it is; only model_dir moves).
    cls.local = os.path.join(REPO, "runs", f"test_storage_{uuid.uuid4().hex[:8]}")
    os.makedirs(cls.local)
    cls.eval_data = os.path.join(cls.local, "validation.tfrecord")
    records.write_records(cls.eval_data, records.read_serialized(
        os.path.join(DEMO, "validation-*.tfrecord"))[:8])
    storage.write_text(os.path.join(cls.local, "metadata.json"),
                       storage.read_text(os.path.join(DEMO, "metadata.json")))

  @classmethod
  def tearDownClass(cls):
    tf.io.gfile.rmtree(cls.local)
    super().tearDownClass()

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def _parse(self):
    gin.clear_config()
    configurables.parse(
        [os.path.join(REPO, "gin", "demo.gin"), os.path.join(REPO, "gin", "tiny.gin")],
        [f"train.train_data='{DEMO}/train-*.tfrecord'", f"train.eval_data='{self.eval_data}'",
         f"train.num_steps={STEPS}", "train.checkpoint_every=2", "train.deterministic=True",
         "train.keep_checkpoints=2", "train.eval_batches=0"], [REPO])

  def _train(self, model_dir, fault=None, **kwargs):
    self._parse()
    with mock.patch.dict(os.environ, {"M6T_FAULT_INJECT": fault or ""}), \
         mock.patch.object(training.FaultInjection, "maybe_kill", _raise_instead_of_kill):
      return configurables.run_train(model_dir=model_dir, **kwargs)

  def test_interrupted_run_on_ram_resumes_exactly_and_evaluates(self):
    straight_dir, resumed_dir = _ram_dir("straight"), _ram_dir("resumed")
    straight = self._train(straight_dir)
    ckpts = os.path.join(resumed_dir, "checkpoints")
    # Interrupted inside the save of step 4: shards in tmp-4/, `latest` still names step 2.
    with self.assertRaises(_Killed):
      self._train(resumed_dir, fault="kill_in_save:4")
    self.assertEqual(json.loads(storage.read_text(os.path.join(ckpts, "latest")))["latest"], 2)
    self.assertIn("tmp-4", storage.listdir(ckpts))
    self.assertFalse(storage.exists(os.path.join(ckpts, "ckpt-4.index")))
    # Interrupted right after step 3 (resumed from 2), then resumed again to the end.
    with self.assertRaises(_Killed):
      self._train(resumed_dir, fault="kill_after_step:3")
    last = self._train(resumed_dir)
    self.assertLen(last["losses"], STEPS - 2)
    self.assertNotIn("tmp-4", storage.listdir(ckpts))  # the unpublished shards were dropped

    want = training.read_loss_log(os.path.join(straight_dir, "losses.jsonl"))
    self.assertLen(want, STEPS)
    self.assertEqual(training.read_loss_log(os.path.join(resumed_dir, "losses.jsonl")), want)
    a = tf.compat.v1.train.NewCheckpointReader(os.path.join(straight_dir, "checkpoints", f"ckpt-{STEPS}"))
    b = tf.compat.v1.train.NewCheckpointReader(os.path.join(ckpts, f"ckpt-{STEPS}"))
    keys = sorted(a.get_variable_to_shape_map())
    self.assertEqual(keys, sorted(b.get_variable_to_shape_map()))
    for k in keys:
      self.assertAllEqual(a.get_tensor(k), b.get_tensor(k), msg=k)
    # Everything else train() writes, on ram:// too.
    for name in ("config.gin", "train_summary.json", "train"):
      self.assertTrue(storage.exists(os.path.join(resumed_dir, name)), name)
    self.assertTrue(storage.listdir(os.path.join(resumed_dir, "train")))  # TensorBoard events
    self.assertEqual(sorted(n for n in storage.listdir(ckpts) if n.endswith(".index")),
                     [f"ckpt-{STEPS - 2}.index", f"ckpt-{STEPS}.index"])

    # The evaluator: config.gin and the checkpoint from ram://, eval.json written there.
    result = evaluation.evaluate(straight_dir)
    self.assertEqual(result["tokens"], straight["eval"]["tokens"])
    self.assertAllClose(result["log_perplexity"], straight["eval"]["log_perplexity"], rtol=1e-5)
    written = json.loads(storage.read_text(os.path.join(straight_dir, "eval.json")))
    self.assertAllClose(written["perplexity"], result["perplexity"])
    # The caption generator's restore reads model_dir from ram:// as well.
    restored = generation.restore(straight_dir)
    self.assertEqual(restored.checkpoint, os.path.join(straight_dir, "checkpoints",
                                                       f"ckpt-{STEPS}"))
    for k, v in training.variables_by_path(restored.model).items():
      self.assertAllEqual(v.numpy(), a.get_tensor(k), msg=k)


class _ThreadRank:
  """One of `size` workers of one expert group, as a thread: rank, slice and a shared barrier."""

  def __init__(self, rank, size, barrier):
    self.rank = self.expert_index = rank
    self.expert_group_size = size
    self.data_index = 0
    self.barrier = barrier.wait


class RamCheckpointTest(tf.test.TestCase):

  def test_file_ops_follow_the_path(self):
    self.assertIsInstance(checkpointing.file_ops_for("/ckpt/run"), checkpointing.LocalFileOps)
    self.assertIsInstance(checkpointing.file_ops_for("file:///ckpt/run"),
                          checkpointing.GFileOps)
    self.assertIsInstance(checkpointing.file_ops_for("gs://bucket/run"), checkpointing.GFileOps)
    self.assertIsInstance(checkpointing.file_ops_for("ram://run"), checkpointing.GFileOps)

  def test_filesystem_without_support_is_named_at_start(self):
    with self.assertRaisesRegex(ConfigError, r"model_dir='s3://bucket/run' is not writable "
                                            r"\(File system scheme 's3' not implemented.*"
                                            r"tensorflow-io"):
      training.check_model_dir("s3://bucket/run")

  def test_two_writers_on_ram_restore_onto_one(self):
    directory = _ram_dir("checkpoints")
    num_experts, size = 4, 2
    dense = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    experts = np.arange(num_experts * 6, dtype=np.float32).reshape(num_experts, 2, 3)
    barrier = threading.Barrier(size)
    errors = []

    def rank_main(rank):
      try:
        e = num_experts // size
        entries = {"model/dense/kernel": tf.Variable(dense),
                   "model/moe/experts/wi": tf.Variable(experts[rank * e:(rank + 1) * e])}
        ckpt = checkpointing.Checkpointer(directory, entries, ctx=_ThreadRank(rank, size, barrier),
                                          num_experts=num_experts)
        self.assertIsInstance(ckpt.fs, checkpointing.GFileOps)
        ckpt.save(7)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
        barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
    self.assertEqual(errors, [])
    self.assertEqual(json.loads(storage.read_text(os.path.join(directory, "latest"))),
                     {"latest": 7, "all": [7]})
    self.assertEqual(sorted(storage.listdir(directory)),
                     ["ckpt-7.data-00000-of-00002", "ckpt-7.data-00001-of-00002",
                      "ckpt-7.index", "latest"])
    one = {"model/dense/kernel": tf.Variable(tf.zeros_like(dense)),
           "model/moe/experts/wi": tf.Variable(tf.zeros_like(experts))}
    from m6t_tf.parallel import context as context_lib
    ckpt = checkpointing.Checkpointer(directory, one, ctx=context_lib.LocalContext(),
                                      num_experts=num_experts)
    ckpt.restore(ckpt.latest())
    self.assertAllEqual(one["model/dense/kernel"], dense)
    self.assertAllEqual(one["model/moe/experts/wi"], experts)  # every expert at its global id


if __name__ == "__main__":
  tf.test.main()
