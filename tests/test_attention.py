"""Self-attention with RoPE against a NumPy forward pass (float64).

Checks where the rotary positions enter: on Q and K (not V), per head, at positions 0..S-1, before
the 1/√d scaling, under a causal mask. The rotation is the half-split reference of
`numpy_reference.rotary_half_split` (see tests/test_embeddings.py for the convention).
"""

import numpy as np
import tensorflow as tf

from m6t_tf.layers import attention
from tests import numpy_reference as ref


def _reference(x, weights, mask, num_heads, head_size, use_rope):
  b, s, _ = x.shape
  proj = lambda name: (x @ weights[name + "/kernel"] + weights[name + "/bias"]).reshape(
      b, s, num_heads, head_size)
  q, k, v = proj("query"), proj("key"), proj("value")
  if use_rope:
    q, k = ref.rotary_half_split(q, np.arange(s)), ref.rotary_half_split(k, np.arange(s))
  scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(head_size)
  scores = np.where(mask[None, None], scores, -np.inf)
  probs = ref.softmax(scores, axis=-1)
  ctx = np.einsum("bhst,bthd->bshd", probs, v).reshape(b, s, num_heads * head_size)
  return ctx @ weights["output/kernel"] + weights["output/bias"]


class RopeAttentionTest(tf.test.TestCase):

  def test_matches_numpy_forward(self):
    rng = np.random.default_rng(0)
    b, s, m, h, d = 2, 7, 6, 2, 4
    x = rng.normal(size=(b, s, m)).astype(np.float32)
    mask = np.tril(np.ones((s, s), bool))
    got = {}
    for use_rope in (True, False):
      layer = attention.SelfAttention(h, d, use_rope=use_rope, init_std=0.5)
      layer.build((None, s, m))
      rng_w = np.random.default_rng(1)   # the same weights for both layers
      weights = {}
      for sub in (layer.query, layer.key, layer.value, layer.output_proj):
        sub.kernel.assign(rng_w.normal(scale=0.5, size=sub.kernel.shape).astype(np.float32))
        sub.bias.assign(rng_w.normal(size=sub.bias.shape).astype(np.float32))
        weights[sub.name + "/kernel"] = sub.kernel.numpy().astype(np.float64)
        weights[sub.name + "/bias"] = sub.bias.numpy().astype(np.float64)
      got[use_rope] = layer(tf.constant(x), tf.constant(mask), training=False).numpy()
      want = _reference(x.astype(np.float64), weights, mask, h, d, use_rope)
      self.assertAllClose(got[use_rope], want, rtol=1e-5, atol=1e-5, msg=f"use_rope={use_rope}")
    # Under the causal mask the first token sees only itself at position 0, where RoPE is the
    # identity; every later token's output changes with RoPE.
    self.assertAllClose(got[True][:, 0], got[False][:, 0], rtol=1e-5, atol=1e-6)
    for t in range(1, s):
      self.assertNotAllClose(got[True][:, t], got[False][:, t], atol=1e-3)

if __name__ == "__main__":
  tf.test.main()
