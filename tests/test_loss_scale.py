"""Dynamic loss scaling (`trainer_lib.LossScale`): ×2 after exactly `period` consecutive finite
steps, ÷2 on an overflow (never below 1), the good-step count reset by an overflow, skipped
steps counted; once on its own and once through real mixed-precision training steps."""

import os

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.run import configurables
from m6t_tf import optimizers
from m6t_tf.run import inputs
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.parallel import context
from tests import support
from tests.support import DEMO, REPO


def _replay(flags, *, initial, period):
  """The rule, step by step: [(scale, good_steps, skipped)] after each finite/overflow flag."""
  scale, good, skipped, out = initial, 0, 0, []
  for finite in flags:
    if not finite:
      scale, good, skipped = max(scale / 2, 1.0), 0, skipped + 1
    elif good + 1 == period:
      scale, good = scale * 2, 0
    else:
      good += 1
    out.append((scale, good, skipped))
  return out


def _state(ls):
  return float(ls.scale.numpy()), int(ls.good_steps.numpy()), int(ls.skipped.numpy())


class LossScaleTest(tf.test.TestCase):

  def test_grows_after_exactly_period_finite_steps(self):
    for period in (1, 2, 3, 5):
      ls = trainer_lib.LossScale(True, initial=8.0, period=period)
      for step in range(1, 3 * period + 1):
        ls.update(tf.constant(True))
        grown = step // period
        self.assertEqual(_state(ls), (8.0 * 2 ** grown, step % period, 0),
                         f"period {period}, after {step} finite steps")

  def test_overflow_halves_resets_count_and_is_counted(self):
    ls = trainer_lib.LossScale(True, initial=64.0, period=3)
    for finite, want in [(True, (64.0, 1, 0)), (True, (64.0, 2, 0)),
                         (False, (32.0, 0, 1)),            # halved; the 2 good steps forgotten
                         (True, (32.0, 1, 1)), (True, (32.0, 2, 1)),
                         (True, (64.0, 0, 1)),             # 3 new good steps: grows
                         (False, (32.0, 0, 2)), (False, (16.0, 0, 3))]:
      ls.update(tf.constant(finite))
      self.assertEqual(_state(ls), want)

  def test_never_below_one(self):
    ls = trainer_lib.LossScale(True, initial=2.0, period=4)
    for skipped in range(1, 4):
      ls.update(tf.constant(False))
      self.assertEqual(_state(ls), (1.0, 0, skipped))

  def test_disabled_keeps_scale_one_and_counts_nonfinite(self):
    ls = trainer_lib.LossScale(False, period=1)
    for finite in (True, True, False, True):
      ls.update(tf.constant(finite))
    self.assertEqual(_state(ls), (1.0, 0, 1))

  def test_traced_update_follows_the_rule_over_a_random_sequence(self):
    flags = np.random.default_rng(0).random(60) < 0.8
    ls = trainer_lib.LossScale(True, initial=2.0 ** 10, period=4)
    update = tf.function(ls.update)
    for step, (finite, want) in enumerate(zip(flags, _replay(flags, initial=2.0 ** 10,
                                                              period=4))):
      update(tf.constant(bool(finite)))
      self.assertEqual(_state(ls), want, f"step {step + 1}")
    self.assertGreater(_state(ls)[2], 0)


@pytest.mark.slow
class _TinyMoE(keras.Model):
  """One MoE layer and a squared-output loss: a model `Trainer` can step in milliseconds."""

  def __init__(self):
    super().__init__(name="tiny")
    from m6t_tf.layers import moe as moe_lib  # pylint: disable=g-import-not-at-top
    self.moe = moe_lib.MoE(4, 8, k=1, capacity_factor=4.0)
    self.moe_layers = [self.moe]

  def call(self, batch, training=None):
    return self.moe(batch["x"], training=training)

  def losses_and_metrics(self, batch, training):
    nll = tf.reduce_sum(tf.square(tf.cast(self(batch, training=training), tf.float32)))
    return nll, {"nll_sum": nll, "num_tokens": tf.constant(6.0), "loss": nll,
                 "moe_loss": tf.constant(0.0)}


class UnscaledGradientsTest(tf.test.TestCase):
  """Under loss scaling the optimiser gets the gradients of L, not of scale·L: what it clips,
  logs as grad_norm and applies equals a run without scaling (the scale is a power of two, so
  float32 scaling and unscaling are exact). Adam alone could not tell: it divides a uniform
  gradient scale out."""

  def test_loss_scaled_step_equals_unscaled(self):
    CLIP = 2e-6  # below the norm of these small initial weights  # pylint: disable=invalid-name
    keras.utils.set_random_seed(0)
    batch = {"x": tf.random.normal([6, 5])}
    results = []
    for scaled in (False, True):
      keras.utils.set_random_seed(1)
      model = _TinyMoE()
      model(batch)
      # Plain SGD and a clip norm the gradients exceed: a scale left in changes both.
      trainer = trainer_lib.Trainer(model, keras.optimizers.SGD(0.1), clip_norm=CLIP)
      trainer.loss_scale = trainer_lib.LossScale(scaled, initial=2.0 ** 12)
      grads, metrics = trainer.compute_gradients(batch)
      trainer.apply_gradients(grads, metrics)
      results.append(([g.numpy() for g in grads if g is not None],
                      float(metrics["grad_norm"]), [v.numpy() for v in model.trainable_variables]))
    (g0, n0, w0), (g1, n1, w1) = results
    self.assertGreater(n0, CLIP)  # clipping is active
    self.assertAllClose(n1, n0, rtol=1e-6)
    for a, b in zip(g1, g0):
      self.assertAllClose(a, b, rtol=1e-6, atol=1e-9)
    for a, b in zip(w1, w0):
      self.assertAllClose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
class MixedPrecisionTrainingTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    support.require_demo()

  def tearDown(self):
    keras.mixed_precision.set_global_policy("float32")
    gin.clear_config()
    super().tearDown()

  def test_scale_follows_real_float16_overflows(self):
    gin.clear_config()
    configurables.parse([os.path.join(REPO, "gin", f) for f in ("demo.gin", "tiny.gin")], [],
                        [REPO])
    ds = inputs.eval_stream(f"{DEMO}/validation-*.tfrecord", batch_size=4, max_len=12,
                                    image_mode="pixels", ctx=context.LocalContext())
    batches = list(ds.take(2))
    model = trainer_lib.build_model(configurables.network_fn(), batch=batches[0],
                                 mixed_precision=True)
    trainer = trainer_lib.Trainer(model, optimizers.make_optimizer("adamw", 1e-3),
                               mixed_precision=True)
    # The trainer's own: TensorFlow's dynamic loss scale defaults (2^15, ×2 every 2000 steps).
    self.assertEqual((_state(trainer.loss_scale), trainer.loss_scale.period),
                     ((2.0 ** 15, 0, 0), 2000))
    # Start far above what float16 gradients hold, with a short period: the first steps
    # overflow and halve the scale, then good steps double it until it overflows again.
    initial, period = 2.0 ** 19, 2
    trainer.loss_scale = trainer_lib.LossScale(True, initial=initial, period=period)
    flags, states, applied = [], [], []
    for step in range(12):
      before = model.trainable_variables[0].numpy().copy()
      metrics = trainer.train_step(batches[step % 2])
      flags.append(bool(metrics["finite"].numpy()))
      states.append(_state(trainer.loss_scale))
      applied.append(not np.array_equal(before, model.trainable_variables[0].numpy()))
    self.assertEqual(states, _replay(flags, initial=initial, period=period))
    self.assertEqual(applied, flags)                   # overflowed steps change no weight
    self.assertEqual(int(trainer.optimizer.iterations.numpy()), sum(flags))
    self.assertFalse(flags[0])
    grew = any(b[0] > a[0] for a, b in zip(states, states[1:]))
    self.assertTrue(grew, states)
    overflow_after_growth = any(not f for f in flags[flags.index(True):])
    self.assertTrue(overflow_after_growth, flags)


if __name__ == "__main__":
  tf.test.main()
