"""Tests of tools/bench_moe.py: the --smoke JSON report's schema (not its timings).

The peers (Keras-Hub, Model Garden; `make bench-setup`) are optional: with them installed the
smoke run times them too, without them it must say why instead of failing.
"""

import json
import os
import subprocess
import sys
import unittest
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import bench_moe  # noqa: E402
from m6t_tf import cli  # noqa: E402

ROUTING_VARIANTS = {"top1", "top2", "top4", "2xtop1", "4xtop1"}
RESULT_KEYS = {"name": str, "variant": str, "shape": str, "tokens": int, "median_s": float,
               "ratio_to_baseline": float, "baseline": str, "is_baseline": bool,
               "tokens_per_s": float,
               "repeats": int, "times_s": list}


class SmokeReportTest(unittest.TestCase):

  @classmethod
  def setUpClass(cls):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_moe.py"), "--smoke",
         "--format=json"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    if proc.returncode != 0:
      raise AssertionError(f"bench_moe.py --smoke failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cls.report = json.loads(proc.stdout)

  def test_top_level_schema(self):
    r = self.report
    self.assertEqual(r["schema_version"], bench_moe.SCHEMA_VERSION)
    self.assertTrue(r["smoke"])
    for key in ("machine", "shape", "peers", "results", "skipped", "scaling_fit", "targets"):
      self.assertIn(key, r)
    self.assertIsInstance(r["machine"]["nproc"], int)
    self.assertIsInstance(r["machine"]["cpu_model"], str)
    self.assertIn("worker", r["shape"])
    for shape in r["shape"].values():
      for letter in ("E", "D", "e", "M", "I", "T", "B", "L", "gamma"):
        self.assertIn(letter, shape)
      self.assertEqual(shape["E"], shape["D"] * shape["e"])
      self.assertEqual(shape["T"], shape["B"] * shape["L"])

  def test_results_have_typed_keys_and_positive_ratios(self):
    self.assertTrue(self.report["results"])
    for row in self.report["results"]:
      for key, kind in RESULT_KEYS.items():
        self.assertIsInstance(row[key], kind, f"{key} of {row['name']} {row['variant']}")
      self.assertGreater(row["ratio_to_baseline"], 0.0)
      self.assertGreater(row["median_s"], 0.0)
      self.assertEqual(row["repeats"], len(row["times_s"]))

  def test_every_routing_variant_capacity_and_dispatch_appears(self):
    results = self.report["results"]
    for shape in self.report["shape"]:
      seen = {r["variant"] for r in results if r["name"] == "routing" and r["shape"] == shape}
      want = {f"{v} capacity {m}x" for v in ROUTING_VARIANTS for m in ("k", "1")}
      self.assertEqual(seen, want, shape)
      dispatches = {r["dispatch"] for r in results if r["name"] == "dispatch" and r["shape"] == shape}
      self.assertEqual(dispatches, {"index", "einsum"}, shape)
    for group in ("floor", "dense", "scaling"):
      self.assertTrue(any(r["name"] == group for r in results), group)
    self.assertEqual({r["dispatch"] for r in results if r["name"] == "scaling"},
                     {"index", "einsum"})
    self.assertIsInstance(self.report["scaling_fit"]["index"]["slope"], float)

  def test_every_group_has_its_baseline_at_ratio_one(self):
    groups = {}
    for row in self.report["results"]:
      groups.setdefault((row["name"], row["shape"] if row["name"] != "scaling" else row["dispatch"],
                         row["baseline"]), []).append(row)
    for key, rows in groups.items():
      baselines = [r for r in rows if r["is_baseline"]]
      self.assertEqual(len(baselines), 1, key)
      self.assertAlmostEqual(baselines[0]["ratio_to_baseline"], 1.0, places=9)

  def test_targets_have_booleans(self):
    targets = self.report["targets"]
    self.assertTrue(targets)
    for t in targets:
      self.assertIsInstance(t["name"], str)
      self.assertIsInstance(t["threshold"], float)
      self.assertIn(t["comparison"], ("<=", ">="))
      self.assertIsInstance(t["evaluated"], bool)
      self.assertIsInstance(t["holds"], bool)
      if t["evaluated"]:
        self.assertIsInstance(t["measured"], float)
      else:
        self.assertIsNone(t["measured"])
        self.assertFalse(t["holds"])
        self.assertTrue(t["note"])

  def test_peers_run_or_say_why(self):
    for name, status in self.report["peers"].items():
      self.assertIsInstance(status["available"], bool)
      ran = any(r["name"] == "peer" and r.get("peer") == name for r in self.report["results"])
      said = any(s["name"] == "peer" and s["variant"].startswith(name)
                 for s in self.report["skipped"])
      if status["available"]:
        self.assertTrue(ran or said, name)
      else:
        self.assertTrue(status["reason"], name)
        self.assertFalse(ran, name)


class PeerImportTest(unittest.TestCase):

  def test_missing_peers_are_reported_not_raised(self):
    # A None entry in sys.modules makes `import` raise ImportError, as an absent package does.
    blocked = {"keras_hub": None, "keras_hub.src": None,
               "keras_hub.src.models.mixtral.mixtral_decoder": None,
               "official": None, "official.nlp.modeling.layers.moe": None}
    with mock.patch.dict(sys.modules, blocked):
      status, modules = bench_moe.import_peers(True)
    self.assertEqual(modules, {})
    for name in ("keras_hub", "model_garden"):
      self.assertFalse(status[name]["available"])
      self.assertIn("bench-setup", status[name]["reason"])

  def test_arguments(self):
    args = bench_moe.parse_args(["--smoke", "--tokens=32,64", "--repeats=2",
                                 "--sections=routing,scaling"])
    self.assertEqual(args.tokens, [32, 64])
    self.assertEqual(args.sections, ("routing", "scaling"))
    with self.assertRaisesRegex(cli.ConfigError, "nope"):  # one line and exit 2 (m6t_tf.cli)
      bench_moe.parse_args(["--sections=nope"])


if __name__ == "__main__":
  unittest.main()
