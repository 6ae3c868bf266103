"""Tests of tools/compare_dense.py: the budget arithmetic by hand, and a `--format=json` run on
tiny configs checked for its schema, its parameter counts (against `m6t_tf.run.planning`) and the
consistency of its numbers (not their values: timings are machine-dependent)."""

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import unittest

import pytest
import tensorflow as tf

from m6t_tf import cli
from m6t_tf.bench import dense as dense_lib
from m6t_tf.bench import models
from m6t_tf.bench import timing
from tests import support
from tests.support import REPO

compare_dense = support.load_tool("tools/compare_dense.py")

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
    b = dense_lib.budget(dense_params=1000, tokens_per_param=20, dense_tokens_per_step=100,
                         dense_step_time_s=0.5)
    self.assertEqual(b, {"budget_params": 1000, "budget_tokens": 20000, "steps": 200.0,
                         "budget_s": 100.0})

  def test_moe_inside_the_same_wall_clock(self):
    # An MoE 25% slower per step gets 200 / 1.25 = 160 steps of 100 tokens in the same 100 s.
    m = dense_lib.moe_at_budget(budget_s=100.0, dense_steps=200.0, dense_tokens=20000.0,
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
    self.assertAlmostEqual(timing.paired_ratio([1.1, 2.2, 1.3], [1.0, 2.0, 1.0]), 1.1)

  def test_upcycle_budgets_by_hand(self):
    # Budget 8 dense steps of 0.5 s = 4 s; the MoE step is 1.4 × 0.5 = 0.7 s. Upcycled after 4
    # dense steps: (8 − 4) / 1.4 = 2.86 → 2 MoE steps; from scratch 8 / 1.4 = 5.71 → 5 steps.
    b = dense_lib.upcycle_budgets(upcycle_at=4, budget_steps=8, dense_step_time_s=0.5,
                                  ratio=1.4)
    self.assertAlmostEqual(b["budget_s"], 4.0)
    self.assertAlmostEqual(b["moe_step_time_s"], 0.7)
    got = {arm: (a["dense_steps"], a["moe_steps"]) for arm, a in b["arms"].items()}
    self.assertEqual(got, {"dense": (8, 0), "upcycled": (4, 2), "moe_scratch": (0, 5)})
    self.assertAlmostEqual(b["arms"]["upcycled"]["budget_used_s"], 4 * 0.5 + 2 * 0.7)
    self.assertAlmostEqual(b["arms"]["moe_scratch"]["budget_fraction"], 3.5 / 4.0)
    # A budget of exactly k MoE steps gives k (no floating-point loss of the last step).
    b = dense_lib.upcycle_budgets(upcycle_at=1, budget_steps=12, dense_step_time_s=0.1,
                                  ratio=1.2)
    self.assertEqual(b["arms"]["moe_scratch"]["moe_steps"], 10)
    with self.assertRaisesRegex(ValueError, "upcycle_budget_steps"):
      dense_lib.upcycle_budgets(upcycle_at=4, budget_steps=4, dense_step_time_s=0.5,
                                ratio=1.0)
    with self.assertRaisesRegex(ValueError, "fit no MoE step"):
      dense_lib.upcycle_budgets(upcycle_at=4, budget_steps=5, dense_step_time_s=0.5,
                                ratio=1.5)

  def test_gin_specs_split_on_commas(self):
    self.assertEqual(models.split_files("gin/a.gin, gin/b.gin"), ["gin/a.gin", "gin/b.gin"])
    self.assertEqual(models.model_name(["gin/demo.gin", "gin/tiny.gin"], True),
                     "dense(demo+tiny)")
    with self.assertRaises(ValueError):
      models.split_files(" , ")


@pytest.mark.multiprocess
class TinyJsonRunTest(unittest.TestCase):

  @classmethod
  def setUpClass(cls):
    support.require_demo()
    cmd = [sys.executable, os.path.join(REPO, "tools", "compare_dense.py"),
           f"--dense_gin={TINY_DENSE}", *[f"--moe_gin={m}" for m in TINY_MOES],
           f"--steps_to_time={ROUNDS}", "--warmup_steps=1", "--format=json"]
    env = support.checkout_env(TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
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
    self.assertIn(models.DENSE_BINDING, d["gin_bindings"])
    self.assertEqual(d["params_activated"], d["params_total"])
    for row in self.report["moe"]:
      # Same embeddings (same vocabulary, M, positions, patch projection) on both sides.
      self.assertEqual(row["params_embedding"], d["params_embedding"])
      self.assertGreater(row["params_total"], d["params_total"])
      self.assertEqual(row["tokens_per_step"], d["tokens_per_step"])

  def test_parameter_counts_match_the_planner(self):
    import gin
    from m6t_tf.run import planning
    self.addCleanup(gin.clear_config)
    d = self.report["dense"]
    files = TINY_DENSE.split(",")
    p = planning.plan_from_gin(files, [models.DENSE_BINDING], search_paths=[REPO])
    self.assertEqual(d["params_total"], p["params_total"])
    self.assertEqual(d["params_embedding"], p["params_by_component"]["embeddings"])
    for row, spec in zip(self.report["moe"], TINY_MOES):
      p = planning.plan_from_gin(spec.split(","), [], search_paths=[REPO])
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


UPCYCLE_SPEC = "gin/demo.gin,gin/tiny.gin"
UPCYCLE_AT, UPCYCLE_BUDGET = 4, 8
# Under these the upcycled MoE computes the dense twin's function exactly (tests/test_upcycle.py):
# top-2 with renormalised gates over identical experts, a capacity that drops nothing, no
# dropout. A learning rate of 1e-2 moves the dense model off its initial loss in 4 steps.
EXACT = ("DROPOUT = 0.0", "ROUTING = 'top_k'", "K = 2", "CAPACITY_FACTOR = 8.0",
         "MoEConfig.normalization = 'renormalize'", "train.learning_rate = 1e-2",
         "train.batch_size_per_worker = 4")


@pytest.mark.multiprocess
class TinyUpcycleRunTest(tf.test.TestCase):
  """`--upcycle_moe_gin` on tiny configs: the three arms, their step budgets, the start point."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    support.require_demo()
    cls.tmp = os.path.join(REPO, "runs", "test_compare_dense_upcycle")
    shutil.rmtree(cls.tmp, ignore_errors=True)
    os.makedirs(cls.tmp)
    cmd = [sys.executable, os.path.join(REPO, "tools", "compare_dense.py"),
           f"--dense_gin={UPCYCLE_SPEC}", f"--upcycle_moe_gin={UPCYCLE_SPEC}",
           f"--upcycle_at={UPCYCLE_AT}", f"--upcycle_budget_steps={UPCYCLE_BUDGET}",
           f"--upcycle_dir={os.path.join(cls.tmp, 'arms')}", "--steps_to_time=2",
           "--warmup_steps=1", "--format=json", *[f"--gin_bindings={b}" for b in EXACT]]
    env = support.checkout_env(TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    if proc.returncode != 0:
      raise AssertionError(f"compare_dense.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cls.report = json.loads(proc.stdout)
    cls.up = cls.report["upcycle"]

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_three_arms_in_json_and_table(self):
    u = self.up
    self.assertEqual([a["arm"] for a in u["arms"]], list(dense_lib.ARMS))
    self.assertEqual(u["upcycle_at"], UPCYCLE_AT)
    self.assertEqual(u["budget_dense_steps"], UPCYCLE_BUDGET)
    self.assertEqual(u["upcycled_experts"], 8)
    # The target is timed with the dense twin and has its row in the budget table.
    self.assertEqual([m["name"] for m in self.report["moe"]], [u["moe_name"]])
    for a in u["arms"]:
      for key in ("val_log_perplexity", "val_perplexity", "train_loss_at_equal_steps",
                  "final_loss", "train_wall_s", "budget_used_s"):
        self.assertIsInstance(a[key], float, f"{a['arm']} {key}")
      for key in ("dense_steps", "moe_steps", "steps", "tokens"):
        self.assertIsInstance(a[key], int, f"{a['arm']} {key}")
      self.assertTrue(math.isfinite(a["val_log_perplexity"]))
      self.assertAlmostEqual(a["val_perplexity"], math.exp(a["val_log_perplexity"]), places=3)
    text = compare_dense.table(self.report)
    for a in u["arms"]:
      self.assertIn(f"| {a['arm']} ({a['name']}) | {a['dense_steps']} + {a['moe_steps']} |", text)
    self.assertIn("whole steps that fit the budget", text)

  def test_step_budgets_follow_the_rule(self):
    u = self.up
    dense_time = u["dense_step_time_s"]
    ratio = statistics.median(
        m / d for m, d in zip(self.report["moe"][0]["times_s"], self.report["dense"]["times_s"]))
    self.assertAlmostEqual(u["step_time_ratio"], ratio)
    self.assertAlmostEqual(u["budget_s"], UPCYCLE_BUDGET * dense_time)
    moe_time = dense_time * ratio
    want = {"dense": (UPCYCLE_BUDGET, 0),
            "upcycled": (UPCYCLE_AT, math.floor((UPCYCLE_BUDGET - UPCYCLE_AT) / ratio + 1e-9)),
            "moe_scratch": (0, math.floor(UPCYCLE_BUDGET / ratio + 1e-9))}
    for a in u["arms"]:
      self.assertEqual((a["dense_steps"], a["moe_steps"]), want[a["arm"]], a["arm"])
      used = a["dense_steps"] * dense_time + a["moe_steps"] * moe_time
      self.assertAlmostEqual(a["budget_used_s"], used)
      # Inside the budget, and one more step would not fit.
      self.assertLessEqual(used, u["budget_s"] * (1 + 1e-9), a["arm"])
      self.assertGreater(used + (dense_time if a["arm"] == "dense" else moe_time),
                         u["budget_s"], a["arm"])
      # Every step ran: one logged loss per step (the upcycled arm's dense steps included).
      self.assertLen(a["losses"], a["steps"])
      tokens = self.report["dense"]["tokens_per_step"]
      self.assertAlmostEqual(a["tokens"], a["steps"] * tokens)

  def test_upcycled_arm_starts_from_the_dense_checkpoint(self):
    u, s = self.up, self.up["start"]
    dense, upcycled = u["arms"][0], u["arms"][1]
    # The upcycled arm's first N steps are the dense arm's.
    self.assertEqual(upcycled["losses"][:UPCYCLE_AT], dense["losses"][:UPCYCLE_AT])
    self.assertEqual(s["dense_checkpoint"],
                     os.path.join(self.tmp, "arms", "dense", "checkpoints", f"ckpt-{UPCYCLE_AT}"))
    # Same function: the validation log-perplexity before the first MoE step is the dense
    # checkpoint's, and the first logged MoE loss is the dense step-N checkpoint's loss on the
    # same (first) batch of the stream.
    self.assertAllClose(
        [s["upcycled_val_log_perplexity_at_0"], s["upcycled_first_loss"]],
        [s["dense_val_log_perplexity_at_upcycle"],
         self.dense_loss_on_first_batch(s["dense_checkpoint"])], atol=1e-4, rtol=0)
    # ... and not a fresh model's (which the N dense steps left behind).
    self.assertGreater(dense["losses"][0] - s["upcycled_first_loss"], 0.05)

  def dense_loss_on_first_batch(self, checkpoint):
    import gin
    from m6t_tf.run import checkpointing
    from m6t_tf.run import configurables
    from m6t_tf.run import trainer as trainer_lib
    from m6t_tf.run import inputs
    from m6t_tf.parallel import context as context_lib
    self.addCleanup(gin.clear_config)
    gin.clear_config()
    configurables.parse([os.path.join(self.tmp, "arms", "dense", "config.gin")], [], [REPO])
    q = lambda name: configurables.query(f"train.{name}")
    ctx = context_lib.LocalContext()
    batch = dict(next(iter(inputs.train_stream(
        q("train_data"), ctx=ctx, seed=q("seed") or 0, batch_size=q("batch_size_per_worker"),
        max_len=q("max_len"), image_mode=q("image_mode"), shuffle_buffer=q("shuffle_buffer")))))
    model = trainer_lib.build_model(batch=batch, network=configurables.network_fn()(name="m6"))
    self.assertEmpty(model.moe_layers)
    ckpt = checkpointing.Checkpointer(os.path.dirname(checkpoint),
                                      trainer_lib.variables_by_path(model), ctx=ctx)
    ckpt.restore(checkpoint)
    _, metrics = model.losses_and_metrics(batch, training=True)
    return float(metrics["nll_sum"] / metrics["num_tokens"])


class FlagsTest(unittest.TestCase):

  def test_bad_flags_fail_before_building(self):
    # One-line errors (m6t_tf.cli): the CLI prints them and exits 2.
    for bad in (["--steps_to_time=0"], ["--warmup_steps=0"], ["--tokens_per_param=0"]):
      with self.assertRaisesRegex(cli.ConfigError, bad[0].split("=")[0]):
        compare_dense.parse_args(["--dense_gin=gin/demo.gin", "--moe_gin=gin/demo.gin", *bad])
    with self.assertRaisesRegex(cli.ConfigError, "--moe_gin"):
      compare_dense.parse_args(["--dense_gin=gin/demo.gin"])        # no --moe_gin
    upcycle = ["--dense_gin=gin/demo.gin", "--upcycle_moe_gin=gin/demo.gin"]
    for bad, message in (([], "needs --upcycle_at"),
                         (["--upcycle_at=0"], "--upcycle_at=0"),
                         (["--upcycle_at=5", "--upcycle_budget_steps=5"], "must exceed"),
                         (["--upcycle_at=5", "--upcycle_noise_std=-1"], "noise_std")):
      with self.assertRaisesRegex(cli.ConfigError, message):
        compare_dense.parse_args(upcycle + bad)
    with self.assertRaisesRegex(cli.ConfigError, "need --upcycle_moe_gin"):
      compare_dense.parse_args(["--dense_gin=a.gin", "--moe_gin=b.gin", "--upcycle_at=5"])
    args = compare_dense.parse_args(upcycle + ["--upcycle_at=5", "--upcycle_dir=runs/none/x"])
    self.assertEqual((args.moe_gin, args.upcycle_budget_steps), ([], 10))    # default 2N

  def test_non_embedding_budget_is_selectable(self):
    args = compare_dense.parse_args(["--dense_gin=a.gin", "--moe_gin=b.gin",
                                     "--param_count=non_embedding"])
    self.assertEqual(args.param_count, "non_embedding")


if __name__ == "__main__":
  unittest.main()
