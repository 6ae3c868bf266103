"""The MoE layer inside an ordinary Keras functional model with unknown batch (and length) sizes.

Written as a Keras tutorial writes a model: `keras.Input((L, M))`, batch size unknown. Keras
traces `fit`, `predict` and `export` with the batch (and here also the length) unknown, so the
layer computes its capacity from the run-time token count. One model stacks every routing
(top-1, top-2 with the router losses, two prototypes, dropless, top-2 in two outer groups), so
that one fit / save / export exercises them all: it fits, predicts at several batch sizes
(equal to the model called eagerly on the same batches, where C is static), saves and loads
a `.keras` file with identical outputs, and its SavedModel (`model.export`) serves a batch
size never seen before with the same outputs, in a fresh `tf.saved_model.load`. Capacity
factor 1.0 makes C, and so the outputs, depend on the batch: a C computed from the wrong T
would show. Under `mixed_float16` the routers stay float32 in the traced graph.
"""

import os
import tempfile
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.layers import moe as moe_lib
from m6t_tf.layers import routers

L, M, I, E = 5, 8, 6, 4
ROUTINGS = {
    "top1": dict(k=1),
    "top2": dict(k=2, aux_loss_weight=0.01, z_loss_weight=0.001),
    "prototype2": dict(routing="prototype", k=2),
    "dropless2": dict(k=2, capacity_mode="dropless"),
    "top2_groups2": dict(k=2, num_groups=2),
}


def build(length=L, seed=0):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((length, M))
  h = inputs
  for name, kwargs in ROUTINGS.items():
    # router_init_std 1.0: decisive, varied routing, so that capacity drops tokens.
    h = h + moe_lib.MoE(E, I, capacity_factor=1.0, router_init_std=1.0, name=name,
                        **kwargs)(h)
  model = keras.Model(inputs, keras.layers.Dense(3, name="head")(h))
  model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
  return model


def data(n, length=L, seed=1):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, length, M)).astype(np.float32),
          rng.standard_normal((n, length, 3)).astype(np.float32))


def batches(*arrays, batch_size):
  """A dataset as a Keras user feeds one: its batch size is unknown to the trace (None), so
  one trace serves every batch, the partial last one included."""
  return tf.data.Dataset.from_tensor_slices(arrays if len(arrays) > 1 else arrays[0]).batch(
      batch_size)


def eager_batches(model, x, batch_size):
  """The model called eagerly (static shapes, static C) on the same batches."""
  return np.concatenate([model(x[i:i + batch_size]).numpy()
                         for i in range(0, len(x), batch_size)])


def routed_shapes(spy):
  """The [T, E] logits shapes every `routing.route` call of a trace saw."""
  return [tuple(call.args[0].shape) for call in spy.call_args_list]


@pytest.mark.slow  # fit, predict, .keras, export: ~1 min of tracing
class FunctionalModelTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = build()
    x, y = data(14)
    # 14 = 4 + 4 + 4 + 2: a partial last batch, as in any real fit.
    with mock.patch.object(routers, "route", wraps=routers.route) as spy:
      cls.history = cls.model.fit(batches(x, y, batch_size=4), epochs=2, verbose=0)
    cls.fit_shapes = routed_shapes(spy)

  def test_fit_trains_every_layer_at_an_unknown_token_count(self):
    # The train step was traced with T unknown only (one routing per layer and group).
    self.assertNotEmpty(self.fit_shapes)
    self.assertEqual(set(self.fit_shapes), {(None, E)})
    losses = self.history.history["loss"]
    self.assertTrue(np.all(np.isfinite(losses)), losses)
    self.assertLess(losses[-1], losses[0])

  def test_predict_at_several_batch_sizes(self):
    x, _ = data(7, seed=2)
    outputs = {}
    for batch_size in (1, 3, 7):
      outputs[batch_size] = self.model.predict(batches(x, batch_size=batch_size), verbose=0)
      self.assertAllClose(outputs[batch_size], eager_batches(self.model, x, batch_size),
                          atol=1e-5, rtol=1e-5, msg=f"batch_size={batch_size}")
    # Capacity drops tokens, so outputs depend on the batch: the comparison is not vacuous.
    self.assertGreater(float(np.abs(outputs[1] - outputs[7]).max()), 1e-3)
    self.assertGreater(float(self.model.get_layer("top1").stats["dropped_fraction"]), 0.0)
    self.assertGreater(float(self.model.get_layer("top2_groups2").stats["dropped_fraction"]),
                       0.0)

  def test_save_and_load_keras_file(self):
    x, _ = data(6, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "moe.keras")
      self.model.save(path)
      loaded = keras.saving.load_model(path)
    for name in ROUTINGS:
      self.assertIsInstance(loaded.get_layer(name), moe_lib.MoE)
      self.assertEqual(loaded.get_layer(name).get_config(),
                       self.model.get_layer(name).get_config())
    for batch_size in (2, 6):
      self.assertAllEqual(eager_batches(loaded, x, batch_size),
                          eager_batches(self.model, x, batch_size))

  def test_export_serves_an_unseen_batch_size(self):
    x, _ = data(8, seed=5)                    # batch 8: never used by fit or predict above
    with tempfile.TemporaryDirectory() as tmp:
      self.model.export(os.path.join(tmp, "saved"), verbose=False)
      served = tf.saved_model.load(os.path.join(tmp, "saved"))
      for n in (8, 1):
        self.assertAllClose(served.serve(tf.constant(x[:n])), eager_batches(self.model, x[:n], n),
                            atol=1e-5, rtol=1e-5, msg=f"batch {n}")


@pytest.mark.slow
class UnknownLengthTest(tf.test.TestCase):

  def test_sequence_length_unknown(self):
    model = build(length=None)
    with mock.patch.object(routers, "route", wraps=routers.route) as spy:
      for length, batch_size in ((3, 2), (7, 3)):
        x, _ = data(4, length=length, seed=length)
        self.assertAllClose(model.predict(batches(x, batch_size=batch_size), verbose=0),
                            eager_batches(model, x, batch_size), atol=1e-5, rtol=1e-5,
                            msg=f"L={length}")
    # Keras traces the first batch with its shapes, then relaxes them: T unknown.
    self.assertIn((None, E), routed_shapes(spy))


@pytest.mark.slow
class MixedPrecisionTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.addCleanup(keras.config.set_dtype_policy, keras.config.dtype_policy())

  def test_router_stays_float32(self):
    keras.config.set_dtype_policy("mixed_float16")
    model = build()
    x, _ = data(6)
    with mock.patch.object(routers, "route", wraps=routers.route) as spy:
      got = model.predict(batches(x, batch_size=4), verbose=0)
    # Traced by predict, T unknown among the traces: the routers' logits are float32 there.
    self.assertIn((None, E), routed_shapes(spy))
    for call in spy.call_args_list:
      self.assertEqual(call.args[0].dtype, tf.float32)
    self.assertTrue(np.all(np.isfinite(got)))
    self.assertAllClose(got, eager_batches(model, x, 4), atol=1e-2, rtol=1e-2)
    for name in ROUTINGS:
      layer = model.get_layer(name)
      self.assertEqual(layer.router.kernel.dtype, "float32")
      self.assertEqual(layer.router.compute_dtype, "float32")
      self.assertEqual(layer.compute_dtype, "float16")
    self.assertEqual(model.get_layer("top2_groups2")(tf.constant(x[:3])).dtype, tf.float16)


if __name__ == "__main__":
  tf.test.main()
