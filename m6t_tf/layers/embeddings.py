"""Inputs of M6: image patches (raw pixels or precomputed features), caption tokens, positions.

M6 reads `[16 image patches ; caption tokens]` (arXiv 2105.15082, appendix A.1). The paper
takes the patch features from a trained ResNet; `PatchEmbedding` accepts such features of any width
P, or cuts raw pixels
into a 4×4 grid itself and projects each flattened patch with a learned matrix.
"""

from __future__ import annotations

import keras
import tensorflow as tf

GRID = 4  # 4×4 = 16 patches per image, as in M6.
NUM_PATCHES = GRID * GRID


@keras.saving.register_keras_serializable(package="m6t_tf")
class PatchEmbedding(keras.layers.Layer):
  """<uint8>[B, H, W, 3] pixels or <float>[B, 16, P] features -> <float>[B, 16, M].

  Args:
    hidden_size: M.
    init_std: truncated-normal std of the projection.
  """

  def __init__(self, hidden_size: int, *, init_std: float = 0.02, **kwargs):
    super().__init__(**kwargs)
    self.hidden_size = hidden_size
    self.init_std = init_std
    self.proj = keras.layers.Dense(
        hidden_size, kernel_initializer=keras.initializers.TruncatedNormal(stddev=init_std),
        name="proj")

  def build(self, input_shape):
    if len(input_shape) == 4:      # pixels [B, H, W, 3]
      h, w, ch = input_shape[1:]
      if h % GRID or w % GRID:
        raise ValueError(f"image size {h}x{w} must be divisible by the {GRID}x{GRID} patch grid")
      self.proj.build((None, NUM_PATCHES, (h // GRID) * (w // GRID) * ch))
    elif len(input_shape) == 3:    # features [B, 16, P]
      if input_shape[1] != NUM_PATCHES:
        raise ValueError(f"patch features must be [B, {NUM_PATCHES}, P], got {input_shape}")
      self.proj.build((None, NUM_PATCHES, input_shape[2]))
    else:
      raise ValueError(f"expected pixels [B, H, W, 3] or features [B, 16, P], got {input_shape}")
    self.built = True

  def call(self, x):
    if x.shape.rank == 4:
      b = tf.shape(x)[0]
      h, w, ch = x.shape[1:]
      ph, pw = h // GRID, w // GRID
      # Pixels to [-1, 1], then [B, 4, ph, 4, pw, C] -> [B, 16, ph·pw·C] in row-major grid order.
      x = tf.cast(x, self.compute_dtype) / 127.5 - 1.0
      x = tf.reshape(x, [b, GRID, ph, GRID, pw, ch])
      x = tf.transpose(x, [0, 1, 3, 2, 4, 5])
      x = tf.reshape(x, [b, NUM_PATCHES, ph * pw * ch])
    return self.proj(tf.cast(x, self.compute_dtype))

  def get_config(self):
    config = super().get_config()
    config.update(hidden_size=self.hidden_size, init_std=self.init_std)
    return config


@keras.saving.register_keras_serializable(package="m6t_tf")
class PositionEmbedding(keras.layers.Layer):
  """Learned absolute positions added to `[B, S, M]` (BERT / M6)."""

  def __init__(self, max_length: int, *, init_std: float = 0.02, **kwargs):
    super().__init__(**kwargs)
    self.max_length = max_length
    self.init_std = init_std

  def build(self, input_shape):
    self.embeddings = self.add_weight(
        name="embeddings", shape=(self.max_length, input_shape[-1]),
        initializer=keras.initializers.TruncatedNormal(stddev=self.init_std))
    self.built = True

  def call(self, x):
    s = x.shape[1]
    if s is not None and s > self.max_length:
      raise ValueError(f"sequence length {s} exceeds max_length={self.max_length}")
    return x + tf.cast(self.embeddings[:tf.shape(x)[1]], x.dtype)[None]

  def get_config(self):
    config = super().get_config()
    config.update(max_length=self.max_length, init_std=self.init_std)
    return config


def rotary(x: tf.Tensor, positions: tf.Tensor, base: float = 10000.0) -> tf.Tensor:
  """RoPE (Su et al.) on <float>[B, S, H, d] with <int>[S] positions; rotates pairs (i, i+d/2)."""
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"RoPE needs an even head size, got {d}")
  inv_freq = 1.0 / (base ** (tf.range(0, d, 2, dtype=tf.float32) / d))   # [d/2]
  angles = tf.cast(positions, tf.float32)[:, None] * inv_freq[None, :]     # [S, d/2]
  sin = tf.cast(tf.sin(angles), x.dtype)[None, :, None, :]
  cos = tf.cast(tf.cos(angles), x.dtype)[None, :, None, :]
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  return tf.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
