"""Converts a JSON-lines caption file into train/validation TFRecords (m6t_tf.data.records).

Input, one JSON object a line (blank lines are ignored):

    {"image": "relative/path.jpg", "caption": "一只猫坐在窗台上"}

with `image` relative to --image_dir. Images are read with tf.io.decode_image (PNG, JPEG, GIF,
BMP), made RGB (alpha composited on white, grey replicated) and resized to
--image_size x --image_size (aspect ratio not kept, as the paper's patch grid assumes a square).
Captions become `[CLS] ids [SEP]`, truncated to --max_len keeping [SEP].

The split is a hash of the image path (records.is_validation), so all captions of an image
land on the same side and the split does not change when lines are added.

    .venv/bin/python tools/make_dataset.py --input=captions.jsonl --image_dir=images \\
        --output_dir=.data/mydata --image_size=64 --max_len=128

Bad lines (not UTF-8, invalid JSON, missing image, undecodable image, empty caption, a caption
with no token): --on_bad_record=skip (default) counts them and reports the first reasons;
--on_bad_record=fail stops at the first one with its line number and writes no shard. Lines are
split on "\n" only and decoded one by one, so a stray invalid byte costs its line, not the file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from m6t_tf.data import records
from m6t_tf.data.tokenizer import UNK_ID, Tokenizer

_MAX_REPORTED = 20  # bad-record reasons kept in the summary


class BadRecordError(ValueError):
  """A line that cannot become a record; the message starts with `<file>:<line>:`."""


def load_rgb(path: str) -> np.ndarray:
  """Decodes an image file to <uint8>[H, W, 3] (alpha over white).

  Raises:
    ValueError: the file is not a decodable PNG/JPEG/GIF/BMP image.
  """
  data = tf.io.read_file(path)
  try:
    img = tf.io.decode_image(data, channels=0, expand_animations=False).numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    raise ValueError(f"undecodable image: {e.message.splitlines()[0]}") from None
  if img.dtype != np.uint8:  # 16-bit PNG
    img = (img.astype(np.float32) / 257.0).round().astype(np.uint8)
  channels = img.shape[-1]
  if channels in (2, 4):  # grey+alpha or RGBA: composite on white, as the demo renders do
    alpha = img[..., -1:].astype(np.float32) / 255.0
    color = img[..., :-1].astype(np.float32)
    img = np.rint(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  return img


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """<uint8>[H, W, 3] -> <uint8>[size, size, 3]; unchanged if already that size."""
  if image.shape[:2] == (size, size):
    return image
  out = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear",
                        antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8).numpy()


def convert(input_path: str | os.PathLike, *, image_dir: str | os.PathLike,
            output_dir: str | os.PathLike, validation_fraction: float = 0.1,
            image_size: int = 64, max_len: int = 128, num_train_shards: int = 8,
            on_bad_record: str = "skip", vocab_path: str | None = None,
            log: Callable[[str], None] = print) -> dict:
  """Converts `input_path` and writes shards plus `metadata.json` into `output_dir`.

  Returns:
    The metadata: counts per split, skipped lines with reasons, truncated captions, files.

  Raises:
    BadRecordError: with on_bad_record="fail", at the first bad line (no files are left).
  """
  if on_bad_record not in ("skip", "fail"):
    raise ValueError(f"on_bad_record must be 'skip' or 'fail', got {on_bad_record!r}")
  t0 = time.time()
  input_path, image_dir, output_dir = Path(input_path), Path(image_dir), Path(output_dir)
  tokenizer = Tokenizer(vocab_path)
  # Bytes, split on b"\n": str.splitlines() would also split inside a JSON string at U+2028 or
  # U+0085 (both legal there), and one invalid byte would fail the whole file's decoding.
  lines = input_path.read_bytes().split(b"\n")
  if lines and lines[0].startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
    lines[0] = lines[0][3:]
  num_lines = sum(1 for line in lines if line.strip())
  num_train_shards = max(1, min(num_train_shards, num_lines))
  output_dir.mkdir(parents=True, exist_ok=True)
  names = {"train": [records.shard_name("train", i, num_train_shards)
                     for i in range(num_train_shards)],
           "validation": [records.shard_name("validation", 0, 1)]}
  counts = {"train": [0] * num_train_shards, "validation": [0]}
  skipped: list[str] = []
  num_skipped = num_truncated = num_unk = max_tokens = 0

  with contextlib.ExitStack() as stack:
    writers = {split: [stack.enter_context(records.RecordWriter(output_dir / n)) for n in ns]
               for split, ns in names.items()}
    for lineno, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        key, caption, image = _read_line(line, image_dir)
        ids = tokenizer.encode([caption])[0]
        if not ids:
          raise ValueError(f"caption {caption!r} has no tokens")
        num_truncated += len(ids) + 2 > max_len
        caption_ids = tokenizer.encode_caption(caption, max_len)
        example = records.make_example(key=key, caption=caption, caption_ids=caption_ids,
                                       image=resize(image, image_size))
      except (ValueError, OSError, tf.errors.OpError) as e:
        reason = f"{input_path}:{lineno}: {e}"
        if on_bad_record == "fail":
          # Leaving the ExitStack through an exception aborts every writer: no shard is left.
          raise BadRecordError(reason) from None
        num_skipped += 1
        if len(skipped) < _MAX_REPORTED:
          skipped.append(reason)
        continue
      num_unk += caption_ids.count(UNK_ID)
      max_tokens = max(max_tokens, len(caption_ids))
      split = "validation" if records.is_validation(key, validation_fraction) else "train"
      # Round-robin over the training shards keeps their sizes within one record.
      shard = sum(counts[split]) % len(writers[split])
      writers[split][shard].write(example)
      counts[split][shard] += 1

  # Only now, with the new shards in place, remove shards of an earlier conversion with a
  # different shard count: the pattern `train-*` would otherwise mix old and new files.
  keep = {n for ns in names.values() for n in ns}
  for pattern in ("train-*-of-*.tfrecord", "validation-*-of-*.tfrecord"):
    for p in output_dir.glob(pattern):
      if p.name not in keep:
        p.unlink()
  meta = {
      "source": str(input_path),
      "image_mode": "pixels",
      "image_size": [image_size, image_size],
      "vocab_size": tokenizer.vocab_size,
      "max_len": max_len,
      "max_caption_tokens": max_tokens,
      "num_truncated_captions": int(num_truncated),
      "num_unk_tokens": num_unk,
      "num_lines": num_lines,
      "num_records": sum(map(sum, counts.values())),
      "num_skipped": num_skipped,
      "skipped_examples": skipped,
      "splits": {split: {"num_records": sum(counts[split]),
                         "pattern": f"{split}-*-of-{len(ns):05d}.tfrecord",
                         "files": [{"name": n, "num_records": c}
                                   for n, c in zip(ns, counts[split])]}
                 for split, ns in names.items()},
      "validation_fraction": validation_fraction,
      "build_seconds": round(time.time() - t0, 2),
  }
  tmp = output_dir / f"metadata.json.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
  os.replace(tmp, output_dir / "metadata.json")
  log(f"wrote {meta['num_records']} records ({meta['splits']['train']['num_records']} train, "
      f"{meta['splits']['validation']['num_records']} validation), skipped {num_skipped}, "
      f"truncated {num_truncated} captions, into {output_dir}")
  for reason in skipped:
    log(f"  skipped {reason}")
  return meta


def _read_line(line: bytes, image_dir: Path) -> tuple[str, str, np.ndarray]:
  """(key, caption, <uint8>[H, W, 3] image) of one JSON line; ValueError says what is wrong."""
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"not UTF-8: byte {e.start} is {line[e.start:e.start + 1]!r}") from None
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON: {e}") from None
  if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"]:
    raise ValueError('expected an object with a string "image" and a string "caption"')
  caption = obj.get("caption")
  if not isinstance(caption, str) or not caption.strip():
    raise ValueError(f"empty caption for image {obj['image']!r}")
  for name in ("image", "caption"):
    try:
      obj[name].encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: not text
      raise ValueError(f"{name} {obj[name]!r} is not valid Unicode (lone surrogate)") from None
  path = image_dir / obj["image"]
  if not path.is_file():
    raise ValueError(f"image file not found: {path}")
  try:
    image = load_rgb(str(path))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return obj["image"], caption.strip(), image


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="JSON-lines file of image/caption pairs")
  parser.add_argument("--image_dir", required=True, help="folder the image paths are under")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--validation_fraction", type=float, default=0.1)
  parser.add_argument("--image_size", type=int, default=64, help="square output size")
  parser.add_argument("--max_len", type=int, default=128,
                      help="max caption tokens including [CLS] and [SEP]")
  parser.add_argument("--num_train_shards", type=int, default=8)
  parser.add_argument("--on_bad_record", choices=("skip", "fail"), default="skip")
  parser.add_argument("--vocab_path", default=None, help="default: cn-clip's vocab.txt")
  args = parser.parse_args(argv)
  try:
    convert(args.input, image_dir=args.image_dir, output_dir=args.output_dir,
            validation_fraction=args.validation_fraction, image_size=args.image_size,
            max_len=args.max_len, num_train_shards=args.num_train_shards,
            on_bad_record=args.on_bad_record, vocab_path=args.vocab_path,
            log=lambda msg: print(msg, file=sys.stderr))
  except BadRecordError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
