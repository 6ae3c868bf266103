"""Smoke runs of tools/experiments/{routing,aux_loss,moe_attention,routing_options,scale}.py: a
couple of tiny steps per run, two seeds, into a temporary folder; each must write its PNG,
markdown table and JSON, share the runs it has in common with the others, train in worker
processes and reuse finished runs. Plus the helpers' arithmetic: means, t-intervals, paired
verdicts, the scale trend's slope.

The scripts plot with matplotlib (`requirements-plots.txt`, installed by `make experiments`);
without it the smoke runs are skipped, saying so.
"""

import importlib.util
import json
import os
import shutil
import tempfile
import unittest

import numpy as np
import pytest

from m6t_tf.bench import experiments
from m6t_tf.bench import plots
from m6t_tf.bench import report
from m6t_tf.bench import stats
from tests import support


def _load(name):
  return support.load_tool(f"tools/experiments/{name}.py")


SMOKE = ["--tiny", "--steps=2", "--eval_points=1", "--log_every=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.multiprocess
class ScriptsSmokeTest(unittest.TestCase):

  @classmethod
  def setUpClass(cls):
    if importlib.util.find_spec("matplotlib") is None:
      pytest.fail("matplotlib is missing: `make experiments-setup` installs "
                  "requirements-plots.txt (make test does it first)", pytrace=False)
    support.require_demo()
    cls.tmp = tempfile.mkdtemp(prefix="m6t_experiments_")
    cls.root = os.path.join(cls.tmp, "runs")
    cls.out = os.path.join(cls.tmp, "out")
    common_flags = SMOKE + [f"--model_root={cls.root}", f"--out_dir={cls.out}"]
    two = ["--seeds=0,1"]
    cwd = os.getcwd()
    try:
      # One timed round in the routing script exercises the step-time column and cost plot;
      # --jobs=2 trains its four runs two at a time in worker processes.
      cls.rc = {
          "routing": _load("routing").main(common_flags + two + [
              "--variants=top1,4top1_cap_k", "--time_rounds=1", "--jobs=2"]),
          "aux_loss": _load("aux_loss").main(common_flags + ["--seeds=0", "--time_rounds=0"]),
          "moe_attention": _load("moe_attention").main(common_flags + [
              "--seeds=0", "--routings=top1", "--time_rounds=0"]),
          "routing_options": _load("routing_options").main(common_flags + two + [
              "--arms=top1_dropless", "--captions=1", "--time_rounds=1", "--jobs=2"]),
          "scale": _load("scale").main(common_flags + two + [
              "--sizes=8,16", "--time_rounds=0", "--jobs=1"]),
      }
    finally:
      _restore_globals()
    assert os.getcwd() == cwd, "a script left the working directory changed"

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)

  def _json(self, name):
    with open(os.path.join(self.out, f"{name}.json")) as f:
      return json.load(f)

  def test_every_script_writes_png_table_and_json(self):
    for name, rc in self.rc.items():
      self.assertEqual(rc, 0, name)
      with open(os.path.join(self.out, f"{name}.png"), "rb") as f:
        self.assertEqual(f.read(8), PNG_MAGIC, name)
      self.assertGreater(os.path.getsize(os.path.join(self.out, f"{name}.png")), 10_000, name)
      with open(os.path.join(self.out, f"{name}.md")) as f:
        md = f.read()
      self.assertIn(f"![", md)
      self.assertIn("[95% CI]", md)
      self.assertIn("python -m m6t_tf.train --gin_file=tools/experiments/gin/", md)
      self.assertIn(f"tools/experiments/{name}.py", md)
      self.assertIn("Machine:", md)
      payload = self._json(name)
      self.assertEqual(payload["experiment"], name)
      self.assertEqual(payload["steps"], 2)
      for run in payload["runs"]:
        self.assertGreater(run["eval"]["perplexity"], 1.0)
        self.assertEqual(sorted(map(int, run["train_loss"])), [1, 2])
    with open(os.path.join(self.out, "routing_cost.png"), "rb") as f:
      self.assertEqual(f.read(8), PNG_MAGIC)

  def test_table_rows(self):
    payload = self._json("routing")
    runs = payload["runs"]
    self.assertEqual([(r["routing"], r["capacity"], r["seed"]) for r in runs],
                     [("top-1", "k× = 1×", 0), ("top-1", "k× = 1×", 1),
                      ("4 top-1", "k×", 0), ("4 top-1", "k×", 1)])
    # tiny.gin: T = 2 × (16 + 11) = 54 positions, E = 8, γ = 1.25 → C = ceil(k · 54 / 8 · 1.25).
    self.assertEqual([r["derived"]["capacity"] for r in runs], [9, 9, 34, 34])
    arm = payload["arms"]["4top1_cap_k"]
    self.assertEqual(arm["log_ppl"]["n"], 2)
    by_seed = {int(k): v for k, v in arm["log_ppl_by_seed"].items()}
    base = {int(k): v for k, v in payload["arms"]["top1"]["log_ppl_by_seed"].items()}
    self.assertAlmostEqual(arm["delta_vs_top1"]["mean"],
                           (by_seed[0] - base[0] + by_seed[1] - base[1]) / 2)
    # The verdict these two seeds must give, from the 95% t-interval of the paired
    # differences (t = 12.706 at 1 degree of freedom), computed here, not by `m6t_tf.bench.stats`.
    diffs = np.array([by_seed[s] - base[s] for s in (0, 1)])
    half = 12.706 * diffs.std(ddof=1) / np.sqrt(2)
    want = ("lower" if diffs.mean() + half < 0 else
            "higher" if diffs.mean() - half > 0 else "tie")
    self.assertEqual(arm["delta_vs_top1"]["verdict"], want)
    self.assertIsNotNone(payload["timing"]["4 top-1, capacity k×"]["ratio"])
    aux = self._json("aux_loss")["runs"]
    self.assertEqual([r["derived"]["aux_loss_weight"] for r in aux], [0.0, 0.01])
    self.assertEqual(len(aux[0]["late_load_cv"]), 2)          # tiny.gin: 2 MoE layers
    attn = self._json("moe_attention")["runs"]
    self.assertEqual([r["derived"]["moe_attention"] for r in attn], [False, True])
    # Q, K, V, O of both layers are MoEs with routing statistics of their own.
    self.assertEqual(len(attn[1]["late_dropped_fraction_attention"]), 8)

  def test_routing_options_compare_by_seed_with_captions(self):
    payload = self._json("routing_options")
    (comparison,) = payload["comparisons"]
    self.assertEqual(comparison["name"], "top-1 dropless")
    self.assertIsNone(comparison["arm"]["capacity"])            # dropless: no C
    self.assertEqual(comparison["base"]["capacity"], 9)
    self.assertEqual(comparison["delta"]["n"], 2)
    for side in ("arm", "base"):
      self.assertEqual(comparison[side]["BLEU-4"]["n"], 2)
      self.assertEqual(comparison[side]["CIDEr-D"]["n"], 2)
    for seed in (0, 1):   # every final model captioned the validation split
      path = os.path.join(self.root, f"top1+dropless+tiny-steps2-seed{seed}",
                          "caption_metrics.json")
      with open(path) as f:
        self.assertIn("CIDEr-D", json.load(f)["model"])
    self.assertIsNotNone(comparison["step_time_ratio"])

  def test_scale_sizes_differ_and_give_a_trend(self):
    payload = self._json("scale")
    sizes = payload["sizes"]
    self.assertEqual([s["size"] for s in sizes], ["E = 8 (demo)", "E = 16"])
    # experts16.gin still applies under --tiny: twice the expert parameters.
    self.assertEqual(sizes[1]["params"]["params_expert"], 2 * sizes[0]["params"]["params_expert"])
    self.assertEqual(sizes[0]["benefit"]["n"], 2)
    self.assertEqual(payload["trend"]["n"], 4)
    # The verdict these per-seed benefits must give: least-squares slope on log2(parameters)
    # with its 95% t-interval (t = 4.303 at n − 2 = 2 degrees of freedom), computed here.
    xs = np.repeat([np.log2(s["params"]["params_total"]) for s in sizes], 2)
    ys = np.concatenate([s["benefit"]["values"] for s in sizes])
    b, a = np.polyfit(xs, ys, 1)
    half = 4.303 * np.sqrt(((ys - a - b * xs) ** 2).sum() / 2 / ((xs - xs.mean()) ** 2).sum())
    want = "grows" if b - half > 0 else "shrinks" if b + half < 0 else "cannot be told apart"
    self.assertAlmostEqual(payload["trend"]["slope"], b)
    self.assertEqual(payload["trend"]["verdict"], want)

  def test_runs_train_in_worker_processes(self):
    # --jobs=2 trained the routing runs in processes of their own, each with its log.
    for name in ("top1+tiny-steps2-seed0", "4top1_cap_k+tiny-steps2-seed1"):
      self.assertTrue(os.path.exists(os.path.join(self.root, name + ".log")), name)
      with open(os.path.join(self.root, name, "experiment.json")) as f:
        self.assertEqual(json.load(f)["status"], "done")

  def test_runs_are_shared_between_scripts(self):
    # top-1 is the routing sweep's run, aux loss "off" and the MoE-attention baseline.
    self.assertEqual(sorted(d for d in os.listdir(self.root) if not d.endswith(".log")), [
        "4top1_cap_k+experts16+tiny-steps2-seed0", "4top1_cap_k+experts16+tiny-steps2-seed1",
        "4top1_cap_k+tiny-steps2-seed0", "4top1_cap_k+tiny-steps2-seed1",
        "top1+aux_loss+tiny-steps2-seed0", "top1+dropless+tiny-steps2-seed0",
        "top1+dropless+tiny-steps2-seed1", "top1+experts16+tiny-steps2-seed0",
        "top1+experts16+tiny-steps2-seed1", "top1+moe_attention+tiny-steps2-seed0",
        "top1+tiny-steps2-seed0", "top1+tiny-steps2-seed1"])

  def test_finished_runs_are_reused(self):
    path = os.path.join(self.root, "top1+tiny-steps2-seed0", "experiment.json")
    with open(path) as f:
      before = json.load(f)
    out = os.path.join(self.tmp, "again")
    try:
      rc = _load("aux_loss").main(SMOKE + [f"--model_root={self.root}", f"--out_dir={out}",
                                           "--seeds=0", "--time_rounds=0"])
    finally:
      _restore_globals()
    self.assertEqual(rc, 0)
    with open(path) as f:
      self.assertEqual(json.load(f)["wall_s"], before["wall_s"])
    self.assertTrue(os.path.exists(os.path.join(out, "aux_loss.png")))


def _restore_globals():
  import gin
  import keras
  import tensorflow as tf
  gin.clear_config()
  keras.mixed_precision.set_global_policy("float32")
  tf.get_logger().setLevel("WARNING")


class HelpersTest(unittest.TestCase):

  def test_smooth_is_a_trailing_mean(self):
    self.assertEqual(stats.smooth([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])

  def test_late_mean_uses_the_second_half(self):
    run = {"scalars": {"x": {10: 1.0, 20: 1.0, 30: 3.0, 40: 5.0}}}
    self.assertEqual(experiments.late_mean(run, "x"), 3.0)     # steps 20, 30, 40 of 40
    self.assertIsNone(experiments.late_mean(run, "missing"))

  def test_layer_names(self):
    self.assertEqual(experiments.short_layer("m6/block_2/moe"), "layer 2")
    self.assertEqual(experiments.short_layer("m6/block_0/attention/query"), "layer 0 query")
    run = {"scalars": {"moe/m6/block_10/moe/load_cv": {}, "moe/m6/block_2/moe/load_cv": {},
                       "loss": {}}}
    self.assertEqual(experiments.moe_layer_names(run), ["m6/block_2/moe", "m6/block_10/moe"])

  def test_bindings_scale_with_steps(self):
    class Args:
      steps, eval_points, log_every, tiny, gin_bindings, model_root = 400, 4, 10, False, [], "r"
    sweep = experiments.Sweep(Args())
    spec = experiments.RunSpec("top-1", ("top1",), seed=3)
    b = sweep.bindings(spec)
    for want in ("train.num_steps = 400", "train.warmup_steps = 40", "train.eval_every = 100",
                 "train.log_every = 10", "train.seed = 3"):
      self.assertIn(want, b)
    self.assertEqual(sweep.files(spec), ["tools/experiments/gin/top1.gin"])
    self.assertTrue(sweep.run_dir(spec).endswith(os.path.join("r", "top1-steps400-seed3")))
    self.assertIn("--gin_file=tools/experiments/gin/top1.gin", sweep.command(spec))

  def test_group_arms_keeps_one_run_per_seed(self):
    base0, base1 = experiments.RunSpec("b", ("top1",), 0), experiments.RunSpec("b", ("top1",), 1)
    arm0 = experiments.RunSpec("a", ("top1", "dropless"), 0)
    groups = experiments.group_arms([arm0, base0, base0, base1, base1])
    self.assertEqual(groups, {("top1", "dropless"): [arm0], ("top1",): [base0, base1]})

  def test_stats_mean_sd_and_t_interval(self):
    st = stats.describe([1.0, 2.0, 3.0])
    self.assertEqual((st["n"], st["mean"], st["sd"]), (3, 2.0, 1.0))
    self.assertAlmostEqual(st["ci95"], 4.303 / 3 ** 0.5)     # t(0.975, 2 df) · sd / √n
    self.assertAlmostEqual(stats.describe([5.0, 7.0])["ci95"], 12.706 * 2 ** 0.5 / 2 ** 0.5)
    one = stats.describe([4.0])
    self.assertEqual((one["mean"], one["sd"], one["ci95"]), (4.0, None, None))
    self.assertEqual(stats.describe([None, float("nan")])["n"], 0)
    self.assertEqual(report.fmt_sd(st), "2.000 ± 1.000")
    self.assertEqual(report.fmt_ci(stats.describe([-1.0, -1.0, -1.0])), "-1.000 [-1.000, -1.000]")

  def test_paired_differences_remove_the_seed_effect(self):
    # The seed moves both arms by up to 1.0; the arm is 0.05 better in every seed: unpaired
    # intervals would overlap, the paired one excludes 0.
    base = {0: 2.0, 1: 3.0, 2: 2.5}
    arm = {0: 1.95, 1: 2.96, 2: 2.44}
    d = stats.paired(arm, base)
    self.assertEqual(d["seeds"], [0, 1, 2])
    self.assertAlmostEqual(d["mean"], -0.05)
    self.assertEqual(d["verdict"], "lower")
    self.assertEqual(stats.paired(base, arm)["verdict"], "higher")
    self.assertEqual(stats.paired({0: 1.0, 1: 2.0, 2: 0.9}, {0: 1.0, 1: 1.0, 2: 1.0})["verdict"],
                     "tie")
    self.assertEqual(stats.paired({0: 1.0}, {0: 2.0})["verdict"], "tie")   # one seed: no claim
    self.assertEqual(stats.paired({0: 1.0, 1: 2.0}, {1: 1.5, 2: 0.0})["seeds"], [1])

  def test_slope_and_its_interval(self):
    exact = stats.slope([1.0, 2.0, 3.0, 4.0], [0.5, 0.7, 0.9, 1.1])
    self.assertAlmostEqual(exact["slope"], 0.2)
    self.assertAlmostEqual(exact["ci95"], 0.0)
    noisy = stats.slope([0, 0, 1, 1, 2, 2], [0.0, 0.2, 0.1, 0.3, 0.2, 0.4])
    self.assertAlmostEqual(noisy["slope"], 0.1)
    # residual variance 0.02 · 4/4 … from the formula: s² = Σr²/(n − 2), se = √(s²/Sxx)
    resid = sum(r * r for r in (-0.1, 0.1, -0.1, 0.1, -0.1, 0.1)) / 4
    self.assertAlmostEqual(noisy["ci95"], 2.776 * (resid / 4) ** 0.5)
    with self.assertRaisesRegex(ValueError, "must differ in x"):
      stats.slope([1.0, 1.0], [0.0, 1.0])

  def test_band_is_the_mean_over_common_steps(self):
    plt = plots.pyplot() if importlib.util.find_spec("matplotlib") else None
    if plt is None:
      pytest.fail("matplotlib is missing: `make experiments-setup` installs "
                  "requirements-plots.txt (make test does it first)", pytrace=False)
    fig, ax = plt.subplots()
    xs, mean = plots.band(ax, [([0, 10, 20], [1.0, 2.0, 3.0]), ([10, 20, 30], [4.0, 6.0, 8.0])],
                          "black")
    self.assertEqual((xs, mean), ([10, 20], [3.0, 4.5]))
    plt.close(fig)

  def test_markdown_table(self):
    self.assertEqual(report.markdown_table(["a", "b"], [[1, 2]], align="lr"),
                     "| a | b |\n| --- | ---: |\n| 1 | 2 |")


if __name__ == "__main__":
  unittest.main()
