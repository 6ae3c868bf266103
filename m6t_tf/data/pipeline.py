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
shuffle seeded, `deterministic=True` everywhere, no `py_function`). Two ways to resume:

1. Preferred: save the iterator in the trainer's checkpoint,
       it = iter(ds); ckpt = tf.train.Checkpoint(model=..., data=it)
   Restoring gives exactly the next batch. The checkpoint then holds the shuffle buffer:
   about `shuffle_buffer` serialized records per worker (2048 x 12 KiB = 25 MiB for 64x64
   pixels; 2048 x 16 x P x 4 bytes for patch features, so lower the buffer for large P).
2. `skip_batches=n` rebuilds the same stream and drops its first n batches. The records are
   skipped before parsing, so this costs reading, not decoding, n x batch_size records.

Sharding by worker rank: with at least `num_shards` files, worker i reads files i, i + D, ...;
with fewer files every worker reads all files and keeps records i, i + D, ... of the (same,
seeded) interleaved stream. Either way the shards partition the data. Shards may differ in
size (by a record, or by whole files); a repeated training stream does not care, and a finite
evaluation stream takes `num_batches=eval_num_batches(...)` so all workers step equally often.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from m6t_tf.data import records
from m6t_tf.data.tokenizer import CLS_ID, PAD_ID, SEP_ID, VOCAB_SIZE

AUTOTUNE = tf.data.AUTOTUNE


def _shard_files(files: list[str], shard_index: int, num_shards: int) -> tuple[list[str], bool]:
  """Files this shard reads, and whether records still need sharding."""
  if num_shards > 1 and len(files) >= num_shards:
    return files[shard_index::num_shards], False
  return files, num_shards > 1


def _peek(files: Sequence[str], image_mode: str) -> dict[str, tf.Tensor]:
  """Parses the first record of the first non-empty file (to learn H, W or P)."""
  for f in files:
    for serialized in tf.data.TFRecordDataset(f).take(1):
      return records.parse_example(serialized, image_mode=image_mode)
  raise ValueError(f"the files {list(files)[:3]}... hold no records")


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


def make_dataset(file_pattern: str | Sequence[str], *, batch_size: int, max_len: int,
                 training: bool, seed: int = 0, shard_index: int = 0, num_shards: int = 1,
                 shuffle_buffer: int = 2048, image_mode: str = "pixels",
                 image_size: int | tuple[int, int] | None = None,
                 feature_dim: int | None = None, repeat: bool | None = None,
                 drop_remainder: bool = True, num_batches: int | None = None,
                 skip_batches: int = 0, include_text: bool = False,
                 cycle_length: int = 8) -> tf.data.Dataset:
  """Builds the batched, sharded, deterministic captioning dataset.

  Args:
    file_pattern: glob pattern(s) of TFRecord files (`records` format).
    batch_size: B, examples per batch on this worker.
    max_len: L, padded token length including [CLS] and [SEP] (>= 2).
    training: shuffle files and records (seeded) and, by default, repeat forever.
    seed: the shuffle seed; must be the same on every worker (record sharding relies on every
      worker seeing the same interleaved order).
    shard_index: this worker's rank in [0, num_shards).
    num_shards: D, the number of workers reading disjoint shards.
    shuffle_buffer: records in the shuffle buffer (training only).
    image_mode: "pixels" (yield "image") or "features" (yield "patch_features").
    image_size: H (square) or (H, W) every image must have; None reads it from the first record.
    feature_dim: P every record must have; None reads it from the first record.
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
  repeat = training if repeat is None else repeat
  if num_batches is not None and repeat:
    raise ValueError("num_batches is for finite (repeat=False) evaluation streams")

  all_files = records.list_files(file_pattern)
  if image_mode == "pixels":
    if image_size is None:
      first = _peek(all_files, image_mode)["image"]
      image_size = (int(first.shape[0]), int(first.shape[1]))
    elif isinstance(image_size, int):
      image_size = (image_size, image_size)
    image_size = tuple(int(x) for x in image_size)
  elif feature_dim is None:
    feature_dim = int(_peek(all_files, image_mode)["patch_features"].shape[1])

  files, shard_records = _shard_files(all_files, shard_index, num_shards)
  ds = tf.data.Dataset.from_tensor_slices(files)
  if training:
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(files)),
                     block_length=1, num_parallel_calls=AUTOTUNE, deterministic=True)
  if shard_records:
    ds = ds.shard(num_shards, shard_index)
  if training:
    ds = ds.shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  if skip_batches:
    # Skipping serialized records before `map` gives the same stream as skipping batches
    # after `batch` (the map is one-to-one) without decoding what is thrown away.
    ds = ds.skip(skip_batches * batch_size)

  image_key = "image" if image_mode == "pixels" else "patch_features"

  def to_features(serialized):
    ex = records.parse_example(serialized, image_mode=image_mode, image_size=image_size,
                               feature_dim=feature_dim)
    out = {image_key: ex[image_key], "tokens": caption_tokens(ex["caption_ids"], max_len)}
    if include_text:
      out["key"], out["caption"] = ex["key"], ex["caption"]
    return out

  ds = ds.map(to_features, num_parallel_calls=AUTOTUNE, deterministic=True)

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
  return ds.with_options(options)


def count_records(file_pattern: str | Sequence[str]) -> list[int]:
  """Records in each file matching `file_pattern`, in sorted file order."""
  return [int(tf.data.TFRecordDataset(f).reduce(np.int64(0), lambda n, _: n + 1))
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

