"""RMSNorm against the NumPy reference x / sqrt(mean(x²) + ε) · scale (float64)."""

import keras
import numpy as np
import tensorflow as tf

from m6t_tf.layers import normalization
from tests import numpy_reference as ref


def _norm(x, *, scale, **kwargs):
  layer = normalization.RMSNorm(**kwargs)
  layer.build(x.shape)
  layer.scale.assign(scale)
  return layer, layer(tf.constant(x))


class RMSNormTest(tf.test.TestCase):

  def tearDown(self):
    keras.mixed_precision.set_global_policy("float32")
    super().tearDown()

  def test_values_match_reference_where_epsilon_matters(self):
    rng = np.random.default_rng(0)
    scale = rng.normal(size=7).astype(np.float32)
    # Rows of RMS 1e-4 .. 10: at the small end mean(x²) is 1e-8, well below ε = 1e-6, so the
    # output depends on ε and on where it is added (inside the square root).
    x = (rng.normal(size=(2, 5, 7)) * np.logspace(-4, 1, 5)[None, :, None]).astype(np.float32)
    layer, y = _norm(x, scale=scale)
    self.assertEqual(layer.epsilon, 1e-6)
    self.assertEqual(y.dtype, tf.float32)
    self.assertAllClose(y, ref.rms_norm(x, scale, 1e-6), rtol=1e-6, atol=0)
    # ε is a real argument, not a constant inside the layer.
    _, y5 = _norm(x, scale=scale, epsilon=1e-5)
    self.assertAllClose(y5, ref.rms_norm(x, scale, 1e-5), rtol=1e-6, atol=0)
    self.assertNotAllClose(y5[:, 0], y[:, 0], rtol=1e-2)

  def test_unit_rms_rows_with_ones_scale_are_unchanged(self):
    x = np.array([[3.0, -4.0, 0.0, 0.0], [1.0, 1.0, -1.0, 1.0]], np.float32)
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True))
    _, y = _norm(x, scale=np.ones(4, np.float32), epsilon=0.0)
    self.assertAllClose(y, x, rtol=1e-7, atol=0)

  def test_mixed_precision_normalises_in_float32(self):
    keras.mixed_precision.set_global_policy("mixed_float16")
    rng = np.random.default_rng(1)
    # Squares of 300 overflow float16 (max 65504): a float16 mean(x²) would be inf.
    x = (300.0 * rng.normal(size=(3, 16))).astype(np.float16)
    scale = rng.normal(size=16).astype(np.float32)
    layer, y = _norm(x, scale=scale)
    self.assertEqual(layer.scale.dtype, "float32")
    self.assertEqual(y.dtype, tf.float16)
    want = ref.rms_norm(x.astype(np.float64), scale.astype(np.float16).astype(np.float64), 1e-6)
    self.assertAllClose(np.asarray(y, np.float64), want, rtol=2e-3, atol=1e-3)

  def test_config_round_trip(self):
    layer = normalization.RMSNorm(epsilon=1e-5, name="n")
    again = normalization.RMSNorm.from_config(layer.get_config())
    self.assertEqual(again.epsilon, 1e-5)


if __name__ == "__main__":
  tf.test.main()
