"""Sigmoid gating (`m6t_tf.layers.routers.sigmoid`) against a NumPy reference written from
DeepSeek-V3's equations (arXiv 2412.19437 §2.1.2): s_i = σ(x_i); the k largest s are chosen;
g_i = ρ · s_i / Σ_{j chosen} s_j. Placement under capacity is the layer's common machinery
(tests/numpy_reference.py's loops); the gates, their gradient, the losses and the whole MoE
layer (index and einsum dispatch, outer groups, dropless) are checked here, and the router's
option reaches the layer, its config and gin like any other.
"""

import os
import tempfile

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

from m6t_tf.run import planning
from m6t_tf.layers import moe as moe_lib
from m6t_tf.layers import routers
from m6t_tf.layers.routers import sigmoid as sigmoid_lib
from m6t_tf.networks import m6_transformer
from tests import numpy_reference as ref

M, I = 6, 5


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def reference_routing(logits, *, k, capacity, route_scale=1.0, token_mask=None,
                      drop_policy="position"):
  """The routing of DeepSeek-V3's sigmoid gate, in float64 with explicit loops."""
  logits = np.asarray(logits, np.float64)
  num_tokens, num_experts = logits.shape
  valid = np.ones(num_tokens, bool) if token_mask is None else np.asarray(token_mask, bool)
  s = sigmoid(logits)                                                     # [T, E]
  expert_index = np.zeros((k, num_tokens), np.int64)
  gate_before = np.zeros((k, num_tokens))
  for t in range(num_tokens):
    order = sorted(range(num_experts), key=lambda e: (-s[t, e], e))       # largest s first
    chosen = order[:k]
    expert_index[:, t] = chosen
    total = sum(s[t, e] for e in chosen)
    gate_before[:, t] = [route_scale * s[t, e] / total for e in chosen]
  used, slot, kept = ref._place_with_policies(  # pylint: disable=protected-access
      expert_index, gate_before, gate_before, valid, capacity, num_experts,
      second_expert_policy="all", drop_policy=drop_policy, uniform=None)
  gate = np.where(kept, gate_before, 0.0)
  normalised = s / s.sum(axis=1, keepdims=True)                           # s'_i
  combine, _, tokens_per_expert, _ = ref._assemble(  # pylint: disable=protected-access
      expert_index, slot, kept, gate, normalised, capacity, num_experts, valid)
  n = max(valid.sum(), 1)
  f = np.zeros(num_experts)
  for t in np.flatnonzero(valid):
    f[expert_index[0, t]] += 1.0 / n
  p = normalised[valid].sum(axis=0) / n
  return dict(expert_index=expert_index, slot=slot, kept=kept, used=used, gate=gate,
              combine_weights=combine, tokens_per_expert=tokens_per_expert,
              aux_loss=num_experts * float((f * p).sum()),
              z_loss=float((ref.logsumexp(logits)[valid] ** 2).sum() / n))


def reference_gate_jacobian(logits, expert_index, kept, route_scale):
  """d g[r, t] / d logits[t, j] from the quotient rule on g_i = ρ·s_i / Σ s, σ' = s(1 − s)."""
  s = sigmoid(logits)
  k, num_tokens = expert_index.shape
  jac = np.zeros((k, num_tokens, logits.shape[1]))
  for t in range(num_tokens):
    chosen = expert_index[:, t]
    total = s[t, chosen].sum()
    for r in range(k):
      if not kept[r, t]:
        continue
      i = chosen[r]
      for j in chosen:
        d = s[t, j] * (1 - s[t, j])
        jac[r, t, j] = route_scale * ((i == j) * d / total - s[t, i] * d / total ** 2)
  return jac


def reference_layer(x, router_kernel, wi, wo, *, k, capacity, route_scale, token_mask=None):
  """out[t] = Σ over token t's kept choices of g · FFN_expert(x[t]) (GeLU experts)."""
  x = np.asarray(x, np.float64)
  r = reference_routing(x @ np.asarray(router_kernel, np.float64), k=k, capacity=capacity,
                        route_scale=route_scale, token_mask=token_mask)
  out = np.zeros_like(x)
  for c in range(k):
    for t in range(x.shape[0]):
      if r["kept"][c, t]:
        e = r["expert_index"][c, t]
        out[t] += r["gate"][c, t] * ref.ffn(x[t], wi[e], wo[e], "gelu")
  return out


def _logits(seed, t, e, scale=2.0):
  return (np.random.default_rng(seed).standard_normal([t, e]) * scale).astype(np.float32)


def _layer(num_experts=4, seed=0, **kwargs):
  layer = moe_lib.MoE(num_experts, I, routing="sigmoid", **kwargs)
  layer.build((None, M))
  rng = np.random.default_rng(100 + seed)
  layer.router.kernel.assign(rng.standard_normal([M, num_experts]).astype(np.float32) * 2.0)
  for w in layer.experts.weights:
    w.assign(rng.standard_normal(w.shape).astype(np.float32) * 0.5)
  return layer


class SigmoidRoutingTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.named_parameters(
      ("top1", 1, 1.0, "position", False), ("top2", 2, 1.0, "position", False),
      ("top2_scaled_masked", 2, 2.5, "position", True),
      ("top3_by_probability", 3, 1.0, "probability", True),
      ("top2_scaled_by_probability", 2, 2.5, "probability", False))
  def test_equals_the_reference(self, k, route_scale, drop_policy, masked):
    t, e = 13, 6
    for seed in range(3):
      logits = _logits(seed, t, e)
      mask = np.random.default_rng(50 + seed).random(t) > 0.25 if masked else None
      cap = ref.capacity(t, e, k=k, capacity_factor=0.75)                # drops tokens
      got = routers.route(logits, routing="sigmoid", k=k, capacity=cap, route_scale=route_scale,
                          token_mask=mask, drop_policy=drop_policy)
      want = reference_routing(logits, k=k, capacity=cap, route_scale=route_scale,
                               token_mask=mask, drop_policy=drop_policy)
      self.assertGreater(int((want["used"] & ~want["kept"]).sum()), 0)   # capacity binds
      self.assertAllEqual(got.expert_index, want["expert_index"])
      self.assertAllEqual(got.kept, want["kept"])
      self.assertAllEqual(np.where(want["kept"], got.slot, -1), np.where(want["kept"],
                                                                          want["slot"], -1))
      self.assertAllClose(got.gate, want["gate"], atol=1e-6, rtol=1e-6)
      self.assertAllClose(got.combine_weights, want["combine_weights"], atol=1e-6, rtol=1e-6)
      self.assertAllEqual(got.tokens_per_expert, want["tokens_per_expert"])
      self.assertAllClose(got.aux_loss, want["aux_loss"], rtol=1e-5)
      self.assertAllClose(got.z_loss, want["z_loss"], rtol=1e-5)

  def test_gates_sum_to_the_route_scale(self):
    # Nothing dropped: a token's k gates are its normalised scores, summing to ρ; far
    # negative logits (σ underflows in float32) still give finite, normalised gates.
    logits = np.concatenate([_logits(7, 8, 5), np.full([2, 5], -200.0, np.float32)])
    logits[-1, 2] = -150.0
    r = sigmoid_lib.sigmoid_routing(logits, k=2, capacity=20, route_scale=2.5)
    self.assertAllClose(tf.reduce_sum(r.gate, axis=0), np.full([10], 2.5), rtol=1e-6)
    self.assertAllEqual(r.expert_index[0, -1], 2)

  @parameterized.parameters((2, 1.0), (3, 2.5))
  def test_gate_gradient_equals_the_quotient_rule(self, k, route_scale):
    t, e = 9, 5
    logits = tf.constant(_logits(11, t, e))
    cap = ref.capacity(t, e, k=k, capacity_factor=1.0)
    with tf.GradientTape() as tape:
      tape.watch(logits)
      r = sigmoid_lib.sigmoid_routing(logits, k=k, capacity=cap, route_scale=route_scale)
      gate = r.gate
    got = tape.jacobian(gate, logits).numpy()                             # [K, T, T, E]
    got = np.stack([got[:, t_, t_, :] for t_ in range(t)], axis=1)        # [K, T, E]
    want = reference_gate_jacobian(logits.numpy(), r.expert_index.numpy(), r.kept.numpy(),
                                   route_scale)
    self.assertGreater(np.abs(want).max(), 1e-3)
    self.assertAllClose(got, want, atol=1e-6, rtol=1e-5)


class SigmoidLayerTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.parameters("index", "einsum")
  def test_layer_equals_the_reference(self, dispatch):
    t, k, rho = 14, 2, 2.5
    x = np.random.default_rng(3).standard_normal([t, M]).astype(np.float32)
    mask = np.arange(t) % 5 != 4
    layer = _layer(k=k, route_scale=rho, capacity_factor=0.75, dispatch=dispatch)
    y = layer(tf.constant(x), token_mask=tf.constant(mask), training=True)
    cap = layer.last_capacity
    self.assertEqual(cap, ref.capacity(t, 4, k=k, capacity_factor=0.75))
    want = reference_layer(x, layer.router.kernel.numpy(), layer.experts.wi.numpy(),
                           layer.experts.wo.numpy(), k=k, capacity=cap, route_scale=rho,
                           token_mask=mask)
    self.assertAllClose(y, want, atol=1e-5, rtol=1e-5)

  def test_router_gradient_equals_central_differences_of_the_reference(self):
    t, k, rho = 10, 2, 2.5
    x = np.random.default_rng(4).standard_normal([t, M]).astype(np.float32)
    probe = np.random.default_rng(5).standard_normal([t, M])
    layer = _layer(k=k, route_scale=rho, capacity_factor=1.0)
    with tf.GradientTape() as tape:
      y = layer(tf.constant(x), training=True)
      loss = tf.reduce_sum(y * tf.constant(probe, tf.float32))
    got = tape.gradient(loss, layer.router.kernel).numpy()
    cap = layer.last_capacity
    kernel = layer.router.kernel.numpy().astype(np.float64)
    wi, wo = layer.experts.wi.numpy(), layer.experts.wo.numpy()
    f = lambda w: float((reference_layer(x, w, wi, wo, k=k, capacity=cap,
                                         route_scale=rho) * probe).sum())
    want = np.zeros_like(kernel)
    eps = 1e-5   # small enough that no choice changes
    for i in np.ndindex(*kernel.shape):
      d = np.zeros_like(kernel)
      d[i] = eps
      want[i] = (f(kernel + d) - f(kernel - d)) / (2 * eps)
    self.assertGreater(np.abs(want).max(), 1e-2)
    self.assertAllClose(got, want, atol=2e-4, rtol=2e-3)

  def test_groups_and_dropless_use_the_common_machinery(self):
    t, k = 12, 2
    x = np.random.default_rng(6).standard_normal([t, M]).astype(np.float32)
    plain = _layer(k=k, route_scale=2.0, capacity_factor=8.0)             # nothing dropped
    kernel, wi, wo = plain.router.kernel.numpy(), plain.experts.wi.numpy(), plain.experts.wo.numpy()
    want = reference_layer(x, kernel, wi, wo, k=k, capacity=t, route_scale=2.0)
    for kwargs in (dict(capacity_factor=8.0), dict(capacity_mode="dropless"),
                   dict(capacity_factor=8.0, num_groups=3)):
      with self.subTest(**kwargs):
        layer = _layer(k=k, route_scale=2.0, **kwargs)
        self.assertAllClose(layer(tf.constant(x), training=True), want, atol=1e-5, rtol=1e-5)
        self.assertEqual(float(layer.stats["dropped_fraction"]), 0.0)

  def test_option_reaches_config_gin_and_planner(self):
    layer = _layer(k=2, route_scale=2.5)
    config = layer.get_config()
    self.assertEqual((config["routing"], config["route_scale"]), ("sigmoid", 2.5))
    self.assertEqual(moe_lib.MoE.from_config(config).options, layer.options)
    self.assertEqual(m6_transformer.MoEConfig(routing="sigmoid", route_scale=2.5).kwargs()
                     ["route_scale"], 2.5)
    with self.assertRaisesRegex(ValueError, "route_scale=2.0 needs routing='sigmoid'"):
      moe_lib.MoE(4, I, route_scale=2.0)
    with self.assertRaisesRegex(ValueError, "route_scale=0.0 must be > 0"):
      moe_lib.MoE(4, I, routing="sigmoid", route_scale=0.0)
    with self.assertRaisesRegex(ValueError, "normalization='renormalize' does not apply"):
      moe_lib.MoE(4, I, routing="sigmoid", k=2, normalization="renormalize")
    plan = planning.PlanConfig(vocab_size=10, hidden_size=M, num_layers=1, num_heads=2,
                               head_size=3, intermediate_size=I, max_text_length=8, max_len=8,
                               moe=dict(num_experts=4, routing="sigmoid", k=2, route_scale=2.5))
    planning.validate(plan)
    self.assertEqual(plan.capacity, ref.capacity(plan.tokens_per_worker, 4, k=2))

  def test_keras_file_round_trip(self):
    inputs = keras.Input((7, M))
    model = keras.Model(inputs, moe_lib.MoE(4, I, routing="sigmoid", k=2, route_scale=2.5,
                                            name="moe")(inputs))
    x = np.random.default_rng(8).standard_normal([3, 7, M]).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "sigmoid.keras")
      model.save(path)
      loaded = keras.saving.load_model(path)
    self.assertEqual(loaded.get_layer("moe").route_scale, 2.5)
    self.assertAllClose(loaded(x), model(x))


if __name__ == "__main__":
  tf.test.main()
