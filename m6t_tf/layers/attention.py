"""Multi-head self-attention for M6, with optional MoE projections (paper §3.4) and RoPE.

With `moe_projections`, each of the four linear maps Q, K, V and output is an MoE of one-matrix
experts without non-linearity (`MoE(expert_type="linear")`). The paper found this hurts quality
and stability, and that expert prototyping helps it converge; it is here to re-run Figure 4.
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from m6t_tf.layers import dropout as dropout_lib
from m6t_tf.layers import embeddings
from m6t_tf.layers import moe as moe_lib


@keras.saving.register_keras_serializable(package="m6t_tf")
class SelfAttention(keras.layers.Layer):
  """<float>[B, S, M] -> <float>[B, S, M] with an additive/boolean mask <bool>[S, S].

  Args:
    num_heads: H.
    head_size: d (H·d need not equal M, but in M6 it does: 16 × 64 = 1024).
    init_std: truncated-normal std of the projections.
    dropout_rate: dropout on attention probabilities (0.1 in M6).
    use_rope: rotary positions on Q and K (second paper) instead of learned absolute ones.
    moe_projections: None, or a dict of `MoE` keyword arguments used for Q, K, V and output.
  """

  def __init__(self, num_heads: int, head_size: int, *, init_std: float = 0.02,
               dropout_rate: float = 0.0, use_rope: bool = False,
               moe_projections: Optional[dict] = None, **kwargs):
    super().__init__(**kwargs)
    self.num_heads = num_heads
    self.head_size = head_size
    self.init_std = init_std
    self.dropout_rate = dropout_rate
    self.use_rope = use_rope
    self.moe_projections = dict(moe_projections) if moe_projections else None
    self._dropout = dropout_lib.Dropout(dropout_rate)

  def build(self, input_shape):
    m = int(input_shape[-1])
    hd = self.num_heads * self.head_size
    init = keras.initializers.TruncatedNormal(stddev=self.init_std)
    if self.moe_projections:
      make = lambda name, n: moe_lib.MoE(expert_type="linear", output_size=n, init_std=self.init_std,
                                         name=name, dtype=self.dtype_policy,
                                         **self.moe_projections)
      self.query, self.key, self.value = make("query", hd), make("key", hd), make("value", hd)
      self.output_proj = make("output", m)
      for layer in (self.query, self.key, self.value):
        layer.build((None, m))
      self.output_proj.build((None, hd))
    else:
      dense = lambda name, n: keras.layers.Dense(n, kernel_initializer=init, name=name,
                                                 dtype=self.dtype_policy)
      self.query, self.key, self.value = dense("query", hd), dense("key", hd), dense("value", hd)
      self.output_proj = dense("output", m)
      for layer in (self.query, self.key, self.value):
        layer.build((None, None, m))
      self.output_proj.build((None, None, hd))
    self.built = True

  def _project(self, layer, x, training, token_mask, capacity):
    if self.moe_projections:
      return layer(x, training=training, token_mask=token_mask, capacity=capacity)
    return layer(x)

  def call(self, x, mask, training=None, token_mask=None, cache=None, cache_index=None,
           moe_capacity=None):
    """Attention of the S positions of `x` over themselves, or over a key/value cache.

    Args:
      x: <float>[B, S, M].
      mask: <bool>[S, S] (no cache) or <bool>[S, S_cache] (with a cache): which keys each query
        sees.
      training: dropout on.
      token_mask: <bool>[B, S] tokens routed by MoE projections.
      cache: None, or {"key", "value": <float>[B, S_cache, H, d]} (incremental decoding). The
        keys and values of `x` are written at positions [cache_index, cache_index + S) and the
        queries attend over the whole updated cache (masked by `mask`).
      cache_index: <int32>[] absolute position of `x[:, 0]` (with a cache; also its RoPE offset).
      moe_capacity: C of the MoE projections for this call (None: the capacity factor).

    Returns:
      <float>[B, S, M]; with a cache, (output, updated cache).
    """
    b, s = tf.shape(x)[0], x.shape[1]
    h, d = self.num_heads, self.head_size
    split = lambda t: tf.reshape(t, [b, s, h, d])
    project = lambda layer, t: self._project(layer, t, training, token_mask, moe_capacity)
    q = split(project(self.query, x))                                     # [B, S, H, d]
    k = split(project(self.key, x))
    v = split(project(self.value, x))
    start = 0 if cache is None else cache_index
    if self.use_rope:
      positions = start + tf.range(s)
      q, k = embeddings.rotary(q, positions), embeddings.rotary(k, positions)
    if cache is not None:
      # Static shapes: the cache keeps its size and the new rows overwrite their positions.
      rows = tf.broadcast_to(tf.range(b)[:, None], [b, s])
      at = tf.stack([rows, tf.broadcast_to(start + tf.range(s)[None, :], [b, s])], -1)  # [B, S, 2]
      write = lambda buf, new: tf.tensor_scatter_nd_update(buf, at, tf.cast(new, buf.dtype))
      k = write(cache["key"], k)                                          # [B, S_cache, H, d]
      v = write(cache["value"], v)
      cache = {"key": k, "value": v}
    scores = tf.einsum("BSHd,BTHd->BHST", q, k) * tf.cast(d ** -0.5, q.dtype)
    # Softmax in float32: large negative masking values overflow float16.
    scores = tf.where(mask[None, None], tf.cast(scores, tf.float32), -1e9)
    probs = tf.cast(tf.nn.softmax(scores, axis=-1), x.dtype)
    probs = self._dropout(probs, training=training)
    ctx = tf.reshape(tf.einsum("BHST,BTHd->BSHd", probs, v), [b, s, h * d])
    out = project(self.output_proj, ctx)
    return out if cache is None else (out, cache)

  def get_config(self):
    config = super().get_config()
    config.update(num_heads=self.num_heads, head_size=self.head_size, init_std=self.init_std,
                  dropout_rate=self.dropout_rate, use_rope=self.use_rope,
                  moe_projections=self.moe_projections)
    return config
