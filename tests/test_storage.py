"""model_dir on a non-local TensorFlow filesystem: TensorFlow's in-memory `ram://`.

`ram://` lives inside one process, so everything here runs in this process:
  * one run trains, evaluates, captions the validation images (JSON lines, metrics, a page)
    and exports a SavedModel with every path on `ram://`, in an empty working directory: the
    local disk gets nothing (once, the captions and their metrics landed in a local folder
    named `ram:`), and the SavedModel loads from `ram://` and serves the generated caption;
  * per-step logs (losses, data keys) reach `ram://` at logging cadence, not every step (an
    append rewrites the whole object there);
  * a run interrupted where a SIGKILL would stop it (inside a checkpoint save, after shards were
    written and before `latest` names them; right after a step, its log line still buffered)
    and resumed by a fresh `train()` call ends with the losses, weights and logs of a run that
    was never interrupted. The fault hooks raise instead of killing the process, which would
    take the filesystem with it;
  * two workers (threads sharing one barrier, each its own `Checkpointer` and expert slice, as
    two ranks on shared storage) write one checkpoint to `ram://`, restored by one worker
    holding every expert (2 → 1).
Killing real processes and resharding across real Horovod ranks are in tests/test_reliability.py
and tests/test_parallel_training.py (local disk); the file operations are the same calls.
"""

import contextlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from unittest import mock

import gin
import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.run import checkpointing
from m6t_tf.run import configurables
from m6t_tf.models import decoding
from m6t_tf.run import evaluation
from m6t_tf.errors import ConfigError
from m6t_tf.run import captioning
from m6t_tf.run import faults
from m6t_tf.parallel import communicator as comm_lib
from m6t_tf.run import logs
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.run import generation
from m6t_tf.run import serving
from m6t_tf import storage
from m6t_tf.data import records
from tests import support
from tests.support import DEMO, REPO

STEPS = 6
LOG_EVERY = 3  # tiny.gin logs every step: the logs' cadence shows only with a longer period


def _ram_dir(name):
  return f"ram://m6t_storage_test/{uuid.uuid4().hex[:8]}/{name}"


class _Killed(Exception):
  """Where a fault-injected SIGKILL would have stopped the process."""


def _raise_instead_of_kill(self, kind, step):
  if self._due(kind, step):  # pylint: disable=protected-access
    raise _Killed(f"{kind}:{step}")


def _tree(root):
  """Relative paths of every file and folder under `root` (bytecode caches left out)."""
  out = set()
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in (".git", "__pycache__")]
    rel = os.path.relpath(folder, root)
    out.update(os.path.normpath(os.path.join(rel, n)) for n in dirs + files)
  return out


def _repo_tree():
  return {p for p in _tree(REPO) if p.split(os.sep)[0] not in ("runs", ".venv", ".data")}


# AutoGraph writes the Python source of each function it converts to the temporary directory
# (TensorFlow's cache of generated code, not an output of the run).
_AUTOGRAPH = "__autograph_generated_file"


@contextlib.contextmanager
def _local_disk_watch():
  """Runs the block in a fresh, empty working directory, with the temporary directory
  (Python's and TMPDIR) moved to another fresh one; yields a list that, on exit, holds every
  local path the block created: in either directory (AutoGraph's sources aside), or new in
  the repository outside runs/ (where the tests running beside this one, under
  `pytest -n`, write their own model dirs)."""
  before = _repo_tree()
  cwd, tmp = tempfile.mkdtemp(prefix="m6t_cwd_"), tempfile.mkdtemp(prefix="m6t_tmp_")
  saved = os.getcwd(), tempfile.tempdir, os.environ.get("TMPDIR")
  created = []
  os.chdir(cwd)
  tempfile.tempdir = os.environ["TMPDIR"] = tmp
  try:
    yield created
  finally:
    os.chdir(saved[0])
    tempfile.tempdir = saved[1]
    if saved[2] is None:
      os.environ.pop("TMPDIR")
    else:
      os.environ["TMPDIR"] = saved[2]
    created += sorted(os.path.join(REPO, p) for p in _repo_tree() - before)
    for folder in (cwd, tmp):
      created += sorted(os.path.join(folder, p) for p in _tree(folder)
                        if not (folder == tmp and p.startswith(_AUTOGRAPH)))
      shutil.rmtree(folder, ignore_errors=True)


def _appends(mock_append, name):
  """How many `storage.append_text` calls wrote to a path ending in `name`."""
  return sum(1 for c in mock_append.call_args_list if c.args[0].endswith(name))


def _jsonl_steps(path):
  """The "step" of every line of a JSON-lines log on any filesystem, in file order."""
  return [json.loads(line)["step"] for line in storage.read_text(path).splitlines()]


def _key_log(path):
  """{step: keys} of a data-key log, later lines overriding earlier ones."""
  out = {}
  for line in storage.read_text(path).splitlines():
    row = json.loads(line)
    out[row["step"]] = row["keys"]
  return out


def _parse(eval_data, *bindings):
  """The run's config; `eval_data=None`: no evaluation (nothing reads it)."""
  gin.clear_config()
  configurables.parse(
      [os.path.join(REPO, "gin", "demo.gin"), os.path.join(REPO, "gin", "tiny.gin")],
      [f"train.train_data='{DEMO}/train-*.tfrecord'",
       f"train.eval_data={eval_data and repr(eval_data)}",
       f"train.num_steps={STEPS}", "train.checkpoint_every=2", "train.deterministic=True",
       "train.keep_checkpoints=2", "train.eval_batches=0", f"train.log_every={LOG_EVERY}",
       "train.log_data_keys=True", *bindings], [REPO])


@pytest.mark.slow
class RamModelDirTest(tf.test.TestCase):
  """One run on ram:// (setUpClass) shared by the checks; an interrupted run compared to it."""

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
    try:
      cls._run_everything_on_ram()
    finally:
      gin.clear_config()

  @classmethod
  def _run_everything_on_ram(cls):
    """train → evaluate → generate → export, every output on ram://, the disk watched."""
    cls.model_dir = _ram_dir("straight")
    cls.export_dir = os.path.join(cls.model_dir, "export")
    with _local_disk_watch() as cls.created, \
         mock.patch.object(storage, "append_text", wraps=storage.append_text) as append:
      # Checkpoints only at the end: the per-step logs are written at logging cadence alone.
      _parse(cls.eval_data, "train.checkpoint_every=1000")
      cls.summary = configurables.run_train(model_dir=cls.model_dir)
      cls.appends = {name: _appends(append, name)
                     for name in ("losses.jsonl", os.path.join("data_keys", "rank0.jsonl"))}
      cls.eval = evaluation.evaluate(cls.model_dir)
      cls.generated = generation.generate(
          cls.model_dir, split="validation", num_images=3, options=decoding.DecodeOptions(),
          html=os.path.join(cls.model_dir, "captions.html"), log=lambda *a: None)
      serving.export_model(cls.model_dir, cls.export_dir, options=decoding.DecodeOptions(),
                           serving_batch=2)
      serve = tf.saved_model.load(cls.export_dir).signatures[serving.SIGNATURE_KEY]
      item = captioning.read_split_items(cls.eval_data, image_mode="pixels", max_len=12)[0]
      cls.served = serve(images=tf.constant([tf.io.encode_png(item.features).numpy()]))

  @classmethod
  def tearDownClass(cls):
    tf.io.gfile.rmtree(cls.local)
    super().tearDownClass()

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def _train(self, model_dir, fault=None):
    # Without evaluation: the interrupted runs' checks are of training, its logs and its
    # checkpoints (the straight run evaluates from ram://); each evaluation would trace again.
    _parse(None)
    with mock.patch.dict(os.environ, {"M6T_FAULT_INJECT": fault or ""}), \
         mock.patch.object(faults.FaultInjection, "maybe_kill", _raise_instead_of_kill):
      return configurables.run_train(model_dir=model_dir)

  def test_a_run_on_ram_writes_nothing_to_the_local_disk(self):
    self.assertEqual(self.created, [])
    self.assertEqual([p for p in _tree(REPO) if "ram:" in p.split(os.sep)], [])
    # Everything landed on ram:// instead.
    for name in ("config.gin", "losses.jsonl", "data_keys/rank0.jsonl", "train_summary.json",
                 "eval.json", "captions.jsonl", "caption_metrics.json", "captions.html",
                 "checkpoints/latest", "export/saved_model.pb", "export/variables"):
      self.assertTrue(storage.exists(os.path.join(self.model_dir, name)), name)
    rows = self.generated["rows"]
    self.assertEqual(self.generated["out"], os.path.join(self.model_dir, "captions.jsonl"))
    self.assertEqual([json.loads(line) for line in storage.read_text(
        self.generated["out"]).splitlines()], json.loads(json.dumps(rows)))
    metrics = json.loads(storage.read_text(os.path.join(self.model_dir,
                                                        "caption_metrics.json")))
    self.assertEqual(metrics, json.loads(json.dumps(self.generated["metrics"])))
    self.assertIn(rows[0]["caption"], storage.read_text(os.path.join(self.model_dir,
                                                                     "captions.html")))
    # The SavedModel loaded from ram:// gives generate's caption for the same image.
    self.assertEqual(self.served["captions"].numpy()[0].decode("utf-8"), rows[0]["caption"])
    self.assertAllClose(self.served["log_probs"].numpy()[0], rows[0]["log_prob"], atol=1e-4)
    self.assertEqual(json.loads(storage.read_text(os.path.join(self.model_dir, "eval.json")))
                     ["tokens"], self.summary["eval"]["tokens"])

  def test_step_logs_reach_ram_at_logging_cadence(self):
    # 6 steps, a log every 3, one checkpoint at the end: two appends per log, not six.
    self.assertEqual(self.appends, {"losses.jsonl": 2, "data_keys/rank0.jsonl": 2})
    losses = logs.read_loss_log(os.path.join(self.model_dir, "losses.jsonl"))
    self.assertEqual(losses, dict(enumerate(self.summary["losses"], start=1)))
    keys = _key_log(os.path.join(self.model_dir, "data_keys", "rank0.jsonl"))
    self.assertEqual(sorted(keys), list(range(1, STEPS + 1)))
    self.assertTrue(all(len(k) == 2 for k in keys.values()))  # tiny.gin: 2 records a step

  def test_local_step_logs_are_written_every_step(self):
    # A local append is cheap and survives a kill: no buffering there.
    path = os.path.join(self.local, "losses.jsonl")
    log = logs.LossLog(path)
    self.assertFalse(log.buffered)
    log.write(1, 2.5)
    self.assertEqual(logs.read_loss_log(path), {1: 2.5})
    self.assertTrue(logs.LossLog(_ram_dir("losses.jsonl")).buffered)

  def test_interrupted_run_on_ram_resumes_exactly_and_evaluates(self):
    resumed_dir = _ram_dir("resumed")
    ckpts = os.path.join(resumed_dir, "checkpoints")
    loss_path = os.path.join(resumed_dir, "losses.jsonl")
    with _local_disk_watch() as created:
      # Interrupted inside the save of step 4: shards in tmp-4/, `latest` still names step 2;
      # the logs were flushed before the save.
      with self.assertRaises(_Killed):
        self._train(resumed_dir, fault="kill_in_save:4")
      self.assertEqual(json.loads(storage.read_text(os.path.join(ckpts, "latest")))["latest"],
                       2)
      self.assertIn("tmp-4", storage.listdir(ckpts))
      self.assertFalse(storage.exists(os.path.join(ckpts, "ckpt-4.index")))
      self.assertEqual(_jsonl_steps(loss_path), [1, 2, 3, 4])
      # Interrupted right after step 3 (resumed from 2): its line was still buffered, and is
      # lost with the process; the resumed run trains step 3 again.
      with self.assertRaises(_Killed):
        self._train(resumed_dir, fault="kill_after_step:3")
      self.assertEqual(_jsonl_steps(loss_path), [1, 2, 3, 4])
      last = self._train(resumed_dir)
    self.assertEqual(created, [])
    self.assertLen(last["losses"], STEPS - 2)
    self.assertNotIn("tmp-4", storage.listdir(ckpts))  # the unpublished shards were dropped

    # Later lines win: the logs read as those of the uninterrupted run.
    self.assertEqual(_jsonl_steps(loss_path), [1, 2, 3, 4, 3, 4, 5, 6])
    want = logs.read_loss_log(os.path.join(self.model_dir, "losses.jsonl"))
    self.assertLen(want, STEPS)
    self.assertEqual(logs.read_loss_log(loss_path), want)
    self.assertEqual(_key_log(os.path.join(resumed_dir, "data_keys", "rank0.jsonl")),
                     _key_log(os.path.join(self.model_dir, "data_keys", "rank0.jsonl")))
    a = tf.compat.v1.train.NewCheckpointReader(
        os.path.join(self.model_dir, "checkpoints", f"ckpt-{STEPS}"))
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

    # The evaluator read config.gin and the checkpoint from ram:// (setUpClass).
    self.assertEqual(self.eval["tokens"], self.summary["eval"]["tokens"])
    self.assertAllClose(self.eval["log_perplexity"], self.summary["eval"]["log_perplexity"],
                        rtol=1e-5)
    written = json.loads(storage.read_text(os.path.join(self.model_dir, "eval.json")))
    self.assertAllClose(written["perplexity"], self.eval["perplexity"])
    # The caption generator's restore reads model_dir from ram:// as well.
    restored = generation.restore(self.model_dir)
    self.assertEqual(restored.checkpoint, os.path.join(self.model_dir, "checkpoints",
                                                       f"ckpt-{STEPS}"))
    for k, v in trainer_lib.variables_by_path(restored.model).items():
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
      checkpointing.check_model_dir("s3://bucket/run")

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
        comm_lib.mark_expert_sharded(entries["model/moe/experts/wi"])  # as Experts.build does
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
    comm_lib.mark_expert_sharded(one["model/moe/experts/wi"])
    from m6t_tf.parallel import context as context_lib
    ckpt = checkpointing.Checkpointer(directory, one, ctx=context_lib.LocalContext(),
                                      num_experts=num_experts)
    ckpt.restore(ckpt.latest())
    self.assertAllEqual(one["model/dense/kernel"], dense)
    self.assertAllEqual(one["model/moe/experts/wi"], experts)  # every expert at its global id


if __name__ == "__main__":
  tf.test.main()
