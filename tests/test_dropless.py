"""Dropless experts and outer-batch groups of `m6t_tf.layers.moe.MoE` on one process.

Dropless (capacity_mode="dropless") must be the function of top-k with a capacity so large
that nothing drops — outputs and every gradient — for every routing, FFN and linear experts;
nothing drops under adversarial routing; the optional memory ceiling drops exactly what a
capacity of that size would, and counts it. Outer groups (num_groups=O): one call equals O
separate calls on the O slices (outputs, losses, gradients), with heavy dropping, also when O
does not divide T (the last slice shorter, its padding masked). The
expert-parallel cases (variable-size all-to-alls, 2 and 4 ranks) are in test_parallel_moe.
"""

import contextlib
import io
import math
import os
import tempfile

from absl.testing import parameterized
import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.run import configurables
from m6t_tf.run import planning
from m6t_tf.layers import moe as moe_lib
from tests import support
from tests.support import DEMO, REPO


M, I, E = 8, 12, 8


def _inputs(b=3, l=10, seed=0, shift=0.0):
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.normal(size=(b, l, M)) + shift, tf.float32)
  mask = tf.constant(rng.random((b, l)) > 0.2)
  return x, mask


def _pair(reference_kwargs, kwargs, x):
  """Two layers with the same weights."""
  keras.utils.set_random_seed(1)
  a = moe_lib.MoE(E, I, name="reference", **reference_kwargs)
  b = moe_lib.MoE(E, I, name="tested", **kwargs)
  a.build(x.shape)
  b.build(x.shape)
  for va, vb in zip(a.trainable_variables, b.trainable_variables):
    vb.assign(va)
  return a, b


def _run(layer, x, mask, **call_kwargs):
  """Output, loss (with the aux and z losses) and gradients w.r.t. x and the weights."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=True, token_mask=mask, **call_kwargs)
    loss = tf.reduce_sum(y * tf.sin(tf.range(y.shape[-1], dtype=tf.float32))) + tf.add_n(
        layer.losses or [0.0])
  return y, loss, tape.gradient(loss, [x] + layer.trainable_variables)


ROUTINGS = [("top1", "top_k", 1), ("top2", "top_k", 2), ("top3", "top_k", 3),
            ("proto2", "prototype", 2), ("proto4", "prototype", 4)]


@pytest.mark.slow
class DroplessTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      *[(f"{n}_{act}", r, k, act) for n, r, k in ROUTINGS for act in ("gelu", "swiglu")])
  def test_equals_top_k_with_a_capacity_that_drops_nothing(self, routing, k, activation):
    x, mask = _inputs()
    common = dict(routing=routing, k=k, activation=activation, aux_loss_weight=0.01,
                  z_loss_weight=0.001)
    big, dropless = _pair(dict(common, capacity_factor=float(E)),
                          dict(common, capacity_mode="dropless"), x)
    y_ref, loss_ref, g_ref = _run(big, x, mask)
    self.assertEqual(float(big.stats["dropped_fraction"]), 0.0)
    for fn in (lambda: _run(dropless, x, mask),
               tf.function(lambda: _run(dropless, x, mask))):
      y, loss, g = fn()
      self.assertAllClose(y, y_ref, rtol=1e-5, atol=1e-6)
      self.assertAllClose(loss, loss_ref, rtol=1e-5)
      for got, want, v in zip(g, g_ref, [x] + dropless.trainable_variables):
        self.assertAllClose(got, want, rtol=1e-5, atol=1e-6,
                            msg=getattr(v, "path", "x"))
      self.assertEqual(float(dropless.stats["dropped_fraction"]), 0.0)
      self.assertAllEqual(dropless.stats["tokens_per_expert"], big.stats["tokens_per_expert"])

  def test_linear_experts(self):
    x, mask = _inputs()
    common = dict(routing="top_k", k=2, expert_type="linear", output_size=5)
    big, dropless = _pair(dict(common, capacity_factor=float(E)),
                          dict(common, capacity_mode="dropless"), x)
    y_ref, _, g_ref = _run(big, x, mask)
    y, _, g = _run(dropless, x, mask)
    self.assertEqual(y.shape, (3, 10, 5))
    self.assertAllClose(y, y_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(g, g_ref):
      self.assertAllClose(got, want, rtol=1e-5, atol=1e-6)

  @parameterized.parameters(1, 2)
  def test_adversarial_routing_drops_nothing(self, k):
    # Inputs shifted positive and router column 0 raised: expert 0 is every token's first
    # choice. Capacity 1.25 drops most of them; dropless none.
    x, mask = _inputs(shift=5.0)
    capped, dropless = _pair(dict(k=k), dict(k=k, capacity_mode="dropless"), x)
    for layer in (capped, dropless):
      layer.router.kernel.assign_add(tf.one_hot(tf.zeros([M], tf.int32), E) * 20.0)
    _run(capped, x, mask)
    y, _, _ = _run(dropless, x, mask)
    real = float(tf.reduce_sum(tf.cast(mask, tf.float32)))
    self.assertEqual(int(dropless.stats["tokens_per_expert"][0]), real)
    self.assertEqual(float(dropless.stats["dropped_fraction"]), 0.0)
    self.assertGreater(float(capped.stats["dropped_fraction"]), 0.3)
    self.assertEqual(int(tf.reduce_sum(dropless.stats["tokens_per_expert"])), k * real)
    # Every real token got an output; padding got zeros.
    norms = tf.norm(y, axis=-1)
    self.assertAllGreater(tf.boolean_mask(norms, mask), 0.0)
    self.assertAllEqual(tf.boolean_mask(norms, ~mask), tf.zeros_like(tf.boolean_mask(norms, ~mask)))

  @parameterized.parameters(("top_k", 1), ("top_k", 2), ("prototype", 2))
  def test_ceiling_drops_what_that_capacity_drops(self, routing, k):
    x, mask = _inputs(shift=5.0)
    factor = 1.5
    capped, guarded = _pair(
        dict(routing=routing, k=k, capacity_factor=factor),
        dict(routing=routing, k=k, capacity_mode="dropless", max_tokens_per_expert_factor=factor),
        x)
    for layer in (capped, guarded):
      layer.router.kernel.assign_add(tf.one_hot(tf.zeros([M], tf.int32), E) * 20.0)
    self.assertEqual(guarded.capacity_for(30, training=True), capped.capacity_for(30, True))
    y_ref, _, g_ref = _run(capped, x, mask)
    y, _, g = _run(guarded, x, mask)
    self.assertGreater(float(guarded.stats["dropped_fraction"]), 0.0)
    self.assertAllClose(guarded.stats["dropped_fraction"], capped.stats["dropped_fraction"])
    self.assertAllClose(y, y_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(g, g_ref):
      self.assertAllClose(got, want, rtol=1e-5, atol=1e-6)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "capacity_mode='none'; allowed: .*'dropless'"):
      moe_lib.MoE(E, I, capacity_mode="none")
    with self.assertRaisesRegex(ValueError, "max_tokens_per_expert_factor=2.0 is the dropless"):
      moe_lib.MoE(E, I, max_tokens_per_expert_factor=2.0)
    with self.assertRaisesRegex(ValueError, "must be > 0"):
      moe_lib.MoE(E, I, capacity_mode="dropless", max_tokens_per_expert_factor=0.0)
    with self.assertRaisesRegex(ValueError, "num_groups=2 .*dropless"):
      moe_lib.MoE(E, I, capacity_mode="dropless", num_groups=2)
    with self.assertRaisesRegex(ValueError, "num_groups=0 must be an integer >= 1"):
      moe_lib.MoE(E, I, num_groups=0)


@pytest.mark.slow
class OuterGroupsTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(*[(o, d, r, k) for o in (2, 5) for d in ("index", "einsum")
                              for r, k in (("top_k", 2), ("prototype", 2))])
  def test_groups_equal_separate_calls_on_the_slices(self, num_groups, dispatch, routing, k):
    # Capacity 1.0 (Capacity 1×): heavy dropping, decided per group.
    x, mask = _inputs(b=5, l=6)
    common = dict(routing=routing, k=k, dispatch=dispatch, capacity_factor=1.0,
                  capacity_mode="1", aux_loss_weight=0.01, z_loss_weight=0.001)
    single, grouped = _pair(common, dict(common, num_groups=num_groups), x)
    t = 5 * 6
    ms = tf.reshape(mask, [num_groups, t // num_groups])
    with tf.GradientTape() as tape:
      tape.watch(x)
      xs = tf.reshape(x, [num_groups, t // num_groups, M])
      outs, losses, dropped = [], [], []
      for g in range(num_groups):
        outs.append(single(xs[g], training=True, token_mask=ms[g]))
        losses.append(tf.add_n(single.losses))
        dropped.append(float(single.stats["dropped_fraction"]))
      y_ref = tf.reshape(tf.concat(outs, 0), x.shape)
      loss_ref = tf.reduce_sum(y_ref ** 2) + tf.add_n(losses) / num_groups
    g_ref = tape.gradient(loss_ref, [x] + single.trainable_variables)
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = grouped(x, training=True, token_mask=mask)
      loss = tf.reduce_sum(y ** 2) + tf.add_n(grouped.losses)
    g = tape.gradient(loss, [x] + grouped.trainable_variables)
    self.assertEqual(grouped.last_capacity, single.last_capacity)  # C from T/O tokens
    self.assertGreater(max(dropped), 0.0)
    self.assertAllClose(y, y_ref, rtol=1e-5, atol=1e-6)
    self.assertAllClose(loss, loss_ref, rtol=1e-5)
    for got, want in zip(g, g_ref):
      self.assertAllClose(got, want, rtol=1e-5, atol=1e-6)

  @parameterized.parameters((31, 4, "index", "top_k", False), (17, 2, "einsum", "prototype", True),
                            (4, 3, "index", "prototype", True), (1, 2, "index", "top_k", True))
  def test_groups_at_a_token_count_they_do_not_divide(self, t, num_groups, dispatch, routing,
                                                      masked):
    """T = 31, O = 4: groups of G = 8, 8, 8 and 7 tokens, each routed with the C of G tokens
    (the last one padded with masked positions that take no capacity); T = 4, O = 3: groups
    of 2, 2 and none (left out of the loss mean). Equal to separate calls on the slices with
    that C, eagerly and traced with T unknown."""
    x, mask = _inputs(b=1, l=t, seed=t)
    if not masked:   # padding positions must be masked by the layer itself
      mask = tf.ones_like(mask)
    common = dict(routing=routing, k=2, dispatch=dispatch, capacity_factor=1.0,
                  capacity_mode="1", aux_loss_weight=0.01, z_loss_weight=0.001)
    single, grouped = _pair(common, dict(common, num_groups=num_groups), x)
    g = -(-t // num_groups)
    c = single.capacity_for(g, True)
    with tf.GradientTape() as tape:
      tape.watch(x)
      outs, losses, dropped, tokens = [], [], [], 0
      for start in range(0, t, g):
        outs.append(single(x[:, start:start + g], training=True, capacity=c,
                           token_mask=mask[:, start:start + g] if masked else None))
        losses.append(tf.add_n(single.losses))
        dropped.append(float(single.stats["dropped_fraction"]))
        tokens += single.stats["tokens_per_expert"].numpy()
      y_ref = tf.concat(outs, axis=1)
      loss_ref = tf.reduce_sum(y_ref ** 2) + tf.add_n(losses) / len(losses)
    g_ref = tape.gradient(loss_ref, [x] + single.trainable_variables)

    def step(x, mask):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = grouped(x, training=True, token_mask=mask if masked else None)
        loss = tf.reduce_sum(y ** 2) + tf.add_n(grouped.losses)
      return y, loss, tape.gradient(loss, [x] + grouped.trainable_variables)

    traced = tf.function(step, input_signature=[tf.TensorSpec([None, None, M]),
                                                tf.TensorSpec([None, None], tf.bool)])
    for name, fn in (("eager", step), ("unknown_t", traced)):
      y, loss, grads = fn(x, mask)
      self.assertAllClose(y, y_ref, rtol=1e-5, atol=1e-6, msg=name)
      self.assertAllClose(loss, loss_ref, rtol=1e-5, msg=name)
      for got, want in zip(grads, g_ref):
        self.assertAllClose(got, want, rtol=1e-5, atol=1e-6, msg=name)
      # Padding positions took no slot: the experts computed the real tokens only.
      self.assertAllEqual(grouped.stats["tokens_per_expert"], tokens, msg=name)
      if name == "eager":
        self.assertEqual(grouped.last_capacity, c)
    if t > 4:
      self.assertGreater(max(dropped), 0.0)

  def test_one_group_is_the_layer_of_before(self):
    x, mask = _inputs()
    a, b = _pair({}, dict(num_groups=1), x)
    self.assertAllEqual(_run(a, x, mask)[0], _run(b, x, mask)[0])
    self.assertEqual(a.alltoall_bytes_per_forward(), b.alltoall_bytes_per_forward())


class DroplessConfigTest(tf.test.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def test_planner_sizes_dropless_at_balance_or_at_the_ceiling(self):
    files = [os.path.join(REPO, "gin", "base.gin")]
    plain = planning.plan_from_gin(files, num_workers=8, search_paths=[REPO])["config"]
    t, e = plain["tokens_per_worker"], plain["num_experts"]
    dropless = planning.plan_from_gin(files, ["CAPACITY_MODE = 'dropless'"], num_workers=8,
                                      search_paths=[REPO])["config"]
    self.assertEqual(dropless["capacity"], math.ceil(t / e))
    ceiling = planning.plan_from_gin(
        files, ["CAPACITY_MODE = 'dropless'", "MoEConfig.max_tokens_per_expert_factor = 3.0"],
        num_workers=8, search_paths=[REPO])["config"]
    self.assertEqual(ceiling["capacity"], math.ceil(3.0 * t / e))
    groups = planning.plan_from_gin(files, ["MoEConfig.num_groups = 4"], num_workers=8,
                                    search_paths=[REPO])["config"]
    self.assertEqual(groups["capacity"], 4 * math.ceil(t / 4 / e * 1.25))

  @pytest.mark.slow
  def test_dropless_trains_and_its_ceiling_warns(self):
    support.require_demo()
    gin.clear_config()
    configurables.parse([os.path.join(REPO, "gin", f) for f in ("demo.gin", "tiny.gin")], [
        f"train.train_data='{DEMO}/train-*.tfrecord'", "train.eval_data=None",
        "train.num_steps=2", "CAPACITY_MODE='dropless'",
        "MoEConfig.max_tokens_per_expert_factor=0.25"], [REPO])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      summary = configurables.run_train(model_dir=tempfile.mkdtemp(prefix="m6t_dropless_"))
    self.assertLen(summary["losses"], 2)
    self.assertTrue(all(math.isfinite(x) for x in summary["losses"]))
    self.assertIn("is dropless but its max_tokens_per_expert_factor=0.25 ceiling dropped",
                  out.getvalue())


if __name__ == "__main__":
  tf.test.main()
