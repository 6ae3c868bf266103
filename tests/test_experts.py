"""Tests of m6t_tf.layers.experts: shapes, hand-computed values, NumPy parity, Keras contract."""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

from m6t_tf.layers import experts as experts_lib

from tests import numpy_reference as ref

# Distinct small dimensions so that a transposed axis cannot go unnoticed.
D, E_LOCAL, C, M, I = 2, 3, 5, 7, 4


def _set_random_weights(layer, seed=0, scale=0.5):
  rng = np.random.default_rng(seed)
  for w in layer.weights:
    w.assign(rng.standard_normal(w.shape).astype(np.float32) * scale)


class ExpertsTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.parameters("relu", "gelu", "swiglu", "linear")
  def test_shapes_and_parameter_count(self, activation):
    layer = experts_lib.Experts(E_LOCAL, M, I, activation=activation)
    y = layer(tf.zeros([D, E_LOCAL, C, M]))
    self.assertEqual(y.shape, (D, E_LOCAL, C, M))
    per_expert = (3 if activation == "swiglu" else 2) * M * I
    self.assertEqual(layer.count_params(), E_LOCAL * per_expert)
    self.assertEqual(tuple(layer.wi.shape), (E_LOCAL, M, I))
    self.assertEqual(tuple(layer.wo.shape), (E_LOCAL, I, M))
    # No leading D axis works too.
    self.assertEqual(layer(tf.zeros([E_LOCAL, C, M])).shape, (E_LOCAL, C, M))

  def test_hand_computed_ones(self):
    # wi = 1 and wo = 1: every hidden unit is relu(Σ_m x_m), every output I · relu(Σ_m x_m).
    layer = experts_lib.Experts(2, 3, 4, activation="relu")
    layer.build(None)
    layer.wi.assign(np.ones([2, 3, 4], np.float32))
    layer.wo.assign(np.ones([2, 4, 3], np.float32))
    x = np.array([[[1.0, 2.0, 3.0], [-1.0, -2.0, 0.5]],
                  [[0.5, 0.5, 0.0], [1.0, -1.0, 0.0]]], np.float32)   # [e=2, C=2, M=3]
    self.assertAllClose(layer(x), [[[24.0] * 3, [0.0] * 3], [[4.0] * 3, [0.0] * 3]])
    # Expert 1 scaled by 2 on its output matrix: only expert 1's rows double.
    layer.wo.assign(np.stack([np.ones([4, 3]), 2 * np.ones([4, 3])]).astype(np.float32))
    self.assertAllClose(layer(x), [[[24.0] * 3, [0.0] * 3], [[8.0] * 3, [0.0] * 3]])

  @parameterized.parameters("relu", "gelu", "swiglu", "linear")
  def test_matches_numpy_per_expert(self, activation):
    layer = experts_lib.Experts(E_LOCAL, M, I, activation=activation)
    layer.build(None)
    _set_random_weights(layer)
    x = np.random.default_rng(1).standard_normal([D, E_LOCAL, C, M]).astype(np.float32)
    want = np.zeros([D, E_LOCAL, C, M])
    for d in range(D):
      for e in range(E_LOCAL):
        want[d, e] = ref.ffn(
            x[d, e], layer.wi.numpy()[e], layer.wo.numpy()[e], activation,
            layer.wi_gate.numpy()[e] if activation == "swiglu" else None)
    self.assertAllClose(layer(x), want, atol=1e-5, rtol=1e-5)

  def test_dropout_only_in_training(self):
    layer = experts_lib.Experts(E_LOCAL, M, I, activation="relu", dropout_rate=0.5)
    layer.build(None)
    _set_random_weights(layer)
    x = tf.random.stateless_normal([E_LOCAL, C, M], [0, 1])
    self.assertAllClose(layer(x, training=False), layer(x))
    self.assertNotAllClose(layer(x, training=True), layer(x, training=False))

  @parameterized.parameters("relu", "swiglu")
  def test_config_round_trip(self, activation):
    layer = experts_lib.Experts(E_LOCAL, M, I, activation=activation, init_std=0.1,
                                dropout_rate=0.25, name="ex")
    layer.build(None)
    clone = experts_lib.Experts.from_config(layer.get_config())
    clone.build(None)
    clone.set_weights(layer.get_weights())
    x = tf.random.stateless_normal([E_LOCAL, C, M], [0, 2])
    self.assertAllClose(clone(x), layer(x))
    for name in ("num_local_experts", "hidden_size", "intermediate_size", "activation",
                 "init_std", "dropout_rate"):
      self.assertEqual(getattr(clone, name), getattr(layer, name))
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    self.assertIsInstance(restored, experts_lib.Experts)
    self.assertEqual(keras.saving.get_registered_name(experts_lib.Experts), "m6t_tf>Experts")

  def test_mixed_precision(self):
    layer = experts_lib.Experts(E_LOCAL, M, I, dtype="mixed_float16")
    y = layer(tf.ones([E_LOCAL, C, M], tf.float16))
    self.assertEqual(y.dtype, tf.float16)
    self.assertEqual(layer.wi.dtype, "float32")

  def test_init_std(self):
    layer = experts_lib.Experts(8, 16, 32, init_std=0.002)
    layer.build(None)
    wi = layer.wi.numpy()
    self.assertLessEqual(np.abs(wi).max(), 2 * 0.002 + 1e-9)   # truncated at 2σ
    self.assertAllClose(wi.std(), 0.002 * 0.88, rtol=0.1)       # truncated normal std ≈ 0.88σ

  @parameterized.parameters(dict(activation="tanh"), dict(num_local_experts=0))
  def test_bad_arguments(self, **kwargs):
    args = dict(num_local_experts=2, hidden_size=M, intermediate_size=I)
    args.update(kwargs)
    with self.assertRaisesRegex(ValueError, next(iter(kwargs))):
      experts_lib.Experts(**args)


class LinearExpertsTest(tf.test.TestCase):

  def test_values_shapes_and_config(self):
    layer = experts_lib.LinearExperts(E_LOCAL, M, 2)
    x = np.random.default_rng(0).standard_normal([D, E_LOCAL, C, M]).astype(np.float32)
    y = layer(x)
    self.assertEqual(y.shape, (D, E_LOCAL, C, 2))
    kernel = layer.kernel.numpy()
    self.assertAllClose(y, np.einsum("deCM,eMN->deCN", x, kernel), atol=1e-5)
    clone = experts_lib.LinearExperts.from_config(layer.get_config())
    clone.build(None)
    clone.set_weights(layer.get_weights())
    self.assertAllClose(clone(x), y)


if __name__ == "__main__":
  tf.test.main()
