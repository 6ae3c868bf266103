"""The dense feed-forward block (the dense baseline, and non-MoE layers under every-K placement)."""

from __future__ import annotations

import keras
import tensorflow as tf

from m6t_tf.layers import dropout as dropout_lib
from m6t_tf.layers import experts as experts_lib


@keras.saving.register_keras_serializable(package="m6t_tf")
class FeedForward(keras.layers.Layer):
  """<float>[..., M] -> <float>[..., M]: act(x·wi [⊙ x·wi_gate]) · wo, no biases (as the experts)."""

  def __init__(self, intermediate_size: int, *, activation: str = "gelu", init_std: float = 0.02,
               dropout_rate: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    experts_lib.activation_fn(activation)
    self.intermediate_size = intermediate_size
    self.activation = activation
    self.init_std = init_std
    self.dropout_rate = dropout_rate
    self._dropout = dropout_lib.Dropout(dropout_rate)

  def build(self, input_shape):
    m, i = int(input_shape[-1]), self.intermediate_size
    init = keras.initializers.TruncatedNormal(stddev=self.init_std)
    self.wi = self.add_weight(name="wi", shape=(m, i), initializer=init)
    if self.activation == "swiglu":
      self.wi_gate = self.add_weight(name="wi_gate", shape=(m, i), initializer=init)
    self.wo = self.add_weight(name="wo", shape=(i, m), initializer=init)
    self.built = True

  def call(self, x, training=None, token_mask=None):
    del token_mask  # same signature as MoE
    act = experts_lib.activation_fn(self.activation)
    # Flatten to [N, M] and use matmul: TF's gradient of an einsum with "..." is ~100× slower
    # on CPU than the plain matmul (measured by tools/compare_dense.py on the demo shapes).
    shape = tf.shape(x)
    x2 = tf.reshape(x, [-1, x.shape[-1]])                                 # [N, M]
    h = tf.matmul(x2, self.wi)                                            # [N, I]
    if self.activation == "swiglu":
      h = act(tf.matmul(x2, self.wi_gate)) * h
    else:
      h = act(h)
    h = self._dropout(h, training=training)
    y = tf.matmul(h, self.wo)                                             # [N, M]
    return tf.reshape(y, tf.concat([shape[:-1], [self.wo.shape[-1]]], axis=0))

  def get_config(self):
    config = super().get_config()
    config.update(intermediate_size=self.intermediate_size, activation=self.activation,
                  init_std=self.init_std, dropout_rate=self.dropout_rate)
    return config
