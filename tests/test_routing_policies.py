"""Tests of the routing policies: GShard's random second expert and the probability drop policy.

Routing against the NumPy reference (`numpy_reference.routing_with_policies`) with the same
uniform draws; the MoE layer's draws as a pure function of its seed; both dispatches and
gradients under the new policies.
"""

import itertools

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

from m6t_tf.layers import moe as moe_lib
from m6t_tf.layers import routers
from m6t_tf.layers import routing as routing_lib
from m6t_tf.parallel import context as context_lib

from tests import numpy_reference as ref

# Distinct small dimensions: inputs [B, L, M] = [2, 9, 7] (T = 18), intermediate I = 3.
B, L, M, I = 2, 9, 7, 3
T = B * L


def _logits(seed, num_tokens, num_experts, scale=2.0):
  return (np.random.default_rng(seed).standard_normal((num_tokens, num_experts)) * scale
          ).astype(np.float32)


def _uniform(seed, k, num_tokens):
  return np.random.default_rng(seed + 500).random((k - 1, num_tokens)).astype(np.float32)


def _mask(seed, num_tokens):
  mask = np.random.default_rng(seed + 1000).random(num_tokens) < 0.7
  mask[0] = True
  return mask


class _Asserts(tf.test.TestCase):

  def assertMatchesReference(self, got, want, want_used, valid):
    """Exact placements (slots where used), masks and counts; weights and losses to 1e-6."""
    used = got.used.numpy()
    self.assertAllEqual(used, want_used)
    self.assertAllEqual(got.kept.numpy(), want.kept)
    self.assertAllEqual(got.expert_index.numpy()[:, valid], want.expert_index[:, valid])
    self.assertAllEqual(np.where(used, got.slot.numpy(), -1), want.slot)
    self.assertAllEqual(got.dispatch_mask.numpy(), want.dispatch_mask)
    self.assertAllEqual(got.tokens_per_expert.numpy(), want.tokens_per_expert)
    self.assertAllClose(got.gate.numpy(), want.gate, atol=1e-6, rtol=0)
    self.assertAllClose(got.combine_weights.numpy(), want.combine_weights, atol=1e-6, rtol=0)
    self.assertAllClose(got.aux_loss.numpy(), want.aux_loss, atol=1e-5, rtol=1e-6)
    self.assertAllClose(got.z_loss.numpy(), want.z_loss, atol=1e-5, rtol=1e-6)
    self.assertAllClose(got.dropped_fraction.numpy(), want.dropped_fraction, atol=1e-6)

  def assertKeptSlotsUnique(self, r):
    kept = r.kept.numpy()
    pairs = list(zip(r.expert_index.numpy()[kept], r.slot.numpy()[kept]))
    self.assertLen(set(pairs), len(pairs))
    self.assertTrue(all(0 <= s < r.capacity for _, s in pairs))


class RandomSecondExpertTest(_Asserts, parameterized.TestCase):

  @parameterized.parameters(
      # (T, E, k, capacity factor): ample capacity and heavy dropping, k = 2 and k = 3.
      (16, 5, 2, 4.0), (16, 5, 2, 0.5), (33, 6, 3, 4.0), (33, 6, 3, 0.5), (7, 3, 3, 1.0),
      (64, 4, 2, 1.0))
  def test_matches_reference(self, t, e, k, gamma):
    cap = routing_lib.capacity(t, e, k=k, capacity_factor=gamma)
    for seed, (normalization, masked, drop_policy) in enumerate(itertools.product(
        ("auto", "none", "softmax_topk"), (False, True), ("position", "probability"))):
      # scale 1.0: second gates near and below half of the pair's weight, so both outcomes occur.
      logits = _logits(seed, t, e, scale=1.0)
      uniform = _uniform(seed, k, t)
      mask = _mask(seed, t) if masked else None
      valid = np.ones(t, bool) if mask is None else mask
      got = routing_lib.top_k_routing(
          logits, k=k, capacity=cap, normalization=normalization, token_mask=mask,
          second_expert_policy="random", drop_policy=drop_policy, uniform=uniform)
      want, want_used = ref.routing_with_policies(
          logits, routing="top_k", k=k, capacity=cap, normalization=normalization,
          token_mask=mask, second_expert_policy="random", drop_policy=drop_policy,
          uniform=uniform)
      with self.subTest(seed=seed, normalization=normalization, masked=masked,
                        drop_policy=drop_policy):
        self.assertMatchesReference(got, want, want_used, valid)
        self.assertKeptSlotsUnique(got)

  def test_both_outcomes_occur(self):
    # The reference comparison above is only meaningful if some later choices are skipped and
    # some used.
    logits, uniform = _logits(0, 64, 4, scale=1.0), _uniform(0, 2, 64)
    used = routing_lib.top_k_routing(logits, k=2, capacity=64, second_expert_policy="random",
                                     uniform=uniform).used.numpy()
    self.assertTrue(used[0].all())
    self.assertBetween(used[1].mean(), 0.2, 0.95)

  def test_gshard_rule_by_hand(self):
    # p = softmax([log 6, log 3, log 1]) = [0.6, 0.3, 0.1]; k = 2: 2·g2/(g1+g2) = 2·0.3/0.9 = 2/3.
    logits = np.log(np.array([[6.0, 3.0, 1.0]] * 4, np.float32))
    uniform = np.array([[0.0, 0.6, 0.7, 0.99]], np.float32)
    r = routing_lib.top_k_routing(logits, k=2, capacity=4, second_expert_policy="random",
                                  uniform=uniform)
    self.assertAllEqual(r.used, [[True] * 4, [True, True, False, False]])
    # Skipped second choices: gate 0, no slot, not counted as drops; the first gate stays
    # renormalised over both (GShard normalises before skipping).
    self.assertAllClose(r.gate, [[2 / 3] * 4, [1 / 3, 1 / 3, 0.0, 0.0]], atol=1e-6)
    self.assertAllEqual(r.tokens_per_expert, [4, 2, 0])
    self.assertAllClose(r.dropped_fraction, 0.0)
    # k = 3: threshold 1/3 of the top-3 weight: the second (0.3) is used if u < 0.9, the
    # third (0.1) if u < 0.3, each by its own draw.
    uniform = np.array([[0.85, 0.95, 0.1, 0.5], [0.25, 0.35, 0.29, 0.0]], np.float32)
    r = routing_lib.top_k_routing(logits, k=3, capacity=4, second_expert_policy="random",
                                  uniform=uniform)
    self.assertAllEqual(r.used, [[True] * 4, [True, False, True, True],
                                 [True, False, True, True]])

  def test_skipped_choice_frees_its_slot(self):
    # C = 1 in expert 1. Token 0's second choice (expert 1) would take it under "all"; skipped,
    # token 1's second choice (expert 1 too) gets slot 0.
    logits = np.log(np.array([[6.0, 3.0, 1.0], [6.0, 3.0, 1.0]], np.float32))
    uniform = np.array([[0.9, 0.1]], np.float32)
    r = routing_lib.top_k_routing(logits, k=2, capacity=2, second_expert_policy="random",
                                  uniform=uniform)
    self.assertAllEqual(r.kept, [[True, True], [False, True]])
    self.assertEqual(int(r.slot[1, 1]), 0)

  @parameterized.parameters("position", "probability")
  def test_all_equals_default_and_zero_draws_equal_all(self, drop_policy):
    logits = _logits(3, 16, 5)
    cap = 4
    default = routing_lib.top_k_routing(logits, k=2, capacity=cap)
    explicit = routing_lib.top_k_routing(logits, k=2, capacity=cap, second_expert_policy="all",
                                         drop_policy="position")
    for name in ("expert_index", "slot", "kept", "gate", "tokens_per_expert"):
      self.assertAllEqual(getattr(default, name), getattr(explicit, name))
    zero = routing_lib.top_k_routing(logits, k=2, capacity=cap, second_expert_policy="random",
                                     drop_policy=drop_policy, uniform=np.zeros([1, 16]))
    every = routing_lib.top_k_routing(logits, k=2, capacity=cap, drop_policy=drop_policy)
    for name in ("expert_index", "slot", "kept", "gate", "tokens_per_expert"):
      self.assertAllEqual(getattr(zero, name), getattr(every, name))

  def test_bad_arguments(self):
    logits = _logits(0, 5, 4)
    with self.assertRaisesRegex(ValueError, "uniform"):
      routing_lib.top_k_routing(logits, k=2, capacity=2, second_expert_policy="random")
    with self.assertRaisesRegex(ValueError, r"k-1=1, T=5"):
      routing_lib.top_k_routing(logits, k=2, capacity=2, second_expert_policy="random",
                                uniform=np.zeros([5]))
    with self.assertRaisesRegex(ValueError, "only used by"):
      routing_lib.top_k_routing(logits, k=2, capacity=2, uniform=np.zeros([1, 5]))
    with self.assertRaisesRegex(ValueError, "second_expert_policy='sampling'.*allowed"):
      routing_lib.top_k_routing(logits, k=2, capacity=2, second_expert_policy="sampling")
    with self.assertRaisesRegex(ValueError, "drop_policy='gate'.*allowed"):
      routing_lib.top_k_routing(logits, k=2, capacity=2, drop_policy="gate")
    with self.assertRaisesRegex(ValueError, "needs routing='top_k'"):
      routers.route(logits, routing="prototype", k=2, capacity=2,
                        second_expert_policy="random", uniform=np.zeros([1, 5]))
    # k = 1 has no second choice: "random" is the identity.
    r = routing_lib.top_k_routing(logits, k=1, capacity=2, second_expert_policy="random")
    self.assertAllEqual(r.used, np.ones([1, 5], bool))


class ProbabilityDropPolicyTest(_Asserts, parameterized.TestCase):

  @parameterized.parameters(
      # (routing, T, E, k, capacity): heavy dropping (C = 1, 2 with 16+ tokens) and ample.
      ("top_k", 16, 3, 1, 1), ("top_k", 16, 3, 1, 2), ("top_k", 24, 5, 2, 1),
      ("top_k", 24, 5, 2, 2), ("top_k", 17, 4, 3, 2), ("top_k", 16, 3, 2, 32),
      ("prototype", 16, 4, 2, 1), ("prototype", 20, 6, 3, 2), ("prototype", 16, 6, 2, 16))
  def test_matches_reference(self, routing, t, e, k, cap):
    for seed, (normalization, masked) in enumerate(itertools.product(
        ("auto", "none", "renormalize", "softmax_topk"), (False, True))):
      logits = _logits(seed, t, e)
      mask = _mask(seed, t) if masked else None
      valid = np.ones(t, bool) if mask is None else mask
      got = routers.route(logits, routing=routing, k=k, capacity=cap,
                              normalization=normalization, token_mask=mask,
                              drop_policy="probability")
      want, want_used = ref.routing_with_policies(
          logits, routing=routing, k=k, capacity=cap, normalization=normalization,
          token_mask=mask, drop_policy="probability")
      with self.subTest(seed=seed, normalization=normalization, masked=masked):
        self.assertMatchesReference(got, want, want_used, valid)
        self.assertKeptSlotsUnique(got)

  @parameterized.parameters(("top_k", 1), ("top_k", 2), ("top_k", 3), ("prototype", 2))
  def test_kept_are_exactly_the_top_c_gates_of_each_expert(self, routing, k):
    t, e, cap = 32, 6, 2
    logits = _logits(11, t, e)
    before = routers.route(logits, routing=routing, k=k, capacity=t)  # nothing dropped
    r = routers.route(logits, routing=routing, k=k, capacity=cap, drop_policy="probability")
    gate, index, kept = before.gate.numpy(), r.expert_index.numpy(), r.kept.numpy()
    self.assertGreater(int((~kept).sum()), t // 2)                        # heavy dropping
    for expert in range(e):
      members = index == expert
      want = np.sort(gate[members])[::-1][:cap]
      self.assertAllClose(np.sort(gate[members & kept])[::-1], want, atol=0, rtol=0)
      # The largest gate sits in slot 0.
      if members.any():
        best = np.unravel_index(np.argmax(np.where(members, gate, -1.0)), gate.shape)
        self.assertEqual(int(r.slot.numpy()[best]), 0)

  def test_second_choice_with_larger_gate_beats_a_first_choice(self):
    # Raw gates ("none"), C = 1. Token 0 picks expert 1 (0.40), then expert 0 (0.30); token 1
    # picks expert 0 (0.55), then expert 1 (0.45). "position" gives both slots to first choices;
    # "probability" gives expert 1 to token 1's second choice (0.45 > 0.40).
    logits = np.log(np.array([[0.30, 0.40, 0.30], [0.55, 0.45, 1e-6]], np.float32))
    pos = routing_lib.top_k_routing(logits, k=2, capacity=1, normalization="none")
    prob = routing_lib.top_k_routing(logits, k=2, capacity=1, normalization="none",
                                     drop_policy="probability")
    self.assertAllEqual(pos.expert_index, [[1, 0], [0, 1]])
    self.assertAllEqual(pos.kept, [[True, True], [False, False]])
    self.assertAllEqual(prob.kept, [[False, True], [False, True]])
    self.assertAllEqual(prob.tokens_per_expert, [1, 1, 0])
    self.assertAllClose(prob.dropped_fraction, 0.5)

  def test_ties_go_to_earlier_round_then_token(self):
    # All-zero logits: every gate equal, so "probability" keeps the "position" order exactly.
    pos = routing_lib.top_k_routing(tf.zeros([9, 3]), k=2, capacity=4)
    prob = routing_lib.top_k_routing(tf.zeros([9, 3]), k=2, capacity=4,
                                     drop_policy="probability")
    self.assertAllEqual(prob.slot, pos.slot)
    self.assertAllEqual(prob.kept, pos.kept)

  def test_inside_tf_function_xla_and_with_padding_all(self):
    logits = _logits(5, 12, 4)
    uniform = _uniform(5, 2, 12)
    eager = routing_lib.top_k_routing(logits, k=2, capacity=2, drop_policy="probability",
                                      second_expert_policy="random", uniform=uniform)
    for jit_compile in (False, True):
      fn = tf.function(lambda x, u: routing_lib.top_k_routing(
          x, k=2, capacity=2, drop_policy="probability", second_expert_policy="random",
          uniform=u).slot, jit_compile=jit_compile)
      got = fn(tf.constant(logits), tf.constant(uniform))
      self.assertAllEqual(np.where(eager.used, got, -1), np.where(eager.used, eager.slot, -1))
    r = routing_lib.top_k_routing(logits, k=2, capacity=2, drop_policy="probability",
                                  token_mask=np.zeros(12, bool))
    self.assertAllEqual(r.tokens_per_expert, [0] * 4)
    self.assertAllClose(r.dropped_fraction, 0.0)


def _make(**kwargs):
  kwargs.setdefault("router_init_std", 1.0)
  layer = moe_lib.MoE(6, I, routing="top_k", k=2, capacity_factor=0.75, **kwargs)
  layer.build((B, L, M))
  rng = np.random.default_rng(7)
  layer.router.kernel.assign(rng.standard_normal([M, 6]).astype(np.float32))
  for w in layer.experts.weights:
    w.assign(rng.standard_normal(w.shape).astype(np.float32) * 0.5)
  return layer


def _x(seed=0):
  return tf.constant(np.random.default_rng(seed).standard_normal((B, L, M)).astype(np.float32))


class MoELayerPolicyTest(parameterized.TestCase, tf.test.TestCase):

  def test_draws_are_a_pure_function_of_the_seed(self):
    layer, x = _make(second_expert_policy="random"), _x()
    y1 = layer(x, training=True, seed=tf.constant([3, 4]))
    y2 = layer(x, training=True, seed=tf.constant([3, 4]))
    self.assertAllEqual(y1, y2)
    # The layer's routing equals the routing function fed the documented draws.
    seed = tf.random.experimental.stateless_fold_in(tf.constant([3, 4], tf.int64),
                                                    moe_lib._SECOND_EXPERT_SEED_SALT)
    uniform = tf.random.stateless_uniform([1, T], seed=seed)
    logits = layer.router(tf.reshape(x, [T, M]))
    cap = layer.capacity_for(T, True)
    r = routing_lib.top_k_routing(logits, k=2, capacity=cap, second_expert_policy="random",
                                  uniform=uniform)
    used1 = r.used.numpy()
    self.assertAllEqual(layer.stats["tokens_per_expert"], r.tokens_per_expert)
    # Another seed skips another set of second choices.
    uniform2 = tf.random.stateless_uniform([1, T], seed=tf.random.experimental.stateless_fold_in(
        tf.constant([3, 5], tf.int64), moe_lib._SECOND_EXPERT_SEED_SALT))
    r2 = routing_lib.top_k_routing(logits, k=2, capacity=cap, second_expert_policy="random",
                                   uniform=uniform2)
    self.assertNotAllEqual(used1, r2.used.numpy())
    y3 = layer(x, training=True, seed=tf.constant([3, 5]))
    self.assertNotAllClose(y1, y3)
    self.assertTrue(0 < used1[1].sum() < T)

  def test_no_seed_uses_the_layer_seed_generator(self):
    keras.utils.set_random_seed(1)
    a = _make(second_expert_policy="random")
    keras.utils.set_random_seed(1)
    b = _make(second_expert_policy="random")
    # An RNG state, which the trainer reseeds every step (as dropout's) and never stores.
    states = [v for v in a.variables if context_lib.is_rng_state(v)]
    self.assertEqual([v.path for v in states],
                     ["second_expert_seed_generator/seed_generator_state"])
    x = _x()
    ya, yb = a(x, training=True), b(x, training=True)
    self.assertAllEqual(ya, yb)                     # same generator state, same draws
    outs = [a(x, training=True).numpy() for _ in range(4)]
    self.assertTrue(any(not np.array_equal(outs[0], o) for o in outs[1:]))  # it advances
    # Restoring the generator's state restores the draws.
    state = a._seed_generator.state.numpy()
    y = a(x, training=True)
    a._seed_generator.state.assign(state)
    self.assertAllEqual(a(x, training=True), y)

  def test_all_equals_today_and_eval_uses_every_choice(self):
    x = _x()
    today = _make()(x, training=True)
    self.assertAllEqual(_make(second_expert_policy="all", drop_policy="position")(
        x, training=True), today)
    random_layer = _make(second_expert_policy="random")
    self.assertAllEqual(random_layer(x, training=False, seed=tf.constant([1, 2])),
                        _make()(x, training=False))
    self.assertAllEqual(random_layer(x, seed=tf.constant([1, 2])), _make()(x))

  @parameterized.parameters(("random", "position"), ("all", "probability"),
                            ("random", "probability"))
  def test_einsum_equals_index_with_gradients(self, second, drop):
    x = _x(2)
    outs = []
    for dispatch in ("einsum", "index"):
      layer = _make(second_expert_policy=second, drop_policy=drop, dispatch=dispatch)
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, seed=tf.constant([5, 6]))
        loss = tf.reduce_sum(y * tf.random.stateless_normal(y.shape, [0, 9]))
      grads = tape.gradient(loss, [x, layer.router.kernel] + layer.experts.trainable_variables)
      for g in grads:
        self.assertIsNotNone(g)
        self.assertTrue(np.isfinite(tf.convert_to_tensor(g).numpy()).all())
      self.assertGreater(float(tf.reduce_max(tf.abs(grads[1]))), 0.0)
      self.assertGreater(float(layer.stats["dropped_fraction"]), 0.0)
      outs.append((y, grads))
    (ye, ge), (yi, gi) = outs
    self.assertAllClose(ye, yi, atol=1e-5, rtol=1e-5)
    for a, b in zip(ge, gi):
      self.assertAllClose(tf.convert_to_tensor(a), tf.convert_to_tensor(b), atol=1e-4,
                          rtol=1e-4)

  def test_prototype_probability_drop_policy(self):
    layer = moe_lib.MoE(6, I, routing="prototype", k=2, capacity_factor=0.5,
                        drop_policy="probability")
    x = _x()
    layer(x, training=True)
    logits = layer.router(tf.reshape(x, [T, M]))
    r = routers.route(logits, routing="prototype", k=2, capacity=layer.capacity_for(T, True),
                          drop_policy="probability")
    self.assertAllEqual(layer.stats["tokens_per_expert"], r.tokens_per_expert)

  def test_get_config_and_validation(self):
    layer = moe_lib.MoE(6, I, k=2, second_expert_policy="random", drop_policy="probability")
    config = layer.get_config()
    self.assertEqual(config["second_expert_policy"], "random")
    self.assertEqual(config["drop_policy"], "probability")
    clone = moe_lib.MoE.from_config(config)
    self.assertEqual((clone.second_expert_policy, clone.drop_policy), ("random", "probability"))
    with self.assertRaisesRegex(ValueError, r"second_expert_policy='top2'.*\('all', 'random'\)"):
      moe_lib.MoE(6, I, k=2, second_expert_policy="top2")
    with self.assertRaisesRegex(ValueError, r"drop_policy='probs'.*'position', 'probability'"):
      moe_lib.MoE(6, I, k=2, drop_policy="probs")
    with self.assertRaisesRegex(ValueError, "needs routing='top_k'"):
      moe_lib.MoE(6, I, routing="prototype", k=2, second_expert_policy="random")
    # Default layers own no seed generator: their weights are unchanged.
    self.assertIsNone(moe_lib.MoE(6, I, k=2)._seed_generator)


if __name__ == "__main__":
  tf.test.main()
