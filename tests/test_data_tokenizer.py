"""Tests of m6t_tf.data.tokenizer: the BERT-Chinese vocabulary and WordPiece round trips."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from m6t_tf.data import demo, tokenizer  # pylint: disable=g-import-not-at-top

_TOK = None


def _tok() -> tokenizer.Tokenizer:
  global _TOK
  if _TOK is None:
    _TOK = tokenizer.Tokenizer()
  return _TOK


class VocabTest(tf.test.TestCase):

  def test_size_and_special_ids(self):
    tok = _tok()
    self.assertEqual(tok.vocab_size, 21128)
    self.assertEqual((tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id),
                     (0, 100, 101, 102, 103))
    for name, i in tokenizer.SPECIAL_TOKENS.items():
      self.assertEqual(tok.id_to_token(i), name)

  def test_found_in_the_wheel_without_importing_cn_clip(self):
    path = tokenizer.find_vocab_file()
    self.assertTrue(path.replace(os.sep, "/").endswith("cn_clip/clip/vocab.txt"), path)
    # Importing cn_clip would import torch, which is not installed.
    self.assertNotIn("cn_clip", sys.modules)

  def _write_vocab(self, tokens):
    path = os.path.join(self.get_temp_dir(), "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(tokens) + "\n")
    return path

  def test_wrong_line_count_raises(self):
    tokens = tokenizer.load_vocab(tokenizer.find_vocab_file())
    path = self._write_vocab(tokens[:-1])
    with self.assertRaisesRegex(ValueError, r"vocab\.txt.*21127 lines.*21128"):
      tokenizer.Tokenizer(path)

  def test_moved_special_token_raises(self):
    tokens = tokenizer.load_vocab(tokenizer.find_vocab_file())
    tokens[101], tokens[102] = tokens[102], tokens[101]
    path = self._write_vocab(tokens)
    with self.assertRaisesRegex(ValueError, r"vocab\.txt.*\[CLS\] must be at id 101.*\[SEP\]"):
      tokenizer.Tokenizer(path)

  def test_duplicate_token_raises(self):
    tokens = tokenizer.load_vocab(tokenizer.find_vocab_file())
    tokens[5000] = tokens[5001]
    with self.assertRaisesRegex(ValueError, "repeats the token"):
      tokenizer.load_vocab(self._write_vocab(tokens))

  def test_not_utf8_raises(self):
    path = os.path.join(self.get_temp_dir(), "bad.txt")
    with open(path, "wb") as f:
      f.write(b"\xff\xfe[PAD]\n")
    with self.assertRaisesRegex(ValueError, "bad.txt.*not UTF-8"):
      tokenizer.load_vocab(path)


class EncodeDecodeTest(tf.test.TestCase):

  def test_pinned_ids(self):
    tok = _tok()
    # Ids checked against the vocabulary lines (line = id + 1) and Google's reference
    # BERT tokenizer; "！" must stay full-width (8013), not fold to "!" (106).
    self.assertEqual(tok.encode(["金牌", "OK手势男", "你好！"]),
                     [[7032, 4277], [8270, 2797, 1232, 4511], [872, 1962, 8013]])
    self.assertEqual([tok.id_to_token(i) for i in (7032, 4277, 8270, 8013)],
                     ["金", "牌", "ok", "！"])

  def test_round_trip_on_chinese_emoji_names(self):
    tok = _tok()
    with open(demo.emoji_zh_file(), encoding="utf-8") as f:
      names = sorted({demo.caption_from_name(v) for v in json.load(f).values()})
    self.assertGreater(len(names), 3000)
    ids = tok.encode(names)
    with_unk = [n for n, x in zip(names, ids) if tok.unk_id in x]
    self.assertLessEqual(len(with_unk), 5, with_unk)  # e.g. "龇" is not in the vocabulary
    for name, x in zip(names, ids):
      if name in with_unk:
        continue
      self.assertEqual(tok.decode(x), name.lower())
      if all(tokenizer._is_cjk(c) for c in name):
        self.assertLen(x, len(name))  # one token per Chinese character

  def test_tensor_in_ragged_out(self):
    out = _tok().encode(tf.constant(["金牌", "跳舞的男人较浅肤色"]))
    self.assertIsInstance(out, tf.RaggedTensor)
    self.assertEqual(out.dtype, tf.int32)
    self.assertEqual(out.row_lengths().numpy().tolist(), [2, 9])

  def test_decode_wordpieces_and_spaces(self):
    tok = _tok()
    for text in ("unaffable running", "new york纽约", "a-b", "ab型血", "按键10"):
      ids = tok.encode([text])[0]
      self.assertEqual(tok.decode(ids), text)
    self.assertTrue(any(tok.id_to_token(i).startswith("##")
                        for i in tok.encode(["unaffable"])[0]))
    self.assertEqual(tok.decode([101, 7032, 4277, 102, 0, 0]), "金牌")
    self.assertEqual(tok.decode([101, 7032, 102], skip_special_tokens=False), "[CLS]金[SEP]")
    self.assertEqual(tok.decode(tf.constant([7032, 100])), "金[UNK]")
    with self.assertRaisesRegex(ValueError, "outside the vocabulary"):
      tok.decode([21128])

  def test_encode_caption(self):
    tok = _tok()
    self.assertEqual(tok.encode_caption("金牌", 8), [101, 7032, 4277, 102])
    # Truncation keeps the final [SEP].
    ids = tok.encode_caption("跳舞的男人", 4)
    self.assertEqual(ids, [101, 6663, 5659, 102])
    self.assertEqual([tok.id_to_token(i) for i in ids], ["[CLS]", "跳", "舞", "[SEP]"])
    with self.assertRaisesRegex(ValueError, "more than max_len=4"):
      tok.encode_caption("跳舞的男人", 4, truncate=False)
    with self.assertRaisesRegex(ValueError, "empty caption"):
      tok.encode_caption("   ", 8)
    with self.assertRaisesRegex(ValueError, "max_len=2"):
      tok.encode_caption("金牌", 2)
    with self.assertRaises(TypeError):
      tok.encode("金牌")


if __name__ == "__main__":
  tf.test.main()
