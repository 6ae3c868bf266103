"""Tests of m6t_tf.data.records: the TFRecord format, its checks and the atomic writer."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from m6t_tf.data import records  # pylint: disable=g-import-not-at-top

IDS = [101, 7032, 4277, 102]


def _raw_example(key="bad-1", **features) -> bytes:
  """A hand-made record, bypassing make_example's checks."""
  feats = {"key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()]))}
  for name, value in features.items():
    if isinstance(value, bytes):
      feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    elif value and isinstance(value[0], float):
      feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=value))
    else:
      feats[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=value))
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


class RoundTripTest(tf.test.TestCase):

  def test_pixels(self):
    image = np.random.default_rng(0).integers(0, 256, [5, 7, 3], dtype=np.uint8)
    ex = records.make_example(key="a/b.png", caption="金牌", caption_ids=IDS, image=image)
    out = records.parse_example(ex.SerializeToString())
    self.assertAllEqual(out["image"], image)
    self.assertEqual(out["image"].dtype, tf.uint8)
    self.assertAllEqual(out["caption_ids"], IDS)
    self.assertEqual(out["caption_ids"].dtype, tf.int32)
    self.assertEqual(out["caption"].numpy().decode(), "金牌")
    self.assertEqual(out["key"].numpy(), b"a/b.png")
    static = records.parse_example(ex.SerializeToString(), image_size=(5, 7))
    self.assertEqual(static["image"].shape, (5, 7, 3))

  def test_features_and_both(self):
    feats = np.arange(16 * 3, dtype=np.float32).reshape(16, 3) / 7
    image = np.zeros([2, 2, 3], np.uint8)
    ser = records.make_example(key="k", caption="c", caption_ids=IDS, image=image,
                               patch_features=feats).SerializeToString()
    out = records.parse_example(ser, image_mode="features", feature_dim=3)
    self.assertAllClose(out["patch_features"], feats)
    self.assertEqual(out["patch_features"].shape, (16, 3))
    self.assertAllEqual(records.parse_example(ser)["image"], image)

  def test_written_and_read_back(self):
    path = os.path.join(self.get_temp_dir(), records.shard_name("train", 0, 1))
    exs = [records.make_example(key=f"k{i}", caption="c", caption_ids=[101, 200 + i, 102],
                                image=np.full([2, 3, 3], i, np.uint8)) for i in range(5)]
    self.assertEqual(records.write_records(path, exs), 5)
    got = [records.parse_example(s) for s in records.read_serialized(path)]
    self.assertEqual([int(g["caption_ids"][1]) for g in got], [200, 201, 202, 203, 204])
    self.assertEqual([int(g["image"][0, 0, 0]) for g in got], [0, 1, 2, 3, 4])


class MakeExampleChecksTest(tf.test.TestCase):

  def test_rejects(self):
    img = np.zeros([2, 2, 3], np.uint8)
    cases = [
        (dict(caption_ids=[], image=img), "needs at least"),
        (dict(caption_ids=[101, 102], image=img), "needs at least \\[CLS\\], one token"),
        (dict(caption_ids=[101] + [7032] * 511 + [102], image=img), "more than MAX_CAPTION"),
        (dict(caption_ids=[7032, 4277, 102], image=img), "start with \\[CLS\\]"),
        (dict(caption_ids=[101, 7032, 4277], image=img), "end\\s+with \\[SEP\\]"),
        (dict(caption_ids=[101, 0, 102], image=img), "no \\[PAD\\]"),
        (dict(caption_ids=[101, 21128, 102], image=img), "in \\[0, 21128\\)"),
        (dict(caption_ids=IDS, image=img.astype(np.float32)), "must be uint8"),
        (dict(caption_ids=IDS, image=img[..., :2]), "\\[H, W, 3\\]"),
        (dict(caption_ids=IDS, patch_features=np.zeros([15, 4])), "\\[16, P\\]"),
        (dict(caption_ids=IDS, patch_features=np.full([16, 2], np.nan)), "NaN"),
        (dict(caption_ids=IDS), "needs image pixels or patch_features"),
    ]
    for kwargs, pattern in cases:
      with self.subTest(pattern=pattern):
        with self.assertRaisesRegex(ValueError, "record 'rec-7'.*" + pattern):
          records.make_example(key="rec-7", caption="金牌", **kwargs)
    with self.assertRaisesRegex(ValueError, "empty caption"):
      records.make_example(key="rec-7", caption=" ", caption_ids=IDS, image=img)


class ParseChecksTest(tf.test.TestCase):
  """Malformed records fail with a message that names the record's key."""

  def _assert_fails(self, serialized, pattern, **kwargs):
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, pattern + r"(.|\n)*bad-1"):
      records.parse_example(serialized, **kwargs)
    # Same inside a tf.data graph, where the trainer meets it.
    ds = tf.data.Dataset.from_tensors(serialized).map(
        lambda s: records.parse_example(s, **kwargs))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, pattern + r"(.|\n)*bad-1"):
      list(ds)

  def test_wrong_byte_count(self):
    ser = _raw_example(image=b"\0" * 17, height=[2], width=[3], caption_ids=IDS)
    self._assert_fails(ser, "image byte count")

  def test_missing_height(self):
    ser = _raw_example(image=b"\0" * 18, caption_ids=IDS)
    self._assert_fails(ser, "height/width")

  def test_unexpected_size(self):
    ser = _raw_example(image=b"\0" * 18, height=[2], width=[3], caption_ids=IDS)
    self._assert_fails(ser, "image size differs", image_size=(3, 2))

  def test_empty_caption_ids(self):
    ser = _raw_example(image=b"\0" * 18, height=[2], width=[3])
    self._assert_fails(ser, "caption_ids need at least")

  def test_caption_ids_without_sep(self):
    ser = _raw_example(image=b"\0" * 18, height=[2], width=[3], caption_ids=[101, 5, 6])
    self._assert_fails(ser, "end with \\[SEP\\]")

  def test_features_length(self):
    ser = _raw_example(patch_features=[0.5] * 31, feature_dim=[2], caption_ids=IDS)
    self._assert_fails(ser, "patch_features length", image_mode="features")


class CheckExampleTest(tf.test.TestCase):
  """check_example names the first reason that applies, and raises only for unparseable bytes."""

  def _reason(self, image_mode="pixels", **changes):
    if image_mode == "pixels":
      feats = dict(image=b"\0" * 18, height=[2], width=[3], caption_ids=IDS, caption=b"c")
      kwargs = dict(image_size=(2, 3))
    else:
      feats = dict(patch_features=[0.5] * 32, feature_dim=[2], caption_ids=IDS, caption=b"c")
      kwargs = dict(feature_dim=2)
    feats.update(changes)
    feats = {k: v for k, v in feats.items() if v is not None}
    vocab_size = feats.pop("vocab_size", 21128)
    _, reason = records.check_example(_raw_example(**feats), image_mode=image_mode,
                                      max_caption_ids=6, vocab_size=vocab_size, **kwargs)
    reason = int(reason)
    return "good" if reason == records.GOOD else records.REASON_NAMES[reason]

  def test_pixels_and_captions(self):
    cases = [
        ({}, "good"),
        (dict(image=None), "missing_image"),
        (dict(height=None), "missing_image"),
        (dict(image=b"\0" * 17), "bad_image"),
        (dict(height=[2**40], width=[1]), "bad_image"),  # no int64 overflow in h * w * 3
        (dict(height=[3], width=[2]), "wrong_image_size"),
        (dict(caption_ids=[101, 102]), "empty_caption"),
        (dict(caption_ids=None), "empty_caption"),
        (dict(caption_ids=[101] + [7032] * 5 + [102]), "caption_too_long"),
        (dict(caption_ids=[101, -1, 102]), "id_out_of_vocab"),
        (dict(caption_ids=[101, 21128, 102]), "id_out_of_vocab"),
        (dict(caption_ids=IDS, vocab_size=7000), "id_out_of_vocab"),
        (dict(caption_ids=[101, 7032, 101, 102]), "malformed_caption_ids"),
        (dict(caption_ids=[7032, 4277, 102]), "malformed_caption_ids"),
        (dict(caption=b"\xc0\xaf"), "caption_not_utf8"),  # an overlong "/"
        (dict(caption=b"\xed\xa0\x80"), "caption_not_utf8"),  # a UTF-16 surrogate
        (dict(caption="café \ufffd".encode()), "good"),  # U+FFFD itself is text
        (dict(image=b"\0" * 17, caption_ids=[101, 102]), "bad_image"),  # the first reason
    ]
    for changes, want in cases:
      with self.subTest(changes=changes):
        self.assertEqual(self._reason(**changes), want)

  def test_features(self):
    cases = [
        ({}, "good"),
        (dict(feature_dim=None), "missing_image"),
        (dict(patch_features=[0.5] * 31), "bad_image"),
        (dict(patch_features=[0.5] * 31 + [float("nan")]), "bad_image"),
        (dict(patch_features=[0.5] * 48, feature_dim=[3]), "wrong_image_size"),
    ]
    for changes, want in cases:
      with self.subTest(changes=changes):
        self.assertEqual(self._reason("features", **changes), want)

  def test_unparseable_bytes_raise_a_readable_error(self):
    # The parser's own message quotes the bytes; invalid UTF-8 there used to surface as a
    # UnicodeDecodeError.
    for serialized in (b"\xff\xfe not a proto", _raw_example(caption_ids=b"\xff")):
      with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "not a tf.train.Example"):
        records.check_example(serialized)


class WriterAndSplitTest(tf.test.TestCase):

  def test_atomic_write(self):
    path = os.path.join(self.get_temp_dir(), "x.tfrecord")
    ex = records.make_example(key="k", caption="c", caption_ids=IDS,
                              image=np.zeros([1, 1, 3], np.uint8))
    with records.RecordWriter(path) as w:
      w.write(ex)
      self.assertFalse(os.path.exists(path))  # readers never see a partial shard
      self.assertTrue(os.path.exists(w.tmp_path))
      self.assertTrue(w.tmp_path.endswith(f".tmp-{os.getpid()}"))
    self.assertTrue(os.path.exists(path))
    self.assertFalse(os.path.exists(w.tmp_path))

    # A failure inside the block keeps the old file and leaves no temporary one.
    with self.assertRaises(RuntimeError):
      with records.RecordWriter(path) as w2:
        w2.write(ex)
        w2.write(ex)
        raise RuntimeError("crash")
    self.assertLen(records.read_serialized(path), 1)
    self.assertFalse(os.path.exists(w2.tmp_path))

  def test_split_is_deterministic_and_proportional(self):
    keys = [f"img{i}.png" for i in range(20000)]
    held = [k for k in keys if records.is_validation(k, 0.1)]
    self.assertBetween(len(held) / len(keys), 0.09, 0.11)
    self.assertEqual(held, [k for k in keys if records.is_validation(k, 0.1)])
    self.assertFalse(any(records.is_validation(k, 0.0) for k in keys[:100]))
    self.assertTrue(all(records.is_validation(k, 1.0) for k in keys[:100]))

  def test_shard_name(self):
    self.assertEqual(records.shard_name("train", 3, 8), "train-00003-of-00008.tfrecord")
    with self.assertRaises(ValueError):
      records.shard_name("train", 8, 8)

  def test_list_files_raises_when_empty(self):
    with self.assertRaisesRegex(FileNotFoundError, "no TFRecord files"):
      records.list_files(os.path.join(self.get_temp_dir(), "nothing-*.tfrecord"))


if __name__ == "__main__":
  tf.test.main()
