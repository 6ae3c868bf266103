"""Every worker reads its own records: one epoch over all workers reads each record once.

Through the trainer's own code path (`training.set_seeds` as `train()` calls it for each rank,
then `training.train_stream`), for W workers over F files, and once in a real 2-rank Horovod
run whose ranks log the keys they trained on (`train.log_data_keys`). Records are dealt by
file when there are at least W files and round-robin from one shared interleaved stream
otherwise; the second case is the one a rank-dependent file order broke (workers read some
records twice and others never, e.g. 480 workers over 256 files).
"""

import collections
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from m6t_tf import training  # pylint: disable=g-import-not-at-top
from m6t_tf.data import pipeline  # pylint: disable=g-import-not-at-top
from m6t_tf.data import records  # pylint: disable=g-import-not-at-top
from tests import jobs  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")
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


def one_epoch_keys(pattern: str, num_workers: int, epoch: int = 0) -> list[list[str]]:
  """The keys each worker trains on in `epoch` (batch 1), seeded as the trainer seeds it."""
  counts = pipeline.shard_record_counts(pattern, num_workers)
  out = []
  for rank in range(num_workers):
    training.set_seeds(SEED, deterministic=False, rank=rank)
    ds = training.train_stream(pattern, ctx=RankContext(rank, num_workers), seed=SEED,
                               batch_size=1, max_len=4, image_mode="pixels", shuffle_buffer=5,
                               include_keys=True)
    keys = [b["key"].numpy()[0].decode() for b in ds.take(counts[rank] * (epoch + 1))]
    out.append(keys[counts[rank] * epoch:])
  return out


class DataOrderTest(tf.test.TestCase):

  def test_one_epoch_reads_every_record_exactly_once(self):
    for num_files in (1, 2, 3, 5, 8, 16):
      folder = tempfile.mkdtemp(dir=self.get_temp_dir())
      pattern, keys = write_files(folder, num_files)
      for num_workers in (2, 3, 4, 8):
        with self.subTest(files=num_files, workers=num_workers):
          read = one_epoch_keys(pattern, num_workers)
          counted = collections.Counter(k for worker in read for k in worker)
          self.assertEqual(sorted(counted), sorted(keys),
                           f"records never read: {sorted(set(keys) - set(counted))[:5]}")
          self.assertEqual(max(counted.values()), 1,
                           f"records read twice: {[k for k, n in counted.items() if n > 1][:5]}")

  def test_second_epoch_is_a_new_order_of_the_same_partition(self):
    folder = tempfile.mkdtemp(dir=self.get_temp_dir())
    pattern, keys = write_files(folder, 3)
    first = one_epoch_keys(pattern, 4, epoch=0)
    second = one_epoch_keys(pattern, 4, epoch=1)
    self.assertEqual(sorted(k for w in second for k in w), sorted(keys))
    self.assertNotEqual(first, second)  # reshuffled, with no rank in the seed

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


class DistributedDataOrderTest(tf.test.TestCase):

  def test_two_ranks_over_three_files_train_on_each_record_once(self):
    if not os.path.exists(HOROVODRUN):
      raise RuntimeError("horovodrun missing: `make setup` builds Horovod")
    tmp = os.path.join(REPO, "runs", "test_data_order")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    self.addCleanup(shutil.rmtree, tmp, True)
    pattern, keys = write_files(tmp, 3)
    counts = pipeline.shard_record_counts(pattern, 2)
    batch = 2
    steps = -(-max(counts) // batch)
    model_dir = os.path.join(tmp, "run")
    bindings = [f"train.train_data = '{pattern}'", "train.eval_data = None",
                f"train.num_steps = {steps}", f"train.batch_size_per_worker = {batch}",
                f"train.seed = {SEED}", "train.shuffle_buffer = 5", "train.log_data_keys = True",
                "MAX_LEN = 4", "train.warmup_steps = 1"]
    args = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
            "m6t_tf.train", "--gin_file=gin/demo.gin", "--gin_file=gin/tiny.gin",
            "--gin_file=gin/layouts/1x2.gin", f"--model_dir={model_dir}"]
    args += [f"--gin_bindings={b}" for b in bindings]
    proc = subprocess.run(args, cwd=REPO, env=jobs.worker_env(), capture_output=True, text=True,
                          timeout=300)
    self.assertEqual(proc.returncode, 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    read = []
    for rank in range(2):
      with open(os.path.join(model_dir, "data_keys", f"rank{rank}.jsonl")) as f:
        rows = [json.loads(line) for line in f]
      self.assertEqual([r["step"] for r in rows], list(range(1, steps + 1)))
      read.append([k for r in rows for k in r["keys"]][:counts[rank]])
    counted = collections.Counter(k for worker in read for k in worker)
    self.assertEqual(sorted(counted), sorted(keys))
    self.assertEqual(max(counted.values()), 1)
    # The trainer's own stream: rank r's log is what `one_epoch_keys` predicts for rank r.
    self.assertEqual(read, one_epoch_keys(pattern, 2))


if __name__ == "__main__":
  tf.test.main()
