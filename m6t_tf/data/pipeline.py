"""The captioning input pipeline: TFRecords -> fixed-shape batches, one shard per worker.

Every batch has the same, fully static shape on every worker:

    {"image":          <uint8>[B, H, W, 3]      (image_mode="pixels"), or
     "patch_features": <float32>[B, 16, P]      (image_mode="features"),
     "tokens":         <int32>[B, max_len]}     [CLS] caption [SEP] 0 0 ... 0

The model reads `tokens[:, :-1]` as inputs and `tokens[:, 1:]` as targets and masks targets
equal to [PAD] = 0. Static shapes matter beyond XLA: MoE expert capacity
C = ceil(k * T / E * gamma) depends on the token count T = B * L, and a capacity that differs
between workers deadlocks the all-to-all. For the same reason there is no bucketing by caption
length: it would make L differ from batch to batch and from worker to worker.

Captions longer than `max_len` are truncated to `[CLS] first max_len - 2 ids [SEP]`: the final
[SEP] is kept so the model always learns to end a caption.

Determinism and resuming. For a given `seed` the order of examples is fixed (file order and
shuffle seeded, `deterministic=True` everywhere, no `py_function`). The file order of epoch e
is a stateless permutation of (seed, e), so which records a shard reads never depends on
TensorFlow's global seed or on the worker; the shuffle buffer that then reorders a shard's
records mixes in the global seed (as every seeded `Dataset.shuffle` does), which the trainer
sets to `seed` on every worker. Two ways to resume:

1. Preferred: save the iterator in the trainer's checkpoint,
       it = iter(ds); ckpt = tf.train.Checkpoint(model=..., data=it)
   Restoring gives exactly the next batch. The checkpoint then holds the shuffle buffer:
   about `shuffle_buffer` serialized records per worker (2048 x 12 KiB = 25 MiB for 64x64
   pixels; 2048 x 16 x P x 4 bytes for patch features, so lower the buffer for large P),
   plus a few blocks of 64 records in flight. A `BadRecordCounter` is not part of it:
   checkpoint its variables next to the model.
2. `skip_batches=n` rebuilds the same stream and drops its first n batches. Bad records are
   dropped before the skip (so it skips exactly the records that were trained on), which
   costs reading and parsing, not training on, n x batch_size records (~0.1 ms each on a
   2-core host).

Sharding by worker rank: with at least `num_shards` files, worker i reads files i, i + D, ...;
with fewer files every worker reads all files and keeps records i, i + D, ... of the (same,
seeded) interleaved stream. Either way the shards partition the data. Shards may differ in
size (by a record, or by whole files); a repeated training stream does not care, and a finite
evaluation stream takes `num_batches=eval_num_batches(...)` so all workers step equally often.

Bad records (`records.BAD_RECORD_REASONS`): corrupt TFRecord framing, bytes that are not a
tf.train.Example, a missing, mis-sized or wrongly sized image, an empty, over-long
(> `max_caption_ids`), out-of-vocabulary or malformed caption, a caption text that is not UTF-8.
`on_bad_record="skip"` (the default) drops them and counts them per reason in a
`BadRecordCounter`; "fail" stops at the first with an InvalidArgumentError naming the file and
the record's index in it. Dropping keeps every property above: shapes (records are dropped
before batching), determinism (a bad record is dropped wherever it falls), exact resuming (the
skip counts good records), sharding (a record is bad on whichever worker reads it).

Errors. Only the parser's rejection of a single record is dropped ("skip") or reported as a
bad record ("fail"); any other runtime error of the pipeline (a file that cannot be read
through, a failing op) reaches the caller's `next()`, and a repeated stream whose epoch holds
no good record fails naming this worker's files: it never spins through empty epochs.

A corrupt file loses more than one record: TFRecordDataset (TF 2.21) cannot resynchronise after
a bad CRC or a truncated record and gives up on the rest of the file; a file cut inside a
record header even ends without any error. The reader compares the bytes it consumed with the
file's size to notice either, and counts the file once ("corrupt_file") per read; in "fail"
mode the error names the first record lost. A file cut exactly between two records looks
complete and cannot be noticed.
"""

from __future__ import annotations

import concurrent.futures
import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from m6t_tf.data import records
from m6t_tf.data.tokenizer import CLS_ID, PAD_ID, SEP_ID, VOCAB_SIZE

AUTOTUNE = tf.data.AUTOTUNE
# Every function this module hands tf.data is written in TensorFlow ops (tf.where, tf.cond):
# AutoGraph's conversion is not needed, and converting them the first time a process builds a
# pipeline cost ~3 s of each trainer's, evaluator's and test's start-up.
_graph = tf.autograph.experimental.do_not_convert


# What an element of the stream is before parsing. A file's reader adds a _CORRUPT_FILE element
# after its last readable record if it could not read the file to its end; a repeated stream
# closes every epoch with an _END_OF_EPOCH element (its index: the epoch), a finite one ends
# with _END_OF_STREAM.
_RECORD, _CORRUPT_FILE, _END_OF_STREAM, _END_OF_EPOCH = 0, 1, 2, 3
_FRAMING_BYTES = 16  # a TFRecord is: uint64 length, uint32 CRC of it, data, uint32 CRC of data
_NUM_REASONS = len(records.REASON_NAMES)
# The sequential stages (reader, numbering, judge) work on blocks of this many records: a
# tf.data scan or filter costs ~30 us per call on a 2-core host, about as much as parsing.
_BLOCK = 64
_IDS_SHOWN = 8  # caption ids quoted in an error message


class BadRecordCounter(tf.Module):
  """Bad records the input pipeline dropped, per reason (`records.BAD_RECORD_REASONS`).

  Pass it to `make_dataset(..., bad_record_counter=counter)` and read it in the training loop:

      counter = BadRecordCounter()
      it = iter(make_dataset(..., training=True, bad_record_counter=counter))
      batch = next(it)
      counter.result()  # {"corrupt_file": 0, "not_an_example": 2, ...}, this worker only

  On a repeated (training) stream the counts move with the batches: after `next(it)` returned
  batch n they are exactly the bad records that came before the last record of batch n, never
  ones that the pipeline has read ahead. On a finite stream they are counted when read and are
  complete when the stream ends. A corrupt file counts once ("corrupt_file") each time it is
  read, however many records it loses; other reasons count records, once per epoch.

  One int64 variable per reason (`by_reason`), on the host CPU because `tf.data` functions run
  there. The counts are per worker: sum them over workers for a global figure.
  """

  def __init__(self, name: str = "bad_records"):
    super().__init__(name=name)
    with tf.device("/device:CPU:0"):
      self.by_reason = {r: tf.Variable(tf.constant(0, tf.int64), trainable=False, name=r)
                        for r in records.REASON_NAMES}

  def add(self, counts: tf.Tensor) -> None:
    """Adds <int64>[R] counts, in the order of `records.REASON_NAMES` (graph-safe)."""
    for i, v in enumerate(self.by_reason.values()):
      v.assign_add(counts[i])

  def as_tensor(self) -> tf.Tensor:
    """<int64>[R] the counts, in the order of `records.REASON_NAMES`."""
    return tf.stack([v.read_value() for v in self.by_reason.values()])

  def result(self) -> dict[str, int]:
    return {r: int(v.numpy()) for r, v in self.by_reason.items()}

  def total(self) -> int:
    return sum(self.result().values())

  def reset(self) -> None:
    for v in self.by_reason.values():
      v.assign(0)


def _shard_files(files: list[str], shard_index: int, num_shards: int) -> tuple[list[str], bool]:
  """Files this shard reads, and whether records still need sharding."""
  if num_shards > 1 and len(files) >= num_shards:
    return files[shard_index::num_shards], False
  return files, num_shards > 1


def _file_sizes(files: Sequence[str]) -> list[int]:
  def size(f):
    return tf.io.gfile.stat(f).length
  if len(files) > 1 and any("://" in f for f in files):  # remote: one round trip per file
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      return list(pool.map(size, files))
  return [size(f) for f in files]


def _file_reader(files: Sequence[str]):
  """The interleave function: file id -> (serialized, file id, record index, kind) elements.

  Corrupt framing ends a file early without an error reaching the stream: TF 2.21's
  TFRecordDataset raises DataLossError at a bad CRC or a record cut short and, under
  `ignore_errors`, gives up on the rest of that file; a file cut inside a record header even
  ends silently, as if it were complete. So the reader counts the bytes it consumed (each
  record is its data plus 16 bytes of framing) and compares them with the file's size: if they
  differ, an element of kind _CORRUPT_FILE follows the last readable record, its index that of
  the first record lost. A file cut exactly between records cannot be told from a shorter one.
  """
  names = tf.constant(list(files))
  sizes = tf.constant(_file_sizes(files), tf.int64)

  def read(file_id):
    size = tf.gather(sizes, file_id)
    blocks = tf.data.TFRecordDataset(tf.gather(names, file_id)).ignore_errors().batch(_BLOCK)
    # batch() never yields an empty block, so an empty one can mark the end of the file.
    blocks = blocks.concatenate(tf.data.Dataset.from_tensors(tf.zeros([0], tf.string)))

    def account(state, serialized):
      index, consumed = state
      n = tf.size(serialized, out_type=tf.int64)
      at_end = tf.equal(n, 0)
      lost = tf.cast(at_end & tf.not_equal(consumed, size), tf.int64)  # 1: a marker follows
      serialized = tf.concat([serialized, tf.fill([lost], "")], axis=0)
      m = n + lost
      kind = tf.fill([m], tf.where(at_end, _CORRUPT_FILE, _RECORD))
      consumed += (tf.reduce_sum(tf.cast(tf.strings.length(serialized), tf.int64)) +
                   _FRAMING_BYTES * n)
      return (index + n, consumed), (serialized, tf.fill([m], file_id),
                                     index + tf.range(m), kind)

    zero = tf.constant(0, tf.int64)
    return blocks.scan((zero, zero), _graph(account)).unbatch()

  return read


def _number(state, block):
  """Numbers the stream and gives each element its predecessor's place (see `_Judge`)."""
  seq, prev_file, prev_index = state
  serialized, file_id, index, kind = block
  n = tf.size(kind, out_type=tf.int64)  # >= 1: batch() yields no empty block
  return (seq + n, file_id[-1], index[-1]), {
      "serialized": serialized, "file_id": file_id, "index": index, "kind": kind,
      "seq": seq + tf.range(n), "prev_file": tf.concat([[prev_file], file_id[:-1]], axis=0),
      "prev_index": tf.concat([[prev_index], index[:-1]], axis=0)}


def _head(ids: tf.Tensor) -> tf.Tensor:
  """<int32>[_IDS_SHOWN] the first ids, zero-padded (for error messages)."""
  head = ids[:_IDS_SHOWN]
  return tf.ensure_shape(tf.pad(head, [[0, _IDS_SHOWN - tf.size(head)]]), [_IDS_SHOWN])


def _first(mask: tf.Tensor) -> tf.Tensor:
  """Index of the first True in <bool>[n], or n."""
  n = tf.size(mask)
  return tf.reduce_min(tf.where(mask, tf.range(n), n))


def _since_last_good(values: tf.Tensor, good: tf.Tensor, carried: tf.Tensor) -> tf.Tensor:
  """For each i, `carried` (if no good record precedes i in the block) plus the sum of
  values[j] over i's run: the j <= i after the last good record before i.

  Args:
    values: <int64>[n, ...] per element.
    good: <bool>[n].
    carried: <int64>[...] the run that ended the previous block.

  Returns:
    <int64>[n, ...].
  """
  run = tf.cumsum(tf.cast(good, tf.int32), exclusive=True)  # good records before i
  # Run r starts after the r-th good record (r >= 1), run 0 at the block's start.
  starts = tf.concat([[0], tf.cast(tf.where(good)[:, 0], tf.int32) + 1], axis=0)
  totals = tf.cumsum(values, axis=0)
  before_run = tf.gather(totals - values, tf.gather(starts, run))
  first_run = tf.reshape(tf.cast(tf.equal(run, 0), values.dtype),
                         [-1] + [1] * (values.shape.rank - 1))
  return totals - before_run + first_run * carried


class _Judge:
  """The scan after parsing, a block at a time: finds dropped records, then fails on or counts
  every bad one, and keeps the good ones.

  Each block is parsed under an `ignore_errors` of its own (`_parse_block`), which drops a
  record the parser rejects ("not_an_example"); the gap it leaves in the sequence numbers
  finds it, and the next element carries its file and index (`prev_file`, `prev_index`; for a
  run of such records, those of the last). A repeated stream (`epochs`) must never spin
  without a batch: an epoch that holds no good record fails (`shard`, a description of this
  worker's files, is named), and with on_bad_record="skip" so do
  `max_consecutive_bad_records` bad records in a row. The judge does not count inside the
  first `skip_records` good records (a resumed run must not count again what the first run
  counted), and passes the counts on to the next good record (`carry`, see
  `BadRecordCounter`) or adds them at once.
  """

  def __init__(self, files, *, keep: Sequence[str], fail: bool,
               counter: BadRecordCounter | None, carry: bool, skip_records: int,
               max_consecutive_bad_records: int, epochs: bool = False, shard: str = ""):
    self.names = tf.constant(list(files))
    self.keep = tuple(keep)
    self.fail, self.counter, self.carry = fail, counter, carry
    self.skip_records = skip_records
    self.max_run = max_consecutive_bad_records
    self.epochs, self.shard = epochs, shard

  def initial_state(self):
    """(last seq, good records seen, bad run, pending counts, good and bad in this epoch)."""
    zero = tf.constant(0, tf.int64)
    return (tf.constant(-1, tf.int64), zero, zero, tf.zeros([_NUM_REASONS], tf.int64), zero,
            zero)

  def _where(self, file_id, index) -> tf.Tensor:
    name = tf.gather(self.names, tf.maximum(file_id, 0))
    return tf.strings.join([name, " record ", tf.strings.as_string(index), ": "])

  def _describe(self, b, i) -> tf.Tensor:
    """What is wrong with element i of block b."""
    return tf.strings.join([
        self._where(b["file_id"][i], b["index"][i]), records.bad_record_message(b["reason"][i]),
        "; key: ", records.printable(b["key"][i]),
        "; image (height, width, bytes) or features (16, P, values): ",
        tf.strings.format("{}", b["image_info"][i]),
        "; caption_ids: ", tf.strings.as_string(b["num_ids"][i]), " ids, the first ",
        tf.strings.format("{}", b["ids_head"][i][:tf.minimum(b["num_ids"][i], _IDS_SHOWN)],
                          summarize=_IDS_SHOWN)])

  def _describe_dropped(self, b, i) -> tf.Tensor:
    """The record the parser rejected just before element i of block b."""
    return tf.strings.join([
        self._where(b["prev_file"][i], b["prev_index"][i]),
        records.bad_record_message(tf.constant(records.NOT_AN_EXAMPLE))])

  def __call__(self, state, b):
    last_seq, good_seen, run, pending, epoch_good, epoch_bad = state
    seq, reason, kind = b["seq"], b["reason"], b["kind"]
    n = tf.size(seq)
    gap = seq - tf.concat([[last_seq], seq[:-1]], axis=0) - 1  # records dropped before i
    good = tf.equal(reason, records.GOOD) & tf.equal(kind, _RECORD)
    out = {k: tf.boolean_mask(b[k], good) for k in self.keep}
    bad = (tf.one_hot(reason, _NUM_REASONS, dtype=tf.int64) +  # one_hot(GOOD) is all 0
           gap[:, None] * tf.one_hot(records.NOT_AN_EXAMPLE, _NUM_REASONS, dtype=tf.int64))
    num_bad = tf.reduce_sum(bad, axis=1)
    checks = []
    if self.epochs:
      # Good and bad records of the epoch up to each element; at an epoch's end marker, the
      # epoch's totals.
      end = tf.equal(kind, _END_OF_EPOCH)
      goods = _since_last_good(tf.cast(good, tf.int64), end, epoch_good)
      bads = _since_last_good(num_bad, end, epoch_bad)
      at_empty = _first(end & tf.equal(goods, 0))
      checks.append((at_empty, lambda: tf.strings.join([
          "no good record in epoch ", tf.strings.as_string(b["index"][at_empty]), " of ",
          self.shard, " (", tf.strings.as_string(bads[at_empty]), " bad records",
          " skipped" if not self.fail else "", "): the files hold no record for this worker, "
          "or only bad ones, and the stream would never yield a batch"])))
      epoch_good = tf.where(end[-1], tf.zeros_like(epoch_good), goods[-1])
      epoch_bad = tf.where(end[-1], tf.zeros_like(epoch_bad), bads[-1])
    if self.fail:
      at_gap, at_bad = _first(gap > 0), _first(reason >= 0)
      checks.append((tf.minimum(at_gap, at_bad), lambda: tf.strings.join([
          "on_bad_record=fail: bad record in ",
          tf.cond(at_gap <= at_bad, lambda: self._describe_dropped(b, at_gap),
                  lambda: self._describe(b, at_bad))])))
    else:
      runs = _since_last_good(num_bad, good, run)
      at = _first(runs >= self.max_run)
      checks.append((at, lambda: tf.strings.join([
          f"on_bad_record=skip: {self.max_run} bad records in a row (is the data, or "
          "image_size / feature_dim / vocab_size / max_caption_ids, wrong?); the last: ",
          tf.cond(reason[at] >= 0, lambda: self._describe(b, at),
                  lambda: self._describe_dropped(b, at))])))
      run = tf.where(good[-1], tf.zeros_like(run), runs[-1])
      # A resumed run counts only bad records after the skip_records-th good record: the first
      # run counted those before it. (Carried counts would leave with the skipped records
      # anyway; counted at read time they must not be added.)
      seen = good_seen + tf.cumsum(tf.cast(good, tf.int64), exclusive=True)
      bad = tf.where((seen >= self.skip_records)[:, None], bad, tf.zeros_like(bad))
      if self.counter is not None and self.carry:
        before = _since_last_good(bad, good, pending)
        out["bad_before"] = tf.boolean_mask(before, good)
        pending = tf.where(good[-1], tf.zeros_like(pending), before[-1])
      elif self.counter is not None:
        self.counter.add(tf.reduce_sum(bad, axis=0))  # runs without a dependency on it
    with tf.control_dependencies([_fail_at_first(checks, n)]):
      good_seen += tf.reduce_sum(tf.cast(good, tf.int64))
    return (seq[-1], good_seen, run, pending, epoch_good, epoch_bad), out


# How the judge's messages start (the trainer tells the data's errors from other failures).
DATA_ERRORS = ("on_bad_record=fail: ", "on_bad_record=skip: ", "no good record in epoch ")


def explain_error(error: tf.errors.OpError) -> tuple[bool, str]:
  """What an error raised by a `make_dataset` stream says, as one line.

  Returns:
    (True, the judge's message) for the data's own errors (a bad record with
    on_bad_record="fail", too many bad records in a row, an epoch without a good record);
    (False, TensorFlow's message without its graph decorations) for any other failure.
  """
  text = error.message
  start = text.find("assertion failed: [")
  if start >= 0:
    inner = text[start + len("assertion failed: ["):].split("\n", 1)[0].rstrip()
    inner = inner[:-1] if inner.endswith("]") else inner
    if inner.startswith(DATA_ERRORS):
      return True, inner
  first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  if first.startswith("{{function_node") and "}} " in first:
    first = first.split("}} ", 1)[1]
  return False, first


def _fail_at_first(checks, n) -> tf.Tensor:
  """Raises InvalidArgumentError for the check that fails first in the block, if any.

  Args:
    checks: (position, message) pairs: the element where a problem shows (`n`: nowhere) and a
      function building the message (called only on failure).
    n: the block's size.
  """
  first = tf.reduce_min(tf.stack([at for at, _ in checks]))

  def message(i):
    at, build = checks[i]
    if i == len(checks) - 1:
      return build()
    return tf.cond(tf.equal(at, first), build, lambda: message(i + 1))

  return _fail_unless(tf.equal(first, n), "", lambda: message(0))


def _fail_unless(condition: tf.Tensor, prefix: str, describe) -> tf.Tensor:
  """Raises InvalidArgumentError "<prefix><describe()>" unless `condition`; the message is
  built only on failure."""
  def fail():
    message = tf.strings.join([prefix, describe()])
    with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
      return tf.constant(False)
  return tf.cond(condition, lambda: tf.constant(True), fail)


def _peek(files: Sequence[str], check: dict, max_records: int) -> dict[str, tf.Tensor]:
  """The first good record (to learn H, W or P), skipping bad ones as the pipeline does."""
  looked = 0
  for path in files:
    if looked >= max_records:
      break
    it = iter(tf.data.TFRecordDataset(path))
    while looked < max_records:
      try:
        serialized = next(it)
      except StopIteration:
        break
      except (tf.errors.OpError, UnicodeDecodeError):  # corrupt framing: the rest is lost
        break
      looked += 1
      try:
        ex, reason = records.check_example(serialized, **check)
      except tf.errors.InvalidArgumentError:
        continue
      if int(reason) == records.GOOD:
        return ex
  raise ValueError(f"no good record among the first {looked} records of {list(files)[:3]}... "
                   "(to learn the image size or feature_dim)")


def caption_tokens(caption_ids: tf.Tensor, max_len: int) -> tf.Tensor:
  """`[CLS] ids [SEP]` truncated to `max_len` (keeping [SEP]) and right-padded with [PAD].

  Args:
    caption_ids: <int32>[N] a record's `caption_ids` ([CLS] ... [SEP]).
    max_len: the padded length L (>= 2).

  Returns:
    <int32>[L] tokens.
  """
  body = caption_ids[1:-1][:max_len - 2]
  tokens = tf.concat([[CLS_ID], body, [SEP_ID]], axis=0)
  tokens = tf.pad(tokens, [[0, max_len - tf.size(tokens)]], constant_values=PAD_ID)
  return tf.ensure_shape(tokens, [max_len])


def _window_shuffle(ds: tf.data.Dataset, window: int, seed: int, epoch) -> tf.data.Dataset:
  """Permutes each run of `window` consecutive elements by a stateless function of
  (seed, epoch, window index).

  Used instead of `Dataset.shuffle`, whose seeded order also depends on TensorFlow's global
  seed (and whose seed cannot follow the epoch inside a `flat_map`): the data order stays a
  pure function of (seed, epoch) whatever the caller seeded. Like a shuffle buffer of the same
  size, it holds `window` records and moves a record by less than `window` positions.
  """
  def permute(index, block):
    n = tf.shape(block[0])[0]
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64) + 1, epoch * 2**20 + index]))
    return tuple(tf.gather(v, order) for v in block)

  return ds.batch(window).enumerate().map(_graph(permute)).unbatch()


# Epochs of a repeated stream: unbounded in practice (a Dataset.range needs a bound).
_EPOCHS_FOREVER = 2**62


def _marker(kind: int, index) -> tf.data.Dataset:
  """One element of `kind` (_END_OF_EPOCH, _END_OF_STREAM) in the reader's structure."""
  return tf.data.Dataset.from_tensors(
      (tf.constant(b""), tf.constant(-1, tf.int64), tf.cast(index, tf.int64),
       tf.constant(kind)))


def _parse_block(block: dict, parse) -> tf.data.Dataset:
  """The elements of one numbered block, parsed; those the parser rejects are dropped."""
  return tf.data.Dataset.from_tensor_slices(block).map(_graph(parse)).ignore_errors()


def make_dataset(file_pattern: str | Sequence[str], *, batch_size: int, max_len: int,
                 training: bool, seed: int = 0, shard_index: int = 0, num_shards: int = 1,
                 shuffle_buffer: int = 2048, image_mode: str = "pixels",
                 image_size: int | tuple[int, int] | None = None,
                 feature_dim: int | None = None, repeat: bool | None = None,
                 drop_remainder: bool = True, num_batches: int | None = None,
                 skip_batches: int = 0, include_text: bool = False,
                 cycle_length: int = 8, on_bad_record: str = "skip",
                 bad_record_counter: BadRecordCounter | None = None,
                 max_caption_ids: int = records.MAX_CAPTION_IDS,
                 vocab_size: int = VOCAB_SIZE,
                 max_consecutive_bad_records: int = 1000) -> tf.data.Dataset:
  """Builds the batched, sharded, deterministic captioning dataset.

  Args:
    file_pattern: glob pattern(s) of TFRecord files (`records` format).
    batch_size: B, examples per batch on this worker.
    max_len: L, padded token length including [CLS] and [SEP] (>= 2).
    training: shuffle files and records (seeded) and, by default, repeat forever.
    seed: the shuffle seed; must be the same on every worker (record sharding relies on every
      worker seeing the same interleaved order, a function of (seed, epoch) only).
    shard_index: this worker's rank in [0, num_shards).
    num_shards: D, the number of workers reading disjoint shards.
    shuffle_buffer: records in the shuffle buffer (training only, >= 1; 1 keeps the records
      of the interleaved files in order, and only the file order changes between epochs).
    image_mode: "pixels" (yield "image") or "features" (yield "patch_features").
    image_size: H (square) or (H, W) every image must have; None reads it from the first good
      record.
    feature_dim: P every record must have; None reads it from the first good record.
    repeat: repeat forever; default `training`.
    drop_remainder: when the stream ends (repeat=False), drop a last partial batch (True) or
      fill it with all-[PAD] rows (False): shapes stay static and the padding rows carry no
      target, so evaluation counts every record exactly once.
    num_batches: if set (repeat=False), yield exactly this many batches, filling with all-[PAD]
      rows after the data ends, so every worker runs the same number of evaluation steps
      (see `eval_num_batches`). Batches past the data are entirely padding.
    skip_batches: drop the first n batches of the stream (resume without an iterator
      checkpoint).
    include_text: also yield "key" and "caption", <string>[B] (for inspecting samples).
    cycle_length: files read in parallel by the interleave.
    on_bad_record: "skip" drops bad records (`records.BAD_RECORD_REASONS`) and counts them in
      `bad_record_counter`; "fail" stops at the first with an InvalidArgumentError naming the
      file, the record index in it and the reason.
    bad_record_counter: where "skip" counts what it drops (see `BadRecordCounter`); None
      drops without counting.
    max_caption_ids: a record with more caption_ids is bad ("caption_too_long"); captions up
      to this long are truncated to `max_len`.
    vocab_size: caption ids must be in [0, vocab_size).
    max_consecutive_bad_records: with "skip", this many bad records in a row raise an
      InvalidArgumentError: the data or a size argument is wrong, and a repeated stream of
      only bad records would otherwise never yield a batch. (So does an epoch of a repeated
      stream without a good record, however short.)

  Returns:
    A `tf.data.Dataset` of dicts as described in the module docstring, with static shapes.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} outside [0, num_shards={num_shards})")
  if image_mode not in records.IMAGE_MODES:
    raise ValueError(f"image_mode must be one of {records.IMAGE_MODES}, got {image_mode!r}")
  if skip_batches < 0:
    raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
  if training and (isinstance(shuffle_buffer, bool) or
                   not isinstance(shuffle_buffer, (int, np.integer)) or shuffle_buffer < 1):
    raise ValueError(f"shuffle_buffer must be an integer >= 1 (1: no record shuffle), got "
                     f"{shuffle_buffer!r}")
  if on_bad_record not in ("skip", "fail"):
    raise ValueError(f"on_bad_record must be 'skip' or 'fail', got {on_bad_record!r}")
  if on_bad_record == "fail" and bad_record_counter is not None:
    raise ValueError("bad_record_counter counts what on_bad_record='skip' drops; 'fail' "
                     "drops nothing")
  if max_consecutive_bad_records < 1:
    raise ValueError(f"max_consecutive_bad_records must be >= 1, got "
                     f"{max_consecutive_bad_records}")
  repeat = training if repeat is None else repeat
  if num_batches is not None and repeat:
    raise ValueError("num_batches is for finite (repeat=False) evaluation streams")

  all_files = records.list_files(file_pattern)
  check = {"image_mode": image_mode, "max_caption_ids": max_caption_ids,
           "vocab_size": vocab_size}
  if image_mode == "pixels":
    if image_size is None:
      first = _peek(all_files, check, max_consecutive_bad_records)["image"]
      image_size = (int(first.shape[0]), int(first.shape[1]))
    elif isinstance(image_size, int):
      image_size = (image_size, image_size)
    image_size = tuple(int(x) for x in image_size)
  elif feature_dim is None:
    first = _peek(all_files, check, max_consecutive_bad_records)["patch_features"]
    feature_dim = int(first.shape[1])
  check.update(image_size=image_size, feature_dim=feature_dim)

  files, shard_records = _shard_files(all_files, shard_index, num_shards)
  read = _file_reader(files)

  def one_epoch(epoch):
    """The records of one pass over this shard's files, in the order of (seed, epoch)."""
    ids = tf.range(len(files), dtype=tf.int64)
    if training:
      # Stateless: a pure function of (seed, epoch), whatever TensorFlow's global seed is. A
      # seeded `Dataset.shuffle` also draws from the global seed, which the trainer once set to
      # seed + rank: each worker then ordered the files differently before the records were
      # dealt round-robin, and workers read some records twice and others never.
      ids = tf.random.experimental.stateless_shuffle(
          ids, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
    ds = tf.data.Dataset.from_tensor_slices(ids).interleave(
        _graph(read), cycle_length=min(cycle_length, len(files)), block_length=1,
        num_parallel_calls=AUTOTUNE, deterministic=True)
    if shard_records:
      # A corrupt-file element is sharded like a record: exactly one worker counts it.
      ds = ds.shard(num_shards, shard_index)
    if training:
      ds = _window_shuffle(ds, shuffle_buffer, seed, epoch)
    if repeat:  # lets the judge see an epoch without a good record (it would spin forever)
      ds = ds.concatenate(_marker(_END_OF_EPOCH, epoch))
    return ds

  # Epochs one after another, each complete before the next starts.
  ds = tf.data.Dataset.range(_EPOCHS_FOREVER if repeat else 1).flat_map(_graph(one_epoch))
  if not repeat:  # lets the judge see records the parser rejected at the very end
    ds = ds.concatenate(_marker(_END_OF_STREAM, -1))
  minus_one = tf.constant(-1, tf.int64)
  ds = ds.batch(_BLOCK).scan((tf.constant(0, tf.int64), minus_one, minus_one),
                             _graph(_number))

  image_key = "image" if image_mode == "pixels" else "patch_features"

  def parse(el):
    is_record = tf.equal(el["kind"], _RECORD)
    ex, reason = records.check_example(tf.where(is_record, el["serialized"], ""), **check)
    ids = ex["caption_ids"]
    out = {image_key: ex[image_key], "tokens": caption_tokens(ids, max_len),
           "key": ex["key"], "caption": ex["caption"], "image_info": ex["image_info"],
           "num_ids": tf.size(ids), "ids_head": _head(ids),
           "reason": tf.where(tf.equal(el["kind"], _CORRUPT_FILE), records.CORRUPT_FILE,
                              tf.where(is_record, reason, records.GOOD))}
    out.update({k: el[k] for k in ("file_id", "index", "kind", "seq", "prev_file",
                                   "prev_index")})
    return out

  counter = bad_record_counter
  # On a repeated stream counts ride with the records to the batch that consumes them; a
  # finite stream may drop its last partial batch, so there they are counted when read.
  carry = counter is not None and repeat
  keep = [image_key, "tokens"] + (["key", "caption"] if include_text else [])
  shard = (f"shard {shard_index} of {num_shards}: " if num_shards > 1 else "") + (
      f"{len(files)} file{'s' * (len(files) != 1)}, the first {files[0]}")
  judge = _Judge(files, keep=keep, fail=on_bad_record == "fail", counter=counter, carry=carry,
                 skip_records=skip_batches * batch_size,
                 max_consecutive_bad_records=max_consecutive_bad_records, epochs=repeat,
                 shard=shard)
  # `ignore_errors` around each block's parse alone: a record the parser rejects is dropped
  # (and found by the judge), while an error anywhere upstream (reading, shuffling, a bad
  # argument) reaches the caller. One `ignore_errors` over the whole stream swallowed those
  # too, and a repeated stream whose every epoch failed spun forever without a batch. An
  # interleave whose block_length is at least a block's size keeps the blocks in order.
  ds = ds.interleave(_graph(lambda block: _parse_block(block, parse)), cycle_length=AUTOTUNE,
                     block_length=_BLOCK, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(_BLOCK).scan(judge.initial_state(), _graph(judge)).unbatch()
  if skip_batches:
    # After the judge: the stream of good records is what a resumed run must continue, and
    # bad ones are not in it (this costs parsing the skipped records).
    ds = ds.skip(skip_batches * batch_size)

  if not repeat and (num_batches is not None or not drop_remainder):
    image_shape = ([*image_size, 3] if image_mode == "pixels" else
                   [records.NUM_PATCHES, feature_dim])
    pad = {image_key: tf.zeros(image_shape, tf.uint8 if image_mode == "pixels" else tf.float32),
           "tokens": tf.zeros([max_len], tf.int32)}
    if include_text:
      pad["key"], pad["caption"] = tf.constant(""), tf.constant("")
    pad_ds = tf.data.Dataset.from_tensors(pad)
    # B - 1 padding rows complete a partial last batch and are dropped by drop_remainder when
    # the data fills whole batches; with num_batches, padding continues as long as needed.
    ds = ds.concatenate(pad_ds.repeat() if num_batches is not None else
                        pad_ds.repeat(batch_size - 1))
  ds = ds.batch(batch_size, drop_remainder=True)
  if num_batches is not None:
    ds = ds.take(num_batches)
  ds = ds.prefetch(AUTOTUNE)

  options = tf.data.Options()
  options.deterministic = True
  # We shard by rank ourselves; tf.distribute must not shard a second time.
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  if counter is not None:
    # The counter is state outside the pipeline: an iterator checkpoint leaves it out (the
    # trainer checkpoints its variables), rather than refusing to save.
    options.experimental_external_state_policy = (
        tf.data.experimental.ExternalStatePolicy.IGNORE)
  if carry:
    def count(batch):
      counter.add(tf.reduce_sum(batch.pop("bad_before"), axis=0))
      return batch
    # Last, after the prefetch, and without a prefetch injected behind it: the map then runs
    # when the trainer asks for the batch, so the counts never run ahead of the training step.
    ds = ds.map(_graph(count))
    options.experimental_optimization.inject_prefetch = False
  return ds.with_options(options)


def count_records(file_pattern: str | Sequence[str]) -> list[int]:
  """Readable records in each file matching `file_pattern`, in sorted file order.

  A corrupt file counts the records before the damage (the reader loses the rest), so the
  counts bound the good records from above and `eval_num_batches` still covers them all.
  """
  return [int(tf.data.TFRecordDataset(f).ignore_errors().reduce(np.int64(0),
                                                                lambda n, _: n + 1))
          for f in records.list_files(file_pattern)]


def shard_record_counts(file_pattern: str | Sequence[str], num_shards: int) -> list[int]:
  """Records each of `num_shards` workers reads in one pass (same rule as `make_dataset`)."""
  counts = count_records(file_pattern)
  files = list(range(len(counts)))
  _, shard_records = _shard_files(files, 0, num_shards)
  if shard_records:
    n = sum(counts)
    return [n // num_shards + (i < n % num_shards) for i in range(num_shards)]
  return [sum(counts[i] for i in _shard_files(files, i, num_shards)[0])
          for i in range(num_shards)]


def eval_num_batches(file_pattern: str | Sequence[str], *, batch_size: int,
                     num_shards: int = 1) -> int:
  """Batches that cover the largest shard: pass as `num_batches` for a complete evaluation.

  Every worker then runs the same number of steps (collectives stay matched) and, with the
  all-[PAD] filler rows masked, every record counts exactly once over all workers.
  """
  return max(math.ceil(c / batch_size) for c in shard_record_counts(file_pattern, num_shards))


def _target_ids(file_pattern: str | Sequence[str], max_len: int | None) -> np.ndarray:
  """Concatenated targets of every record: `tokens[1:]` without padding."""
  spec = {"caption_ids": tf.io.RaggedFeature(tf.int64)}
  ds = tf.data.TFRecordDataset(records.list_files(file_pattern)).map(
      lambda s: tf.io.parse_single_example(s, spec)["caption_ids"])
  out = []
  for ids in ds.as_numpy_iterator():
    records.check_caption_ids(ids)
    if max_len is not None:
      ids = np.concatenate([ids[:1], ids[1:-1][:max_len - 2], ids[-1:]])
    out.append(ids[1:])
  return np.concatenate(out) if out else np.zeros([0], np.int64)


def unigram_perplexity(train_pattern: str | Sequence[str],
                       validation_pattern: str | Sequence[str], *,
                       max_len: int | None = None, vocab_size: int = VOCAB_SIZE) -> float:
  """Perplexity of an add-one-smoothed unigram model: the baseline a captioner must beat.

  The tokens that count are exactly the model's targets: for every record, the caption ids
  after [CLS] up to and including [SEP] (truncated as `make_dataset` truncates when `max_len`
  is given); [CLS] and [PAD] are never targets. With c(w) the count of w among the training
  targets, N their total and V = `vocab_size` (all 21128 entries, specials included),

      p(w) = (c(w) + 1) / (N + V),     PPL = exp(-(1/M) * sum_j log p(v_j))

  over the M validation targets v_j. This equals a model that ignores the image and the
  preceding tokens; a trained captioner's teacher-forced perplexity should be far below it.

  Args:
    train_pattern: TFRecord files the unigram counts come from.
    validation_pattern: TFRecord files it is evaluated on.
    max_len: truncate like the pipeline with this `max_len`; None keeps whole captions.
    vocab_size: V of the smoothing.

  Returns:
    The perplexity.
  """
  train = _target_ids(train_pattern, max_len)
  valid = _target_ids(validation_pattern, max_len)
  if valid.size == 0:
    raise ValueError(f"no validation targets in {validation_pattern!r}")
  if (train.size and train.max() >= vocab_size) or valid.max() >= vocab_size:
    raise ValueError(f"token ids exceed vocab_size={vocab_size}")
  counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
  log_p = np.log(counts + 1.0) - np.log(train.size + vocab_size)
  return float(np.exp(-log_p[valid].mean()))

