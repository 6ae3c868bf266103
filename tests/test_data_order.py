"""Every worker reads its own records: one epoch over all workers reads each record once.

Through the trainer's own code path (`trainer_lib.set_seeds` as `train()` calls it for each rank,
then `inputs.train_stream`), for W workers over F files, and once in a real 2-rank Horovod
run whose ranks log the keys they trained on (`train.log_data_keys`). Records are dealt by
file when there are at least W files and round-robin from one shared interleaved stream
otherwise; the second case is the one a rank-dependent file order broke (workers read some
records twice and others never, e.g. 480 workers over 256 files).
"""

import collections
import dataclasses
import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.run import inputs
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.data import pipeline
from m6t_tf.data import records
from tests import support

SEED = 7


@dataclasses.dataclass
class RankContext:
  """What `train_stream` asks of a worker context, for rank `rank` of `size` (no Horovod)."""
  rank: int
  size: int

  def data_shard(self):
    return self.rank, self.size


def write_files(folder: str, num_files: int) -> tuple[str, list[str]]:
  """`num_files` TFRecord files of 9..12 records each, every record with a distinct key."""
  keys = []
  for f in range(num_files):
    examples = []
    for j in range(9 + f % 4):
      key = f"f{f}r{j}"
      keys.append(key)
      examples.append(records.make_example(
          key=key, caption="c", caption_ids=[101, 1000 + len(keys), 102],
          image=np.full([8, 8, 3], len(keys) % 256, np.uint8)))
    records.write_records(os.path.join(folder, records.shard_name("train", f, num_files)),
                          examples)
  return os.path.join(folder, "train-*.tfrecord"), keys


def epoch_keys(pattern: str, num_workers: int, epochs: int = 1) -> list[list[list[str]]]:
  """[epoch][worker]: the keys each worker trains on in each of the first `epochs` epochs
  (batch 1), its stream built once and seeded as the trainer seeds it."""
  counts = pipeline.shard_record_counts(pattern, num_workers)
  out = [[] for _ in range(epochs)]
  for rank in range(num_workers):
    trainer_lib.set_seeds(SEED, deterministic=False, rank=rank)
    ds = inputs.train_stream(pattern, ctx=RankContext(rank, num_workers), seed=SEED,
                               batch_size=1, max_len=4, image_mode="pixels", shuffle_buffer=5,
                               include_keys=True)
    keys = [b["key"].numpy()[0].decode() for b in ds.take(counts[rank] * epochs)]
    for epoch in range(epochs):
      out[epoch].append(keys[counts[rank] * epoch:counts[rank] * (epoch + 1)])
  return out


@pytest.mark.slow
class DataOrderTest(tf.test.TestCase):

  def test_one_epoch_reads_every_record_exactly_once(self):
    # (files, workers): the six pairs a rank-dependent file order breaks (fewer files than
    # workers, more than one file: records are dealt from one interleaved stream, and each
    # worker must interleave the files in the same order), then the edges — one file, as many
    # files as workers, more files than workers (dealt by file, some workers one file more).
    # The full 6 × 4 cross product of files {1, 2, 3, 5, 8, 16} and workers {2, 3, 4, 8}
    # fails at exactly these six under a file order seeded with seed + shard index. (The
    # as-many-files edge is (2, 2): one file per worker, dealt by file, at 2 streams, not 8.)
    # At (3, 4) the streams run on into a second epoch: every record once more, reordered.
    pairs = [(2, 3), (2, 4), (2, 8), (3, 4), (3, 8), (5, 8), (1, 2), (2, 2), (16, 3)]
    for num_files in sorted({f for f, _ in pairs}):
      folder = tempfile.mkdtemp(dir=self.get_temp_dir())
      pattern, keys = write_files(folder, num_files)
      for num_workers in [w for f, w in pairs if f == num_files]:
        with self.subTest(files=num_files, workers=num_workers):
          second_epoch = (num_files, num_workers) == (3, 4)
          read = epoch_keys(pattern, num_workers, epochs=2 if second_epoch else 1)
          counted = collections.Counter(k for worker in read[0] for k in worker)
          self.assertEqual(sorted(counted), sorted(keys),
                           f"records never read: {sorted(set(keys) - set(counted))[:5]}")
          self.assertEqual(max(counted.values()), 1,
                           f"records read twice: {[k for k, n in counted.items() if n > 1][:5]}")
          if second_epoch:
            self.assertEqual(sorted(k for worker in read[1] for k in worker), sorted(keys))
            self.assertNotEqual(read[0], read[1])  # reshuffled, with no rank in the seed

  def test_partition_does_not_depend_on_the_global_seed(self):
    folder = tempfile.mkdtemp(dir=self.get_temp_dir())
    pattern, _ = write_files(folder, 3)
    shards = []
    for global_seed in (0, 1):
      tf.random.set_seed(global_seed)
      ds = pipeline.make_dataset(pattern, batch_size=1, max_len=4, training=True, seed=SEED,
                                 shard_index=1, num_shards=4, shuffle_buffer=5,
                                 include_text=True)
      n = pipeline.shard_record_counts(pattern, 4)[1]
      shards.append(sorted(b["key"].numpy()[0].decode() for b in ds.take(n)))
    self.assertEqual(shards[0], shards[1])


@pytest.mark.multiprocess
class DistributedDataOrderTest(tf.test.TestCase):

  def test_two_ranks_train_on_the_records_their_streams_predict(self):
    # The shared 2-rank reference run (tests/support.py: demo data, 8 files dealt by file,
    # train.log_data_keys) logged the keys each rank trained on; each rank's are the first
    # records of `train_stream` for that rank, as `epoch_keys` builds it, and no record
    # is read by both ranks.
    model_dir = support.reference_run(2)
    read = []
    for rank in range(2):
      logged = support.data_keys(model_dir, rank)
      self.assertEqual(sorted(logged), list(range(1, support.REFERENCE_STEPS + 1)))
      read.append([k for step in sorted(logged) for k in logged[step]])
    self.assertFalse(set(read[0]) & set(read[1]), "a record was read by both ranks")
    for rank in range(2):
      trainer_lib.set_seeds(0, deterministic=False, rank=rank)
      ds = inputs.train_stream(support.TRAIN, ctx=RankContext(rank, 2), seed=0, batch_size=1,
                                 max_len=12, image_mode="pixels", shuffle_buffer=64,
                                 include_keys=True)
      want = [b["key"].numpy()[0].decode() for b in ds.take(len(read[rank]))]
      self.assertEqual(read[rank], want, f"rank {rank}")


if __name__ == "__main__":
  tf.test.main()
