"""Tests of tools/bench_moe.py: the --smoke JSON report's schema (not its timings).

The peers (Keras-Hub, Model Garden; `make bench-setup`) are optional: with them installed the
smoke run times them too, without them it must say why instead of failing.
"""

import ast
import contextlib
import glob
import io
import json
import math
import os
import sys
import unittest
from unittest import mock

import pytest

from m6t_tf import cli
from m6t_tf.bench.moe import candidates
from m6t_tf.bench.moe import dropless
from m6t_tf.bench.moe import peers
from tests import support
from tests.support import REPO

bench_moe = support.load_tool("tools/bench_moe.py")

ROUTING_VARIANTS = {"top1", "top2", "top4", "2xtop1", "4xtop1"}
RESULT_KEYS = {"name": str, "variant": str, "shape": str, "tokens": int, "median_s": float,
               "ratio_to_baseline": float, "baseline": str, "is_baseline": bool,
               "tokens_per_s": float,
               "repeats": int, "times_s": list}


def run_in_process(argv: list) -> dict:
  """The tool's JSON report of `argv`, run by its `main` in this process (TensorFlow is already
  imported here: a process of its own would only add its start-up). Its own child processes
  (the 2-rank Gloo run) still start as the tool starts them."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = cli.run_argparse(bench_moe.main, argv)
  if rc != 0:
    raise AssertionError(f"bench_moe.py {' '.join(argv)} failed ({rc}); its log is above")
  return json.loads(out.getvalue())


@pytest.mark.multiprocess
class SmokeReportTest(unittest.TestCase):

  @classmethod
  def setUpClass(cls):
    cls.report = run_in_process(["--smoke", "--format=json"])

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


@pytest.mark.multiprocess
class DroplessSmokeReportTest(unittest.TestCase):
  """`--suite=dropless --smoke`: one process for the layer sections, one 2-rank Gloo run."""

  GROUPS = {"dropless-balanced", "dropless-skewed", "groups-natural", "groups-skewed",
            "alltoall-step", "alltoall-share-capacity", "alltoall-share-variable",
            "alltoall-share-padded", "alltoall-alone"}

  @classmethod
  def setUpClass(cls):
    cls.report = run_in_process(["--suite=dropless", "--smoke", "--repeats=1", "--format=json"])

  def test_every_group_ran_with_typed_keys_and_positive_ratios(self):
    r = self.report
    self.assertEqual(r["schema_version"], bench_moe.SCHEMA_VERSION)
    self.assertEqual(r["suite"], "dropless")
    self.assertEqual(r["skipped"], [])
    self.assertEqual({row["name"] for row in r["results"]}, self.GROUPS)
    for row in r["results"]:
      for key, kind in RESULT_KEYS.items():
        self.assertIsInstance(row[key], kind, f"{key} of {row['name']} {row['variant']}")
      self.assertGreater(row["ratio_to_baseline"], 0.0)
      self.assertTrue(math.isfinite(row["ratio_to_baseline"]))
    groups = {}
    for row in r["results"]:
      groups.setdefault((row["name"], row["shape"], row["baseline"]), []).append(row)
    for key, rows in groups.items():
      baselines = [row for row in rows if row["is_baseline"]]
      self.assertEqual(len(baselines), 1, key)
      self.assertAlmostEqual(baselines[0]["ratio_to_baseline"], 1.0, places=9)
    self.assertEqual({row["num_groups"] for row in r["results"]
                      if row["name"] == "groups-natural"}, set(dropless.GROUPS))

  def test_dropped_fractions(self):
    shape = self.report["shape"]["T=64"]
    for row in self.report["results"]:
      if row["variant"].startswith("dropless"):
        self.assertEqual(row["dropped_fraction"], 0.0, row["variant"])
    # Skewed at capacity 1.25: expert 0 keeps C of its round(0.6·T) tokens, the others fit.
    c = candidates.capacity(shape)
    want = (round(dropless.SKEW * shape["T"]) - c) / shape["T"]
    for row in self.report["results"]:
      if row["name"] == "dropless-skewed" and row["variant"].startswith("capacity"):
        self.assertAlmostEqual(row["dropped_fraction"], want, places=6)

  def test_alltoall_summary(self):
    a2a = self.report["alltoall"]
    self.assertEqual(set(a2a), {"balanced", "skewed"})
    for routing, s in a2a.items():
      for key in ("step_padded_over_variable", "step_capacity_over_variable",
                  "alone_padded_over_variable", "share_capacity", "share_variable",
                  "share_padded"):
        self.assertIsInstance(s[key], float, f"{routing} {key}")
        self.assertGreater(s[key], 0.0, f"{routing} {key}")
      # The padded exchange is the same function as the variable-split one.
      self.assertLess(s["padded_max_rel_difference"], 1e-5, routing)
      for variant in ("capacity", "variable", "padded"):
        per_rank = s["bytes"][variant]["per_rank"]
        self.assertEqual(len(per_rank), dropless.A2A_RANKS)
        for b in per_rank:
          self.assertGreater(b["bytes"], 0)
          self.assertGreaterEqual(b["bytes"], b["remote_bytes"])

  def test_targets_have_booleans(self):
    targets = self.report["targets"]
    self.assertEqual(len(targets), 6)
    for t in targets:
      self.assertTrue(t["evaluated"], t["name"])
      self.assertIsInstance(t["measured"], float)
      self.assertGreater(t["measured"], 0.0)
      self.assertIsInstance(t["holds"], bool)
      self.assertEqual(t["comparison"], "<=")


class PinnedRoutingTest(unittest.TestCase):

  def test_balanced_and_skewed_counts(self):
    import numpy as np
    balanced = np.bincount(dropless.pinned_experts(64, 8), minlength=8)
    self.assertEqual(balanced.tolist(), [8] * 8)
    skewed = np.bincount(dropless.pinned_experts(100, 8, 0.6), minlength=8)
    self.assertEqual(skewed[0], 60)
    self.assertEqual(skewed.sum(), 100)
    self.assertLessEqual(skewed[1:].max() - skewed[1:].min(), 1)

  def test_dropless_suite_arguments(self):
    args = bench_moe.parse_args(["--suite=dropless"])
    self.assertEqual(args.sections, dropless.DROPLESS_SECTIONS)
    with self.assertRaisesRegex(cli.ConfigError, "routing"):
      bench_moe.parse_args(["--suite=dropless", "--sections=routing"])


class PeerImportTest(unittest.TestCase):

  def test_missing_peers_are_reported_not_raised(self):
    # A None entry in sys.modules makes `import` raise ImportError, as an absent package does.
    blocked = {"keras_hub": None, "keras_hub.src": None,
               "keras_hub.src.models.mixtral.mixtral_decoder": None,
               "official": None, "official.nlp.modeling.layers.moe": None}
    with mock.patch.dict(sys.modules, blocked):
      status, modules = peers.import_peers(True)
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


class PublicApiTest(unittest.TestCase):
  """The benchmark measures the layer as a model uses it: through its public API only."""

  FILES = sorted(glob.glob(os.path.join(REPO, "m6t_tf", "bench", "moe", "*.py"))
                 + [os.path.join(REPO, "tools", "bench_moe.py")])

  def test_no_private_access_subclassing_or_patching_of_the_layers(self):
    self.assertGreater(len(self.FILES), 5)
    problems = []
    for path in self.FILES:
      tree = ast.parse(open(path, encoding="utf-8").read(), path)
      layer_modules = {a.asname or a.name for node in ast.walk(tree)
                       if isinstance(node, ast.ImportFrom) and node.module
                       and node.module.startswith("m6t_tf.layers") for a in node.names}
      where = lambda node: f"{os.path.relpath(path, REPO)}:{node.lineno}"
      for node in ast.walk(tree):
        # x._name of anything but the class's own `self` (dunders such as __path__ are public).
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
          problems.append(f"{where(node)} reads private {ast.unparse(node)}")
        if isinstance(node, ast.ClassDef):
          for base in node.bases:
            root = base
            while isinstance(root, ast.Attribute):
              root = root.value
            if isinstance(root, ast.Name) and root.id in layer_modules:
              problems.append(f"{where(node)} subclasses {ast.unparse(base)}")
        if isinstance(node, ast.Assign):
          for target in node.targets:
            if (isinstance(target, ast.Attribute) and target.attr in ("__class__", "call")
                and not (isinstance(target.value, ast.Name) and target.value.id == "self")):
              problems.append(f"{where(node)} patches {ast.unparse(target)}")
    self.assertEqual(problems, [])


if __name__ == "__main__":
  unittest.main()
