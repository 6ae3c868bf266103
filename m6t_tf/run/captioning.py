"""Captions from a network: decoding batches of images on every worker, in lockstep.

`Captioner` decodes fixed-size batches in one `tf.function`; `decode_items` gives each worker
its share of the images (batches of the same size on every rank, the last ones padded with
filler rows) and gathers the rows on rank 0; `CaptionSamples` is the trainer's: greedy
captions of a few validation images beside their references, written to TensorBoard.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from m6t_tf.data import images as images_lib
from m6t_tf.data import records
from m6t_tf.data import tokenizer as tokenizer_lib
from m6t_tf.errors import ConfigError
from m6t_tf.models import decoding

class Captioner:
  """Decodes fixed-size batches in one `tf.function` (traced once per batch size)."""

  def __init__(self, network, options: decoding.DecodeOptions, *, lockstep: bool = False,
               vocab: Optional[list[str]] = None):
    options.check(network.max_text_length, network.vocab_size)
    self.network, self.options, self.lockstep = network, options, lockstep
    first_banned = None if vocab is None else tf.constant(decoding.continuations(vocab))
    self._fn = tf.function(lambda features, row_mask: decoding.decode(
        network, features, options, row_mask=row_mask, lockstep=lockstep,
        first_banned=first_banned))

  def __call__(self, features: dict, row_mask=None) -> dict:
    """{"image" | "patch_features": [B, ...]} -> NumPy arrays of `decoding.decode`."""
    first = next(iter(features.values()))
    if row_mask is None:
      row_mask = np.ones([first.shape[0]], bool)
    out = self._fn({k: tf.convert_to_tensor(v) for k, v in features.items()},
                   tf.convert_to_tensor(row_mask))
    return {k: v.numpy() for k, v in out.items()}


@dataclasses.dataclass
class Item:
  """One image to caption: its key, file path (or None), model input and references."""
  key: str
  path: Optional[str]
  features: np.ndarray
  references: list[str]


def list_image_files(patterns: str) -> list[str]:
  """Files of comma-separated glob patterns, sorted; raises if one matches nothing."""
  files = []
  for pattern in [p for p in patterns.split(",") if p]:
    found = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
    if not found:
      raise ConfigError(f"--images={pattern!r} matches no file")
    files.extend(found)
  return list(dict.fromkeys(files))


def read_image_files(paths: Sequence[str], image_size: int) -> list[Item]:
  """Decodes and resizes image files as the dataset builder did (`m6t_tf.data.images`)."""
  decode = tf.function(lambda data: images_lib.decode_image(data, image_size))
  items = []
  for path in paths:
    try:
      pixels = decode(tf.io.read_file(path)).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
      raise ConfigError(f"{path}: undecodable image ({e.message.splitlines()[0]}); give PNG, "
                        f"JPEG, GIF or BMP files") from None
    items.append(Item(key=path, path=path, features=pixels, references=[]))
  return items


def read_split_items(pattern: str, *, image_mode: str, max_len: int) -> list[Item]:
  """One item per distinct record key, with every caption of that key as its references."""
  del max_len  # references are the records' whole captions, as the metrics expect
  files = records.list_files(pattern)
  if not files:
    raise ConfigError(f"no records match {pattern!r}")
  feature = "image" if image_mode == "pixels" else "patch_features"
  items: dict[str, Item] = {}
  dataset = tf.data.TFRecordDataset(files).map(
      lambda s: records.parse_example(s, image_mode=image_mode))
  for ex in dataset.as_numpy_iterator():
    key = ex["key"].decode("utf-8")
    caption = ex["caption"].decode("utf-8")
    if key not in items:
      items[key] = Item(key=key, path=None, features=ex[feature], references=[])
    items[key].references.append(caption)
  return list(items.values())


def world_rank(ctx) -> tuple[int, int]:
  return int(getattr(ctx, "size", 1)), int(getattr(ctx, "rank", 0))


def decode_items(items: Sequence[Item], captioner: Captioner, *, feature: str, ctx,
                 batch_size: int, tokenizer) -> list[dict]:
  """Decodes this rank's share of `items` in lockstep with the other ranks; rows in order.

  Returns every row on rank 0 (gathered from all ranks) and this rank's rows elsewhere.
  """
  world, rank = world_rank(ctx)
  mine = list(range(rank, len(items), world))
  per_rank = math.ceil(len(items) / world)
  batch = max(1, min(batch_size, per_rank))
  num_batches = math.ceil(per_rank / batch)  # the same on every rank
  shape = items[0].features.shape
  dtype = items[0].features.dtype
  rows = []
  for i in range(num_batches):
    index = mine[i * batch:(i + 1) * batch]
    features = np.zeros([batch, *shape], dtype)
    for j, n in enumerate(index):
      features[j] = items[n].features
    row_mask = np.arange(batch) < len(index)
    out = captioner({feature: features}, row_mask)
    for j, n in enumerate(index):
      rows.append((n, _row(items[n], {k: v[j] for k, v in out.items()}, tokenizer)))
  if world > 1:
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    rows = [r for part in hvd.allgather_object(rows) for r in part]
  return [r for _, r in sorted(rows, key=lambda nr: nr[0])]


def _row(item: Item, out: dict, tokenizer) -> dict:
  """The JSON row of one image from its decode outputs ([N, ...] candidates, best first)."""
  candidates = []
  for tokens, log_prob, score, length in zip(out["tokens"], out["log_prob"], out["score"],
                                             out["length"]):
    if not np.isfinite(score):
      continue  # a beam that never ended (not possible once the vocabulary exceeds 2K)
    candidates.append({"caption": tokenizer.decode(tokens[:length + 1]),
                       "log_prob": float(log_prob), "score": float(score),
                       "num_tokens": int(length)})
  best = candidates[0]
  return {"key": item.key, "image": item.path, "caption": best["caption"],
          "log_prob": best["log_prob"], "score": best["score"],
          "num_tokens": best["num_tokens"],
          "candidates": [{k: c[k] for k in ("caption", "log_prob", "score")} for c in candidates],
          "references": list(item.references)}


class CaptionSamples:
  """Greedy captions of a few validation images beside their references, for TensorBoard.

  Every worker decodes (in lockstep: with experts sharded each decode step runs the
  all-to-alls), and the chief writes one `eval/captions` text summary: a Markdown table of
  image key, generated caption and references.
  """

  def __init__(self, eval_data: str, *, num_images: int, network, image_mode: str,
               max_len: int, ctx):
    self.ctx = ctx
    self.items = self._first_items(eval_data, num_images, image_mode)
    self.feature = "image" if image_mode == "pixels" else "patch_features"
    self.tokenizer = tokenizer_lib.Tokenizer()
    options = decoding.DecodeOptions(method="greedy",
                                     max_len=min(max_len, network.max_text_length + 1))
    self.captioner = Captioner(
        network, options, lockstep=ctx.size > 1,
        vocab=tokenizer_lib.load_vocab(self.tokenizer.vocab_path))

  @staticmethod
  def _first_items(pattern: str, num_images: int, image_mode: str) -> list:
    """The first `num_images` distinct images of the split, with the references found among
    its first records (the whole split is not read)."""
    feature = "image" if image_mode == "pixels" else "patch_features"
    items = {}
    dataset = tf.data.TFRecordDataset(records.list_files(pattern)).take(64 * num_images).map(
        lambda x: records.parse_example(x, image_mode=image_mode))
    for ex in dataset.as_numpy_iterator():
      key = ex["key"].decode("utf-8")
      if key not in items and len(items) < num_images:
        items[key] = Item(key=key, path=None, features=ex[feature], references=[])
      if key in items:
        items[key].references.append(ex["caption"].decode("utf-8"))
    return list(items.values())

  def rows(self) -> list[dict]:
    """Decodes the images (every worker must call it); rows on the chief."""
    return decode_items(self.items, self.captioner, feature=self.feature, ctx=self.ctx,
                              batch_size=len(self.items), tokenizer=self.tokenizer)

  @staticmethod
  def markdown(rows: list[dict]) -> str:
    cell = lambda t: str(t).replace("|", "\\|").replace("\n", " ")
    lines = ["| image | generated (log-prob) | references |", "|---|---|---|"]
    for r in rows:
      lines.append(f"| {cell(r['key'])} | {cell(r['caption'])} ({r['log_prob']:.2f}) | "
                   f"{cell(' / '.join(r['references']))} |")
    return "\n".join(lines)

  def write(self, writer, step: int, rows: Optional[list[dict]] = None) -> list[dict]:
    """Decodes (unless given the `rows`) and writes the summary on the chief; returns the rows."""
    rows = self.rows() if rows is None else rows
    if writer is not None and rows:
      with writer.as_default():
        tf.summary.text("eval/captions", self.markdown(rows), step=step)
      writer.flush()
    return rows
