"""The command lines as a user meets them, run as real subprocesses (m6t_tf.cli), and the
trainer's configuration checks behind them (in this process: a ConfigError each).

A configuration or input error is one line on stderr and exit status 2, before any model is
built; a genuine crash keeps its traceback; a successful call prints none of TensorFlow's
start-up notices; and a user's own pictures and captions go through make_dataset, train and
evaluate with only the data paths and a step count given.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import gin
import numpy as np
import pytest
import tensorflow as tf

from m6t_tf import errors
from m6t_tf.errors import ConfigError
from m6t_tf.run import configurables
from tests import support
from tests.support import HOROVODRUN, REPO

PY = sys.executable
# What TensorFlow prints at start-up unless m6t_tf.cli keeps it off the console.
NOISE = ("absl::InitializeLog", "oneDNN", "cuda", "cuInit", "cpu_feature_guard",
         "This TensorFlow binary")


def _env(**extra):
  """The environment of a user's shell: no log-level variable set."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "M6T_TF_LOGS")}
  env.update(PYTHONPATH=REPO, **extra)
  return env


def _run(args, timeout=300, **env):
  return subprocess.run(args, cwd=REPO, env=_env(**env), capture_output=True, text=True,
                        timeout=timeout)


def _train(*args, **kw):
  return _run([PY, "-m", "m6t_tf.train", *args], **kw)


_TMPDIRS = []


def _tmpdir():
  _TMPDIRS.append(tempfile.mkdtemp(prefix="m6t_cli_"))
  return _TMPDIRS[-1]


def tearDownModule():
  import shutil
  for d in _TMPDIRS:
    shutil.rmtree(d, ignore_errors=True)


class CliTestCase(tf.test.TestCase):

  def assertUserError(self, proc, *needles):
    """Exit 2 and exactly one stderr line holding every needle (no traceback, no noise)."""
    lines = proc.stderr.strip().splitlines()
    self.assertEqual(proc.returncode, 2, proc.stdout[-2000:] + proc.stderr[-3000:])
    self.assertLen(lines, 1, proc.stderr)
    for needle in needles:
      self.assertIn(needle, lines[0])

  def assertNoNoise(self, text):
    for word in NOISE:
      self.assertNotIn(word, text)


@pytest.mark.multiprocess
class DryRunTest(CliTestCase):

  def test_the_paper_1t_layout_plans_in_seconds_without_data(self):
    # The training data named here does not exist: a dry run reads none.
    started = time.time()
    proc = _train("--gin_file=gin/1T.gin", "--gin_file=gin/layouts/1x480.gin", "--dry_run",
                  "--gin_bindings=train.train_data='/nonexistent/train-*.tfrecord'")
    seconds = time.time() - started
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    out = proc.stdout
    self.assertIn("every binding is valid for 480 worker(s); no data read, no weight made. "
                  "Still required to train: train.num_steps.", out)
    for row in ("| params total | 1,002,753,474,184 (1 T) |", "| T tokens per worker / C |",
                "| memory: total (recompute) |", "| all-to-all per step |"):
      self.assertIn(row, out)
    # 1T.gin recomputes whole blocks: the verdict for this run is the one with recomputation.
    self.assertRegex(out, r"This run \(train.remat='block'\): 17\.\d\d of 32 GiB per worker: "
                          r"fits\.")
    self.assertLess(seconds, 120, "a dry run should take seconds (TensorFlow's import aside)")
    self.assertNoNoise(proc.stderr)

  def test_a_bad_binding_is_one_line_before_any_plan(self):
    proc = _train("--gin_file=gin/demo.gin", "--dry_run", "--gin_bindings=MAX_LEN=20",
                  "--gin_bindings=MoEConfig.capacity_factor=0")
    self.assertUserError(proc, "capacity_factor=0 must be > 0")
    self.assertNotIn("| quantity |", proc.stdout)
    self.assertUserError(_train("--gin_file=gin/demo.gin", "--dry_run"),
                         "a dry run does not read", "--gin_bindings=MAX_LEN=20")


class TrainerConfigErrorsTest(tf.test.TestCase):
  """The trainer's own checks, in this process: each is a ConfigError (the CLI prints it as
  one line and exits 2: `TrainerCliTest` and `DryRunTest` run that path as subprocesses),
  raised before the model is built and before anything is written to the model dir."""

  def setUp(self):
    super().setUp()
    support.require_demo()

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def assertConfigError(self, bindings, *needles):
    """train() on demo.gin with `bindings` raises a one-line ConfigError holding every needle,
    and the model dir stays empty."""
    gin.clear_config()
    configurables.parse([os.path.join(REPO, "gin", "demo.gin")], list(bindings), [REPO])
    model_dir = _tmpdir()
    with self.assertRaises(ConfigError) as raised:
      configurables.run_train(model_dir=model_dir)
    line = errors.one_line(raised.exception)
    self.assertNotIn("\n", line)
    for needle in needles:
      self.assertIn(needle, line)
    self.assertEqual(os.listdir(model_dir), [])
    return line

  def test_max_len_beyond_the_network_names_max_len_before_the_model(self):
    self.assertConfigError(["train.max_len=64"], "train.max_len=64",
                           "M6Transformer.max_text_length=20", "--gin_bindings=MAX_LEN=64")

  def test_data_longer_than_a_pinned_length_names_the_data_length(self):
    self.assertConfigError(["MAX_LEN=10"], "captions of up to 20 tokens", "metadata.json",
                           "--gin_bindings=MAX_LEN=20", "train.truncate_captions=True")

  def test_cosine_horizon_shorter_than_warmup_is_one_line(self):
    self.assertConfigError(["train.warmup_steps=100", "train.num_steps=30"],
                           "train.num_steps=30", "100 warmup steps",
                           "--gin_bindings=train.warmup_steps=3")

  def test_settings_that_hung_or_crashed_are_one_line(self):
    # shuffle_buffer=0 once spun through empty epochs in silence, never reaching step 1;
    # on_bad_record='bogus' ended in a ValueError traceback (exit 1).
    for binding, needles in (
        ("train.shuffle_buffer=0", ["train.shuffle_buffer=0 must be an integer >= 1",
                                    "--gin_bindings=train.shuffle_buffer=2048"]),
        ("train.on_bad_record='bogus'", ["train.on_bad_record='bogus'; allowed: 'skip'"])):
      with self.subTest(binding):
        self.assertConfigError([binding], *needles)


@pytest.mark.multiprocess
class TrainerCliTest(CliTestCase):
  """`python -m m6t_tf.train` itself: flag errors, and one line per rank under horovodrun."""

  def setUp(self):
    support.require_demo()

  def test_missing_or_bad_gin_file(self):
    self.assertUserError(_train(f"--model_dir={_tmpdir()}"), "--gin_file is required")
    self.assertUserError(_train("--gin_file=gin/no_such.gin", f"--model_dir={_tmpdir()}"),
                         "--gin_file=gin/no_such.gin: no such file")
    self.assertUserError(_train("--gin_file=gin/demo.gin", "--gin_bindings=train.nope=1",
                                f"--model_dir={_tmpdir()}"), "nope")

  def test_every_rank_reports_once_and_the_job_fails(self):
    support.require_horovodrun()
    proc = _run([HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", PY, "-m",
                 "m6t_tf.train", "--gin_file=gin/demo.gin", "--gin_file=gin/layouts/1x2.gin",
                 "--gin_bindings=train.max_len=64", f"--model_dir={_tmpdir()}"],
                timeout=240)
    self.assertNotEqual(proc.returncode, 0)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines()
            if "error: train.max_len=64" in line]
    self.assertEqual(sorted(line.split("<")[0] for line in ours), ["[0]", "[1]"], ours)
    self.assertTrue(all(f"rank {line[1]}: " in line for line in ours), ours)
    rank_lines = [line for line in (proc.stdout + proc.stderr).splitlines()
                  if line.startswith(("[0]<stderr>", "[1]<stderr>"))]
    self.assertFalse([line for line in rank_lines if "Traceback" in line], rank_lines)


@pytest.mark.multiprocess
class ToolErrorsTest(CliTestCase):

  def test_evaluate_without_a_trained_model_dir(self):
    self.assertUserError(_run([PY, "-m", "m6t_tf.evaluate"]), "--model_dir is required")
    missing = os.path.join(_tmpdir(), "nothing")
    self.assertUserError(_run([PY, "-m", "m6t_tf.evaluate", f"--model_dir={missing}"]),
                         "config.gin not found")

  def test_plan_is_quiet_and_its_errors_are_one_line(self):
    proc = _run([PY, "tools/plan.py", "--gin_file=gin/base.gin"])
    self.assertEqual(proc.returncode, 0, proc.stderr)
    self.assertIn("| params total |", proc.stdout)
    self.assertEqual(proc.stderr, "")  # no TensorFlow start-up notice
    self.assertUserError(_run([PY, "tools/plan.py", "--gin_file=gin/base.gin",
                               "--gin_bindings=MoEConfig.nope=1"]), "gin config", "nope")
    self.assertUserError(_run([PY, "tools/plan.py", "--gin_file=gin/base.gin", "--bogus"]),
                         "bogus")

  def test_tensorflow_logs_come_back_on_request(self):
    # The override restores TensorFlow's own lines (and shows what the quiet run hides).
    proc = _run([PY, "tools/plan.py", "--gin_file=gin/base.gin"], M6T_TF_LOGS="1")
    self.assertEqual(proc.returncode, 0, proc.stderr)
    self.assertIn("absl::InitializeLog", proc.stderr)

  def test_launcher_layout_mismatch(self):
    self.assertUserError(_run([PY, "-m", "m6t_tf.launch", "--gin_file=gin/demo.gin",
                               "--gin_file=gin/layouts/1x2.gin", "--num_workers=3",
                               "--dry_run"]),
                         "--num_workers=3", "gin/layouts")

  def test_make_dataset_input_errors(self):
    out = _tmpdir()
    self.assertUserError(_run([PY, "tools/make_dataset.py", "--input=/no/such.jsonl",
                               f"--image_dir={out}", f"--output_dir={out}"]),
                         "--input='/no/such.jsonl': no such file")
    self.assertUserError(_run([PY, "tools/make_dataset.py", "--input=x"]),
                         "the following arguments are required")

  def test_a_genuine_crash_keeps_its_traceback(self):
    # A plain ValueError is not a user error (TensorFlow raises ValueError for bugs too).
    code = ("from m6t_tf import cli\n"
            "def main(argv):\n"
            "  raise ValueError('a bug, not a config error')\n"
            "cli.run(main)\n")
    proc = _run([PY, "-c", code])
    self.assertEqual(proc.returncode, 1)
    self.assertIn("Traceback (most recent call last)", proc.stderr)
    self.assertIn("ValueError: a bug, not a config error", proc.stderr)


class NoiseFilterTest(tf.test.TestCase):
  """What `quiet_tensorflow` writes back of the import's stderr (the real TF 2.21 lines)."""

  START = (
      "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
      "I0000 00:00:1796066852.135154    8684 port.cc:153] oneDNN custom operations are on. You "
      "may see slightly different numerical results due to floating-point round-off errors from "
      "different computation orders. To turn them off, set the environment variable "
      "`TF_ENABLE_ONEDNN_OPTS=0`.\n"
      "I0000 00:00:1796066852.135684    8684 cudart_stub.cc:31] Could not find cuda drivers on "
      "your machine, GPU will not be used.\n")
  CUINIT = ("E0000 00:00:1796066853.060055    8684 cuda_platform.cc:52] failed call to cuInit: "
            "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")

  def test_notices_go_and_everything_else_stays(self):
    from m6t_tf import cli  # pylint: disable=g-import-not-at-top
    error = "ImportError: libfoo.so: cannot open shared object file\n"
    self.assertEqual(cli.without_noise(self.START + self.CUINIT + error), error)
    # With a CUDA driver installed a failed cuInit is a real problem: it stays.
    self.assertEqual(cli.without_noise(self.CUINIT), self.CUINIT)


# A user's own data: 12 pictures, 16 captions (four pictures have two); the longest caption
# is longer than the demo's 20 tokens, so the length must follow the data.
CAPTIONS = [
    (0, "一只橘色的猫坐在窗台上"), (0, "窗边的猫在晒太阳"), (1, "公园里的红色长椅"),
    (2, "雨后的街道上有很多水坑"), (2, "下雨以后的城市街道"), (3, "桌子上放着一杯热咖啡"),
    (4, "海边的日落，天空是橙色和紫色的，远处有一艘小船慢慢驶向港口"),
    (5, "两个孩子在草地上踢足球"), (5, "草地上的足球比赛"), (6, "一碗热腾腾的牛肉面"),
    (7, "山顶上覆盖着白雪"), (8, "书架上摆满了旧书"), (8, "图书馆里的书架"),
    (9, "夜晚城市的霓虹灯"), (10, "一朵盛开的粉色荷花"), (11, "厨房里的新鲜蔬菜"),
]


def make_photos(folder):
  """Writes 12 PNG/JPEG pictures of different sizes and captions.jsonl; returns its path."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(folder, "photos"), exist_ok=True)
  for i in range(12):
    h, w = (48 + 8 * (i % 3), 64 + 4 * (i % 4))
    pixels = np.clip(rng.normal(40 + 15 * i, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
    name = f"photo_{i:02d}." + ("jpg" if i % 2 else "png")
    data = tf.io.encode_jpeg(pixels) if i % 2 else tf.io.encode_png(pixels)
    with open(os.path.join(folder, "photos", name), "wb") as f:
      f.write(data.numpy())
  path = os.path.join(folder, "captions.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for i, caption in CAPTIONS:
      name = f"photo_{i:02d}." + ("jpg" if i % 2 else "png")
      f.write(json.dumps({"image": name, "caption": caption}, ensure_ascii=False) + "\n")
  return path


@pytest.mark.multiprocess
class UserDatasetWalkTest(CliTestCase):
  """The README's "Your own dataset" walk, as a user types it (demo.gin, a few steps)."""

  def test_own_photos_convert_train_and_evaluate_first_try(self):
    root = _tmpdir()
    captions = make_photos(root)
    data = os.path.join(root, "data")
    proc = _run([PY, "tools/make_dataset.py", f"--input={captions}",
                 f"--image_dir={os.path.join(root, 'photos')}", f"--output_dir={data}",
                 "--max_len=64", "--validation_fraction=0.25"])
    self.assertEqual(proc.returncode, 0, proc.stderr)
    self.assertNoNoise(proc.stderr)
    with open(os.path.join(data, "metadata.json"), encoding="utf-8") as f:
      meta = json.load(f)
    self.assertEqual(meta["num_records"], 16)
    self.assertIn(meta["splits"]["validation"]["num_records"], (4, 5))
    self.assertIn("warning: validation holds", proc.stderr)
    longest = meta["max_caption_tokens"]
    self.assertGreater(longest, 20)  # longer than the demo's captions

    model_dir = os.path.join(root, "run")
    proc = _train("--gin_file=gin/demo.gin",
                  f"--gin_bindings=train.train_data='{data}/train-*.tfrecord'",
                  f"--gin_bindings=train.eval_data='{data}/validation-*.tfrecord'",
                  "--gin_bindings=train.num_steps=3", f"--model_dir={model_dir}")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(proc.stderr, "")
    self.assertIn("step 3/3", proc.stdout)
    self.assertIn("Validation perplexity", proc.stdout)
    with open(os.path.join(model_dir, "config.gin")) as f:
      self.assertIn(f"MAX_LEN = {longest}\n", f.read())  # the length followed the data

    proc = _run([PY, "-m", "m6t_tf.evaluate", f"--model_dir={model_dir}"])
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(proc.stderr, "")
    self.assertIn("unigram perplexity of the same captions", proc.stdout)

    # ... and captions of the user's own photos (the PNGs), as the README's walk ends.
    out = os.path.join(model_dir, "photos.jsonl")
    proc = _run([PY, "-m", "m6t_tf.generate", f"--model_dir={model_dir}",
                 f"--images={os.path.join(root, 'photos', '*.png')}", f"--out={out}"])
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("Captioning 6 images", proc.stdout)
    with open(out, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual([os.path.basename(r["image"]) for r in rows],
                     [f"photo_{i:02d}.png" for i in range(0, 12, 2)])
    for r in rows:
      self.assertTrue(r["caption"])
      self.assertNotIn("##", r["caption"])


if __name__ == "__main__":
  tf.test.main()
