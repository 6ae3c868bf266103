"""tools/experiments/flops.py (paper Table 1 at our scale) on the tiny overlay.

One run of the script with `--tiny` into a temporary folder (six of the nine variants: enough
for both capacities at k = 1, 2, 4 and both routings), then checks on its JSON:

* the planner's FLOPs per step equal the matmul ops of the traced training step, counted from
  their shapes, exactly, once the two things the planner counts and no matmul op computes are
  taken out (the index dispatch's element-wise gate-weighted combine, 3 × 2·k·T·M per MoE
  layer, and the patch projection's input gradient, which nothing needs). At tiny sizes these
  are 1.6% of the step, so a tolerance would hide a wrong factor in a small component: the
  comparison is to the FLOP. The forward pass alone and the expert matmuls alone are
  checked the same way;
* our shape count equals the TF profiler's own statistic on every op whose statistic TF
  computes correctly (MatMul everywhere; BatchMatMul in the forward pass, which has no adj_x);
* Capacity 1× costs exactly top-1's matmul FLOPs (same C), and Capacity k× grows with k, the
  expert matmuls in proportion to C;
* the planner's C equals the trainer's.
"""

import json
import math
import os
import shutil
import tempfile
import unittest

import pytest

from tests import support

VARIANTS = ["top1", "top2_cap_k", "top2_cap_1", "top4_cap_k", "4top1_cap_k", "4top1_cap_1"]


@pytest.mark.slow
class FlopsTableTest(unittest.TestCase):

  @classmethod
  def setUpClass(cls):
    support.require_demo()
    cls.tmp = tempfile.mkdtemp(prefix="m6t_flops_")
    cwd = os.getcwd()
    try:
      flops = support.load_tool("tools/experiments/flops.py")
      cls.rc = flops.main(["--tiny", f"--out_dir={cls.tmp}", "--variants=" + ",".join(VARIANTS)])
    finally:
      import gin
      import keras
      import tensorflow as tf
      gin.clear_config()
      keras.mixed_precision.set_global_policy("float32")
      tf.get_logger().setLevel("WARNING")
    assert os.getcwd() == cwd, "the script left the working directory changed"
    with open(os.path.join(cls.tmp, "flops.json")) as f:
      cls.payload = json.load(f)
    with open(os.path.join(cls.tmp, "flops.md")) as f:
      cls.md = f.read()
    cls.rows = {r["variant"]: r for r in cls.payload["rows"]}
    cls.results = {r["variant"]: r for r in cls.payload["results"]}

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)

  def test_writes_table_and_json(self):
    self.assertEqual(self.rc, 0)
    self.assertEqual(list(self.rows), VARIANTS)
    self.assertIn("python tools/experiments/flops.py --tiny", self.md)
    self.assertIn("TensorFlow ", self.md)
    self.assertIn("| routing | capacity | C (planner / trainer) | planner GFLOPs/step |", self.md)
    # The script's own verdict on the residual (the JSON check is the next test's).
    self.assertTrue("to the FLOP in every row" in self.md, "flops.md: residual not explained")
    self.assertFalse("NOT" in self.md, "flops.md: residual not explained")

  def test_capacity_agrees_with_the_trainer_and_the_hand_count(self):
    # tiny.gin: T = 2 × (16 + 11) = 54 positions, every one counted (REAL_TOKEN_FRACTION = 1),
    # E = 8, γ = 1.25 → C = ceil(k · 54 / 8 · 1.25) = 9, 17, 34 for k = 1, 2, 4.
    want = {"top1": 9, "top2_cap_k": 17, "top2_cap_1": 9, "top4_cap_k": 34, "4top1_cap_k": 34,
            "4top1_cap_1": 9}
    for v, r in self.rows.items():
      self.assertEqual((r["C_planner"], r["C_trainer"]), (want[v], want[v]), v)

  def test_step_matmuls_equal_the_planner_to_the_flop(self):
    for v, res in self.results.items():
      fl = res["planner"]["flops_forward"]
      c = res["planner"]["config"]
      self.assertEqual(c["dispatch"], "index", v)
      moe_layers, k, t, m = len(c["moe_layers"]), c["k"], c["tokens_per_worker"], c["hidden_size"]
      self.assertEqual(fl["dispatch_combine"], moe_layers * 2 * k * t * m, v)
      step = res["step"]
      self.assertEqual(step["shape_matmul"],
                       res["planner"]["flops_per_step"] - 3 * fl["dispatch_combine"]
                       - fl["embeddings"], v)
      self.assertEqual(res["forward"]["shape_matmul"], fl["total"] - fl["dispatch_combine"], v)
      self.assertEqual(step["shape_experts"], 3 * fl["experts"], v)
      self.assertEqual(step["shape_forward"], res["forward"]["shape_matmul"], v)
      # What the table's ratio column shows: within the 1.6% the two exclusions make here.
      self.assertGreater(self.rows[v]["shape_over_planner"], 0.98, v)
      self.assertLess(self.rows[v]["shape_over_planner"], 1.0, v)

  def test_shape_count_equals_the_profiler_where_tf_counts_right(self):
    for v, res in self.results.items():
      step, fwd = res["step"], res["forward"]
      self.assertEqual(step["profiler_by_type"]["MatMul"], step["shape_by_type"]["MatMul"], v)
      self.assertEqual(fwd["profiler_by_type"]["MatMul"], fwd["shape_by_type"]["MatMul"], v)
      self.assertEqual(fwd["profiler_by_type"]["BatchMatMulV2"],
                       fwd["shape_by_type"]["BatchMatMulV2"], v)
      # Einsum has no flops statistic: the profiler's matmul count misses it, and says so.
      self.assertNotIn("Einsum", step["profiler_by_type"])
      self.assertIn("Einsum", step["matmul_ops_without_flops_statistic"])
      self.assertEqual(step["profiler_total"], sum(step["profiler_by_type"].values()))

  def test_capacity_1x_costs_top1(self):
    base = self.rows["top1"]
    for v in ("top2_cap_1", "4top1_cap_1"):
      self.assertEqual(self.rows[v]["shape_vs_top1"], 1.0, v)
      self.assertEqual(self.rows[v]["experts_vs_top1"], 1.0, v)
      # The planner adds the element-wise combine, which grows with k: ≈ top-1.
      self.assertAlmostEqual(self.rows[v]["planner_vs_top1"], 1.0, delta=0.01)
      self.assertGreater(self.rows[v]["planner_vs_top1"], base["planner_vs_top1"], v)

  def test_capacity_kx_grows_with_k(self):
    r = self.rows
    for chain in (["top1", "top2_cap_k", "top4_cap_k"], ["top1", "4top1_cap_k"]):
      costs = [r[v]["shape_matmul_flops_per_step"] for v in chain]
      self.assertEqual(costs, sorted(set(costs)), chain)
      planned = [r[v]["planner_flops_per_step"] for v in chain]
      self.assertEqual(planned, sorted(set(planned)), chain)
    for v in ("top2_cap_k", "top4_cap_k", "4top1_cap_k"):
      # Expert matmuls run on E·C slots: they scale with C exactly.
      self.assertTrue(math.isclose(r[v]["experts_vs_top1"], r[v]["C_planner"] / 9), v)
    # Same k, same C: looped top-4 and 4 prototypes cost the same matmuls.
    self.assertEqual(r["top4_cap_k"]["shape_matmul_flops_per_step"],
                     r["4top1_cap_k"]["shape_matmul_flops_per_step"])


if __name__ == "__main__":
  unittest.main()
