"""Tests of tools/compare_dense.py: the budget arithmetic by hand, and a `--format=json` run on
tiny configs checked for its schema, its parameter counts (against `m6t_tf.planning`) and the
consistency of its numbers (not their values: timings are machine-dependent)."""

import glob
import json
import math
import os
import statistics
import subprocess
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import compare_dense  # noqa: E402
from m6t_tf import cli  # noqa: E402

DEMO = os.path.join(ROOT, ".data", "demo")
TINY_DENSE = "gin/demo.gin,gin/tiny.gin"
TINY_MOES = ("gin/demo.gin,gin/tiny.gin", "tools/experiments/gin/top2_cap_k.gin,gin/tiny.gin")
ROUNDS = 3

COMMON_KEYS = {"name": str, "gin_files": list, "gin_bindings": list, "batch_source": str,
               "params_total": int, "params_non_embedding": int, "params_embedding": int,
               "params_activated": int, "tokens_per_step": int, "step_time_s": float,
               "median_step_time_s": float, "times_s": list, "steps": float}
DENSE_KEYS = {"budget_params": int, "budget_tokens": float, "budget_s": float}
MOE_KEYS = {"moe_layers": int, "num_experts": int, "routing": str, "k": int,
            "capacity_mode": str, "step_time_ratio": float, "step_time_increase_pct": float,
            "within_20pct": bool, "tokens": float, "tokens_vs_dense": float,
            "steps_vs_dense": float}


class BudgetArithmeticTest(unittest.TestCase):

  def test_chinchilla_budget_by_hand(self):
    # 1,000 params × 20 = 20,000 tokens; 100 tokens/step → 200 steps; × 0.5 s = 100 s.
    b = compare_dense.budget(dense_params=1000, tokens_per_param=20, dense_tokens_per_step=100,
                             dense_step_time_s=0.5)
    self.assertEqual(b, {"budget_params": 1000, "budget_tokens": 20000, "steps": 200.0,
                         "budget_s": 100.0})

  def test_moe_inside_the_same_wall_clock(self):
    # An MoE 25% slower per step gets 200 / 1.25 = 160 steps of 100 tokens in the same 100 s.
    m = compare_dense.moe_at_budget(budget_s=100.0, dense_steps=200.0, dense_tokens=20000.0,
                                    dense_step_time_s=0.5, ratio=1.25, tokens_per_step=100)
    self.assertAlmostEqual(m["step_time_s"], 0.625)
    self.assertAlmostEqual(m["steps"], 160.0)
    self.assertAlmostEqual(m["tokens"], 16000.0)
    self.assertAlmostEqual(m["step_time_increase_pct"], 25.0)
    self.assertFalse(m["within_20pct"])
    self.assertAlmostEqual(m["steps_vs_dense"], 0.8)
    self.assertAlmostEqual(m["tokens_vs_dense"], 0.8)
    self.assertAlmostEqual(m["steps"] * m["step_time_s"], 100.0)

  def test_paired_ratio_is_the_median_of_per_round_ratios(self):
    # Round 2 was slowed for both models (a shared machine): the paired ratio ignores that.
    self.assertAlmostEqual(compare_dense.paired_ratio([1.1, 2.2, 1.3], [1.0, 2.0, 1.0]), 1.1)

  def test_gin_specs_split_on_commas(self):
    self.assertEqual(compare_dense.split_files("gin/a.gin, gin/b.gin"), ["gin/a.gin", "gin/b.gin"])
    self.assertEqual(compare_dense.model_name(["gin/demo.gin", "gin/tiny.gin"], True),
                     "dense(demo+tiny)")
    with self.assertRaises(ValueError):
      compare_dense.split_files(" , ")


class TinyJsonRunTest(unittest.TestCase):

  @classmethod
  def setUpClass(cls):
    if not glob.glob(os.path.join(DEMO, "train-*.tfrecord")):
      raise unittest.SkipTest("demo dataset missing: `make data` builds it")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "compare_dense.py"),
           f"--dense_gin={TINY_DENSE}", *[f"--moe_gin={m}" for m in TINY_MOES],
           f"--steps_to_time={ROUNDS}", "--warmup_steps=1", "--format=json"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    if proc.returncode != 0:
      raise AssertionError(f"compare_dense.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cls.report = json.loads(proc.stdout)

  def test_schema(self):
    r = self.report
    self.assertEqual(r["schema_version"], compare_dense.SCHEMA_VERSION)
    self.assertEqual(r["tool"], "tools/compare_dense.py")
    for key in ("nproc", "cpu_model", "loadavg_start", "loadavg_end", "tensorflow"):
      self.assertIn(key, r["machine"])
    self.assertEqual(r["method"]["param_count"], "total")
    self.assertEqual(r["method"]["tokens_per_param"], 20.0)
    self.assertEqual(r["method"]["steps_to_time"], ROUNDS)
    for key, kind in {**COMMON_KEYS, **DENSE_KEYS}.items():
      self.assertIsInstance(r["dense"][key], kind, f"dense {key}")
    self.assertEqual(len(r["moe"]), len(TINY_MOES))
    for row in r["moe"]:
      for key, kind in {**COMMON_KEYS, **MOE_KEYS}.items():
        self.assertIsInstance(row[key], kind, f"{row['name']} {key}")
      self.assertEqual(len(row["times_s"]), ROUNDS)
      self.assertEqual(row["batch_source"], "data")
    self.assertEqual([m["routing"] for m in r["moe"]], ["prototype", "top_k"])
    self.assertEqual([m["k"] for m in r["moe"]], [2, 2])

  def test_dense_twin_has_no_moe_and_is_the_same_backbone(self):
    d = self.report["dense"]
    self.assertIn(compare_dense.DENSE_BINDING, d["gin_bindings"])
    self.assertEqual(d["params_activated"], d["params_total"])
    for row in self.report["moe"]:
      # Same embeddings (same vocabulary, M, positions, patch projection) on both sides.
      self.assertEqual(row["params_embedding"], d["params_embedding"])
      self.assertGreater(row["params_total"], d["params_total"])
      self.assertEqual(row["tokens_per_step"], d["tokens_per_step"])

  def test_parameter_counts_match_the_planner(self):
    import gin
    from m6t_tf import planning
    self.addCleanup(gin.clear_config)
    d = self.report["dense"]
    files = TINY_DENSE.split(",")
    p = planning.plan_from_gin(files, [compare_dense.DENSE_BINDING], search_paths=[ROOT])
    self.assertEqual(d["params_total"], p["params_total"])
    self.assertEqual(d["params_embedding"], p["params_by_component"]["embeddings"])
    for row, spec in zip(self.report["moe"], TINY_MOES):
      p = planning.plan_from_gin(spec.split(","), [], search_paths=[ROOT])
      self.assertEqual(row["params_total"], p["params_total"])
      self.assertEqual(row["params_activated"], p["params_activated"])

  def test_budget_arithmetic_is_consistent(self):
    r = self.report
    d = r["dense"]
    self.assertEqual(d["budget_params"], d["params_total"])
    self.assertAlmostEqual(d["budget_tokens"], 20 * d["params_total"])
    self.assertTrue(math.isclose(d["steps"] * d["tokens_per_step"], d["budget_tokens"],
                                 rel_tol=1e-9))
    self.assertAlmostEqual(d["step_time_s"], statistics.median(d["times_s"]))
    self.assertTrue(math.isclose(d["budget_s"], d["steps"] * d["step_time_s"], rel_tol=1e-9))
    for row in r["moe"]:
      # The wall-clock budget is shared: MoE steps × MoE step time == dense steps × dense time.
      self.assertTrue(math.isclose(row["steps"] * row["step_time_s"], d["budget_s"],
                                   rel_tol=1e-9), row["name"])
      self.assertTrue(math.isclose(row["tokens"], row["steps"] * row["tokens_per_step"],
                                   rel_tol=1e-9))
      ratio = statistics.median(a / b for a, b in zip(row["times_s"], d["times_s"]))
      self.assertAlmostEqual(row["step_time_ratio"], ratio)
      self.assertAlmostEqual(row["step_time_s"], d["step_time_s"] * ratio)
      self.assertAlmostEqual(row["step_time_increase_pct"], 100 * (ratio - 1))
      self.assertEqual(row["within_20pct"], row["step_time_increase_pct"] <= 20.0)
      self.assertAlmostEqual(row["steps_vs_dense"], 1 / ratio)
      self.assertAlmostEqual(row["tokens_vs_dense"], row["tokens"] / d["budget_tokens"])

  def test_table_names_every_model_and_the_rule(self):
    text = compare_dense.table(self.report)
    self.assertIn("20 tokens/param", text)
    self.assertIn("the budget uses total", text)
    for row in [self.report["dense"]] + self.report["moe"]:
      self.assertIn(f"| {row['name']} |", text)


class FlagsTest(unittest.TestCase):

  def test_bad_flags_fail_before_building(self):
    # One-line errors (m6t_tf.cli): the CLI prints them and exits 2.
    for bad in (["--steps_to_time=0"], ["--warmup_steps=0"], ["--tokens_per_param=0"]):
      with self.assertRaisesRegex(cli.ConfigError, bad[0].split("=")[0]):
        compare_dense.parse_args(["--dense_gin=gin/demo.gin", "--moe_gin=gin/demo.gin", *bad])
    with self.assertRaisesRegex(cli.ConfigError, "--moe_gin"):
      compare_dense.parse_args(["--dense_gin=gin/demo.gin"])        # no --moe_gin

  def test_non_embedding_budget_is_selectable(self):
    args = compare_dense.parse_args(["--dense_gin=a.gin", "--moe_gin=b.gin",
                                     "--param_count=non_embedding"])
    self.assertEqual(args.param_count, "non_embedding")


if __name__ == "__main__":
  unittest.main()
