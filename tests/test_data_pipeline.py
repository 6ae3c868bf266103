"""Tests of m6t_tf.data.pipeline: static shapes, padding, sharding, determinism, resuming."""

import math
import os
import threading
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from m6t_tf.data import pipeline, records  # pylint: disable=g-import-not-at-top

H, W, P = 3, 5, 7  # distinct sizes so a transposed image would show
FILE_SIZES = (7, 6, 5)  # 18 records in 3 files
NUM = sum(FILE_SIZES)


def _caption_ids(i: int) -> list[int]:
  """Record i: [CLS] 1000+i, 2000, 2001, ... (1 + i % 6 body ids) [SEP]."""
  return [101, 1000 + i] + [2000 + j for j in range(i % 6)] + [102]


def _write_toy(folder: str) -> str:
  i = 0
  for f, size in enumerate(FILE_SIZES):
    exs = []
    for _ in range(size):
      exs.append(records.make_example(
          key=f"rec{i}", caption=f"caption {i}", caption_ids=_caption_ids(i),
          image=np.full([H, W, 3], i, np.uint8),
          patch_features=np.full([16, P], i, np.float32)))
      i += 1
    records.write_records(os.path.join(folder, records.shard_name("train", f, 3)), exs)
  return os.path.join(folder, "train-*.tfrecord")


def _ids(batches) -> list[int]:
  """Record index of every real (non-padding) row, from the second token."""
  out = []
  for b in batches:
    out += [int(t) - 1000 for t in b["tokens"][:, 1].numpy() if t != 0]
  return out


class PipelineTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.pattern = _write_toy(self.get_temp_dir())

  def test_static_shapes_and_dtypes(self):
    ds = pipeline.make_dataset(self.pattern, batch_size=4, max_len=6, training=True)
    self.assertEqual(ds.element_spec["image"].shape, (4, H, W, 3))
    self.assertEqual(ds.element_spec["image"].dtype, tf.uint8)
    self.assertEqual(ds.element_spec["tokens"].shape, (4, 6))
    self.assertEqual(ds.element_spec["tokens"].dtype, tf.int32)
    self.assertEqual(set(ds.element_spec), {"image", "tokens"})
    feats = pipeline.make_dataset(self.pattern, batch_size=2, max_len=6, training=False,
                                  image_mode="features")
    self.assertEqual(feats.element_spec["patch_features"].shape, (2, 16, P))
    self.assertEqual(feats.element_spec["patch_features"].dtype, tf.float32)
    b = next(iter(feats))
    i = int(b["tokens"][0, 1]) - 1000
    self.assertAllEqual(b["patch_features"][0], np.full([16, P], i, np.float32))
    # Padding rows of drop_remainder=False keep the static shape too.
    ds = pipeline.make_dataset(self.pattern, batch_size=4, max_len=6, training=False,
                               drop_remainder=False)
    self.assertEqual(ds.element_spec["tokens"].shape, (4, 6))

  def test_padding_truncation_and_remainder(self):
    max_len = 5
    ds = pipeline.make_dataset(self.pattern, batch_size=4, max_len=max_len, training=False,
                               drop_remainder=False)
    batches = list(ds)
    self.assertLen(batches, math.ceil(NUM / 4))
    tokens = np.concatenate([b["tokens"].numpy() for b in batches])
    images = np.concatenate([b["image"].numpy() for b in batches])
    self.assertEqual(sorted(_ids(batches)), list(range(NUM)))
    for row, image in zip(tokens, images):
      if row[0] == 0:  # filler row of the last batch: nothing to score, blank image
        self.assertAllEqual(row, np.zeros(max_len))
        self.assertAllEqual(image, np.zeros([H, W, 3]))
        continue
      i = row[1] - 1000
      self.assertAllEqual(image, np.full([H, W, 3], i))
      full = _caption_ids(i)
      if len(full) <= max_len:
        self.assertAllEqual(row, full + [0] * (max_len - len(full)))
      else:  # truncated: the first max_len - 1 ids, then [SEP]
        self.assertAllEqual(row, full[:max_len - 1] + [102])
    self.assertEqual(int((tokens[:, 0] == 0).sum()), 4 * len(batches) - NUM)
    dropped = list(pipeline.make_dataset(self.pattern, batch_size=4, max_len=5,
                                         training=False))
    self.assertLen(dropped, NUM // 4)

  def test_shards_partition_the_data(self):
    # 2 shards <= 3 files: by file; 4 shards > 3 files: by record.
    for num_shards in (2, 4):
      for training in (False, True):
        with self.subTest(num_shards=num_shards, training=training):
          seen = []
          for k in range(num_shards):
            ds = pipeline.make_dataset(self.pattern, batch_size=1, max_len=8,
                                       training=training, repeat=False, seed=3,
                                       shard_index=k, num_shards=num_shards)
            seen.append(_ids(ds))
          flat = [i for s in seen for i in s]
          self.assertEqual(sorted(flat), list(range(NUM)))  # disjoint and complete
          self.assertEqual([len(s) for s in seen],
                           pipeline.shard_record_counts(self.pattern, num_shards))

  def test_eval_num_batches_equal_on_every_shard(self):
    n = pipeline.eval_num_batches(self.pattern, batch_size=4, num_shards=2)
    self.assertEqual(n, math.ceil((7 + 5) / 4))  # shard 0 reads files 0 and 2
    seen = []
    for k in range(2):
      batches = list(pipeline.make_dataset(self.pattern, batch_size=4, max_len=8,
                                           training=False, shard_index=k, num_shards=2,
                                           num_batches=n))
      self.assertLen(batches, n)
      seen += _ids(batches)
    self.assertEqual(sorted(seen), list(range(NUM)))

  def test_deterministic_for_a_seed(self):
    def first(seed, n=6):
      ds = pipeline.make_dataset(self.pattern, batch_size=3, max_len=8, training=True,
                                 seed=seed)
      return [b["tokens"].numpy() for b in ds.take(n)]
    twelve = first(1, 12)
    self.assertAllEqual(twelve[:6], first(1))
    self.assertNotAllEqual(twelve[:6], first(2))
    # Epochs are reshuffled: batches 0-5 and 6-11 (epoch 2 of 18 records) differ in order.
    both = np.concatenate(twelve)
    self.assertNotAllEqual(both[:NUM, 1], both[NUM:, 1])
    self.assertEqual(sorted(both[:NUM, 1]), sorted(both[NUM:, 1]))

  def test_iterator_checkpoint_restores_next_batch(self):
    def make():
      return pipeline.make_dataset(self.pattern, batch_size=3, max_len=8, training=True,
                                   seed=5, shuffle_buffer=8)
    it = iter(make())
    for _ in range(4):
      next(it)
    ckpt = tf.train.Checkpoint(data=it)
    path = ckpt.save(os.path.join(self.get_temp_dir(), "ckpt"))
    expected = [next(it) for _ in range(3)]

    it2 = iter(make())
    next(it2)  # a fresh iterator in another state
    tf.train.Checkpoint(data=it2).restore(path).assert_consumed()
    for want in expected:
      got = next(it2)
      self.assertAllEqual(got["tokens"], want["tokens"])
      self.assertAllEqual(got["image"], want["image"])

  def test_skip_batches_resumes_the_same_stream(self):
    kwargs = dict(batch_size=3, max_len=8, training=True, seed=7)
    base = [b["tokens"].numpy() for b in
            pipeline.make_dataset(self.pattern, **kwargs).take(10)]
    resumed = [b["tokens"].numpy() for b in
               pipeline.make_dataset(self.pattern, skip_batches=7, **kwargs).take(3)]
    self.assertAllEqual(resumed, base[7:10])

  def test_unexpected_image_size(self):
    # "fail" names the file, the record and the reason; "skip" drops and counts every record.
    ds = pipeline.make_dataset(self.pattern, batch_size=2, max_len=8, training=False,
                               image_size=(W, H), on_bad_record="fail")
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r"train-00000-of-00003\.tfrecord record 0: wrong_image_size"
                                r".*key: rec0"):
      next(iter(ds))
    counter = pipeline.BadRecordCounter()
    ds = pipeline.make_dataset(self.pattern, batch_size=2, max_len=8, training=False,
                               image_size=(W, H), bad_record_counter=counter)
    self.assertEmpty(list(ds))
    self.assertEqual(counter.result()["wrong_image_size"], NUM)
    self.assertEqual(counter.total(), NUM)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "shard_index"):
      pipeline.make_dataset(self.pattern, batch_size=2, max_len=8, training=False,
                            shard_index=2, num_shards=2)
    with self.assertRaisesRegex(ValueError, "max_len"):
      pipeline.make_dataset(self.pattern, batch_size=2, max_len=1, training=False)
    with self.assertRaisesRegex(ValueError, "num_batches"):
      pipeline.make_dataset(self.pattern, batch_size=2, max_len=8, training=True,
                            num_batches=3)
    for buffer in (0, -1, 2.5, True):
      with self.assertRaisesRegex(ValueError, rf"shuffle_buffer must be an integer >= 1 .*"
                                              rf"got {buffer!r}"):
        pipeline.make_dataset(self.pattern, batch_size=2, max_len=8, training=True,
                              shuffle_buffer=buffer)

  def test_count_records(self):
    self.assertEqual(pipeline.count_records(self.pattern), list(FILE_SIZES))


def _next_within(ds, seconds: float = 60):
  """The first element of `ds`, or the error it raised; fails if neither came in `seconds`.

  A stream that swallows its errors never returns: the thread is left behind (a daemon).
  """
  out = {}

  def run():
    try:
      out["value"] = next(iter(ds))
    except Exception as e:  # pylint: disable=broad-except
      out["error"] = e

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    raise AssertionError(f"no element and no error after {seconds} s: the stream spins")
  if "error" in out:
    raise out["error"]
  return out["value"]


class StreamNeverSpinsTest(tf.test.TestCase):
  """A repeated stream yields a batch or raises: it never loops over empty epochs."""

  def setUp(self):
    super().setUp()
    self.dir = self.get_temp_dir()

  def _records(self, name, n):
    path = os.path.join(self.dir, name)
    records.write_records(path, [records.make_example(
        key=f"r{i}", caption="c", caption_ids=_caption_ids(i),
        image=np.zeros([H, W, 3], np.uint8)) for i in range(n)])
    return path

  def test_an_error_upstream_of_the_parser_reaches_the_caller(self):
    # The hang: a window of 0 made every epoch fail inside the stream, the one
    # `ignore_errors` over the whole stream swallowed it, and next() never returned.
    path = self._records("a.tfrecord", 4)
    shuffle = pipeline._window_shuffle  # pylint: disable=protected-access
    with mock.patch.object(pipeline, "_window_shuffle",
                           lambda ds, window, seed, epoch: shuffle(ds, 0, seed, epoch)):
      ds = pipeline.make_dataset(path, batch_size=2, max_len=8, training=True,
                                 shuffle_buffer=4)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                "Batch size must be greater than zero"):
      _next_within(ds)

  def test_an_epoch_without_a_good_record_fails_naming_the_files(self):
    empty = self._records("empty.tfrecord", 0)
    for mode, counted in (("skip", " skipped"), ("fail", "")):
      ds = pipeline.make_dataset(empty, batch_size=2, max_len=8, training=True,
                                 image_size=(H, W), on_bad_record=mode)
      with self.assertRaisesRegex(
          tf.errors.InvalidArgumentError,
          rf"no good record in epoch 0 of 1 file, the first \S*empty\.tfrecord "
          rf"\(0 bad records{counted}\): the files hold no record for this worker"):
        _next_within(ds)
    # Bad records only, far fewer than max_consecutive_bad_records: the first epoch says so.
    bad = os.path.join(self.dir, "bad.tfrecord")
    records.write_records(bad, [b"\x0a\x05garbage", b"\x0a\x05garbage again"])
    ds = pipeline.make_dataset(bad, batch_size=2, max_len=8, training=True,
                               image_size=(H, W))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r"no good record in epoch 0 of 1 file, the first "
                                r"\S*bad\.tfrecord \(2 bad records skipped\)"):
      _next_within(ds)
    # One record, two workers: worker 1's shard of the records is empty.
    one = self._records("one.tfrecord", 1)
    self.assertLen(list(pipeline.make_dataset(one, batch_size=1, max_len=8, training=True,
                                              num_shards=2, shard_index=0).take(3)), 3)
    ds = pipeline.make_dataset(one, batch_size=1, max_len=8, training=True, num_shards=2,
                               shard_index=1, image_size=(H, W))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r"no good record in epoch 0 of shard 1 of 2: 1 file"):
      _next_within(ds)

  def test_the_stream_explains_its_errors_in_one_line(self):
    ds = pipeline.make_dataset(self._records("empty.tfrecord", 0), batch_size=2, max_len=8,
                               training=True, image_size=(H, W))
    with self.assertRaises(tf.errors.InvalidArgumentError) as cm:
      _next_within(ds)
    is_data, text = pipeline.explain_error(cm.exception)
    self.assertTrue(is_data)
    self.assertStartsWith(text, "no good record in epoch 0 of 1 file, the first ")
    self.assertEndsWith(text, "would never yield a batch")
    other = tf.errors.InvalidArgumentError(
        None, None, "{{function_node __wrapped__X}} Batch size must be greater than zero.\n\t "
        "[[{{node BatchDatasetV2}}]]")
    self.assertEqual(pipeline.explain_error(other),
                     (False, "Batch size must be greater than zero."))


class UnigramPerplexityTest(tf.test.TestCase):

  def _write(self, name, id_lists):
    path = os.path.join(self.get_temp_dir(), name)
    records.write_records(path, [
        records.make_example(key=f"{name}{i}", caption="c", caption_ids=ids,
                             image=np.zeros([1, 1, 3], np.uint8))
        for i, ids in enumerate(id_lists)])
    return path

  def test_hand_computed(self):
    train = self._write("train.tfrecord", [[101, 5, 6, 102], [101, 5, 102]])
    valid = self._write("valid.tfrecord", [[101, 5, 7, 102]])
    # Train targets 5 6 [SEP] 5 [SEP]: c(5)=2, c(6)=1, c(SEP)=2, N=5, V=21128, N+V=21133.
    # Validation targets 5 7 [SEP]: p = 3/21133, 1/21133, 3/21133.
    # PPL = exp(-(log 3 + log 1 + log 3 - 3 log 21133) / 3) = 21133 / 9^(1/3).
    self.assertAllClose(pipeline.unigram_perplexity(train, valid), 21133 / 9 ** (1 / 3))
    # max_len=3 truncates like the pipeline: train targets 5 [SEP] 5 [SEP] (N=4);
    # validation targets 5 [SEP], each p = 3/21132, so PPL = 21132/3.
    self.assertAllClose(pipeline.unigram_perplexity(train, valid, max_len=3), 21132 / 3)
    # A smaller vocabulary changes only the smoothing mass: V=200, N+V=205.
    self.assertAllClose(pipeline.unigram_perplexity(train, valid, vocab_size=200),
                        205 / 9 ** (1 / 3))


if __name__ == "__main__":
  tf.test.main()
