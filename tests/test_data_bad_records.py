"""Tests of bad-record handling in m6t_tf.data.pipeline: skip and count, or fail by name.

Every test builds its own small TFRecord files: good records, records that break one rule each,
and files damaged at the byte level (a flipped byte breaks a CRC; files cut inside a record's
data and inside its header).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from m6t_tf.data import pipeline, records  # pylint: disable=g-import-not-at-top

H, W = 2, 3
MAX_CAPTION_IDS = 12  # small, so an over-long caption stays small


def _good(i: int) -> bytes:
  """Good record i: caption_ids [CLS] 1000+i [SEP], pixels all equal to i."""
  return records.make_example(key=f"good{i}", caption=f"caption {i}",
                              caption_ids=[101, 1000 + i, 102],
                              image=np.full([H, W, 3], i, np.uint8)).SerializeToString()


def _raw(key: str, **changes) -> bytes:
  """A record bypassing make_example's checks: a good one with features changed (None
  removes one)."""
  features = {"key": key.encode(), "caption": b"a caption", "caption_ids": [101, 2000, 102],
              "image": bytes(H * W * 3), "height": [H], "width": [W]}
  features.update(changes)
  feats = {}
  for name, value in features.items():
    if value is None:
      continue
    if isinstance(value, bytes):
      feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    elif isinstance(value[0], float):
      feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=value))
    else:
      feats[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=value))
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


# One record for each way a record can be bad: name -> (serialized, reason).
BAD = {
    "garbage": (b"\x0a\x05garbage and more", "not_an_example"),
    "wrong_type": (_raw("wrong_type", caption_ids=b"\x65\x66"), "not_an_example"),
    "no_image": (_raw("no_image", image=None), "missing_image"),
    "no_height": (_raw("no_height", height=None), "missing_image"),
    "byte_count": (_raw("byte_count", image=bytes(H * W * 3 - 1)), "bad_image"),
    "other_size": (_raw("other_size", height=[W], width=[H]), "wrong_image_size"),
    "empty_caption": (_raw("empty_caption", caption_ids=[101, 102]), "empty_caption"),
    "no_caption_ids": (_raw("no_caption_ids", caption_ids=None), "empty_caption"),
    "too_long": (_raw("too_long", caption_ids=[101] + [2000] * MAX_CAPTION_IDS + [102]),
                 "caption_too_long"),
    "out_of_vocab": (_raw("out_of_vocab", caption_ids=[101, 21128, 102]), "id_out_of_vocab"),
    # 2**32 + 2000 would wrap to the valid id 2000 in int32: checked in int64.
    "huge_id": (_raw("huge_id", caption_ids=[101, 2**32 + 2000, 102]), "id_out_of_vocab"),
    "pad_inside": (_raw("pad_inside", caption_ids=[101, 2000, 0, 102]),
                   "malformed_caption_ids"),
    "not_utf8": (_raw("not_utf8", caption=b"caf\xe9 \xff"), "caption_not_utf8"),
}


def _offsets(serialized: list[bytes]) -> list[int]:
  """Byte offset of each record in a TFRecord file (12 bytes of header, data, 4 of CRC)."""
  out, pos = [], 0
  for s in serialized:
    out.append(pos)
    pos += len(s) + 16
  return out


class BadRecordsTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.get_temp_dir()
    # "mixed": a good record before every bad one, and one more good at the end.
    mixed, self.good_ids = [], []
    for i, (serialized, _) in enumerate(BAD.values()):
      mixed += [_good(i), serialized]
      self.good_ids.append(i)
    mixed.append(_good(50))
    self.good_ids.append(50)
    self._write("a-mixed", mixed)
    # Three damaged copies of 4 good records: records 2 and 3, 3, and 3 are lost.
    four = [_good(60 + i) for i in range(4)]
    start = _offsets(four)
    data = b"".join(self._frame(s) for s in four)
    crc = bytearray(data)
    crc[start[2] + 12 + 5] ^= 0xFF  # in record 2's data: its CRC no longer matches
    self._write_bytes("b-crc", bytes(crc))
    self._write_bytes("c-cut-data", data[:start[3] + 12 + 5])  # inside record 3's data
    self._write_bytes("d-cut-header", data[:start[3] + 5])  # inside record 3's header
    self.good_ids += [60, 61] + [60, 61, 62] * 2
    self._write("e-clean", [_good(70 + i) for i in range(3)])
    self.good_ids += [70, 71, 72]
    self.pattern = os.path.join(self.dir, "*.tfrecord")
    self.expected = dict.fromkeys(records.REASON_NAMES, 0)
    for _, reason in BAD.values():
      self.expected[reason] += 1
    self.expected["corrupt_file"] = 3

  def _frame(self, serialized: bytes) -> bytes:
    path = os.path.join(self.dir, "one.tmp")
    records.write_records(path, [serialized])
    with open(path, "rb") as f:
      return f.read()

  def _write(self, name: str, serialized: list[bytes]) -> str:
    path = os.path.join(self.dir, f"{name}.tfrecord")
    records.write_records(path, serialized)
    return path

  def _write_bytes(self, name: str, data: bytes) -> str:
    path = os.path.join(self.dir, f"{name}.tfrecord")
    with open(path, "wb") as f:
      f.write(data)
    return path

  def _make(self, pattern=None, **kwargs):
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("training", False)
    return pipeline.make_dataset(pattern or self.pattern, max_len=4,
                                 max_caption_ids=MAX_CAPTION_IDS, **kwargs)

  @staticmethod
  def _ids(batches) -> list[int]:
    return [int(t) - 1000 for b in batches for t in b["tokens"][:, 1].numpy() if t != 0]

  def test_tf_gives_up_on_a_file_at_corrupt_framing(self):
    # What TF 2.21 does, and why the reader compares bytes read with the file size.
    def read(name):
      path = os.path.join(self.dir, f"{name}.tfrecord")
      return len(list(tf.data.TFRecordDataset(path).ignore_errors()))
    self.assertEqual(read("b-crc"), 2)  # a bad CRC: the rest of the file is lost
    self.assertEqual(read("c-cut-data"), 3)  # DataLossError, then nothing
    self.assertEqual(read("d-cut-header"), 3)  # no error at all
    with self.assertRaises(tf.errors.DataLossError):
      list(tf.data.TFRecordDataset(os.path.join(self.dir, "b-crc.tfrecord")))

  def test_skip_keeps_every_good_record_and_counts_every_bad_one(self):
    counter = pipeline.BadRecordCounter()
    ds = self._make(bad_record_counter=counter, drop_remainder=False, include_text=True)
    self.assertEqual(ds.element_spec["image"].shape, (2, H, W, 3))  # learned from good data
    batches = list(ds)
    self.assertCountEqual(self._ids(batches), self.good_ids)
    for b in batches:
      for key, image in zip(b["key"].numpy(), b["image"].numpy()):
        if key:
          self.assertAllEqual(image, np.full([H, W, 3], int(key[4:])))
    self.assertEqual(counter.result(), self.expected)
    self.assertEqual(counter.total(), len(BAD) + 3)
    self.assertAllEqual(counter.as_tensor(), list(self.expected.values()))
    # Without a counter the same records come through.
    self.assertCountEqual(self._ids(self._make(drop_remainder=False)), self.good_ids)

  def test_fail_names_the_file_the_record_and_the_reason(self):
    cases = [(f"f-{name}", [_good(0), serialized, _good(1)], 1, reason)
             for name, (serialized, reason) in BAD.items()]
    # A rejected record at the very end; two in a row (the message names the second).
    cases.append(("f-garbage-last", [_good(0), BAD["garbage"][0]], 1, "not_an_example"))
    cases.append(("f-garbage-twice", [_good(0), BAD["garbage"][0], BAD["garbage"][0],
                                      _good(1)], 2, "not_an_example"))
    for name, serialized, index, reason in cases:
      with self.subTest(name=name):
        path = self._write(name, serialized)
        ds = self._make(path, on_bad_record="fail", image_size=(H, W), batch_size=1)
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError,
            rf"on_bad_record=fail: bad record in \S*{name}\.tfrecord record {index}: "
            rf"{reason}: "):
          list(ds)
    for name, index in (("b-crc", 2), ("c-cut-data", 3), ("d-cut-header", 3)):
      with self.subTest(name=name):
        ds = self._make(os.path.join(self.dir, f"{name}.tfrecord"), on_bad_record="fail")
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                    rf"{name}\.tfrecord record {index}: corrupt_file: "):
          list(ds)
    # Details for finding the record: its key, its declared image, its first caption ids.
    path = self._write("g-detail", [_good(0), BAD["byte_count"][0]])
    with self.assertRaisesRegex(
        tf.errors.InvalidArgumentError,
        r"g-detail\.tfrecord record 1: bad_image: image byte count != height \* width \* 3"
        r".*; key: byte_count; image \(height, width, bytes\) .*: \[2 3 17\]; caption_ids: "
        r"3 ids, the first \[101 2000 102\]"):
      list(self._make(path, on_bad_record="fail"))
    # Good data passes "fail" unchanged.
    clean = os.path.join(self.dir, "e-clean.tfrecord")
    self.assertEqual(self._ids(self._make(clean, on_bad_record="fail", drop_remainder=False)),
                     [70, 71, 72])

  def test_counts_move_with_the_batches_of_a_repeated_stream(self):
    g, garbage, long = _good, BAD["garbage"][0], BAD["too_long"][0]
    path = self._write("h-order", [g(0), garbage, long, g(1), garbage, g(2), g(3), long])
    counter = pipeline.BadRecordCounter()
    it = iter(self._make(path, batch_size=1, repeat=True, bad_record_counter=counter))
    # Bad records before the batch's record, cumulative: (not_an_example, caption_too_long).
    # The pipeline reads ahead (prefetch), but the counts are those of the batches consumed.
    want = [(0, 0), (1, 1), (2, 1), (2, 1), (2, 2), (3, 3), (4, 3), (4, 3)]
    for i, (garbage_n, long_n) in enumerate(want):
      batch = next(it)
      self.assertEqual(int(batch["tokens"][0, 1]) - 1000, i % 4)
      self.assertEqual(set(batch), {"image", "tokens"})
      got = counter.result()
      self.assertEqual((got["not_an_example"], got["caption_too_long"]), (garbage_n, long_n))
      self.assertEqual(counter.total(), garbage_n + long_n)
    # A finite stream counts when it reads; resumed after 2 batches it counts what follows g1.
    counter = pipeline.BadRecordCounter()
    self.assertEqual(self._ids(self._make(path, batch_size=1, skip_batches=2,
                                          bad_record_counter=counter)), [2, 3])
    self.assertEqual({k: v for k, v in counter.result().items() if v},
                     {"not_an_example": 1, "caption_too_long": 1})

  def test_resume_by_skip_batches_continues_stream_and_counts(self):
    kwargs = dict(training=True, seed=3, shuffle_buffer=8, batch_size=2)
    counter = pipeline.BadRecordCounter()
    it = iter(self._make(bad_record_counter=counter, **kwargs))
    full = []
    for step in range(1, 25):
      full.append(next(it)["tokens"].numpy())
      if step == 9:
        at_9 = counter.as_tensor().numpy()
    at_24 = counter.as_tensor().numpy()
    self.assertGreaterEqual(at_24.sum(), len(BAD) + 3)  # more than an epoch
    # Counting does not change the stream, and a seed fixes it.
    plain = [b["tokens"].numpy() for b in self._make(**kwargs).take(24)]
    self.assertAllEqual(plain, full)

    resumed_counter = pipeline.BadRecordCounter()
    resumed = self._make(bad_record_counter=resumed_counter, skip_batches=9, **kwargs)
    self.assertAllEqual([b["tokens"].numpy() for b in resumed.take(15)], full[9:])
    # The resumed run counts exactly what the first run counted after step 9.
    self.assertAllEqual(at_9 + resumed_counter.as_tensor().numpy(), at_24)

  def test_iterator_checkpoint_with_a_counter(self):
    counter = pipeline.BadRecordCounter()
    ds = self._make(bad_record_counter=counter, training=True, seed=1, shuffle_buffer=4)
    it = iter(ds)
    for _ in range(5):
      next(it)
    path = tf.train.Checkpoint(data=it, bad=counter).save(os.path.join(self.dir, "ckpt"))
    want = [next(it)["tokens"].numpy() for _ in range(3)]
    want_counts = counter.result()

    counter2 = pipeline.BadRecordCounter()
    it2 = iter(self._make(bad_record_counter=counter2, training=True, seed=1,
                          shuffle_buffer=4))
    tf.train.Checkpoint(data=it2, bad=counter2).restore(path).assert_consumed()
    self.assertAllEqual([next(it2)["tokens"].numpy() for _ in range(3)], want)
    self.assertEqual(counter2.result(), want_counts)

  def test_shards_split_good_records_and_counts(self):
    # 5 files: 2 workers shard by file, 7 by record; either way the good records are
    # partitioned and every bad record (every damaged file) is counted on exactly one worker.
    for num_shards in (2, 7):
      with self.subTest(num_shards=num_shards):
        seen, total = [], np.zeros(len(records.REASON_NAMES), np.int64)
        for k in range(num_shards):
          counter = pipeline.BadRecordCounter()
          ds = self._make(bad_record_counter=counter, batch_size=1, shard_index=k,
                          num_shards=num_shards)
          seen += self._ids(ds)
          total += counter.as_tensor().numpy()
        self.assertCountEqual(seen, self.good_ids)
        self.assertAllEqual(total, list(self.expected.values()))

  def test_evaluation_stream_over_damaged_files(self):
    # count_records reads what it can, so eval_num_batches covers every good record.
    self.assertEqual(pipeline.count_records(self.pattern), [27, 2, 3, 3, 3])
    n = pipeline.eval_num_batches(self.pattern, batch_size=2)
    batches = list(self._make(num_batches=n))
    self.assertLen(batches, n)
    self.assertCountEqual(self._ids(batches), self.good_ids)

  def test_features_mode(self):
    good = [records.make_example(key=f"f{i}", caption="c", caption_ids=[101, 1000 + i, 102],
                                 patch_features=np.full([16, 2], i, np.float32))
            for i in range(3)]
    nan = _raw("nan", image=None, patch_features=[float("nan")] * 32, feature_dim=[2])
    path = self._write("j-features", [good[0], nan, good[1], BAD["garbage"][0], good[2]])
    counter = pipeline.BadRecordCounter()
    ds = self._make(path, image_mode="features", bad_record_counter=counter,
                    drop_remainder=False, batch_size=3)
    (batch,) = list(ds)
    self.assertAllEqual(batch["patch_features"][:, 0, 0], [0, 1, 2])
    self.assertEqual(self._ids([batch]), [0, 1, 2])
    self.assertEqual({k: v for k, v in counter.result().items() if v},
                     {"bad_image": 1, "not_an_example": 1})

  def test_only_bad_records_raise_instead_of_spinning(self):
    path = self._write("i-bad", [BAD["too_long"][0], BAD["garbage"][0]] * 3)
    ds = self._make(path, repeat=True, image_size=(H, W), max_consecutive_bad_records=5)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r"on_bad_record=skip: 5 bad records in a row .*the last: "
                                r"\S*i-bad\.tfrecord record 4: caption_too_long"):
      next(iter(ds))
    # Without image_size, learning it needs a good record.
    with self.assertRaisesRegex(ValueError, "no good record among the first 6 records"):
      self._make(path)

  def test_arguments(self):
    with self.assertRaisesRegex(ValueError, "on_bad_record"):
      self._make(on_bad_record="ignore")
    with self.assertRaisesRegex(ValueError, "'fail' drops nothing"):
      self._make(on_bad_record="fail", bad_record_counter=pipeline.BadRecordCounter())


if __name__ == "__main__":
  tf.test.main()
