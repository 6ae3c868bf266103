"""RoPE (`embeddings.rotary`) against a NumPy reference, and its relative-position property.

Convention: m6t_tf implements the *half-split* layout (GPT-NeoX, LLaMA in Hugging Face):
feature j and feature j + d/2 form one rotated pair, turned by position · 10000^(−2j/d).
The other common layout, *interleaved* pairs (2j, 2j+1) of the RoFormer paper and Meta's
LLaMA code, gives different numbers for the same weights; checkpoints converted between the two
need their Q/K columns permuted. The reference (`numpy_reference.rotary_half_split`) multiplies
complex numbers x_j + i·x_{j+d/2} by e^{iθ}, independently of the sin/cos code under test.
"""

import numpy as np
import tensorflow as tf

from m6t_tf.layers import embeddings
from tests import numpy_reference as ref


def _rotate(x, positions):
  return embeddings.rotary(tf.constant(x), tf.constant(positions, tf.int32)).numpy()


class RotaryTest(tf.test.TestCase):

  def test_values_match_reference(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)     # [B, S, H, d]
    for positions in (np.arange(6), np.array([0, 1, 5, 17, 64, 142])):  # 142: 16 patches + 127
      self.assertAllClose(_rotate(x, positions), ref.rotary_half_split(x, positions),
                          rtol=1e-6, atol=1e-6, msg=f"positions {positions}")

  def test_hand_computed_half_split_pairs(self):
    # d = 4: frequencies 1 and 10000^(-1/2) = 0.01 rad per position. A unit vector on feature 0
    # turns into feature 2 (its pair j + d/2), not into feature 1 (the interleaved pair).
    x = np.zeros((1, 1, 1, 4), np.float32)
    x[..., 0] = 1.0
    x[..., 1] = 1.0
    got = _rotate(x, [3])[0, 0, 0]
    self.assertAllClose(got, [np.cos(3.0), np.cos(0.03), np.sin(3.0), np.sin(0.03)],
                        rtol=1e-6, atol=1e-7)

  def test_position_zero_is_identity_and_norms_are_kept(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 2, 16)).astype(np.float32)
    self.assertAllClose(_rotate(x, [0, 0, 0, 0]), x, rtol=0, atol=0)
    y = _rotate(x, [3, 11, 40, 100])
    self.assertAllClose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-6)

  def test_scores_depend_only_on_relative_position(self):
    rng = np.random.default_rng(2)
    d = 16
    q = rng.normal(size=d).astype(np.float32)
    k = rng.normal(size=d).astype(np.float32)

    def score(m, n):   # q at position m, k at position n
      qm = _rotate(q.reshape(1, 1, 1, d), [m]).reshape(d).astype(np.float64)
      kn = _rotate(k.reshape(1, 1, 1, d), [n]).reshape(d).astype(np.float64)
      return qm @ kn

    for offset in (0, 1, 5, 37):
      scores = [score(n + offset, n) for n in (0, 3, 20, 90)]
      self.assertAllClose(scores, [scores[0]] * 4, rtol=1e-6, atol=0, msg=f"offset {offset}")
      # ... and equal the reference's score at that offset from position 0.
      want = (ref.rotary_half_split(q.reshape(1, 1, 1, d), [offset]).reshape(d)
              @ k.astype(np.float64))
      self.assertAllClose(scores[0], want, rtol=1e-6, atol=0)
    # The score does change with the offset (the property is not met by a constant).
    self.assertGreater(abs(score(5, 0) - score(0, 0)), 0.1)

  def test_odd_head_size_is_rejected(self):
    with self.assertRaisesRegex(ValueError, "even head size, got 5"):
      embeddings.rotary(tf.zeros([1, 2, 1, 5]), tf.range(2))


if __name__ == "__main__":
  tf.test.main()
