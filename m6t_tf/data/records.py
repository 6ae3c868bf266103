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

Bad records. `check_example` parses a record without raising on bad content and returns the
first of `BAD_RECORD_REASONS` that applies (-1 for a good record); `parse_example` raises on
it. The pipeline drops or refuses bad records by these reasons (`pipeline.make_dataset`'s
`on_bad_record`). A caption longer than the model's `max_len` is not bad (the pipeline
truncates it); one of more than `max_caption_ids` (512, BERT's position limit) ids is: no real
caption is that long, so such ids are garbage, and truncating them would train on garbage.
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
MAX_CAPTION_IDS = 512  # above this a record's caption_ids are corrupt, not just long
_MAX_SIDE = 1 << 16  # bounds height and width so height * width * 3 cannot overflow int64

# Why a record is bad, in order of precedence (a record gets the first reason that applies);
# the index is the reason's code. Append only: the names key the pipeline's counters.
BAD_RECORD_REASONS = {
    "corrupt_file": "the file is damaged or unreadable from this record on (bad CRC, "
                    "truncated record or read error): its remaining records are lost",
    "not_an_example": "not a tf.train.Example with the m6t_tf features (unparseable bytes, or "
                      "a feature of the wrong type or length)",
    "missing_image": "missing image: no image bytes or missing or non-positive height/width "
                     "(pixels); no patch_features or non-positive feature_dim (features)",
    "bad_image": "image byte count != height * width * 3 (pixels); patch_features length != "
                 "16 * feature_dim, or NaN/Inf in them (features)",
    "wrong_image_size": "image size differs from the dataset's image_size (pixels) or "
                        "feature_dim (features)",
    "empty_caption": "caption_ids need at least [CLS], one token and [SEP]",
    "caption_too_long": "more caption_ids than max_caption_ids",
    "id_out_of_vocab": "caption_ids outside the vocabulary [0, vocab_size)",
    "malformed_caption_ids": f"caption_ids must start with [CLS]={CLS_ID} and end with "
                             f"[SEP]={SEP_ID}, with no [PAD]/[CLS]/[SEP] between",
    "caption_not_utf8": "the caption text is not valid UTF-8",
}
REASON_NAMES = tuple(BAD_RECORD_REASONS)
GOOD = -1  # the reason code of a good record
(CORRUPT_FILE, NOT_AN_EXAMPLE, MISSING_IMAGE, BAD_IMAGE, WRONG_IMAGE_SIZE, EMPTY_CAPTION,
 CAPTION_TOO_LONG, ID_OUT_OF_VOCAB, MALFORMED_CAPTION_IDS, CAPTION_NOT_UTF8) = range(
     len(REASON_NAMES))


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
    ValueError: naming `key`, if there is no id between [CLS] and [SEP], more than
      MAX_CAPTION_IDS ids, the ids do not start with [CLS] / end with [SEP], contain [PAD],
      [CLS] or [SEP] inside, or fall outside the vocabulary.
  """
  ids = [int(i) for i in np.asarray(caption_ids).reshape(-1)]
  if len(ids) < 3:
    raise ValueError(f"record {key!r}: caption_ids {ids} needs at least [CLS], one token "
                     "and [SEP]")
  if len(ids) > MAX_CAPTION_IDS:
    raise ValueError(f"record {key!r}: {len(ids)} caption_ids, more than "
                     f"MAX_CAPTION_IDS={MAX_CAPTION_IDS}")
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
  # `check_example`, which names the reason, rather than a parser error that does not.
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


def printable(text: tf.Tensor) -> tf.Tensor:
  """`text` with invalid UTF-8 replaced by U+FFFD, safe to put into an error message.

  TensorFlow decodes error messages as UTF-8 in Python: a raw key or caption with invalid bytes
  in an assertion would turn the InvalidArgumentError into a UnicodeDecodeError.
  """
  return tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")


def _first_reason(conditions: Sequence[tuple[int, tf.Tensor]]) -> tf.Tensor:
  """The smallest code whose condition holds, or GOOD; <int32>[]."""
  codes = tf.constant([code for code, _ in conditions], tf.int32)
  hits = tf.stack([tf.convert_to_tensor(c) for _, c in conditions])
  first = tf.reduce_min(tf.where(hits, codes, len(REASON_NAMES)))
  return tf.where(first < len(REASON_NAMES), first, GOOD)


def _parse(serialized: tf.Tensor, image_mode: str) -> dict[str, tf.Tensor]:
  spec = _feature_spec(image_mode)
  if not tf.executing_eagerly():
    return tf.io.parse_single_example(serialized, spec)
  try:
    return tf.io.parse_single_example(serialized, spec)
  except (tf.errors.InvalidArgumentError, UnicodeDecodeError):
    # The parser's message quotes the raw bytes, which need not be UTF-8 (and then surface as
    # a UnicodeDecodeError); say what is wrong instead.
    raise tf.errors.InvalidArgumentError(
        None, None, f"malformed record: {BAD_RECORD_REASONS['not_an_example']}") from None


def check_example(serialized: tf.Tensor, *, image_mode: str = "pixels",
                  image_size: tuple[int, int] | None = None,
                  feature_dim: int | None = None,
                  max_caption_ids: int = MAX_CAPTION_IDS,
                  vocab_size: int = VOCAB_SIZE) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
  """Parses one serialized record and finds what, if anything, is wrong with it.

  Raises nothing for bad content, so `tf.data` can drop bad records: only bytes that do not
  parse with the feature spec (reason "not_an_example") raise, from the parser.

  Args:
    serialized: <string>[] one serialized `tf.train.Example`.
    image_mode: "pixels" to read `image`, "features" to read `patch_features`.
    image_size: (H, W) every image must have (gives the result a static shape), or None.
    feature_dim: P every record must have (gives a static shape), or None.
    max_caption_ids: more caption_ids than this make the record bad ("caption_too_long").
    vocab_size: ids must be in [0, vocab_size).

  Returns:
    (example, reason). example is {"key": <string>[], "caption": <string>[],
    "caption_ids": <int32>[N], "image_info": <int64>[3]} plus "image": <uint8>[H, W, 3] or
    "patch_features": <float32>[16, P] (zeros, of size 0 when the shape is not static, for a
    bad image). "image_info" is what the record declares, for messages: (height, width,
    image bytes) or (16, feature_dim, number of patch_features values). reason is
    <int32>[]: GOOD (-1) or the code of the first `BAD_RECORD_REASONS` entry that applies
    ("corrupt_file" never: that is the reader's finding).

  Raises:
    tf.errors.InvalidArgumentError: the bytes do not parse as a tf.train.Example with the
      m6t_tf feature types.
  """
  f = _parse(serialized, image_mode)
  ids64 = f["caption_ids"]
  n = tf.size(ids64)
  # Sums of 1-element slices, not ids[0]: an empty list must not raise.
  first, last = tf.reduce_sum(ids64[:1]), tf.reduce_sum(ids64[-1:])
  inner = ids64[1:-1]
  caption = f["caption"]
  # Range-check in int64: a huge id would wrap into the vocabulary when cast to int32.
  conditions = [
      (EMPTY_CAPTION, n < 3),
      (CAPTION_TOO_LONG, n > max_caption_ids),
      (ID_OUT_OF_VOCAB, tf.reduce_any((ids64 < 0) | (ids64 >= vocab_size))),
      (MALFORMED_CAPTION_IDS, (first != CLS_ID) | (last != SEP_ID) |
       tf.reduce_any((inner == PAD_ID) | (inner == CLS_ID) | (inner == SEP_ID))),
      (CAPTION_NOT_UTF8, tf.not_equal(printable(caption), caption)),
  ]
  out = {"key": f["key"], "caption": caption}
  if image_mode == "pixels":
    h, w = f["height"], f["width"]
    raw = tf.io.decode_raw(f["image"], tf.uint8)
    size = tf.size(raw, out_type=tf.int64)
    sides_ok = (h > 0) & (w > 0)
    out["image_info"] = tf.stack([h, w, size])
    conditions += [
        (MISSING_IMAGE, (size == 0) | ~sides_ok),
        (BAD_IMAGE, (h > _MAX_SIDE) | (w > _MAX_SIDE) | (size != h * w * 3)),
    ]
    if image_size is not None:
      conditions.append((WRONG_IMAGE_SIZE, (h != image_size[0]) | (w != image_size[1])))
      # Reshape only bytes that fit; the condition is the reshape's own, so no check above
      # can let a bad size through to an error here.
      out["image"] = tf.cond(
          size == image_size[0] * image_size[1] * 3,
          lambda: tf.reshape(raw, [image_size[0], image_size[1], 3]),
          lambda: tf.zeros([image_size[0], image_size[1], 3], tf.uint8))
    else:
      fits = sides_ok & (h <= _MAX_SIDE) & (w <= _MAX_SIDE) & (size == h * w * 3)
      out["image"] = tf.cond(
          fits, lambda: tf.reshape(raw, tf.cast(tf.stack([h, w, 3]), tf.int32)),
          lambda: tf.zeros([0, 0, 3], tf.uint8))
  else:
    p = f["feature_dim"]
    vals = f["patch_features"]
    size = tf.size(vals, out_type=tf.int64)
    out["image_info"] = tf.stack([tf.constant(NUM_PATCHES, tf.int64), p, size])
    conditions += [
        (MISSING_IMAGE, (size == 0) | (p <= 0)),
        (BAD_IMAGE, (size != NUM_PATCHES * p) | ~tf.reduce_all(tf.math.is_finite(vals))),
    ]
    if feature_dim is not None:
      conditions.append((WRONG_IMAGE_SIZE, p != feature_dim))
      out["patch_features"] = tf.cond(
          size == NUM_PATCHES * feature_dim,
          lambda: tf.reshape(vals, [NUM_PATCHES, feature_dim]),
          lambda: tf.zeros([NUM_PATCHES, feature_dim], tf.float32))
    else:
      out["patch_features"] = tf.cond(
          (p > 0) & (size == NUM_PATCHES * p),
          lambda: tf.reshape(vals, tf.cast(tf.stack([NUM_PATCHES, p]), tf.int32)),
          lambda: tf.zeros([NUM_PATCHES, 0], tf.float32))
  out["caption_ids"] = tf.cast(ids64, tf.int32)
  return out, _first_reason(conditions)


def bad_record_message(reason: tf.Tensor) -> tf.Tensor:
  """<string>[] "<name>: <description>" of a reason code (GOOD gives "good")."""
  texts = tf.constant([f"{k}: {v}" for k, v in BAD_RECORD_REASONS.items()] + ["good"])
  return tf.gather(texts, tf.where(reason >= 0, reason, len(REASON_NAMES)))


def parse_example(serialized: tf.Tensor, *, image_mode: str = "pixels",
                  image_size: tuple[int, int] | None = None,
                  feature_dim: int | None = None,
                  max_caption_ids: int = MAX_CAPTION_IDS,
                  vocab_size: int = VOCAB_SIZE) -> dict[str, tf.Tensor]:
  """Parses and checks one serialized record, raising on a bad one; eager or inside `tf.data`.

  Args: as `check_example`.

  Returns:
    {"key": <string>[], "caption": <string>[], "caption_ids": <int32>[N]} plus
    "image": <uint8>[H, W, 3] or "patch_features": <float32>[16, P].

  Raises:
    tf.errors.InvalidArgumentError: "malformed record: <reason>: <what>; key: <key> ..." for
      any of `BAD_RECORD_REASONS` (see `check_example`).
  """
  ex, reason = check_example(serialized, image_mode=image_mode, image_size=image_size,
                             feature_dim=feature_dim, max_caption_ids=max_caption_ids,
                             vocab_size=vocab_size)
  op = tf.debugging.Assert(
      tf.equal(reason, GOOD),
      ["malformed record:", bad_record_message(reason), "; key:", printable(ex["key"]),
       "; image (height, width, bytes) or features (16, P, values):", ex["image_info"],
       "; caption_ids:", ex["caption_ids"]], summarize=8)
  del ex["image_info"]
  with tf.control_dependencies([op] if op is not None else []):
    return {k: tf.identity(v) for k, v in ex.items()}


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
