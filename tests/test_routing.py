"""Tests of m6t_tf.layers.routing against the NumPy reference, hand-made cases and invariants."""

import itertools

from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.layers import routers
from m6t_tf.layers import routing as routing_lib

from tests import numpy_reference as ref

NORMALIZATIONS = ("auto", "none", "renormalize", "softmax_topk")


def _random_logits(seed, num_tokens, num_experts, scale=2.0):
  # Distinct float32 logits; near-ties (closer than float32 softmax resolves) are vanishingly rare.
  return (np.random.default_rng(seed).standard_normal((num_tokens, num_experts)) * scale
          ).astype(np.float32)


def _wide_gap_logits(seed, num_tokens, num_experts, gap=200.0):
  """Every token's logits are a random permutation of gap·[0, 1, …, E-1] (float32).

  With gap = 200 every probability but the top one underflows to exactly 0.0 in float32
  (exp(-200) < 1e-45), so only the logits still rank the later choices.
  """
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(num_experts) for _ in range(num_tokens)]).astype(
      np.float32) * np.float32(gap)


def _random_mask(seed, num_tokens):
  mask = np.random.default_rng(seed + 1000).random(num_tokens) < 0.7
  mask[0] = True
  return mask


class CapacityTest(parameterized.TestCase):

  @parameterized.parameters(
      # (T, E, k, γ, mode, expected)
      (8, 4, 1, 1.25, "k", 3),       # ceil(2.5)
      (32, 8, 1, 1.25, "k", 5),      # exactly 5: no spurious round-up
      (8, 2, 2, 1.25, "k", 10),      # 2·8/2·1.25 = 10 (1.25·8 is 10.000000000000002 in floats)
      (8, 2, 2, 1.25, "1", 5),       # Capacity 1×: k' = 1 whatever the routing
      (64, 32, 4, 1.25, "k", 10),
      (64, 32, 4, 1.25, "1", 3),
      (10, 7, 1, 1.1, "k", 2),       # ceil(1.571)
      (70, 7, 1, 1.1, "k", 11),      # 10·1.1 = 11.000000000000002 in floats
      (6, 5, 2, 2.0, "k", 5),
      (3, 7, 1, 0.5, "k", 1),        # min_capacity
  )
  def test_values(self, t, e, k, gamma, mode, expected):
    self.assertEqual(routing_lib.capacity(t, e, k=k, capacity_factor=gamma, mode=mode), expected)
    self.assertEqual(ref.capacity(t, e, k=k, capacity_factor=gamma, mode=mode), expected)

  def test_matches_exact_rational_reference_on_grid(self):
    for t, e, k, gamma, mode in itertools.product(
        (1, 2, 3, 5, 7, 8, 16, 24, 64, 100, 1024, 8192), (1, 2, 3, 5, 7, 8, 32, 960),
        (1, 2, 4), (0.5, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0), ("k", "1")):
      self.assertEqual(
          routing_lib.capacity(t, e, k=k, capacity_factor=gamma, mode=mode),
          ref.capacity(t, e, k=k, capacity_factor=gamma, mode=mode), (t, e, k, gamma, mode))

  def test_min_capacity(self):
    self.assertEqual(routing_lib.capacity(2, 7, capacity_factor=1.0, min_capacity=4), 4)
    self.assertEqual(routing_lib.capacity(70, 7, capacity_factor=1.0, min_capacity=4), 10)

  @parameterized.parameters(
      dict(num_tokens=0, num_experts=2), dict(num_tokens=4, num_experts=0),
      dict(num_tokens=4, num_experts=2, capacity_factor=0.0),
      dict(num_tokens=4, num_experts=2, capacity_factor=-1.0),
      dict(num_tokens=4, num_experts=2, mode="2"))
  def test_bad_arguments(self, **kwargs):
    with self.assertRaises(ValueError):
      routing_lib.capacity(**kwargs)


class RuntimeCapacityTest(tf.test.TestCase):
  """`capacity_tensor`: the capacity of a token count known only at run time."""

  def test_equals_static_capacity_for_every_token_count(self):
    # Every T up to 2000 and a few large ones, for factors whose products round in floats
    # (1.1, 1.25), so a difference in rounding order shows. The ops are element-wise: one
    # call takes every T at once.
    t = np.concatenate([np.arange(1, 2001), [4096, 8192, 8193, 65536]]).astype(np.int32)
    traced = tf.function(routing_lib.capacity_tensor)
    for e, k, gamma, mode, floor in itertools.product(
        (1, 3, 7, 32, 960), (1, 2, 4), (0.5, 1.1, 1.25, 2.0), ("k", "1"), (1, 4)):
      got = routing_lib.capacity_tensor(tf.constant(t), e, k=k, capacity_factor=gamma,
                                        mode=mode, min_capacity=floor).numpy()
      want = [routing_lib.capacity(int(v), e, k=k, capacity_factor=gamma, mode=mode,
                                   min_capacity=floor) for v in t]
      np.testing.assert_array_equal(got, want, err_msg=str((e, k, gamma, mode, floor)))
    # Traced (grappler may rewrite the graph) on the cases where floats round up spuriously.
    for t_, e, k, gamma in ((70, 7, 1, 1.1), (8, 2, 2, 1.25), (32, 8, 1, 1.25)):
      self.assertEqual(int(traced(tf.constant(t_), e, k=k, capacity_factor=gamma)),
                       routing_lib.capacity(t_, e, k=k, capacity_factor=gamma))

  def test_bad_arguments(self):
    for kwargs, needle in ((dict(num_experts=0), "num_experts=0"),
                           (dict(capacity_factor=0.0), "capacity_factor=0.0"),
                           (dict(mode="2"), "mode='2'")):
      with self.subTest(needle), self.assertRaisesRegex(ValueError, needle):
        routing_lib.capacity_tensor(tf.constant(8), **{"num_experts": 4, **kwargs})


@pytest.mark.slow
class RuntimeTokenCountTest(parameterized.TestCase, tf.test.TestCase):
  """Routing traced with T unknown (and C a tensor) equals the static routing."""

  @parameterized.named_parameters(
      ("top1", "top_k", 1, "position"), ("top2", "top_k", 2, "position"),
      ("top2_probability", "top_k", 2, "probability"), ("proto2", "prototype", 2, "position"),
      ("proto2_probability", "prototype", 2, "probability"))
  def test_equals_static(self, routing, k, drop_policy):
    e = 6
    fields = ("expert_index", "slot", "gate", "kept", "used", "tokens_per_expert", "aux_loss",
              "z_loss", "combine_weights", "dispatch_mask")

    @tf.function(input_signature=[tf.TensorSpec([None, e], tf.float32),
                                  tf.TensorSpec([None], tf.bool), tf.TensorSpec([], tf.int32)])
    def dynamic(logits, mask, c):
      r = routers.route(logits, routing=routing, k=k, capacity=c, token_mask=mask,
                            drop_policy=drop_policy)
      return {f: getattr(r, f) for f in fields}

    for t in (1, 7, 12):
      logits, mask = _random_logits(t, t, e), _random_mask(t, t)
      c = routing_lib.capacity(t, e, k=k, capacity_factor=0.75)
      static = routers.route(logits, routing=routing, k=k, capacity=c, token_mask=mask,
                                 drop_policy=drop_policy)
      got = dynamic(logits, mask, tf.constant(c))
      for f in fields:
        self.assertAllEqual(got[f], getattr(static, f), msg=f"{f} T={t}")

  def test_random_second_expert_at_run_time(self):
    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32),
                                  tf.TensorSpec([1, None], tf.float32)])
    def dynamic(logits, uniform):
      return routing_lib.top_k_routing(logits, k=2, capacity=tf.constant(3),
                                       second_expert_policy="random", uniform=uniform).used

    logits = _random_logits(3, 9, 5)
    uniform = np.random.default_rng(4).random((1, 9)).astype(np.float32)
    static = routing_lib.top_k_routing(logits, k=2, capacity=3, second_expert_policy="random",
                                       uniform=uniform).used
    self.assertAllEqual(dynamic(logits, uniform), static)


class _RoutingAsserts(tf.test.TestCase):

  def assertRoutingMatches(self, got, want, valid):
    """Exact placements, slots and masks; weights and losses to 1e-6."""
    self.assertEqual(got.capacity, want.capacity)
    kept = got.kept.numpy()
    self.assertAllEqual(kept, want.kept)
    self.assertAllEqual(got.expert_index.numpy()[:, valid], want.expert_index[:, valid])
    self.assertAllEqual(got.slot.numpy()[:, valid], want.slot[:, valid])
    self.assertAllEqual(got.dispatch_mask.numpy(), want.dispatch_mask)
    self.assertAllEqual(got.tokens_per_expert.numpy(), want.tokens_per_expert)
    self.assertAllEqual(got.valid.numpy(), valid)
    self.assertAllClose(got.gate.numpy(), want.gate, atol=1e-6, rtol=0)
    self.assertAllClose(got.combine_weights.numpy(), want.combine_weights, atol=1e-6, rtol=0)
    self.assertAllClose(got.probs.numpy(), want.probs, atol=1e-6, rtol=0)
    self.assertAllClose(got.aux_loss.numpy(), want.aux_loss, atol=1e-5, rtol=1e-6)
    self.assertAllClose(got.z_loss.numpy(), want.z_loss, atol=1e-5, rtol=1e-6)
    self.assertAllClose(got.dropped_fraction.numpy(), want.dropped_fraction, atol=1e-6)


def _shapes():
  """(T, E, k) over distinct small dims; capacity factors from heavy dropping to ample."""
  return [(7, 5, 1), (7, 5, 2), (3, 2, 2), (5, 7, 3), (64, 7, 2), (64, 5, 4), (30, 3, 1),
          (2, 3, 3)]


class TopKRoutingTest(_RoutingAsserts, parameterized.TestCase):

  @parameterized.parameters(*_shapes())
  def test_matches_reference(self, t, e, k):
    for seed, (gamma, normalization, masked) in enumerate(itertools.product(
        (0.25, 1.0, 2.0), NORMALIZATIONS, (False, True))):
      logits = _random_logits(seed, t, e)
      mask = _random_mask(seed, t) if masked else None
      cap = routing_lib.capacity(t, e, k=k, capacity_factor=gamma)
      got = routing_lib.top_k_routing(tf.constant(logits), k=k, capacity=cap,
                                      normalization=normalization, token_mask=mask)
      want = ref.top_k_routing(logits, k=k, capacity=cap, normalization=normalization,
                               token_mask=mask)
      valid = np.ones(t, bool) if mask is None else mask
      with self.subTest(seed=seed, gamma=gamma, normalization=normalization, masked=masked):
        self.assertRoutingMatches(got, want, valid)

  @parameterized.parameters(1, 2)
  def test_heavy_dropping_capacity_one(self, k):
    logits = _random_logits(3, 64, 3)
    got = routing_lib.top_k_routing(tf.constant(logits), k=k, capacity=1)
    want = ref.top_k_routing(logits, k=k, capacity=1)
    self.assertRoutingMatches(got, want, np.ones(64, bool))
    self.assertLessEqual(int(got.kept.numpy().sum()), 3)

  def test_first_choices_have_priority_over_second_choices(self):
    # Token 0: 1st expert 0, 2nd expert 1. Token 1: 1st expert 1. C = 1.
    # Token 1's first choice takes expert 1's only slot although token 0 comes first.
    logits = tf.constant([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    r = routing_lib.top_k_routing(logits, k=2, capacity=1)
    self.assertAllEqual(r.expert_index, [[0, 1], [1, 2]])
    self.assertAllEqual(r.kept, [[True, True], [False, True]])
    self.assertAllEqual(r.slot, [[0, 0], [1, 0]])
    self.assertAllEqual(r.tokens_per_expert, [1, 1, 1])

  def test_slots_continue_after_earlier_rounds(self):
    # All tokens pick expert 0 then expert 1, except token 2 which picks 1 then 0.
    logits = tf.constant([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [1.0, 0.5, 0.0]])
    r = routing_lib.top_k_routing(logits, k=2, capacity=4)
    self.assertAllEqual(r.expert_index, [[0, 0, 1, 0], [1, 1, 0, 1]])
    # Round 2 in expert 1 starts after token 2 (slot 0); in expert 0 after tokens 0, 1, 3.
    self.assertAllEqual(r.slot, [[0, 1, 0, 2], [1, 2, 3, 3]])
    self.assertAllEqual(r.kept, [[True] * 4, [True] * 4])

  def test_ties_pick_lowest_index(self):
    # Equal logits: argmax (TF and NumPy) takes the lowest index, so every token's r-th choice
    # is expert r, and expert 0 fills up first. Documented in tests/numpy_reference.py.
    r = routing_lib.top_k_routing(tf.zeros([5, 3]), k=2, capacity=3)
    self.assertAllEqual(r.expert_index, [[0] * 5, [1] * 5])
    self.assertAllEqual(r.slot, [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])
    self.assertAllEqual(r.kept, [[True] * 3 + [False] * 2] * 2)
    self.assertAllEqual(r.tokens_per_expert, [3, 3, 0])
    self.assertAllClose(r.gate, [[0.5] * 3 + [0.0] * 2] * 2)   # renormalised 1/3 + 1/3

  def test_choices_follow_logits_where_probabilities_underflow(self):
    t, e, k = 6, 5, 3
    logits = _wide_gap_logits(0, t, e)
    probs = tf.nn.softmax(logits).numpy()
    self.assertEqual(int((probs == 0.0).sum()), t * (e - 1))   # the case of the test holds
    for normalization in NORMALIZATIONS:
      r = routing_lib.top_k_routing(logits, k=k, capacity=t, normalization=normalization)
      # r-th choice = r-th largest logit, not the lowest index among the zero probabilities.
      self.assertAllEqual(r.expert_index, np.argsort(-logits, axis=-1)[:, :k].T, normalization)
      want = ref.top_k_routing(logits, k=k, capacity=t, normalization=normalization)
      self.assertRoutingMatches(r, want, np.ones(t, bool))
    # Gates still come from the probabilities: the later choices weigh (exactly) nothing.
    r = routing_lib.top_k_routing(logits, k=k, capacity=t, normalization="none")
    self.assertAllEqual(r.gate, [[1.0] * t, [0.0] * t, [0.0] * t])

  def test_choices_follow_logits_closer_than_probabilities_resolve(self):
    # Logits one float32 ulp apart whose softmax rounds to two equal probabilities: the larger
    # logit (expert 1) is the first choice, not the lower index.
    a = np.float32(0.48302874)
    logits = np.array([[a, np.nextafter(a, np.float32(1.0)), -4.0236588]], np.float32)
    probs = tf.nn.softmax(logits).numpy()
    self.assertEqual(probs[0, 0], probs[0, 1])
    r = routing_lib.top_k_routing(logits, k=2, capacity=1)
    self.assertAllEqual(r.expert_index, [[1], [0]])

  def test_minus_infinity_logits_keep_choices_distinct(self):
    logits = np.array([[0.0, -np.inf, 1.0, -np.inf]], np.float32)
    r = routing_lib.top_k_routing(logits, k=4, capacity=1)
    self.assertAllEqual(r.expert_index, [[2], [0], [1], [3]])
    self.assertAllEqual(r.gate.numpy()[2:], [[0.0], [0.0]])

  def test_padding_takes_no_capacity(self):
    logits = tf.zeros([4, 2])  # every real token wants expert 0
    r = routing_lib.top_k_routing(logits, k=1, capacity=2,
                                  token_mask=tf.constant([False, True, False, True]))
    self.assertAllEqual(r.kept, [[False, True, False, True]])
    self.assertAllEqual(r.slot.numpy()[0, [1, 3]], [0, 1])
    self.assertAllEqual(r.tokens_per_expert, [2, 0])
    self.assertAllEqual(r.gate, [[0.0, 0.5, 0.0, 0.5]])
    self.assertAllClose(r.dropped_fraction, 0.0)

  def test_padding_tokens_still_get_distinct_choices(self):
    # Routing.expert_index lists K *distinct* experts for every token, padding included.
    r = routing_lib.top_k_routing(tf.zeros([3, 4]), k=3, capacity=2,
                                  token_mask=tf.constant([True, False, True]))
    self.assertAllEqual(r.expert_index, [[0, 0, 0], [1, 1, 1], [2, 2, 2]])

  def test_all_padding(self):
    r = routing_lib.top_k_routing(tf.constant(_random_logits(0, 4, 3)), k=2, capacity=2,
                                  token_mask=tf.zeros([4], tf.bool))
    self.assertFalse(r.kept.numpy().any())
    self.assertAllEqual(r.combine_weights, np.zeros([4, 3, 2]))
    self.assertAllEqual(r.tokens_per_expert, [0, 0, 0])
    for value in (r.aux_loss, r.z_loss, r.dropped_fraction):
      self.assertAllEqual(value, 0.0)

  def test_normalizations(self):
    logits = np.array([[1.0, 0.0, -1.0, 2.0]], np.float32)
    p = ref.softmax(logits)[0]
    top = [3, 0]
    cases = {"none": p[top], "auto": p[top] / p[top].sum(),
             "renormalize": p[top] / p[top].sum(), "softmax_topk": ref.softmax(logits[0, top])}
    logits = tf.constant(logits)
    for normalization, expected in cases.items():
      r = routing_lib.top_k_routing(logits, k=2, capacity=1, normalization=normalization)
      self.assertAllClose(r.gate.numpy()[:, 0], expected, atol=1e-6, msg=normalization)
    r = routing_lib.top_k_routing(logits, k=1, capacity=1)   # "auto", k = 1: raw probability
    self.assertAllClose(r.gate.numpy()[:, 0], [p[3]], atol=1e-6)

  def test_aux_loss_is_one_when_perfectly_uniform(self):
    # Token t prefers expert t mod E, but with a uniform softmax P_i = 1/E... use a permutation
    # of equal-magnitude logits so f_i = 1/E and P_i = 1/E exactly.
    e = 4
    logits = np.tile(np.eye(e, dtype=np.float32) * 3.0, (2, 1))  # [8, 4], f = P = 1/4
    r = routing_lib.top_k_routing(tf.constant(logits), k=1, capacity=8)
    self.assertAllClose(r.aux_loss, 1.0, atol=1e-6)
    self.assertAllClose(r.aux_loss, ref.top_k_routing(logits, k=1, capacity=8).aux_loss)
    # Everything on one expert with a confident router: loss approaches E.
    r = routing_lib.top_k_routing(tf.constant(np.tile([[20.0, 0, 0, 0]], (8, 1)), tf.float32), k=1,
                                  capacity=8)
    self.assertAllClose(r.aux_loss, float(e), atol=1e-6)

  def test_z_loss_value(self):
    logits = tf.constant([[0.0, 0.0], [np.log(3.0), 0.0]], tf.float32)
    r = routing_lib.top_k_routing(logits, k=1, capacity=2)
    # logsumexp: log 2 and log 4.
    self.assertAllClose(r.z_loss, (np.log(2.0) ** 2 + np.log(4.0) ** 2) / 2, atol=1e-6)

  def test_gradient_reaches_logits_through_gates(self):
    logits = tf.constant(_random_logits(1, 7, 5))
    for normalization in ("none", "softmax_topk", "renormalize"):
      with tf.GradientTape() as tape:
        tape.watch(logits)
        r = routing_lib.top_k_routing(logits, k=2, capacity=3, normalization=normalization)
        loss = tf.reduce_sum(r.combine_weights * tf.random.stateless_normal(
            r.combine_weights.shape, [1, 2]))
      grad = tape.gradient(loss, logits)
      self.assertGreater(float(tf.reduce_max(tf.abs(grad))), 0.0, normalization)

  def test_routes_inside_tf_function(self):
    logits = _random_logits(4, 7, 5)
    fn = tf.function(lambda x: routing_lib.top_k_routing(x, k=2, capacity=2).combine_weights,
                     jit_compile=True)
    self.assertAllClose(fn(tf.constant(logits)),
                        ref.top_k_routing(logits, k=2, capacity=2).combine_weights, atol=1e-6)

  @parameterized.parameters(
      dict(k=0), dict(k=4), dict(capacity=0), dict(normalization="softmax"),
      dict(token_mask=[True, False]))
  def test_bad_arguments(self, **kwargs):
    args = dict(k=1, capacity=2)
    args.update(kwargs)
    with self.assertRaises(ValueError):
      routing_lib.top_k_routing(tf.zeros([5, 3]), **args)

  def test_bad_logits_shapes(self):
    with self.assertRaisesRegex(ValueError, r"\[T, E\]"):
      routing_lib.top_k_routing(tf.zeros([2, 5, 3]), k=1, capacity=2)

    @tf.function(input_signature=[tf.TensorSpec([4, None], tf.float32)])
    def unknown_experts(x):
      return routing_lib.top_k_routing(x, k=1, capacity=2).gate

    with self.assertRaisesRegex(ValueError, "static number of experts E"):
      unknown_experts.get_concrete_function()


class PrototypeRoutingTest(_RoutingAsserts, parameterized.TestCase):

  @parameterized.parameters(
      (7, 6, 2), (7, 6, 3), (5, 4, 4), (64, 4, 2), (64, 8, 4), (3, 2, 2), (30, 5, 1))
  def test_matches_reference(self, t, e, z):
    for seed, (gamma, mode, normalization, masked) in enumerate(itertools.product(
        (0.25, 1.0, 2.0), ("k", "1"), NORMALIZATIONS, (False, True))):
      logits = _random_logits(seed, t, e)
      mask = _random_mask(seed, t) if masked else None
      cap = routing_lib.capacity(t, e, k=z, capacity_factor=gamma, mode=mode)
      got = routing_lib.prototype_routing(tf.constant(logits), num_prototypes=z, capacity=cap,
                                          normalization=normalization, token_mask=mask)
      want = ref.prototype_routing(logits, num_prototypes=z, capacity=cap,
                                   normalization=normalization, token_mask=mask)
      valid = np.ones(t, bool) if mask is None else mask
      with self.subTest(seed=seed, gamma=gamma, mode=mode, normalization=normalization,
                        masked=masked):
        self.assertRoutingMatches(got, want, valid)

  def test_one_prototype_is_top_1(self):
    logits = tf.constant(_random_logits(5, 7, 5))
    a = routing_lib.prototype_routing(logits, num_prototypes=1, capacity=2)
    b = routing_lib.top_k_routing(logits, k=1, capacity=2)
    for field in ("combine_weights", "dispatch_mask", "expert_index", "slot", "kept", "gate",
                  "tokens_per_expert", "aux_loss", "z_loss"):
      self.assertAllClose(getattr(a, field), getattr(b, field), atol=1e-7, msg=field)

  def test_hand_computed(self):
    # E = 4, Z = 2 (F = 2): prototype 0 = experts {0, 1}, prototype 1 = experts {2, 3}.
    logits = np.array([[1.0, 0.0, 0.0, 2.0],
                       [0.0, 3.0, 1.0, 0.0],
                       [2.0, 0.0, 0.0, 1.0]], np.float32)
    r = routing_lib.prototype_routing(tf.constant(logits), num_prototypes=2, capacity=1)
    self.assertAllEqual(r.expert_index, [[0, 1, 0], [3, 2, 3]])
    self.assertAllEqual(r.slot, [[0, 0, 1], [0, 0, 1]])
    self.assertAllEqual(r.kept, [[True, True, False], [True, True, False]])
    s = lambda d: 1.0 / (1.0 + np.exp(-d))   # two-way softmax = sigmoid of the difference
    self.assertAllClose(r.gate, [[s(1.0), s(3.0), 0.0], [s(2.0), s(1.0), 0.0]], atol=1e-6)
    self.assertAllEqual(r.tokens_per_expert, [1, 1, 1, 1])
    self.assertAllClose(r.dropped_fraction, 2.0 / 6.0)

  def test_choices_follow_logits_where_probabilities_underflow(self):
    t, z, f = 6, 3, 4
    # Each prototype's F logits are a permutation of 200·[0..F-1], shifted per prototype.
    logits = _wide_gap_logits(1, t * z, f).reshape(t, z, f) + (
        np.float32(-1000.0) * np.arange(z, dtype=np.float32))[None, :, None]
    logits = logits.reshape(t, z * f)
    for normalization in NORMALIZATIONS:
      r = routing_lib.prototype_routing(logits, num_prototypes=z, capacity=t,
                                        normalization=normalization)
      want_index = np.argmax(logits.reshape(t, z, f), axis=-1).T + np.arange(z)[:, None] * f
      self.assertAllEqual(r.expert_index, want_index, normalization)
      want = ref.prototype_routing(logits, num_prototypes=z, capacity=t,
                                   normalization=normalization)
      self.assertRoutingMatches(r, want, np.ones(t, bool))

  def test_choices_follow_logits_closer_than_probabilities_resolve(self):
    # Prototype 1 holds two logits one float32 ulp apart whose softmax rounds to equal
    # probabilities: its top-1 is the larger logit (expert 4), not the lower index (3).
    a = np.float32(0.48302874)
    logits = np.array([[1.0, 0.0, -1.0, a, np.nextafter(a, np.float32(1.0)), -4.0236588]],
                      np.float32)
    probs = tf.nn.softmax(logits[:, 3:]).numpy()
    self.assertEqual(probs[0, 0], probs[0, 1])
    r = routing_lib.prototype_routing(logits, num_prototypes=2, capacity=1)
    self.assertAllEqual(r.expert_index, [[0], [4]])

  def test_ties_pick_first_expert_of_each_prototype(self):
    r = routing_lib.prototype_routing(tf.zeros([2, 6]), num_prototypes=3, capacity=2)
    self.assertAllEqual(r.expert_index, [[0, 0], [2, 2], [4, 4]])

  @parameterized.parameters(
      dict(num_prototypes=4), dict(num_prototypes=0), dict(num_prototypes=7),
      dict(capacity=0), dict(normalization="bogus"))
  def test_bad_arguments(self, **kwargs):
    args = dict(num_prototypes=2, capacity=2)
    args.update(kwargs)
    with self.assertRaises(ValueError):
      routing_lib.prototype_routing(tf.zeros([5, 6]), **args)

  def test_route_dispatches_and_rejects_unknown(self):
    logits = tf.constant(_random_logits(0, 5, 4))
    a = routers.route(logits, routing="prototype", k=2, capacity=2)
    b = routing_lib.prototype_routing(logits, num_prototypes=2, capacity=2)
    self.assertAllEqual(a.expert_index, b.expert_index)
    a = routers.route(logits, routing="top_k", k=2, capacity=2)
    b = routing_lib.top_k_routing(logits, k=2, capacity=2)
    self.assertAllEqual(a.expert_index, b.expert_index)
    with self.assertRaisesRegex(ValueError, "routing"):
      routers.route(logits, routing="hash", k=1, capacity=2)


class GateGradientTest(parameterized.TestCase, tf.test.TestCase):
  """d combine_weights / d logits against central differences of the float64 reference."""

  @parameterized.parameters(
      ("top_k", 1, "none"), ("top_k", 2, "renormalize"), ("top_k", 2, "softmax_topk"),
      ("top_k", 3, "none"), ("prototype", 2, "none"), ("prototype", 2, "renormalize"),
      ("prototype", 3, "softmax_topk"))
  def test_matches_finite_differences(self, routing, k, normalization):
    t, e, cap = 5, 6, 2   # C = 2 drops some choices: their gates must carry no gradient
    logits = _random_logits(7, t, e)
    probe = np.random.default_rng(8).standard_normal((t, e, cap))
    x = tf.constant(logits)
    with tf.GradientTape() as tape:
      tape.watch(x)
      r = routers.route(x, routing=routing, k=k, capacity=cap, normalization=normalization)
      loss = tf.reduce_sum(r.combine_weights * tf.constant(probe, tf.float32))
    grad = tape.gradient(loss, x).numpy()

    def f(v):
      return (ref.route(v, routing=routing, k=k, capacity=cap,
                        normalization=normalization).combine_weights * probe).sum()

    numeric = np.zeros_like(grad, np.float64)
    eps = 1e-5
    base = logits.astype(np.float64)
    for i, j in itertools.product(range(t), range(e)):
      up, down = base.copy(), base.copy()
      up[i, j] += eps
      down[i, j] -= eps
      numeric[i, j] = (f(up) - f(down)) / (2 * eps)
    self.assertAllClose(grad, numeric, atol=1e-5, rtol=1e-4)
    self.assertGreater(np.abs(numeric).max(), 1e-3)


class ArrayInputTest(parameterized.TestCase, tf.test.TestCase):
  """Routing takes NumPy arrays and nested lists as TensorFlow ops do."""

  @parameterized.parameters(("top_k", 2), ("prototype", 2), ("top_k", 1))
  def test_numpy_and_lists_match_tensors(self, routing, k):
    logits = _random_logits(9, 5, 4)
    want = routers.route(tf.constant(logits), routing=routing, k=k, capacity=2)
    mask = [True, False, True, True, True]
    want_masked = routers.route(tf.constant(logits), routing=routing, k=k, capacity=2,
                                    token_mask=tf.constant(mask))
    for name, value in (("float32 array", logits), ("float64 array", logits.astype(np.float64)),
                        ("list", logits.tolist())):
      got = routers.route(value, routing=routing, k=k, capacity=2)
      for field in ("expert_index", "slot", "kept", "gate", "aux_loss", "z_loss"):
        self.assertAllClose(getattr(got, field), getattr(want, field), atol=1e-7,
                            msg=f"{name}: {field}")
      got = routers.route(value, routing=routing, k=k, capacity=2, token_mask=mask)
      self.assertAllClose(got.combine_weights, want_masked.combine_weights, atol=1e-7, msg=name)
    got = routing_lib.top_k_routing(np.array([[0, 3, 1]]), k=2, capacity=1)   # integer logits
    self.assertAllEqual(got.expert_index, [[1], [2]])

  def test_direct_functions_take_arrays(self):
    logits = _random_logits(10, 7, 6)
    a = routing_lib.top_k_routing(logits, k=2, capacity=3)
    b = routing_lib.prototype_routing(logits.tolist(), num_prototypes=3, capacity=3)
    self.assertAllEqual(a.expert_index, ref.top_k_routing(logits, k=2, capacity=3).expert_index)
    self.assertAllEqual(b.expert_index, ref.prototype_routing(
        logits, num_prototypes=3, capacity=3).expert_index)

  def test_bad_inputs_name_the_problem(self):
    with self.assertRaisesRegex(TypeError, "router logits must be numbers.*string"):
      routing_lib.top_k_routing([["a", "b"]], k=1, capacity=1)
    with self.assertRaisesRegex(TypeError, "router logits must be a \\[T, E\\].*list"):
      routing_lib.top_k_routing([[1.0, 2.0], [3.0]], k=1, capacity=1)
    with self.assertRaisesRegex(ValueError, r"\[T, E\], got shape \(3,\)"):
      routing_lib.prototype_routing(np.zeros(3), num_prototypes=1, capacity=1)


class CoefficientOfVariationTest(tf.test.TestCase):

  def test_population_std_over_mean(self):
    tpe = np.array([4, 0, 2, 2])
    self.assertAllClose(routing_lib.coefficient_of_variation(tpe), np.std(tpe) / np.mean(tpe))
    self.assertAllClose(routing_lib.coefficient_of_variation(tpe),
                        ref.coefficient_of_variation(tpe))
    self.assertAllEqual(routing_lib.coefficient_of_variation([3, 3, 3]), 0.0)
    self.assertAllEqual(routing_lib.coefficient_of_variation([0, 0]), 0.0)


@st.composite
def routing_problems(draw):
  routing = draw(st.sampled_from(("top_k", "prototype")))
  e = draw(st.sampled_from((2, 3, 4, 5, 6, 7, 8)))
  if routing == "top_k":
    k = draw(st.integers(1, min(e, 4)))
  else:
    k = draw(st.sampled_from([z for z in (1, 2, 3, 4) if e % z == 0]))
  t = draw(st.integers(1, 40))
  cap = draw(st.integers(1, max(1, 2 * t * k // e)))
  normalization = draw(st.sampled_from(NORMALIZATIONS))
  seed = draw(st.integers(0, 2 ** 31 - 1))
  rng = np.random.default_rng(seed)
  # Coarse logits make exact ties common, exercising the lowest-index rule too.
  logits = rng.integers(-3, 4, size=(t, e)).astype(np.float32) * draw(
      st.sampled_from((0.5, 1.0, 3.0)))
  mask = rng.random(t) < draw(st.sampled_from((0.5, 1.0)))
  return routing, k, cap, normalization, logits, mask


class RoutingInvariantsTest(tf.test.TestCase):

  @hypothesis.settings(max_examples=50, deadline=None, derandomize=True, database=None)
  @hypothesis.given(routing_problems())
  def test_invariants(self, problem):
    routing, k, cap, normalization, logits, mask = problem
    r = routers.route(tf.constant(logits), routing=routing, k=k, capacity=cap,
                          normalization=normalization, token_mask=mask)
    t, e = logits.shape
    index, slot, kept = r.expert_index.numpy(), r.slot.numpy(), r.kept.numpy()
    dispatch, combine = r.dispatch_mask.numpy(), r.combine_weights.numpy()

    # Every token's K choices are distinct experts (for prototypes: one in each prototype).
    for tok in range(t):
      self.assertLen(set(index[:, tok]), index.shape[0])
    if routing == "prototype":
      self.assertAllEqual(index // (e // k), np.repeat(np.arange(k)[:, None], t, axis=1))
    # Padding takes nothing.
    self.assertFalse(kept[:, ~mask].any())
    self.assertFalse(dispatch[~mask].any())
    # No expert above capacity; kept slots unique and contiguous from 0 in every expert.
    for ex in range(e):
      slots = sorted(slot[kept & (index == ex)].tolist())
      self.assertEqual(slots, list(range(len(slots))))
      self.assertLessEqual(len(slots), cap)
      self.assertEqual(int(dispatch[:, ex, :].sum()), len(slots))
      self.assertLessEqual(int(dispatch[:, ex, :].sum(axis=0).max(initial=0)), 1)
    self.assertAllEqual(r.tokens_per_expert, dispatch.sum(axis=(0, 2)))
    # Dropped choices are exactly those beyond capacity in priority order: per expert, the
    # choices wanting it, ordered by (round, token) for top-k and by token for prototypes,
    # and the first C of them are kept.
    for ex in range(e):
      wanting = [(rnd, tok) for rnd in range(index.shape[0]) for tok in range(t)
                 if index[rnd, tok] == ex and mask[tok]]
      if routing == "prototype":
        wanting.sort(key=lambda rt: rt[1])
      for position, (rnd, tok) in enumerate(wanting):
        self.assertEqual(bool(kept[rnd, tok]), position < cap)
        if position < cap:
          self.assertEqual(slot[rnd, tok], position)
          self.assertTrue(dispatch[tok, ex, position])
    # Combine weights live on dispatched slots only, non-negative.
    self.assertTrue((combine >= 0).all())
    self.assertFalse((combine[~dispatch] != 0).any())
    # Top-k gates are at most the top-k probabilities (sum <= 1) or renormalised; prototype
    # gates with "none" are one probability per prototype and may sum to Z.
    sums_to_one = routing == "top_k" or normalization in ("renormalize", "softmax_topk")
    if sums_to_one:
      self.assertTrue((combine.sum(axis=(1, 2)) <= 1 + 1e-6).all())
    # And the whole thing agrees with the reference (exact ties included).
    want = ref.route(logits, routing=routing, k=k, capacity=cap, normalization=normalization,
                     token_mask=mask)
    self.assertAllEqual(kept, want.kept)
    self.assertAllEqual(dispatch, want.dispatch_mask)
    self.assertAllClose(combine, want.combine_weights, atol=1e-6, rtol=0)


if __name__ == "__main__":
  tf.test.main()
