"""The TFRecord format of m6t_tf captioning data.

One `tf.train.Example` per (image, caption) pair. Features:

| name             | type          | meaning                                                        |
|------------------|---------------|----------------------------------------------------------------|
| `key`            | bytes         | the record's name (e.g. an image path); named in every error   |
| `caption`        | bytes         | the caption, UTF-8 text as written (before lower-casing)       |
| `caption_ids`    | int64 list    | `[CLS] wordpiece ids... [SEP]`, no padding, every id < 21128   |
| `image`          | bytes         | raw uint8 RGB pixels, row-major `[height, width, 3]`           |
| `height`,`width` | int64         | the image size; `len(image) == height * width * 3`             |
| `patch_features` | float list    | precomputed features of the 4x4 = 16 patches, row-major `[16, P]` |
| `feature_dim`    | int64         | P; `len(patch_features) == 16 * P`                             |

A record carries pixels (`image`, `height`, `width`), patch features (`patch_features`,
`feature_dim`, the paper's ResNet features), or both; the pipeline reads the one it is asked
for. Raw pixels rather than PNG/JPEG: decoding is the costliest step of an image pipeline on a
2-core host, and the demo's 64x64 images are only 12 KiB each.

Files are named `<split>-<index:05d>-of-<count:05d>.tfrecord` (uncompressed) and written
atomically: to `<name>.tmp-<pid>` first, renamed into place on a clean close, so a reader never
sees a half-written shard and a crashed writer leaves only a `.tmp-*` file behind.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf

from m6t_tf.data.tokenizer import CLS_ID, PAD_ID, SEP_ID, VOCAB_SIZE

NUM_PATCHES = 16  # M6 splits every image into 4x4 patches (appendix A.1).
IMAGE_MODES = ("pixels", "features")


def shard_name(split: str, index: int, num_shards: int) -> str:
  """`train-00003-of-00008.tfrecord` style file name of shard `index` of `num_shards`."""
  if not 0 <= index < num_shards:
    raise ValueError(f"shard index {index} outside [0, {num_shards})")
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def is_validation(group: str, fraction: float) -> bool:
  """Deterministic held-out split: True for about `fraction` of all group names.

  Hash-based rather than a seeded shuffle so a pair's split never changes when pairs are
  added or removed, and every copy of the builder agrees without sharing state.

  Args:
    group: the name that decides the split; records sharing it land on the same side.
    fraction: the share of groups held out, in [0, 1].
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"validation fraction {fraction} outside [0, 1]")
  h = int.from_bytes(hashlib.sha256(group.encode("utf-8")).digest()[:8], "big")
  return h < fraction * 2.0**64


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values: Sequence[int]) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def check_caption_ids(caption_ids: Sequence[int], key: str = "?") -> list[int]:
  """Validates `[CLS] ids... [SEP]` and returns the ids as a list of int.

  Raises:
    ValueError: naming `key`, if the ids are empty, do not start with [CLS] / end with [SEP],
      contain [PAD], [CLS] or [SEP] inside, or fall outside the vocabulary.
  """
  ids = [int(i) for i in np.asarray(caption_ids).reshape(-1)]
  if len(ids) < 2:
    raise ValueError(f"record {key!r}: caption_ids {ids} needs at least [CLS] and [SEP]")
  if ids[0] != CLS_ID or ids[-1] != SEP_ID:
    raise ValueError(f"record {key!r}: caption_ids must start with [CLS]={CLS_ID} and end "
                     f"with [SEP]={SEP_ID}, got {ids[:3]}...{ids[-3:]}")
  inner = ids[1:-1]
  bad = [i for i in inner if i in (PAD_ID, CLS_ID, SEP_ID) or not 0 <= i < VOCAB_SIZE]
  if bad or not 0 <= min(ids) <= max(ids) < VOCAB_SIZE:
    raise ValueError(f"record {key!r}: caption_ids contain {bad[:5]}: ids must be in "
                     f"[0, {VOCAB_SIZE}) with no [PAD]/[CLS]/[SEP] between the ends")
  return ids


def make_example(*, key: str, caption: str, caption_ids: Sequence[int],
                 image: np.ndarray | None = None,
                 patch_features: np.ndarray | None = None) -> tf.train.Example:
  """Builds one record.

  Args:
    key: the record's name, non-empty (an image path, an emoji codepoint sequence, ...).
    caption: the caption text, non-empty.
    caption_ids: `[CLS] ids... [SEP]`, unpadded (see `Tokenizer.encode_caption`).
    image: <uint8>[H, W, 3] RGB pixels, or None.
    patch_features: <float>[16, P] patch features, or None. At least one of the two.

  Returns:
    The `tf.train.Example`.

  Raises:
    ValueError: naming `key`, for any argument that breaks the format above.
  """
  if not isinstance(key, str) or not key:
    raise ValueError(f"record key must be a non-empty string, got {key!r}")
  if not isinstance(caption, str) or not caption.strip():
    raise ValueError(f"record {key!r}: empty caption")
  ids = check_caption_ids(caption_ids, key)
  if image is None and patch_features is None:
    raise ValueError(f"record {key!r}: needs image pixels or patch_features")
  feature = {
      "key": _bytes([key.encode("utf-8")]),
      "caption": _bytes([caption.encode("utf-8")]),
      "caption_ids": _ints(ids),
  }
  if image is not None:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      # Refuse rather than cast: a float image in [0, 1] would silently become all zeros.
      raise ValueError(f"record {key!r}: image must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
      raise ValueError(f"record {key!r}: image must be [H, W, 3], got {image.shape}")
    feature["image"] = _bytes([np.ascontiguousarray(image).tobytes()])
    feature["height"] = _ints([image.shape[0]])
    feature["width"] = _ints([image.shape[1]])
  if patch_features is not None:
    feats = np.asarray(patch_features, np.float32)
    if feats.ndim != 2 or feats.shape[0] != NUM_PATCHES or feats.shape[1] < 1:
      raise ValueError(f"record {key!r}: patch_features must be [{NUM_PATCHES}, P], got "
                       f"{feats.shape}")
    if not np.all(np.isfinite(feats)):
      raise ValueError(f"record {key!r}: patch_features contain NaN or Inf")
    feature["patch_features"] = tf.train.Feature(
        float_list=tf.train.FloatList(value=feats.reshape(-1).tolist()))
    feature["feature_dim"] = _ints([feats.shape[1]])
  return tf.train.Example(features=tf.train.Features(feature=feature))


def _feature_spec(image_mode: str) -> dict:
  # Defaults instead of required features: a missing feature then fails one of the checks in
  # `parse_example`, whose message names the record, rather than a parser error that does not.
  spec = {
      "key": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "caption": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "caption_ids": tf.io.RaggedFeature(tf.int64),
  }
  if image_mode == "pixels":
    spec["image"] = tf.io.FixedLenFeature([], tf.string, default_value="")
    spec["height"] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    spec["width"] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
  elif image_mode == "features":
    spec["patch_features"] = tf.io.RaggedFeature(tf.float32)
    spec["feature_dim"] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
  else:
    raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
  return spec


def _check(condition: tf.Tensor, message: str, key: tf.Tensor, *values: tf.Tensor) -> list:
  """A graph-safe assertion naming the record; returns the op to depend on (eager: [])."""
  op = tf.debugging.Assert(condition, [f"malformed record: {message}; key:", key, *values],
                           summarize=8)
  return [op] if op is not None else []


def parse_example(serialized: tf.Tensor, *, image_mode: str = "pixels",
                  image_size: tuple[int, int] | None = None,
                  feature_dim: int | None = None) -> dict[str, tf.Tensor]:
  """Parses and checks one serialized record; works eagerly and inside `tf.data`.

  Args:
    serialized: <string>[] one serialized `tf.train.Example`.
    image_mode: "pixels" to read `image`, "features" to read `patch_features`.
    image_size: (H, W) every image must have (gives the result a static shape), or None.
    feature_dim: P every record must have (gives a static shape), or None.

  Returns:
    {"key": <string>[], "caption": <string>[], "caption_ids": <int32>[N]} plus
    "image": <uint8>[H, W, 3] or "patch_features": <float32>[16, P].

  Raises:
    tf.errors.InvalidArgumentError: "malformed record: <what>; key: <key> ..." when the image
      byte count does not match height x width x 3, the size differs from `image_size`, the
      features are not 16 x P, or `caption_ids` are not `[CLS] ... [SEP]` in the vocabulary.
  """
  f = tf.io.parse_single_example(serialized, _feature_spec(image_mode))
  key = f["key"]
  ids = tf.cast(f["caption_ids"], tf.int32)
  n = tf.size(ids)
  deps = _check(n >= 2, "caption_ids need at least [CLS] and [SEP]", key, n)
  # Sums of 1-element slices, not ids[0]: an empty list then fails the check above instead of
  # raising an out-of-range error that does not name the record.
  first, last = tf.reduce_sum(ids[:1]), tf.reduce_sum(ids[-1:])
  deps += _check(tf.logical_and(tf.equal(first, CLS_ID), tf.equal(last, SEP_ID)),
                 f"caption_ids must start with [CLS]={CLS_ID} and end with [SEP]={SEP_ID}",
                 key, ids)
  deps += _check(tf.reduce_all((ids >= 0) & (ids < VOCAB_SIZE)),
                 f"caption_ids outside the vocabulary [0, {VOCAB_SIZE})", key, ids)
  out = {"key": key, "caption": f["caption"]}
  if image_mode == "pixels":
    h, w = f["height"], f["width"]
    raw = tf.io.decode_raw(f["image"], tf.uint8)
    deps += _check(tf.logical_and(h > 0, w > 0), "missing or non-positive height/width",
                   key, h, w)
    deps += _check(tf.equal(tf.size(raw, out_type=tf.int64), h * w * 3),
                   "image byte count != height * width * 3", key, tf.size(raw), h, w)
    if image_size is not None:
      deps += _check(tf.logical_and(tf.equal(h, image_size[0]), tf.equal(w, image_size[1])),
                     f"image size differs from the expected {tuple(image_size)}", key, h, w)
    with tf.control_dependencies(deps):
      if image_size is not None:
        out["image"] = tf.reshape(raw, [image_size[0], image_size[1], 3])
      else:
        out["image"] = tf.reshape(raw, tf.stack([h, w, 3]))
  else:
    p = f["feature_dim"]
    vals = f["patch_features"]
    deps += _check(p > 0, "missing or non-positive feature_dim", key, p)
    deps += _check(tf.equal(tf.size(vals, out_type=tf.int64), NUM_PATCHES * p),
                   f"patch_features length != {NUM_PATCHES} * feature_dim", key,
                   tf.size(vals), p)
    if feature_dim is not None:
      deps += _check(tf.equal(p, feature_dim),
                     f"feature_dim differs from the expected {feature_dim}", key, p)
    with tf.control_dependencies(deps):
      shape = ([NUM_PATCHES, feature_dim] if feature_dim is not None else
               tf.stack([NUM_PATCHES, tf.cast(p, tf.int32)]))
      out["patch_features"] = tf.reshape(vals, shape)
  with tf.control_dependencies(deps):
    out["caption_ids"] = tf.identity(ids)
  return out


class RecordWriter:
  """Writes one TFRecord file atomically (`<path>.tmp-<pid>`, renamed on a clean close).

  Use as a context manager; an exception inside the block deletes the temporary file and
  leaves any existing `path` untouched.

      with RecordWriter("out/train-00000-of-00001.tfrecord") as w:
        w.write(make_example(...))
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.tmp_path = f"{self.path}.tmp-{os.getpid()}"
    self.num_records = 0
    self._writer = tf.io.TFRecordWriter(self.tmp_path)

  def write(self, example: tf.train.Example | bytes) -> None:
    """Appends one record (an Example or its serialized bytes)."""
    if isinstance(example, tf.train.Example):
      example = example.SerializeToString()
    self._writer.write(example)
    self.num_records += 1

  def close(self) -> None:
    """Flushes and moves the file into place."""
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    if "://" in self.path:  # GCS/HDFS: no os.replace there.
      tf.io.gfile.rename(self.tmp_path, self.path, overwrite=True)
    else:
      os.replace(self.tmp_path, self.path)

  def abort(self) -> None:
    """Discards what was written."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if tf.io.gfile.exists(self.tmp_path):
      tf.io.gfile.remove(self.tmp_path)

  def __enter__(self) -> "RecordWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_records(path: str | os.PathLike,
                  examples: Iterable[tf.train.Example | bytes]) -> int:
  """Writes `examples` to `path` atomically; returns the number written."""
  with RecordWriter(path) as w:
    for ex in examples:
      w.write(ex)
  return w.num_records


def read_serialized(file_pattern: str | Sequence[str]) -> list[bytes]:
  """All serialized records of the files matching `file_pattern`, in sorted file order."""
  files = list_files(file_pattern)
  return [r.numpy() for r in tf.data.TFRecordDataset(files)]


def list_files(file_pattern: str | Sequence[str]) -> list[str]:
  """Sorted files matching a glob pattern (or several); raises if there are none."""
  patterns = [file_pattern] if isinstance(file_pattern, (str, os.PathLike)) else file_pattern
  files = sorted({f for p in patterns for f in tf.io.gfile.glob(os.fspath(p))})
  if not files:
    raise FileNotFoundError(f"no TFRecord files match {file_pattern!r}")
  return files
