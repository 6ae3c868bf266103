"""m6t_tf.bench's shared pieces: interleaved timing rounds, JSON output, child environments.

(Its statistics are tested in tests/test_experiments.py, the MoE suites in
tests/test_bench_moe.py, the dense-twin budget in tests/test_compare_dense.py.)
"""

import io
import json
import os
import tempfile
import unittest
from unittest import mock

import m6t_tf
from m6t_tf.bench import processes
from m6t_tf.bench import report
from m6t_tf.bench import timing


class InterleavedTest(unittest.TestCase):

  def test_rounds_rotate_after_the_warmup(self):
    calls = []

    def run(c):
      calls.append(c)
      return float(len(calls))

    times = timing.interleaved(["a", "b", "c"], 3, run, warmup=1)
    self.assertEqual(calls, ["a", "b", "c",                     # warm-up, one after the other
                             "a", "b", "c", "b", "c", "a", "c", "a", "b"])
    # Each candidate's seconds in round order, whatever its place in the round.
    self.assertEqual(times, [[4.0, 9.0, 11.0], [5.0, 7.0, 12.0], [6.0, 8.0, 10.0]])

  def test_a_failing_candidate_is_reported_and_dropped(self):
    failures, done = [], []

    def run(c):
      if c == "bad" and len(done) == 1:
        raise RuntimeError("out of memory")
      return 1.0

    times = timing.interleaved(
        ["ok", "bad"], 3, run, after_round=done.append,
        on_error=lambda c, r, e: failures.append((c, r, str(e))))
    self.assertEqual(times, [[1.0, 1.0, 1.0], [1.0]])
    self.assertEqual(failures, [("bad", 1, "out of memory")])
    self.assertEqual(done, [1, 2, 3])
    with self.assertRaisesRegex(RuntimeError, "boom"):
      timing.interleaved(["x"], 1, lambda c: (_ for _ in ()).throw(RuntimeError("boom")))

  def test_paired_ratio_is_per_round(self):
    # A slow second round hits both alike: the per-round ratio stays 2.
    self.assertEqual(timing.paired_ratio([2.0, 20.0, 2.2], [1.0, 10.0, 1.0]), 2.0)

  def test_machine_info_names_the_machine(self):
    info = timing.machine_info()
    self.assertEqual(info["nproc"], os.cpu_count())
    self.assertEqual(len(info["loadavg_start"]), 3)
    self.assertTrue(info["tensorflow"] and info["keras"] and info["python"])


class ReportTest(unittest.TestCase):

  def test_write_json_makes_folders_and_replaces_whole(self):
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "a", "b", "r.json")
      report.write_json(path, {"b": 1, "a": [1.5]}, sort_keys=True)
      report.write_json(path, {"z": 2})
      with open(path) as f:
        self.assertEqual(f.read(), '{\n "z": 2\n}')
      self.assertEqual(os.listdir(os.path.dirname(path)), ["r.json"])   # no temporary left

  def test_emit_prints_json_or_the_table_and_writes_out(self):
    result = {"x": 1}
    with tempfile.TemporaryDirectory() as d:
      out = os.path.join(d, "r.json")
      for fmt, want in (("json", '{\n "x": 1\n}\n'), ("table", "| x | 1 |\n")):
        with mock.patch("sys.stdout", new_callable=io.StringIO) as stdout:
          report.emit(result, format=fmt, table=lambda r: f"| x | {r['x']} |", out=out)
        self.assertEqual(stdout.getvalue(), want)
        with open(out) as f:
          self.assertEqual(json.load(f), result)

  def test_number_formats(self):
    self.assertEqual(report.si(12_345_678), "12.35M")
    self.assertEqual(report.si(999), "999")
    self.assertEqual(report.fmt(0.1234, 1, pct=True), "12.3%")
    self.assertEqual(report.fmt(float("nan")), "—")
    self.assertEqual(report.markdown_table(["a", "b", "c"], [[1, 2, 3]], align="lrl"),
                     "| a | b | c |\n| --- | ---: | --- |\n| 1 | 2 | 3 |")


class ChildEnvTest(unittest.TestCase):

  def test_a_child_finds_this_package_first(self):
    with mock.patch.dict(os.environ, {"PYTHONPATH": os.pathsep.join(["/x", "/y"])}):
      env = processes.child_env(OMP_NUM_THREADS="1")
    self.assertEqual(env["PYTHONPATH"].split(os.pathsep), [processes.PACKAGE_ROOT, "/x", "/y"])
    self.assertEqual(env["OMP_NUM_THREADS"], "1")
    self.assertEqual(os.path.join(processes.PACKAGE_ROOT, "m6t_tf"),
                     os.path.dirname(os.path.abspath(m6t_tf.__file__)))


if __name__ == "__main__":
  unittest.main()
