"""The BERT-Chinese WordPiece tokenizer of M6 (21128 entries).

M6 (appendix A.1) tokenizes captions with the WordPiece vocabulary of Google's BERT-Base,
Chinese: 21128 entries, lower-cased, every CJK character a token of its own. That vocabulary
file ships inside the `cn-clip` wheel (`cn_clip/clip/vocab.txt`), which we install with
`--no-deps` as a data package: its Python package imports torch, so we locate the file through
the distribution's file list (or `sys.path`) and never import `cn_clip`.

Special ids (the BERT layout, checked at load):

    [PAD] = 0    padding; the model masks targets equal to it
    [UNK] = 100  any character or word the vocabulary cannot spell
    [CLS] = 101  first token of every caption (the model's "start of text")
    [SEP] = 102  last token of every caption (the model's "end of text")
    [MASK] = 103 unused by captioning, checked only to catch a different vocabulary

Example:

    tok = Tokenizer()
    tok.encode(["OK手势男"])          # [[8270, 2797, 1232, 4511]]  ("ok" "手" "势" "男")
    tok.encode_caption("金牌", 8)     # [101, 7032, 4277, 102]
    tok.decode([101, 7032, 4277, 102])  # "金牌"
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

VOCAB_SIZE = 21128
PAD_ID = 0
UNK_ID = 100
CLS_ID = 101
SEP_ID = 102
MASK_ID = 103
SPECIAL_TOKENS = {"[PAD]": PAD_ID, "[UNK]": UNK_ID, "[CLS]": CLS_ID, "[SEP]": SEP_ID,
                  "[MASK]": MASK_ID}

_VOCAB_DIST = "cn-clip"
_VOCAB_SUFFIX = "cn_clip/clip/vocab.txt"


def find_vocab_file() -> str:
  """Returns the path of the BERT-Chinese vocabulary shipped in the cn-clip wheel.

  Looks in the installed distribution's RECORD first (exact, and independent of `sys.path`
  order), then in every `sys.path` entry. The wheel also installs a second copy at
  `<prefix>/clip/vocab.txt`; only the one inside the package folder is used so the path does
  not depend on the install prefix layout.

  Raises:
    FileNotFoundError: cn-clip is not installed; the message says how to fix it.
  """
  try:
    files = importlib.metadata.files(_VOCAB_DIST) or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  for f in files:
    if f.as_posix().endswith(_VOCAB_SUFFIX):
      path = Path(f.locate())
      if path.is_file():
        return str(path.resolve())
  for entry in sys.path:
    path = Path(entry or ".") / _VOCAB_SUFFIX
    if path.is_file():
      return str(path.resolve())
  raise FileNotFoundError(
      f"BERT-Chinese vocabulary not found: no '{_VOCAB_SUFFIX}' in the '{_VOCAB_DIST}' "
      "distribution or on sys.path. Install it with `pip install --no-deps -r "
      "requirements-data.txt` (cn-clip==1.6.0), or pass vocab_path= explicitly.")


def load_vocab(path: str | os.PathLike) -> list[str]:
  """Reads and validates a BERT-Chinese vocabulary file (one token a line).

  Args:
    path: the vocabulary file.

  Returns:
    The 21128 tokens; the index of a token is its id.

  Raises:
    ValueError: the file is not UTF-8, does not hold exactly 21128 distinct tokens, or its
      special tokens are not at the BERT ids. The message names the file and the problem.
  """
  path = str(path)
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"vocabulary file {path!r} is not UTF-8: {e}") from None
  # Split on "\n" only: str.splitlines() would also split on characters such as U+2028 or
  # U+001C, which are legitimate vocabulary entries in some BERT vocabularies.
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  tokens = [line.rstrip("\r") for line in lines]
  if len(tokens) != VOCAB_SIZE:
    raise ValueError(f"vocabulary file {path!r} has {len(tokens)} lines; the BERT-Chinese "
                     f"vocabulary of M6 has exactly {VOCAB_SIZE}")
  for name, want in SPECIAL_TOKENS.items():
    if tokens[want] != name:
      found = tokens.index(name) if name in tokens else None
      raise ValueError(f"vocabulary file {path!r}: {name} must be at id {want} but line "
                       f"{want + 1} is {tokens[want]!r}" +
                       (f" and {name} is at id {found}" if found is not None else
                        f" and {name} is missing"))
  if len(set(tokens)) != len(tokens):
    seen, dup = set(), None
    for t in tokens:
      if t in seen:
        dup = t
        break
      seen.add(t)
    raise ValueError(f"vocabulary file {path!r} repeats the token {dup!r}")
  return tokens


def _is_cjk(ch: str) -> bool:
  """True for the CJK ideograph blocks BERT's basic tokenizer splits into single tokens."""
  cp = ord(ch)
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or
          0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or
          0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_wordish(ch: str) -> bool:
  """True if two such characters in adjacent tokens must have been separated by whitespace."""
  return ch.isalnum() and not _is_cjk(ch) and not unicodedata.category(ch).startswith("P")


class Tokenizer:
  """BERT-Chinese WordPiece tokenizer (wraps `tensorflow_text.BertTokenizer`).

  Lower-cases and strips accents exactly as Google's reference BERT tokenizer does
  (BERT-Base, Chinese is an uncased model: Google lists `chinese_L-12_H-768_A-12` among the
  `do_lower_case=True` checkpoints, and the vocabulary has no upper-case entries), splits every
  CJK character into its own token, and maps what the vocabulary cannot spell to [UNK]. Ids
  match the reference tokenizer on every Chinese name of the `emoji` package and on
  full-width text.

  Attributes:
    vocab_path: the vocabulary file in use.
    vocab_size: 21128.
    pad_id, unk_id, cls_id, sep_id, mask_id: the special ids (0, 100, 101, 102, 103).
  """

  def __init__(self, vocab_path: str | os.PathLike | None = None, *, lower_case: bool = True):
    """Loads and validates the vocabulary.

    Args:
      vocab_path: a vocabulary file; default: the one in the installed cn-clip wheel.
      lower_case: lower-case and strip accents before WordPiece (True for BERT-Chinese).

    Raises:
      FileNotFoundError: no vocab_path given and cn-clip is not installed.
      ValueError: the vocabulary file is malformed (see `load_vocab`).
    """
    # Imported here so that readers of records (pipeline.py, the trainer) do not pay for
    # loading tensorflow_text's custom ops.
    import tensorflow_text  # pylint: disable=g-import-not-at-top

    self.vocab_path = str(vocab_path) if vocab_path is not None else find_vocab_file()
    self.lower_case = lower_case
    self._tokens = load_vocab(self.vocab_path)
    self.vocab_size = len(self._tokens)
    self.pad_id, self.unk_id, self.cls_id = PAD_ID, UNK_ID, CLS_ID
    self.sep_id, self.mask_id = SEP_ID, MASK_ID
    # An in-memory table rather than the file path: the path would otherwise be baked into
    # any graph that captures the tokenizer and break when the venv moves.
    table = tf.lookup.StaticVocabularyTable(
        tf.lookup.KeyValueTensorInitializer(
            keys=tf.constant(self._tokens, tf.string),
            values=tf.range(self.vocab_size, dtype=tf.int64)),
        num_oov_buckets=1)
    # lower_case=False here, with lower-casing and accent stripping done in `tokenize`:
    # tensorflow_text's lower_case=True folds with NFKC, which maps full-width punctuation
    # and digits ("，" "！" "１") to ASCII ids, unlike Google's BERT tokenizer (lower(), NFD,
    # drop combining marks) that produced the M6 vocabulary ids.
    self._bert = tensorflow_text.BertTokenizer(
        table, token_out_type=tf.int64, unknown_token="[UNK]", lower_case=False)
    self._normalize_utf8 = tensorflow_text.normalize_utf8

  def id_to_token(self, token_id: int) -> str:
    """The vocabulary entry of `token_id` (e.g. "##s", "[SEP]", "金")."""
    if not 0 <= int(token_id) < self.vocab_size:
      raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
    return self._tokens[int(token_id)]

  def tokenize(self, texts: tf.Tensor) -> tf.RaggedTensor:
    """Graph-safe WordPiece ids, without [CLS]/[SEP].

    Args:
      texts: <string>[N] UTF-8 strings.

    Returns:
      <int32>[N, (L)] ragged ids.
    """
    texts = tf.convert_to_tensor(texts, tf.string)
    if self.lower_case:
      texts = tf.strings.lower(texts, encoding="utf-8")
      texts = self._normalize_utf8(texts, "NFD")
      texts = tf.strings.regex_replace(texts, r"\p{Mn}", "")
    pieces = self._bert.tokenize(texts)  # [N, (words), (pieces)]
    return tf.cast(pieces.merge_dims(-2, -1), tf.int32)

  def encode(self, texts: Sequence[str] | tf.Tensor) -> list[list[int]] | tf.RaggedTensor:
    """WordPiece ids of each text, without [CLS]/[SEP] and without padding.

    Args:
      texts: a list of str (Python in, Python out) or a <string>[N] tensor (tensor in,
        tensor out).

    Returns:
      list of id lists for a Python list; <int32>[N, (L)] RaggedTensor for a tensor.
    """
    if isinstance(texts, str):
      raise TypeError("encode() takes a list of strings; use encode([text])[0] for one text")
    if isinstance(texts, (tf.Tensor, tf.RaggedTensor)):
      return self.tokenize(texts)
    texts = list(texts)
    if not texts:
      return []
    return self.tokenize(tf.constant(texts, tf.string)).to_list()

  def encode_caption(self, text: str, max_len: int, *, truncate: bool = True) -> list[int]:
    """`[CLS] ids... [SEP]` for one caption, at most `max_len` ids.

    Args:
      text: the caption.
      max_len: the largest allowed length, [CLS] and [SEP] included (>= 3).
      truncate: cut the caption's ids to `max_len - 2` and keep the final [SEP] (True), or raise
        (False).

    Returns:
      The ids, starting with 101 and ending with 102.

    Raises:
      ValueError: `max_len < 3`, the text is empty or tokenizes to nothing, or it is too long
        and `truncate` is False.
    """
    if max_len < 3:
      raise ValueError(f"max_len={max_len}: a caption needs [CLS], one token and [SEP]")
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"empty caption: {text!r}")
    ids = self.encode([text])[0]
    if not ids:
      raise ValueError(f"caption {text!r} has no tokens after WordPiece")
    if len(ids) + 2 > max_len:
      if not truncate:
        raise ValueError(f"caption {text!r} has {len(ids) + 2} tokens with [CLS]/[SEP], "
                         f"more than max_len={max_len}")
      ids = ids[:max_len - 2]
    return [CLS_ID] + ids + [SEP_ID]

  def decode(self, ids: Sequence[int] | np.ndarray | tf.Tensor, *,
             skip_special_tokens: bool = True) -> str:
    """Text of a sequence of ids: CJK pieces joined without spaces, "##" pieces glued on.

    A space is put back only between two pieces that both touch an alphanumeric non-CJK
    character ("new york"), since the basic tokenizer separates those only at whitespace.
    The text comes back lower-cased, as the tokenizer saw it.

    Args:
      ids: <int>[L] ids (list, NumPy array or tensor).
      skip_special_tokens: drop [PAD], [CLS], [SEP] and [MASK] ([UNK] is always kept).

    Returns:
      The decoded string.
    """
    if isinstance(ids, (tf.Tensor, tf.Variable)):
      ids = ids.numpy()
    ids = np.asarray(ids).reshape(-1).tolist()
    skip = {PAD_ID, CLS_ID, SEP_ID, MASK_ID} if skip_special_tokens else set()
    out: list[str] = []
    for i in ids:
      if i in skip:
        continue
      piece = self.id_to_token(i)
      if piece.startswith("##") and out:
        out.append(piece[2:])
        continue
      if out and out[-1] and _is_wordish(out[-1][-1]) and _is_wordish(piece[0]):
        out.append(" ")
      out.append(piece)
    return "".join(out)
