"""WordPiece ids back to text with TensorFlow ops only (for the serving graph).

`Tokenizer.decode` is Python; the SavedModel of `m6t_tf.export` must turn ids into text inside
the graph, with nothing but TensorFlow at load time (no tensorflow_text ops). `Detokenizer`
computes the same function from three constant per-id tables made from the vocabulary: the
piece's text (without a leading "##"), whether it is a "##" continuation, and whether its first
and last characters are "wordish" (alphanumeric, not CJK, not punctuation). A piece is glued to
the previous one, except that a space goes between two wordish characters ("new york"); CJK
characters are never separated. tests/test_generate.py checks it against `Tokenizer.decode`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from m6t_tf.data import tokenizer as tokenizer_lib


class Detokenizer(tf.Module):
  """<int32>[N, L] ids -> <string>[N] text; special tokens ([PAD] [CLS] [SEP] [MASK]) dropped.

  Args:
    vocab: the vocabulary (list of 21128 tokens), e.g. `tokenizer_lib.load_vocab(path)`.
  """

  def __init__(self, vocab: list[str], name: str = "detokenizer"):
    super().__init__(name=name)
    cont = np.array([t.startswith("##") for t in vocab])
    text = [t[2:] if c else t for t, c in zip(vocab, cont)]
    wordish = tokenizer_lib._is_wordish  # pylint: disable=protected-access
    self._full = tf.constant(vocab, tf.string)                      # first piece keeps its "##"
    self._text = tf.constant(text, tf.string)
    self._cont = tf.constant(cont)
    self._first_wordish = tf.constant([bool(t) and wordish(t[0]) for t in vocab])
    self._last_wordish = tf.constant([bool(t) and wordish(t[-1]) for t in text])
    skip = np.zeros(len(vocab), bool)
    skip[[tokenizer_lib.PAD_ID, tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID,
          tokenizer_lib.MASK_ID]] = True
    self._skip = tf.constant(skip)

  def __call__(self, ids: tf.Tensor) -> tf.Tensor:
    ids = tf.cast(ids, tf.int32)
    kept = tf.ragged.boolean_mask(ids, ~tf.gather(self._skip, ids))          # [N, (L)]
    flat = kept.flat_values
    starts = tf.cast(tf.gather(kept.row_starts(), kept.value_rowids()), tf.int32)
    first = tf.range(tf.size(flat)) == starts
    cont = tf.gather(self._cont, flat)
    glued = tf.logical_and(cont, ~first)                                    # "##x" after a piece
    piece = tf.where(glued, tf.gather(self._text, flat), tf.gather(self._full, flat))
    # `Tokenizer.decode` looks at the last character of what it appended before: the piece's
    # text ("##" stripped), or the whole first piece — the same last character either way.
    prev_last = tf.gather(self._last_wordish, tf.concat([[0], flat[:-1]], 0))
    space = tf.logical_and(tf.logical_and(~first, ~glued),
                           tf.logical_and(prev_last, tf.gather(self._first_wordish, flat)))
    piece = tf.where(space, tf.strings.join([" ", piece]), piece)
    return tf.strings.reduce_join(kept.with_flat_values(piece), axis=-1)
