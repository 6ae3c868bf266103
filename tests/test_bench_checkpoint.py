"""Tests of tools/bench_checkpoint.py: a `--format=json` run on the tiny demo model, checked for
its schema, its fsync counts and the consistency of its numbers (not their values: timings are
machine-dependent)."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import unittest

import pytest
from tests import support
from tests.support import REPO

bench_checkpoint = support.load_tool("tools/bench_checkpoint.py")

REPEATS = 2


class FileOpsTest(unittest.TestCase):

  def test_before_flushes_only_latest(self):
    with tempfile.TemporaryDirectory() as d:
      for name in ("ckpt-1.index", "latest.tmp-1"):
        open(os.path.join(d, name), "w").close()
      for variant, want in (("before", 1), ("durable", 3)):
        ops = bench_checkpoint.file_ops(variant)
        ops.flush_file(os.path.join(d, "ckpt-1.index"))
        ops.flush_file(os.path.join(d, "latest.tmp-1"))
        ops.flush_dir(d)
        self.assertEqual(ops.fsyncs, want, variant)
    with self.assertRaisesRegex(ValueError, "variant='fast'"):
      bench_checkpoint.file_ops("fast")


@pytest.mark.multiprocess
class JsonRunTest(unittest.TestCase):

  @classmethod
  def setUpClass(cls):
    cls.parent = tempfile.mkdtemp(prefix="bench_ckpt_test_", dir=os.path.join(REPO, "runs")
                                  if os.path.isdir(os.path.join(REPO, "runs")) else None)
    cmd = [sys.executable, "tools/bench_checkpoint.py", "--gin_file=gin/demo.gin",
           "--gin_file=gin/tiny.gin", f"--repeats={REPEATS}", "--format=json",
           f"--dir={cls.parent}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    if proc.returncode:
      raise AssertionError(proc.stderr[-3000:])
    cls.result = json.loads(proc.stdout)

  @classmethod
  def tearDownClass(cls):
    os.rmdir(cls.parent)   # fails if the tool left its checkpoints behind

  def test_schema_and_counts(self):
    r = self.result
    self.assertEqual(r["schema_version"], 1)
    self.assertEqual(r["repeats"], REPEATS)
    self.assertGreater(r["config"]["entries"], 10)
    self.assertGreater(r["config"]["checkpoint_bytes"], 1e6)
    # One file (`latest`) before; durable: 2 shard files, 2 merged files, the directory,
    # `latest`, the directory again.
    self.assertEqual(r["variants"]["before"]["fsyncs_per_save"], 1)
    self.assertEqual(r["variants"]["durable"]["fsyncs_per_save"], 7)

  def test_numbers_are_consistent(self):
    v = self.result["variants"]
    for name in bench_checkpoint.VARIANTS:
      self.assertEqual(len(v[name]["times_s"]), REPEATS)
      self.assertTrue(all(t > 0 for t in v[name]["times_s"]))
      self.assertAlmostEqual(v[name]["median_s"], statistics.median(v[name]["times_s"]))
    ratios = [d / b for d, b in zip(v["durable"]["times_s"], v["before"]["times_s"])]
    self.assertAlmostEqual(self.result["ratio_durable_to_before"], statistics.median(ratios))
    self.assertIn("|", bench_checkpoint.table(self.result))


if __name__ == "__main__":
  unittest.main()
