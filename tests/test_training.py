"""Trainer, evaluator and gin configs: every size file shrunk by tiny.gin trains; exact resume;
the evaluator's perplexity against a hand-computed value; bad configs fail before compute."""

import glob
import json
import math
import os
import re
import stat
import tempfile
import threading
from unittest import mock

from absl.testing import parameterized
import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.run import configurables
from m6t_tf.run import evaluation as evaluate_lib
from m6t_tf.run import checkpointing
from m6t_tf.run import inputs
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.errors import ConfigError
from m6t_tf.data import pipeline
from m6t_tf.data import records
from tests import support
from tests.support import DEMO, REPO

SIZE_FILES = ["base.gin", "10B.gin", "100B.gin", "1T.gin", "demo.gin", "revisit_moe.gin"]


def _parse(files, bindings=()):
  gin.clear_config()
  configurables.parse([os.path.join(REPO, "gin", f) for f in files], list(bindings), [REPO])


def _tiny(size_file, bindings=()):
  _parse([size_file, "tiny.gin"], [
      f"train.train_data='{DEMO}/train-*.tfrecord'",
      f"train.eval_data='{DEMO}/validation-*.tfrecord'", *bindings])


@pytest.mark.slow
class GinFilesTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    support.require_demo()
    os.chdir(REPO)

  def tearDown(self):
    keras.mixed_precision.set_global_policy("float32")
    gin.clear_config()
    super().tearDown()

  @parameterized.parameters(*SIZE_FILES)
  def test_size_file_shrunk_by_tiny_trains_two_steps(self, size_file):
    _tiny(size_file)
    model_dir = _tmpdir()
    summary = configurables.run_train(model_dir=model_dir)
    self.assertLen(summary["losses"], 2)
    self.assertTrue(all(math.isfinite(x) for x in summary["losses"]))
    self.assertTrue(math.isfinite(summary["eval"]["perplexity"]))
    self.assertTrue(os.path.exists(os.path.join(model_dir, "checkpoints", "ckpt-2.index")))
    with open(os.path.join(model_dir, "config.gin")) as f:
      self.assertIn("train.num_steps = 2", f.read())

  def test_mixed_precision_step_keeps_router_float32(self):
    _tiny("base.gin", ["train.mixed_precision = True"])
    summary = configurables.run_train(model_dir=_tmpdir())
    self.assertTrue(all(math.isfinite(x) for x in summary["losses"]))
    model = summary["model"]
    moe = model.moe_layers[0]
    self.assertEqual(moe.router.compute_dtype, "float32")
    self.assertEqual(moe.experts.compute_dtype, "float16")
    self.assertEqual(moe.experts.wi.dtype, "float32")  # float32 master weights

  def test_size_files_pin_the_paper(self):
    # arXiv 2105.15082 Table 5: layers, experts, I, init std, optimizer, lr, mixed precision
    expected = {
        "base.gin": (5, 32, 4096, 0.02, "adamw", 8e-5, True),
        "10B.gin": (10, 128, 4096, 0.02, "adamw", 8e-5, True),
        "100B.gin": (24, 512, 4096, 0.02, "adamw", 8e-5, True),
        "1T.gin": (24, 960, 21248, 0.002, "adafactor", 5e-3, False),
    }
    for name, (layers, experts, inter, std, opt, lr, mp) in expected.items():
      _parse([name])
      q = gin.query_parameter
      self.assertEqual(q("%NUM_LAYERS"), layers, name)
      self.assertEqual(q("%NUM_EXPERTS"), experts, name)
      self.assertEqual(q("%INTERMEDIATE"), inter, name)
      self.assertEqual(q("%INIT_STD"), std, name)
      self.assertEqual(q("%HIDDEN"), 1024, name)
      self.assertEqual((q("%NUM_HEADS"), q("%HEAD_SIZE")), (16, 64), name)
      self.assertEqual(q("%CAPACITY_FACTOR"), 1.25, name)
      self.assertEqual(q("%DROPOUT"), 0.1, name)
      self.assertEqual(q("train.optimizer"), opt, name)
      self.assertEqual(q("train.learning_rate"), lr, name)
      self.assertEqual(q("train.warmup_steps"), 500, name)
      self.assertEqual(q("train.batch_size_per_worker"), 8, name)
      self.assertEqual(q("train.mixed_precision"), mp, name)

  def test_resume_equals_straight_run(self):
    # on_bad_record='fail' on clean data: both streams of a resumed run are built with it (a
    # bad-record counter handed to a 'fail' stream once crashed every such run at start-up).
    bindings = ["train.num_steps=7", "train.deterministic=True", "train.eval_data=None",
                "train.checkpoint_every=2", "train.on_bad_record='fail'"]
    _tiny("demo.gin", bindings)
    straight = configurables.run_train(model_dir=_tmpdir())["losses"]
    resumed_dir = _tmpdir()
    _tiny("demo.gin", bindings)
    first = configurables.run_train(model_dir=resumed_dir, stop_after=4)["losses"]
    _tiny("demo.gin", bindings)
    second = configurables.run_train(model_dir=resumed_dir)["losses"]
    self.assertLen(first, 4)
    self.assertLen(second, 3)
    self.assertAllEqual(straight, first + second)

  @parameterized.parameters([[]], [["train.global_batch_size = 6"]])
  def test_evaluate_cli_matches_trainer_final_eval(self, bindings):
    # With a global batch the trainer's per-worker batch is global / workers, not the gin
    # batch_size_per_worker (2 in tiny.gin); capacity, and so perplexity, depends on it. (An
    # untrained tiny model's perplexity barely shows it: the batch count does.)
    _tiny("demo.gin", ["train.eval_batches=0", *bindings])
    model_dir = _tmpdir()
    summary = configurables.run_train(model_dir=model_dir)
    result = evaluate_lib.evaluate(model_dir)
    self.assertEqual(result["batches"], summary["eval"]["batches"])
    self.assertEqual(result["tokens"], summary["eval"]["tokens"])
    self.assertAllClose(result["log_perplexity"], summary["eval"]["log_perplexity"], rtol=1e-5)
    with open(os.path.join(model_dir, "eval.json")) as f:
      self.assertAllClose(json.load(f)["perplexity"], result["perplexity"])
    self.assertGreater(result["unigram_perplexity"], 1.0)

  def test_logged_learning_rate_is_the_one_applied(self):
    # Warmup 1, then cosine to 10% over 3 steps: step s applies schedule(s - 1), so step 1
    # applies the peak. (The log once showed the next step's rate, 5.5e-3 at step 1.)
    _tiny("demo.gin", ["train.num_steps = 3", "train.warmup_steps = 1",
                       "train.learning_rate = 1e-2", "train.lr_decay = 'cosine'",
                       "train.final_lr_fraction = 0.1", "train.log_every = 1"])
    model_dir = _tmpdir()
    configurables.run_train(model_dir=model_dir)
    logged = {}
    for path in glob.glob(os.path.join(model_dir, "train", "events.*")):
      for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
          if value.tag == "learning_rate":
            logged[event.step] = float(tf.make_ndarray(value.tensor))
    self.assertAllClose([logged[s] for s in (1, 2, 3)], [1e-2, 5.5e-3, 1e-3], rtol=1e-5)

  def test_perplexity_matches_hand_computed_value(self):
    # With a zero embedding table the logits are the output bias alone, so the model is a
    # unigram distribution softmax(bias) and its perplexity can be computed by hand.
    _tiny("demo.gin")
    ds = inputs.eval_stream(f"{DEMO}/validation-*.tfrecord", batch_size=4, max_len=12,
                                    image_mode="pixels", ctx=_local())
    model = trainer_lib.build_model(configurables.network_fn(), batch=next(iter(ds.take(1))))
    net = model.network
    net.token_embedding.embeddings.assign(tf.zeros_like(net.token_embedding.embeddings))
    bias = np.random.default_rng(0).normal(size=net.output_bias.shape).astype(np.float32)
    net.output_bias.assign(bias)
    trainer = trainer_lib.Trainer(model, evaluate_lib._NoOpt())
    got = trainer_lib.evaluate_perplexity(trainer, ds)
    log_p = bias - np.log(np.sum(np.exp(bias.astype(np.float64))))
    targets = np.concatenate([b["tokens"].numpy()[:, 1:].reshape(-1) for b in ds])
    targets = targets[targets != 0]
    expected = math.exp(-np.mean(log_p[targets]))
    self.assertEqual(got["tokens"], len(targets))
    self.assertAllClose(got["perplexity"], expected, rtol=1e-4)


_TMPDIRS = []


def _tmpdir():
  # tf.test's create_tempdir needs absl flags, which pytest does not parse.
  _TMPDIRS.append(tempfile.mkdtemp(prefix="m6t_test_"))
  return _TMPDIRS[-1]


def tearDownModule():
  import shutil
  for d in _TMPDIRS:
    shutil.rmtree(d, ignore_errors=True)


def _local():
  from m6t_tf.parallel import context
  return context.LocalContext()


def _within(seconds, fn):
  """fn() in a thread; fails if it neither returned nor raised after `seconds` (a run that
  spins without a step). The thread is left behind (a daemon)."""
  out = {}

  def run():
    try:
      out["value"] = fn()
    except Exception as e:  # pylint: disable=broad-except
      out["error"] = e

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    raise AssertionError(f"no step and no error after {seconds} s: the run spins")
  if "error" in out:
    raise out["error"]
  return out["value"]


class BadConfigTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    os.chdir(REPO)

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def test_unknown_binding_is_rejected(self):
    with self.assertRaisesRegex(ConfigError, "nonexistent_option"):
      _tiny("demo.gin", ["train.nonexistent_option = 3"])

  def test_k_larger_than_experts_fails_before_training(self):
    _tiny("demo.gin", ["K = 16"])
    with self.assertRaisesRegex(ConfigError, "k=16"):
      configurables.run_train(model_dir=_tmpdir())

  def test_out_of_range_and_wrong_type_values(self):
    cases = [("CAPACITY_FACTOR = -1.0", "capacity_factor=-1.0 must be > 0"),
             ("NUM_HEADS = 3", "num_heads=3 must divide hidden_size=32"),
             ("train.num_steps = 'ten'", "train.num_steps='ten' must be an integer"),
             ("train.global_batch_size = 3", None),  # 1 worker: 3 divides
             ("train.optimizer = 'sgd'", "train.optimizer='sgd'; allowed")]
    for binding, message in cases:
      _tiny("demo.gin", [binding])
      if message is None:
        continue
      with self.assertRaisesRegex(ConfigError, message, msg=binding):
        configurables.run_train(model_dir=_tmpdir())

  def test_global_batch_must_divide_over_workers(self):
    class TwoWorkers(_local().__class__):
      size = 2
    _tiny("demo.gin", ["train.global_batch_size = 3"])
    with self.assertRaisesRegex(ConfigError, "global_batch_size=3 is not divisible by the 2"):
      configurables.run_train(model_dir=_tmpdir(), ctx=TwoWorkers())

  def test_cosine_horizon_shorter_than_warmup(self):
    _tiny("demo.gin", ["train.warmup_steps = 10", "train.lr_decay = 'cosine'"])
    with self.assertRaisesRegex(ConfigError, r"train.num_steps=2 is not more than the 10 "
                                            r"warmup steps .*train.warmup_steps=1"):
      configurables.run_train(model_dir=_tmpdir())

  def test_settings_that_crashed_hung_or_were_ignored_are_config_errors(self):
    # Each was a plain ValueError (a traceback, exit 1), a silent hang (shuffle_buffer=0: the
    # stream spun through empty epochs) or accepted (keep_checkpoints=0 kept every
    # checkpoint). ConfigError is asserted, not ValueError, which it subclasses.
    cases = [
        ("train.on_bad_record = 'bogus'", r"train.on_bad_record='bogus'; allowed: 'skip'"),
        ("train.stall_timeout_s = -1", r"train.stall_timeout_s=-1 must be a number of "
                                       r"seconds >= 0 .*stall_timeout_s=300"),
        ("train.keep_checkpoints = 0", r"train.keep_checkpoints=0 must be an integer >= 1 "
                                       r"\(a run keeps at least the checkpoint"),
        ("train.keep_checkpoints = -2", r"train.keep_checkpoints=-2 must be an integer >= 1"),
        ("train.shuffle_buffer = 0", r"train.shuffle_buffer=0 must be an integer >= 1 .*"
                                     r"--gin_bindings=train.shuffle_buffer=2048"),
        ("train.shuffle_buffer = -3", r"train.shuffle_buffer=-3 must be an integer >= 1"),
        ("train.shuffle_buffer = 2.5", r"train.shuffle_buffer=2.5 must be an integer >= 1"),
    ]
    for binding, message in cases:
      with self.subTest(binding):
        _tiny("demo.gin", [binding, "train.eval_data = None"])
        model_dir = _tmpdir()
        with self.assertRaisesRegex(ConfigError, message):
          _within(120, lambda: configurables.run_train(model_dir=model_dir))
        self.assertEqual(os.listdir(model_dir), [])  # before anything was written

  @pytest.mark.slow
  def test_cosine_warmup_fix_it_suggests_is_valid(self):
    # num_steps=1 once suggested warmup_steps=1, the value that had just failed.
    for bindings in (["train.warmup_steps = 1"],
                     ["train.warmup_steps = 0", "train.warmup_fraction = 0.9"]):
      bindings = ["train.num_steps = 1", "train.lr_decay = 'cosine'",
                  "train.eval_data = None", *bindings]
      with self.subTest(bindings):
        _tiny("demo.gin", bindings)
        with self.assertRaisesRegex(ConfigError, "train.num_steps=1 is not more than") as cm:
          configurables.run_train(model_dir=_tmpdir())
        fix = re.findall(r"--gin_bindings=(\S+)", str(cm.exception).splitlines()[0])
        self.assertTrue(fix, str(cm.exception))
        _tiny("demo.gin", bindings + fix)  # the suggested fix, applied: one good step
        summary = configurables.run_train(model_dir=_tmpdir())
        self.assertLen(summary["losses"], 1)
        self.assertTrue(math.isfinite(summary["losses"][0]))

  @pytest.mark.slow
  def test_input_pipeline_errors_end_the_run_naming_the_data(self):
    # A bad record under on_bad_record='fail': a ConfigError naming the file, record and fix.
    folder = _tmpdir()
    data = os.path.join(folder, "bad.tfrecord")
    good = records.read_serialized(f"{DEMO}/validation-*.tfrecord")[:3]
    records.write_records(data, good[:2] + [b"\x0a\x05garbage"] + good[2:])
    _tiny("demo.gin", [f"train.train_data = '{data}'", "train.eval_data = None",
                       "train.on_bad_record = 'fail'"])
    with self.assertRaisesRegex(
        ConfigError, rf"train.train_data='{re.escape(data)}' \(the batch of step 1\): "
                     rf"on_bad_record=fail: bad record in {re.escape(data)} record 2: "
                     rf"not_an_example: .*; repair or remove that record, or set "
                     rf"--gin_bindings=\"train.on_bad_record='skip'\""):
      _within(120, lambda: configurables.run_train(model_dir=_tmpdir()))
    # Any other failure inside the stream keeps its type and says where it came from (it was
    # swallowed, and the run spun without a step).
    _tiny("demo.gin", ["train.eval_data = None"])
    shuffle = pipeline._window_shuffle  # pylint: disable=protected-access
    with mock.patch.object(pipeline, "_window_shuffle",
                           lambda ds, window, seed, epoch: shuffle(ds, 0, seed, epoch)), \
         self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                "Batch size must be greater than zero") as cm:
      _within(120, lambda: configurables.run_train(model_dir=_tmpdir()))
    notes = getattr(cm.exception, "__notes__", [])
    self.assertTrue(any(n.startswith("Raised by the input pipeline of train.train_data=") and
                        "(the batch of step 1): " in n and
                        n.endswith("Batch size must be greater than zero.") for n in notes),
                    notes)

  def test_unwritable_model_dir_reported_at_start(self):
    if os.geteuid() == 0:
      path = "/proc/m6t_tf_cannot_write_here"  # root ignores permission bits; /proc refuses
    else:
      path = _tmpdir()
      os.chmod(path, stat.S_IRUSR | stat.S_IXUSR)
    with self.assertRaisesRegex(ConfigError, "not writable"):
      checkpointing.check_model_dir(path)


class UnigramBaselineTest(tf.test.TestCase):

  def test_demo_unigram_perplexity_is_recorded(self):
    meta_path = os.path.join(DEMO, "metadata.json")
    support.require_demo()
    with open(meta_path) as f:
      meta = json.load(f)
    got = pipeline.unigram_perplexity(f"{DEMO}/train-*.tfrecord",
                                      f"{DEMO}/validation-*.tfrecord")
    self.assertAllClose(got, meta["unigram_perplexity_validation"], rtol=1e-3)


if __name__ == "__main__":
  tf.test.main()
