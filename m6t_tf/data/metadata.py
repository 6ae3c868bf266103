"""What a dataset holds, read before anything is built: caption length, image size, feature width.

`tools/make_dataset.py` and the demo builder write `metadata.json` next to the TFRecords; the
trainer and the evaluator read it (`read`) and compare it with the config (`check_config`)
before the input pipeline or the model exists, so a mismatch is one line naming the binding to
change, at start-up, instead of an error from inside the model after the first batch.

Keys read from `metadata.json` (other keys are ignored):

    image_mode           "pixels" or "features" (or a list of both): what the records carry
    image_size           [H, W] of the pixels
    feature_dim          P of the patch features
    max_caption_tokens   the longest `caption_ids`, [CLS] and [SEP] included

Hand-made TFRecords need no metadata: the first readable record gives the image mode and size
or the feature width, and, only where the caption length must follow the data, every record's
`caption_ids` are scanned (which reads the whole dataset once).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

from absl import logging

from m6t_tf.errors import ConfigError

METADATA_FILE = "metadata.json"
GRID = 4  # the 4×4 patch grid of M6 (m6t_tf.layers.embeddings.GRID)
_PEEK_RECORDS = 16  # bad records tolerated before the first readable one


@dataclasses.dataclass(frozen=True)
class DataFacts:
  """What the files of one glob pattern hold.

  Attributes:
    pattern: the glob pattern.
    binding: the config binding the pattern came from, for messages (`train.train_data`).
    source: where the facts come from, for messages (a metadata.json path, or "the first
      record of <file>").
    image_modes: what the records carry: ("pixels",), ("features",) or both.
    image_size: (H, W) of the pixels, or None.
    feature_dim: P of the patch features, or None.
    max_caption_tokens: the longest caption in tokens ([CLS]/[SEP] included); None = unknown
      (no metadata and no scan asked for).
    mean_caption_tokens: the mean caption length in tokens, from metadata.json (weighted by
      records over folders); None = unknown. Sizes expert capacity from the real tokens
      (`configurables.resolve_real_token_fraction`).
  """
  pattern: str
  binding: str
  source: str
  image_modes: tuple
  image_size: Optional[tuple]
  feature_dim: Optional[int]
  max_caption_tokens: Optional[int]
  mean_caption_tokens: Optional[float] = None

  def where(self) -> str:
    return f"{self.binding}={self.pattern!r}"


def list_files(pattern: str, binding: str) -> list:
  """Sorted files matching `pattern`; ConfigError naming `binding` if none do."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not isinstance(pattern, str) or not pattern:
    raise ConfigError(f"{binding}={pattern!r} is not a file pattern: pass "
                      f"--gin_bindings=\"{binding}='path/train-*.tfrecord'\"")
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    parent = os.path.dirname(pattern) or "."
    hint = ("" if tf.io.gfile.isdir(parent) else
            f"; the folder {parent!r} does not exist (relative paths start at {os.getcwd()})")
    raise ConfigError(f"{binding}={pattern!r} matches no file{hint}")
  return files


def read(pattern: str, *, binding: str, need_length: bool = False) -> DataFacts:
  """The facts of the files matching `pattern`, from their metadata.json or their records.

  Args:
    pattern: a TFRecord glob pattern.
    binding: the binding it came from (`train.train_data`), named in every error.
    need_length: without metadata, scan every record for the longest caption (else the
      length stays unknown).

  Raises:
    ConfigError: no file matches, a metadata.json is unreadable, or the files disagree.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (gfile: also gs://, s3://)
  files = list_files(pattern, binding)
  folders = sorted({os.path.dirname(f) for f in files})
  metas = []
  for folder in folders:
    path = os.path.join(folder, METADATA_FILE)
    if not tf.io.gfile.exists(path):
      metas = None
      break
    try:
      with tf.io.gfile.GFile(path, "rb") as f:
        metas.append((path, json.loads(f.read().decode("utf-8"))))
    except (OSError, ValueError, tf.errors.OpError) as e:
      raise ConfigError(f"{path} (metadata of {binding}) is unreadable: {e}; rebuild the "
                        f"dataset or delete the file") from None
  if metas:
    return _from_metadata(pattern, binding, metas)
  return _from_records(pattern, binding, files, need_length)


def _from_metadata(pattern, binding, metas) -> DataFacts:
  modes, sizes, dims, lengths, means = set(), set(), set(), [], []
  for _, meta in metas:
    records = meta.get("num_pairs", meta.get("num_records"))
    if meta.get("mean_caption_tokens") is not None and records:
      means.append((float(meta["mean_caption_tokens"]), int(records)))
    mode = meta.get("image_mode", "pixels")
    modes.update([mode] if isinstance(mode, str) else mode)
    if meta.get("image_size"):
      size = meta["image_size"]
      sizes.add(tuple(int(x) for x in (size if isinstance(size, list) else [size, size])))
    if meta.get("feature_dim"):
      dims.add(int(meta["feature_dim"]))
    if meta.get("max_caption_tokens") is not None:
      lengths.append(int(meta["max_caption_tokens"]))
  source = metas[0][0] if len(metas) == 1 else f"{len(metas)} metadata.json files"
  if len(sizes) > 1 or len(dims) > 1:
    raise ConfigError(f"{binding}={pattern!r} mixes folders of different image sizes or "
                      f"feature widths ({sorted(sizes or dims)}, {source}); convert them alike")
  return DataFacts(pattern=pattern, binding=binding, source=source,
                   image_modes=tuple(sorted(modes)),
                   image_size=next(iter(sizes)) if sizes else None,
                   feature_dim=next(iter(dims)) if dims else None,
                   max_caption_tokens=max(lengths) if len(lengths) == len(metas) else None,
                   mean_caption_tokens=(sum(m * n for m, n in means) / sum(n for _, n in means)
                                        if means and len(means) == len(metas) else None))


def _features(serialized: bytes) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.train.Example.FromString(serialized).features.feature


def _from_records(pattern, binding, files, need_length) -> DataFacts:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  first, looked = None, 0
  for path in files:
    try:
      for serialized in tf.data.TFRecordDataset(path).take(_PEEK_RECORDS - looked):
        looked += 1
        try:
          feat = _features(serialized.numpy())
        except Exception:  # pylint: disable=broad-except  (not an Example: the pipeline's to count)
          continue
        if "image" in feat or "patch_features" in feat:
          first = (path, feat)
          break
    except tf.errors.OpError:
      pass  # a corrupt file: the pipeline reports it
    if first or looked >= _PEEK_RECORDS:
      break
  if first is None:
    raise ConfigError(f"{binding}={pattern!r}: none of the first {looked} records is an "
                      f"m6t_tf example (m6t_tf.data.records); convert the data with "
                      f"tools/make_dataset.py")
  path, feat = first
  modes, size, dim = [], None, None
  if "image" in feat:
    modes.append("pixels")
    h, w = (feat[k].int64_list.value for k in ("height", "width"))
    size = (int(h[0]), int(w[0])) if h and w else None
  if "patch_features" in feat:
    modes.append("features")
    p = feat["feature_dim"].int64_list.value if "feature_dim" in feat else []
    dim = int(p[0]) if p else None
  length = None
  if need_length:
    logging.warning("no %s next to %s: reading every record for the longest caption",
                    METADATA_FILE, pattern)
    length = _longest_caption(files)
  return DataFacts(pattern=pattern, binding=binding, source=f"the first record of {path}",
                   image_modes=tuple(modes), image_size=size, feature_dim=dim,
                   max_caption_tokens=length)


def _longest_caption(files: Sequence[str]) -> int:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = {"caption_ids": tf.io.RaggedFeature(tf.int64)}
  ds = tf.data.TFRecordDataset(list(files)).ignore_errors().batch(256).map(
      lambda s: tf.cast(tf.reduce_max(tf.io.parse_example(s, spec)["caption_ids"].row_lengths()),
                        tf.int64))
  return int(ds.reduce(tf.constant(0, tf.int64), tf.maximum))


def check_config(facts: DataFacts, *, image_mode: str, max_len: Optional[int],
                 truncate_captions: bool) -> None:
  """Raises ConfigError if the data cannot feed a model of this config (before any compute).

  Args:
    facts: `read(...)` of the data.
    image_mode: train.image_mode.
    max_len: train.max_len, the caption length L ([CLS]/[SEP] included).
    truncate_captions: train.truncate_captions: longer captions are cut (keeping [SEP])
      instead of being an error.
  """
  if image_mode not in facts.image_modes:
    have = " and ".join(facts.image_modes) or "neither pixels nor features"
    fix = (f"--gin_bindings=\"train.image_mode='{facts.image_modes[0]}'\""
           if facts.image_modes else "convert the data with tools/make_dataset.py")
    raise ConfigError(f"train.image_mode={image_mode!r}, but the records of {facts.where()} "
                      f"carry {have} ({facts.source}): set {fix}")
  if image_mode == "pixels" and facts.image_size:
    h, w = facts.image_size
    if h % GRID or w % GRID:
      raise ConfigError(f"the images of {facts.where()} are {h}x{w} ({facts.source}), not "
                        f"divisible by M6's {GRID}x{GRID} patch grid: convert with "
                        f"tools/make_dataset.py --image_size={max(GRID, h // GRID * GRID)}")
  n = facts.max_caption_tokens
  if max_len is not None and n is not None and n > max_len and not truncate_captions:
    raise ConfigError(
        f"{facts.where()} has captions of up to {n} tokens ([CLS]/[SEP] included, "
        f"{facts.source}), more than train.max_len={max_len}: set --gin_bindings=MAX_LEN={n} "
        f"(it sets train.max_len and M6Transformer.max_text_length) to keep them whole, or "
        f"--gin_bindings=train.truncate_captions=True to cut them")


def check_same_images(a: DataFacts, b: DataFacts, image_mode: str) -> None:
  """ConfigError unless `a` and `b` (train and evaluation data) have the same image shape."""
  if image_mode == "pixels" and a.image_size and b.image_size and a.image_size != b.image_size:
    raise ConfigError(f"the images of {b.where()} are {b.image_size[0]}x{b.image_size[1]} but "
                      f"those of {a.where()} are {a.image_size[0]}x{a.image_size[1]}: convert "
                      f"both with the same tools/make_dataset.py --image_size")
  if image_mode == "features" and a.feature_dim and b.feature_dim and (
      a.feature_dim != b.feature_dim):
    raise ConfigError(f"the patch features of {b.where()} are {b.feature_dim} wide but those of "
                      f"{a.where()} are {a.feature_dim}: use features of one extractor")
