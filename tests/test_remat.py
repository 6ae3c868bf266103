"""Recomputation (`train.remat`) changes memory, never the gradient.

Each option against "none" on the same weights and batch, with dropout 0.1 and the auxiliary
and z-losses on (the two things recomputation breaks: a recomputed forward drawing new dropout
masks, and MoE losses added inside a recomputed function losing their gradient): top-k (k=2),
prototype routing, MoE attention, a dense/MoE mix, dropless with GShard's random second expert
(a random draw the recomputation must repeat), outer groups dropping by probability. The all-to-alls a recomputed block repeats
are counted against the planner; a run resumed under recomputation reproduces the losses of
the same run without it. The 2-rank cases (experts sharded) are in test_parallel_gradients.
"""

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
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.errors import ConfigError
from m6t_tf.models import m6_captioner
from m6t_tf.networks import m6_transformer as transformer_lib
from m6t_tf.parallel import communicator as comm_lib
from tests import support
from tests.support import DEMO, REPO

# The options each network is checked under (each one traces the step anew, the cost of this
# file): "block" and "experts" everywhere (dropout masks, MoE losses, random draws inside the
# recomputed function); "attention" where attention differs (learned positions, RoPE, MoE
# projections); a named block where blocks differ (dense and MoE).
MODES = {
    "top2": ("block", "attention", "experts"),
    "prototype": ("block", "attention", "experts"),
    "moe_attention": ("block", "attention", "experts"),
    "dense_and_moe": ("block", ("block_1",), "experts"),
    "dropless_random_second": ("block", "experts"),
    "groups_drop_by_probability": ("block", "experts"),
}
RTOL = 1e-6
# Softmax over the keys is invariant to q·b_k (the same for every key), so without RoPE the key
# bias's gradient is zero in exact arithmetic (as tests/test_parallel_gradients.py notes).
ZERO_GRADIENT = "attention/key/bias"

NETWORKS = {
    "top2": dict(moe=dict(num_experts=4, k=2, aux_loss_weight=0.01, z_loss_weight=0.001),
                 moe_placement="all"),
    "prototype": dict(moe=dict(num_experts=4, k=2, routing="prototype", aux_loss_weight=0.01,
                               z_loss_weight=0.001),
                      moe_placement="all", norm="pre_rms", positions="rope",
                      activation="swiglu"),
    "moe_attention": dict(moe=dict(num_experts=4, k=1, aux_loss_weight=0.01, z_loss_weight=0.001),
                          moe_placement="all", moe_attention=True),
    "dense_and_moe": dict(moe=dict(num_experts=4, k=1, aux_loss_weight=0.01),
                          moe_placement="every_k", moe_every=2),
    "dropless_random_second": dict(moe=dict(num_experts=4, k=2, capacity_mode="dropless",
                                            second_expert_policy="random", aux_loss_weight=0.01,
                                            z_loss_weight=0.001),
                                   moe_placement="all"),
    "groups_drop_by_probability": dict(moe=dict(num_experts=4, k=2, num_groups=3,
                                                drop_policy="probability", capacity_factor=1.0,
                                                aux_loss_weight=0.01),
                                       moe_placement="all"),
}


def _model(name):
  keras.utils.set_random_seed(3)
  model = m6_captioner.M6Captioner(
      vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, head_size=8,
      intermediate_size=24, max_text_length=8, dropout_rate=0.1, **NETWORKS[name])
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 40, size=(3, 9))
  tokens[0, 6:] = 0                                   # padding: not routed
  batch = {"patch_features": tf.constant(rng.normal(size=(3, 16, 12)), tf.float32),
           "tokens": tf.constant(tokens, tf.int32)}
  model.build_from_batch(batch)
  return model, batch


def _gradients(model, batch, remat):
  """Loss and gradients of one training forward, every dropout seed state reset first."""
  model.network.set_remat(remat)
  for i, v in enumerate(v for v in model.variables if "seed_generator" in v.path):
    v.assign(np.array([11 + i, 5], np.int64))

  @tf.function
  def step(b):
    with tf.GradientTape() as tape:
      loss, _ = model.losses_and_metrics(b, training=True)
    return loss, tape.gradient(loss, model.trainable_variables)

  loss, grads = step(batch)
  return float(loss), [g.numpy() for g in grads]


def _relative_error(x, ref):
  return float(np.linalg.norm((x - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-30))


@pytest.mark.slow
class RematGradientTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(*[(name, name) for name in NETWORKS])
  def test_every_option_gives_the_gradient_of_none(self, name):
    model, batch = _model(name)
    ref_loss, ref = _gradients(model, batch, "none")
    self.assertGreater(len(model.losses), 0, "the MoE losses must be on for this test")
    for mode in MODES[name]:
      loss, grads = _gradients(model, batch, list(mode) if isinstance(mode, tuple) else mode)
      self.assertAllClose(loss, ref_loss, rtol=RTOL, msg=f"{name}, remat={mode}")
      total = np.sqrt(sum(np.sum(np.square(g)) for g in ref))
      for v, g, want in zip(model.trainable_variables, grads, ref):
        if ZERO_GRADIENT in v.path and np.linalg.norm(want) < 1e-7 * total:
          # Zero in exact arithmetic (learned positions; with RoPE it is not): what it gets is
          # round-off, whose bits depend on the order TF's threads add in; checked to be
          # round-off, not relatively.
          self.assertLess(np.linalg.norm(g), 1e-7 * total, f"{name}, remat={mode}: {v.path}")
          continue
        self.assertLess(_relative_error(g, want), RTOL, f"{name}, remat={mode}: {v.path}")

  def test_router_gradient_includes_the_moe_losses(self):
    # The router's gradient under remat must carry the auxiliary loss: with a huge weight it
    # dominates, and a lost loss gradient would show as a large error.
    model, batch = _model("top2")
    for layer in model.moe_layers:
      layer.aux_loss_weight = 10.0
    _, ref = _gradients(model, batch, "none")
    _, grads = _gradients(model, batch, "block")
    for v, g, want in zip(model.trainable_variables, grads, ref):
      if "router" in v.path:
        self.assertLess(_relative_error(g, want), RTOL, v.path)

  def test_dropout_is_on_and_differs_between_steps(self):
    # The equalities above would hold trivially without dropout: the masks must be drawn.
    model, batch = _model("top2")
    model.network.set_remat("block")
    for v in (v for v in model.variables if "seed_generator" in v.path):
      v.assign(np.array([1, 0], np.int64))
    first = float(model.losses_and_metrics(batch, training=True)[0])
    second = float(model.losses_and_metrics(batch, training=True)[0])
    no_dropout = float(model.losses_and_metrics(batch, training=False)[0])
    self.assertNotAllClose(first, second)
    self.assertNotAllClose(first, no_dropout)


class CountingCommunicator(comm_lib.LocalCommunicator):
  """Counts the all-to-all calls traced (a recomputed block calls them again)."""

  def __init__(self):
    super().__init__()
    self.calls = 0

  def all_to_all(self, x):
    self.calls += 1
    return super().all_to_all(x)


@pytest.mark.slow
class RematCollectivesTest(tf.test.TestCase):

  def test_block_repeats_the_forward_all_to_alls_and_the_planner_counts_them(self):
    comm = CountingCommunicator()
    keras.utils.set_random_seed(0)
    network = transformer_lib.M6Transformer(
        vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, head_size=8,
        intermediate_size=24, max_text_length=8, dropout_rate=0.0,
        moe=dict(num_experts=4, k=1, communicator=comm), moe_placement="all", name="m6")
    model = m6_captioner.M6Captioner(network=network)
    batch = {"patch_features": tf.random.normal([2, 16, 12]),
             "tokens": tf.ones([2, 9], tf.int32)}
    model.build_from_batch(batch)
    calls = {}
    for mode in ("none", "block", "experts", "attention"):
      comm.calls = 0
      _gradients(model, batch, mode)
      calls[mode] = comm.calls
    # Two per MoE layer per forward; "block" runs each forward again in the backward pass.
    self.assertEqual(calls["none"], 2 * 2)
    self.assertEqual(calls["block"], 2 * calls["none"])
    self.assertEqual(calls["experts"], calls["none"])
    self.assertEqual(calls["attention"], calls["none"])
    result = planning.plan_from_gin([os.path.join(REPO, "gin", "base.gin")], num_workers=8,
                                    search_paths=[REPO])
    # Forward + backward + the recomputed forward: 3 forwards' worth.
    self.assertEqual(result["alltoall_bytes_per_step_recompute"],
                     3 * result["alltoall_bytes_per_forward"])
    gin.clear_config()


class RematIndexedSlicesTest(tf.test.TestCase):

  def test_a_gathering_consumer_of_a_recomputed_output(self):
    # tf.recompute_grad in a graph fails on IndexedSlices arriving at its outputs (a consumer
    # gathering their rows, as the dropless combine once did); `dropout.remat` densifies them.
    from m6t_tf.layers import dropout as dropout_lib
    w = tf.Variable(tf.reshape(tf.range(12, dtype=tf.float32), [4, 3]))

    @tf.function
    def step(x):
      with tf.GradientTape() as tape:
        y = dropout_lib.remat(lambda t: tf.matmul(t, w))(x)
        loss = tf.reduce_sum(tf.gather(y, [0, 2, 2]))
      return tape.gradient(loss, w)

    self.assertAllClose(step(tf.ones([5, 4])), tf.fill([4, 3], 3.0))


class RematConfigTest(tf.test.TestCase):

  def test_bad_values_name_the_options(self):
    model, _ = _model("top2")
    with self.assertRaisesRegex(ValueError, r"remat='blocks'.*'none', 'block', 'attention'"):
      model.network.set_remat("blocks")
    with self.assertRaisesRegex(ValueError, r"\['block_7'\] are not blocks.*block_0 … block_1"):
      model.network.set_remat(["block_7"])
    with self.assertRaisesRegex(ValueError, "remat="):
      trainer_lib.Trainer(model, keras.optimizers.SGD(0.1), remat="everything")


def _tiny(bindings):
  gin.clear_config()
  configurables.parse([os.path.join(REPO, "gin", f) for f in ("demo.gin", "tiny.gin")], [
      f"train.train_data='{DEMO}/train-*.tfrecord'", "train.eval_data=None",
      "train.num_steps=5", "train.deterministic=True", "train.checkpoint_every=2",
      *bindings], [REPO])


@pytest.mark.slow
class RematTrainingTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    support.require_demo()

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def test_resumed_run_under_remat_reproduces_the_run_without(self):
    _tiny([])
    straight = configurables.run_train(model_dir=tempfile.mkdtemp(prefix="m6t_remat_"))["losses"]
    model_dir = tempfile.mkdtemp(prefix="m6t_remat_")
    _tiny(["train.remat='block'"])
    first = configurables.run_train(model_dir=model_dir, stop_after=2)["losses"]
    _tiny(["train.remat='experts'"])
    second = configurables.run_train(model_dir=model_dir)["losses"]
    self.assertLen(first + second, 5)
    self.assertAllClose(straight, first + second, rtol=1e-5)

  def test_bad_remat_binding_fails_before_compute(self):
    _tiny(["train.remat='everything'"])
    with self.assertRaisesRegex(ConfigError, r"train.remat='everything'; allowed"):
      configurables.run_train(model_dir=tempfile.mkdtemp(prefix="m6t_remat_"))


if __name__ == "__main__":
  tf.test.main()
