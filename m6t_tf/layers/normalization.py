"""RMSNorm (the second paper's LLaMA-2-style pre-normalisation)."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="m6t_tf")
class RMSNorm(keras.layers.Layer):
  """x / rms(x) · scale over the last axis, computed in float32."""

  def __init__(self, *, epsilon: float = 1e-6, **kwargs):
    super().__init__(**kwargs)
    self.epsilon = epsilon

  def build(self, input_shape):
    self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="ones")
    self.built = True

  def call(self, x):
    x32 = tf.cast(x, tf.float32)
    x32 = x32 * tf.math.rsqrt(tf.reduce_mean(tf.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return tf.cast(x32, x.dtype) * tf.cast(self.scale, x.dtype)

  def get_config(self):
    config = super().get_config()
    config.update(epsilon=self.epsilon)
    return config
