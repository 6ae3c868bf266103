"""Smoke runs of tools/experiments/{routing,aux_loss,moe_attention}.py: a couple of tiny steps
per run into a temporary folder; each must write its PNG, markdown table and JSON, share the
runs it has in common with the others, and reuse finished runs. Plus the helpers' arithmetic.

The scripts plot with matplotlib (`requirements-plots.txt`, installed by `make experiments`);
without it the smoke runs are skipped, saying so.
"""

import glob
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "tools", "experiments")
DEMO = os.path.join(ROOT, ".data", "demo")
sys.path.insert(0, EXPERIMENTS)

import common  # noqa: E402


def _load(name):
  spec = importlib.util.spec_from_file_location(f"experiments_{name}",
                                                os.path.join(EXPERIMENTS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


SMOKE = ["--tiny", "--steps=2", "--eval_points=1", "--log_every=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ScriptsSmokeTest(unittest.TestCase):

  @classmethod
  def setUpClass(cls):
    if importlib.util.find_spec("matplotlib") is None:
      raise unittest.SkipTest("matplotlib missing: `pip install -r requirements-plots.txt` "
                              "(`make experiments` does)")
    if not glob.glob(os.path.join(DEMO, "train-*.tfrecord")):
      raise unittest.SkipTest("demo dataset missing: `make data` builds it")
    cls.tmp = tempfile.mkdtemp(prefix="m6t_experiments_")
    cls.root = os.path.join(cls.tmp, "runs")
    cls.out = os.path.join(cls.tmp, "out")
    common_flags = SMOKE + [f"--model_root={cls.root}", f"--out_dir={cls.out}"]
    cwd = os.getcwd()
    try:
      # One timed round in the routing script exercises the step-time column and cost plot.
      cls.rc = {
          "routing": _load("routing").main(common_flags + [
              "--variants=top1,2top1_cap_k", "--replicate=", "--time_rounds=1"]),
          "aux_loss": _load("aux_loss").main(common_flags + ["--time_rounds=0"]),
          "moe_attention": _load("moe_attention").main(common_flags + [
              "--routings=top1", "--time_rounds=0"]),
      }
    finally:
      _restore_globals()
    assert os.getcwd() == cwd, "a script left the working directory changed"

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)

  def test_every_script_writes_png_table_and_json(self):
    for name, rc in self.rc.items():
      self.assertEqual(rc, 0, name)
      with open(os.path.join(self.out, f"{name}.png"), "rb") as f:
        self.assertEqual(f.read(8), PNG_MAGIC, name)
      self.assertGreater(os.path.getsize(os.path.join(self.out, f"{name}.png")), 10_000, name)
      with open(os.path.join(self.out, f"{name}.md")) as f:
        md = f.read()
      self.assertIn(f"![", md)
      self.assertIn("| val PPL |", md)
      self.assertIn("python -m m6t_tf.train --gin_file=tools/experiments/gin/", md)
      self.assertIn(f"tools/experiments/{name}.py", md)
      self.assertIn("Machine:", md)
      with open(os.path.join(self.out, f"{name}.json")) as f:
        payload = json.load(f)
      self.assertEqual(payload["experiment"], name)
      self.assertEqual(payload["steps"], 2)
      for run in payload["runs"]:
        self.assertGreater(run["eval"]["perplexity"], 1.0)
        self.assertEqual(sorted(map(int, run["train_loss"])), [1, 2])
    with open(os.path.join(self.out, "routing_cost.png"), "rb") as f:
      self.assertEqual(f.read(8), PNG_MAGIC)

  def test_table_rows(self):
    with open(os.path.join(self.out, "routing.json")) as f:
      runs = json.load(f)["runs"]
    self.assertEqual([(r["routing"], r["capacity"]) for r in runs],
                     [("top-1", "k× = 1×"), ("2 top-1", "k×")])
    # tiny.gin: T = 2 × (16 + 11) = 54 positions, E = 8, γ = 1.25 → C = ceil(k · 54 / 8 · 1.25).
    self.assertEqual([r["derived"]["capacity"] for r in runs], [9, 17])
    self.assertIsNotNone(runs[1]["step_time_vs_top1"])
    with open(os.path.join(self.out, "aux_loss.json")) as f:
      aux = json.load(f)["runs"]
    self.assertEqual([r["derived"]["aux_loss_weight"] for r in aux], [0.0, 0.01])
    self.assertEqual(len(aux[0]["late_load_cv"]), 2)          # tiny.gin: 2 MoE layers
    with open(os.path.join(self.out, "moe_attention.json")) as f:
      attn = json.load(f)["runs"]
    self.assertEqual([r["derived"]["moe_attention"] for r in attn], [False, True])
    # Q, K, V, O of both layers are MoEs with routing statistics of their own.
    self.assertEqual(len(attn[1]["late_dropped_fraction_attention"]), 8)

  def test_runs_are_shared_between_scripts(self):
    # top-1 is the routing sweep's run, aux loss "off" and the MoE-attention baseline.
    self.assertEqual(sorted(os.listdir(self.root)), [
        "2top1_cap_k+tiny-steps2-seed0", "top1+aux_loss+tiny-steps2-seed0",
        "top1+moe_attention+tiny-steps2-seed0", "top1+tiny-steps2-seed0"])

  def test_finished_runs_are_reused(self):
    path = os.path.join(self.root, "top1+tiny-steps2-seed0", "experiment.json")
    with open(path) as f:
      before = json.load(f)
    out = os.path.join(self.tmp, "again")
    try:
      rc = _load("aux_loss").main(SMOKE + [f"--model_root={self.root}", f"--out_dir={out}",
                                           "--time_rounds=0"])
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
    self.assertEqual(common.smooth([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])

  def test_late_mean_uses_the_second_half(self):
    run = {"scalars": {"x": {10: 1.0, 20: 1.0, 30: 3.0, 40: 5.0}}}
    self.assertEqual(common.late_mean(run, "x"), 3.0)     # steps 20, 30, 40 of 40
    self.assertIsNone(common.late_mean(run, "missing"))

  def test_layer_names(self):
    self.assertEqual(common.short_layer("m6/block_2/moe"), "layer 2")
    self.assertEqual(common.short_layer("m6/block_0/attention/query"), "layer 0 query")
    run = {"scalars": {"moe/m6/block_10/moe/load_cv": {}, "moe/m6/block_2/moe/load_cv": {},
                       "loss": {}}}
    self.assertEqual(common.moe_layer_names(run), ["m6/block_2/moe", "m6/block_10/moe"])

  def test_bindings_scale_with_steps(self):
    class Args:
      steps, eval_points, log_every, tiny, gin_bindings, model_root = 400, 4, 10, False, [], "r"
    sweep = common.Sweep(Args())
    spec = common.RunSpec("top-1", ("top1",), seed=3)
    b = sweep.bindings(spec)
    for want in ("train.num_steps = 400", "train.warmup_steps = 40", "train.eval_every = 100",
                 "train.log_every = 10", "train.seed = 3"):
      self.assertIn(want, b)
    self.assertEqual(sweep.files(spec), ["tools/experiments/gin/top1.gin"])
    self.assertTrue(sweep.run_dir(spec).endswith(os.path.join("r", "top1-steps400-seed3")))
    self.assertIn("--gin_file=tools/experiments/gin/top1.gin", sweep.command(spec))

  def test_markdown_table(self):
    self.assertEqual(common.markdown_table(["a", "b"], [[1, 2]], align="lr"),
                     "| a | b |\n| --- | ---: |\n| 1 | 2 |")


if __name__ == "__main__":
  unittest.main()
