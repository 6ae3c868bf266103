"""Tests of the capacity planner (m6t_tf.run.planning, tools/plan.py).

The planner never builds weights; here every count is checked against something built:
parameters against `count_params()` and the variable shapes of the Keras model of every gin
size file (shrunk by gin/tiny.gin) and of architecture variants; per-worker parameters against
a network built for one rank of a 2-expert-rank mesh; FLOPs against the MatMul/Einsum ops of the
traced forward graph (an independent count: the expert einsums there run on [D, e, C, M]
buffers, so E·C slots); optimizer state against the slots Keras' AdamW and our Adafactor
allocate; all-to-all bytes against `MoE.alltoall_bytes_per_forward`.
"""

import json
import os
import re
import subprocess
import sys

from absl.testing import parameterized
import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from m6t_tf import optimizers
from m6t_tf.bench import flops as flops_lib
from m6t_tf.run import planning
from m6t_tf.errors import ConfigError
from m6t_tf.models import m6_captioner
from m6t_tf.networks import m6_transformer
from m6t_tf.parallel import communicator as comm_lib
from tests.support import REPO

SIZES = ["base", "10B", "100B", "1T", "demo"] + (
    ["revisit_moe"] if os.path.exists(os.path.join(REPO, "gin", "revisit_moe.gin")) else [])
# Variants of base.gin + tiny.gin: (name, gin bindings, patch_dim).
VARIANTS = (
    ("swiglu_pre_rms_rope", ["M6Transformer.activation='swiglu'", "M6Transformer.norm='pre_rms'",
                             "M6Transformer.positions='rope'"], 768),
    ("every_k", ["NUM_LAYERS=5", "M6Transformer.moe_placement='every_k'",
                 "M6Transformer.moe_every=2"], 768),
    ("last_k_top2_einsum", ["NUM_LAYERS=3", "M6Transformer.moe_placement='last_k'",
                            "M6Transformer.moe_every=2", "MoEConfig.k=2",
                            "MoEConfig.dispatch='einsum'"], 768),
    ("moe_attention_prototype", ["M6Transformer.moe_attention=True",
                                 "MoEConfig.routing='prototype'", "MoEConfig.k=2"], 768),
    ("moe_attention_swiglu_every_k", ["NUM_LAYERS=4", "M6Transformer.moe_attention=True",
                                      "M6Transformer.activation='swiglu'",
                                      "M6Transformer.moe_placement='every_k'",
                                      "M6Transformer.moe_every=2"], 768),
    ("dense", ["M6Transformer.moe_placement='none'"], 768),
    ("features_capacity1", ["train.image_mode='features'", "MoEConfig.k=2",
                            "MoEConfig.capacity_mode='1'", "HEAD_SIZE=8"], 7),
)


def _gin_files(size, *more):
  return [os.path.join(REPO, "gin", f"{size}.gin"), os.path.join(REPO, "gin", "tiny.gin"),
          *more]


def _dummy_batch(config: dict):
  b, length = config["batch_size_per_worker"], config["max_len"]
  tokens = np.ones([b, length], np.int32)
  tokens[0, length // 2:] = 0        # some padding: not routed, but still computed densely
  if config["patch_dim"] == 768:
    return {"image": np.zeros([b, 64, 64, 3], np.uint8), "tokens": tokens}
  return {"patch_features": np.zeros([b, 16, config["patch_dim"]], np.float32), "tokens": tokens}


def _build(files, bindings=(), patch_dim=768):
  """(plan, built M6Captioner, batch) for a gin config; the model from gin's own bindings."""
  result = planning.plan_from_gin(files, bindings, patch_dim=patch_dim, search_paths=[REPO])
  network = m6_transformer.M6Transformer(name="m6", **gin.get_bindings("M6Transformer"))
  model = m6_captioner.M6Captioner(network=network)
  batch = _dummy_batch(result["config"])
  model(batch, training=True)
  return result, model, batch


def _size(v) -> int:
  return int(np.prod(v.shape))


def graph_flops(model, batch) -> dict:
  """Matmul FLOPs of the forward ops the logits depend on: {"total", "experts"}."""
  specs = {k: tf.TensorSpec(v.shape, v.dtype) for k, v in batch.items()}
  forward = tf.function(lambda b: model(b, training=True), autograph=False)
  graph_fn = forward.get_concrete_function(specs)
  seen, stack, out = set(), [t.op for t in graph_fn.outputs], {"total": 0, "experts": 0}
  while stack:        # data ancestors only: unused routing tensors are pruned at run time
    op = stack.pop()
    if op.name in seen:
      continue
    seen.add(op.name)
    stack.extend(t.op for t in op.inputs)
    assert "Conv" not in op.type and ("MatMul" not in op.type
                                      or op.type in flops_lib.MATMUL_OPS), op.type
    if op.type in flops_lib.MATMUL_OPS:
      flops = flops_lib.matmul_flops(op)
      out["total"] += flops
      if re.search(r"/moe(_\d+)?/experts(_\d+)?/", op.name):   # scopes get _1, _2 suffixes
        out["experts"] += flops
  return out


class PlanningTest(parameterized.TestCase, tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self._communicator = comm_lib.get_default()
    comm_lib.set_default(comm_lib.LocalCommunicator())

  def tearDown(self):
    comm_lib.set_default(self._communicator)
    gin.clear_config()
    super().tearDown()

  def _check_params(self, result, model):
    self.assertIsInstance(result["params_total"], int)
    self.assertIsInstance(result["params_activated"], int)
    # Keras 3 count_params() counts every weight, the MoE statistics variables included.
    self.assertEqual(model.count_params(), result["params_keras_count"])
    self.assertEqual(sum(_size(v) for v in model.trainable_weights), result["params_total"])
    self.assertEqual(sum(_size(v) for v in model.non_trainable_weights),
                     result["params_nontrainable"])
    specs = planning.weight_specs(planning.config_from_gin(patch_dim=result["config"]["patch_dim"]))
    self.assertEqual(sorted(tuple(v.shape) for v in model.weights), sorted(s.shape for s in specs))
    by = result["params_by_component"]
    self.assertEqual(sum(by.values()), result["params_total"])
    trainable = model.trainable_weights
    self.assertEqual(sum(_size(v) for v in trainable if "/experts/" in v.path),
                     by["experts"] + by["attention_experts"])
    self.assertEqual(sum(_size(v) for v in trainable if "/router/" in v.path), by["routers"])
    self.assertEqual(sum(_size(v) for v in trainable if "/ffn/" in v.path), by["dense_ffn"])
    self.assertEqual(sum(_size(v) for v in trainable if "norm/" in v.path), by["norms"])
    self.assertEqual(result["params_per_worker"], result["params_total"])   # one worker

  @parameterized.parameters(*SIZES)
  def test_params_match_keras_for_every_size_file(self, size):
    result, model, _ = _build(_gin_files(size))
    self._check_params(result, model)

  @parameterized.named_parameters(*VARIANTS)
  def test_params_match_keras_for_variants(self, bindings, patch_dim):
    result, model, _ = _build(_gin_files("base"), bindings, patch_dim)
    self._check_params(result, model)
    if "M6Transformer.moe_placement='every_k'" in bindings:
      self.assertEqual(result["config"]["moe_layers"], [1, 3])
    if "M6Transformer.moe_placement='none'" in bindings:
      self.assertEqual(result["params_by_component"]["experts"], 0)
      self.assertEqual(result["params_activated"], result["params_total"])

  @parameterized.named_parameters(
      ("base", "base", []),
      ("revisit_style", "base", VARIANTS[0][1] + ["MoEConfig.k=2", "NUM_LAYERS=3",
                                                  "M6Transformer.moe_placement='every_k'",
                                                  "M6Transformer.moe_every=2"]),
      ("moe_attention", "base", VARIANTS[3][1]),
      ("capacity1_features", "base", VARIANTS[-1][1], 7),
  )
  @pytest.mark.slow
  def test_flops_match_traced_graph(self, size, bindings, patch_dim=768):
    result, model, batch = _build(_gin_files(size), bindings, patch_dim)
    counted = graph_flops(model, batch)
    fl = result["flops_forward"]
    # The index dispatch's gate-weighted combine is element-wise (multiply, then sum over the
    # k choices), not a matmul op in the graph; the planner counts its 2·k·T·N multiply-adds.
    index = result["config"]["dispatch"] == "index"
    self.assertEqual(counted["total"] + (fl["dispatch_combine"] if index else 0), fl["total"])
    self.assertEqual(counted["experts"], fl["experts"])
    c = result["config"]
    e_c = c["num_experts"] * c["capacity"]
    n_w = 3 if c["activation"] == "swiglu" else 2
    self.assertEqual(fl["experts"], len(c["moe_layers"]) * 2 * e_c * n_w * c["hidden_size"]
                     * c["intermediate_size"])
    self.assertEqual(result["flops_per_step"], 3 * fl["total"])
    # All-to-all: what the built MoE layers (FFN, and Q, K, V, output with MoE attention) report.
    layers = model.moe_layers
    self.assertLen(layers, len(c["moe_layers"]) * (5 if c["moe_attention"] else 1))
    self.assertEqual(sum(layer.alltoall_bytes_per_forward() for layer in layers),
                     result["alltoall_bytes_per_forward"])
    self.assertEqual(result["alltoall_bytes_per_step"], 2 * result["alltoall_bytes_per_forward"])

  def test_activated_params_hand_count(self):
    result = planning.plan_from_gin(_gin_files("base"), ["MoEConfig.k=2"], search_paths=[REPO])
    c = result["config"]
    one_expert = 2 * c["hidden_size"] * c["intermediate_size"]
    experts = result["params_by_component"]["experts"]
    self.assertEqual(experts, c["num_layers"] * c["num_experts"] * one_expert)
    self.assertEqual(result["params_activated"],
                     result["params_total"] - experts + c["num_layers"] * 2 * one_expert)

  @parameterized.parameters("adamw", "adafactor")
  def test_optimizer_state_matches_keras_slots(self, name):
    result, model, _ = _build(_gin_files("base"), [f"train.optimizer='{name}'"])
    variables = model.trainable_variables
    opt = optimizers.make_optimizer(name, 1e-3, weight_decay=0.0)
    opt.build(variables)
    bare = keras.optimizers.SGD(1e-3)    # no slots: only the optimizer's own counters
    bare.build(variables)
    slots = sum(_size(v) for v in opt.variables) - sum(_size(v) for v in bare.variables)
    self.assertEqual(4 * slots, result["memory_bytes"]["optimizer_state"])
    self.assertEqual(4 * sum(_size(v) for v in variables), result["memory_bytes"]["gradients"])

  def test_per_worker_params_match_a_sharded_network(self):
    """One rank of a (data 2 × expert 2) mesh holds e = E/2 experts and all dense weights."""

    class TwoRanks(comm_lib.Communicator):
      expert_group_size = 2
      expert_rank = 1

    files = _gin_files("base", os.path.join(REPO, "gin", "layouts", "2x2.gin"))
    result = planning.plan_from_gin(files, search_paths=[REPO])
    comm_lib.set_default(TwoRanks())
    network = m6_transformer.M6Transformer(name="m6", **gin.get_bindings("M6Transformer"))
    c = result["config"]
    network.build({"image": (None, 64, 64, 3), "tokens": (None, c["max_len"] - 1)})
    self.assertEqual((c["mesh_data"], c["mesh_expert"], c["experts_per_worker"]), (2, 2, 4))
    self.assertEqual(sum(_size(v) for v in network.trainable_weights), result["params_per_worker"])
    self.assertEqual(sum(_size(v) for v in network.trainable_weights if "/experts/" in v.path),
                     result["params_per_worker_expert"])
    # Dense gradients over all 4 ranks, expert gradients over the 2 replicas, float32.
    ar = result["allreduce_bytes_per_step"]
    self.assertEqual(ar["dense"], 4 * result["params_per_worker_dense"])
    self.assertEqual(ar["expert"], 4 * result["params_per_worker_expert"])
    self.assertEqual(result["allreduce_wire_bytes_per_step"],
                     2 * 3 * ar["dense"] // 4 + 2 * 1 * ar["expert"] // 2)

  def test_paper_sizes(self):
    """The expert counts of the gin headers; base..100B fit in 32 GB; 1T with Adafactor fits
    with recomputation (its unfused tanh-GeLU keeps 4 [E·C, I] tensors per layer, measured by
    tools/measure_memory.py), with AdamW not even then."""
    layouts = os.path.join(REPO, "gin", "layouts")
    want = {"base": (8, 1_342_177_280), "10B": (16, 10_737_418_240),
            "100B": (128, 103_079_215_104), "1T": (480, 1_002_606_428_160)}
    plans = {}
    for size, (workers, experts) in want.items():
      files = [os.path.join(REPO, "gin", f"{size}.gin"), os.path.join(layouts, f"1x{workers}.gin")]
      plans[size] = planning.plan_from_gin(files, search_paths=[REPO])
      self.assertEqual(plans[size]["params_by_component"]["experts"], experts)
      self.assertEqual(plans[size]["config"]["tokens_per_worker"], 8 * 143)
      if size != "1T":
        self.assertTrue(plans[size]["fits"], plans[size]["verdict"])
    one_t = plans["1T"]
    self.assertTrue(one_t["fits_with_recompute"], one_t["verdict"])
    # Mixed precision (base..100B) sends float16 all-to-all payloads; 1T ran without it.
    self.assertEqual(plans["base"]["alltoall_bytes_per_element"], 2)
    self.assertEqual(one_t["alltoall_bytes_per_element"], 4)
    self.assertGreater(plans["base"]["memory_bytes"]["weight_casts"], 0)
    self.assertEqual(one_t["memory_bytes"]["weight_casts"], 0)
    self.assertEqual(one_t["config"]["capacity"], 2)
    self.assertBetween(one_t["moe_expert_flops_share"], 0.98, 0.99)
    self.assertBetween(one_t["params_total"], 1.0e12, 1.01e12)
    adamw = planning.plan_from_gin(
        [os.path.join(REPO, "gin", "1T.gin"), os.path.join(layouts, "1x480.gin")],
        ["train.optimizer='adamw'"], search_paths=[REPO])
    self.assertFalse(adamw["fits"])
    self.assertFalse(adamw["fits_with_recompute"])
    self.assertLess(adamw["headroom_bytes"], 0)
    self.assertIn("does not fit", adamw["verdict"])
    self.assertLess(one_t["memory_bytes"]["activations_recompute"],
                    one_t["memory_bytes"]["activations"])
    self.assertIn("|", planning.markdown_table(plans))

  def test_layout_mismatch_and_uneven_experts_raise(self):
    files = [os.path.join(REPO, "gin", "base.gin"), os.path.join(REPO, "gin", "layouts", "1x8.gin")]
    with self.assertRaisesRegex(ConfigError, "num_workers=16"):
      planning.plan_from_gin(files, num_workers=16, search_paths=[REPO])
    with self.assertRaisesRegex(ConfigError, "do not split"):
      planning.plan_from_gin([files[0]], num_workers=12, search_paths=[REPO])


@pytest.mark.multiprocess
class PlanToolTest(tf.test.TestCase):

  def test_json_table_and_errors(self):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    runs = (["--gin_file=gin/1T.gin", "--gin_file=gin/layouts/1x480.gin", "--format=json"],
            ["--gin_file=gin/base.gin", "--num_workers=8", "--format=table", "--gpu_memory_gb=2"],
            ["--gin_file=gin/base.gin", "--num_workers=12"])
    # Started together: most of each run is importing TensorFlow.
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "plan.py"), *args],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args in runs]
    (json_out, json_err), (table_out, table_err), (_, bad_err) = [
        p.communicate(timeout=180) for p in procs]
    self.assertEqual(procs[0].returncode, 0, json_err)
    result = json.loads(json_out)
    for key in ("params_total", "params_activated", "params_by_component", "memory_bytes",
                "fits", "headroom_bytes", "flops_forward", "flops_per_step",
                "moe_expert_flops_share", "alltoall_bytes_per_step", "allreduce_bytes_per_step",
                "verdict"):
      self.assertIn(key, result)
    self.assertIsInstance(result["params_total"], int)
    self.assertEqual(result["config"]["num_workers"], 480)
    self.assertEqual(procs[1].returncode, 0, table_err)
    self.assertIn("| params total | 1,385,946,760", table_out)
    self.assertIn("does not fit", table_out)
    self.assertEqual(procs[2].returncode, 2)
    self.assertIn("do not split", bad_err)


if __name__ == "__main__":
  tf.test.main()
