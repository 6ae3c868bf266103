"""The trainer's input: its shard of the training records, the evaluation batches, and how a
failure of the input pipeline reaches the user."""

from __future__ import annotations

import tensorflow as tf

from m6t_tf.data import pipeline
from m6t_tf.errors import ConfigError
from m6t_tf.layers.embeddings import NUM_PATCHES


def train_stream(train_data, *, ctx, seed: int, batch_size: int, max_len: int, image_mode: str,
                 shuffle_buffer: int, skip_batches: int = 0, on_bad_record: str = "skip",
                 counter=None, include_keys: bool = False):
  """This worker's training batches: its shard of `train_data` in the order of (seed, epoch).

  With `include_keys`, batches also carry "key" (<string>[B], each record's key).
  """
  shard, shards = ctx.data_shard()
  ds = pipeline.make_dataset(train_data, batch_size=batch_size, max_len=max_len, training=True,
                             seed=seed, shard_index=shard, num_shards=shards,
                             image_mode=image_mode, shuffle_buffer=shuffle_buffer,
                             skip_batches=skip_batches, on_bad_record=on_bad_record,
                             bad_record_counter=counter, include_text=include_keys)
  if include_keys:
    ds = ds.map(lambda b: {k: v for k, v in b.items() if k != "caption"})
  return ds


def eval_stream(eval_data, *, batch_size, max_len, image_mode, ctx):
  """This worker's evaluation batches: its shard of `eval_data` once, the last batch partial.
  Every worker gets the same number of batches (`pipeline.eval_num_batches`), so the
  collectives of each evaluation step pair up."""
  shard, shards = ctx.data_shard()
  n = pipeline.eval_num_batches(eval_data, batch_size=batch_size, num_shards=shards)
  return pipeline.make_dataset(eval_data, batch_size=batch_size, max_len=max_len, training=False,
                               shard_index=shard, num_shards=shards, image_mode=image_mode,
                               repeat=False, drop_remainder=False, num_batches=n)


def next_batch(iterator, *, train_data: str, step: int):
  """The next training batch. The input pipeline's own verdicts on the data (a bad record
  under on_bad_record='fail', bad records only, an epoch without a good record) are
  ConfigErrors naming the record and the fix; any other failure keeps its type and
  traceback, with a note naming the data and the step."""
  try:
    return next(iterator)
  except tf.errors.OpError as e:
    is_data, text = pipeline.explain_error(e)
    where = f"train.train_data={train_data!r} (the batch of step {step})"
    if not is_data:
      e.add_note(f"Raised by the input pipeline of {where}: {text}")
      raise
    if text.startswith("on_bad_record=fail"):
      fix = ("repair or remove that record, or set --gin_bindings=\"train.on_bad_record="
             "'skip'\" to skip and count bad records")
    else:
      fix = "check the files against the config (image size, MAX_LEN) and the worker count"
    raise ConfigError(f"{where}: {text}; {fix}") from None


def real_positions(batch) -> int:
  """Positions of `batch` that are real tokens: the patches of every real example plus the
  caption inputs that are not padding (the rest of a padded batch is never routed)."""
  inputs = batch["tokens"].numpy()[:, :-1]
  return NUM_PATCHES * int((inputs[:, 0] != 0).sum()) + int((inputs != 0).sum())
