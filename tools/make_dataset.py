"""Converts a JSON-lines caption file into train/validation TFRecords (m6t_tf.data.records).

Input, one JSON object a line (blank lines are ignored):

    {"image": "relative/path.jpg", "caption": "一只猫坐在窗台上"}

with `image` relative to --image_dir. Images are read with tf.io.decode_image (PNG, JPEG, GIF,
BMP), made RGB (alpha composited on white, grey replicated) and resized to
--image_size x --image_size (aspect ratio not kept, as the paper's patch grid assumes a square).
Captions become `[CLS] ids [SEP]`, truncated to --max_len keeping [SEP].

The split is by image, so all captions of an image land on the same side: images in the order
of a hash of their path go to validation until it holds round(--validation_fraction ×
captions) captions (at least that many, fewer only if one image would be left for training).
The order does not depend on the other lines, so adding lines moves only images at the margin.
A warning says when validation holds fewer than 20 captions (its perplexity is then noise).

    .venv/bin/python tools/make_dataset.py --input=captions.jsonl --image_dir=images \\
        --output_dir=.data/mydata --image_size=64 --max_len=128

Bad lines (not UTF-8, invalid JSON, a missing "image" or "caption" key, missing image file,
undecodable image, empty caption, a caption with no token): --on_bad_record=skip (default)
counts them and reports the first reasons; --on_bad_record=fail stops at the first one with
its line number and writes no shard. Lines are split on "\n" only and decoded one by one, so a
stray invalid byte costs its line, not the file. Errors (a bad flag, a missing input, a failed
line with --on_bad_record=fail, no line converted) print one line and exit 2 (m6t_tf.cli).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from m6t_tf import cli

from m6t_tf import errors

if __name__ == "__main__":
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from m6t_tf.data import records  # pylint: disable=g-import-not-at-top
from m6t_tf.data.tokenizer import UNK_ID, Tokenizer  # pylint: disable=g-import-not-at-top

_MAX_REPORTED = 20  # bad-record reasons kept in the summary
MIN_VALIDATION_CAPTIONS = 20  # fewer: a warning, the validation perplexity is mostly noise


class BadRecordError(errors.ConfigError):
  """A line that cannot become a record; the message starts with `<file>:<line>:`."""


def _hash(key: str) -> int:
  return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def choose_validation(keys: list[str], fraction: float) -> set[str]:
  """The images held out: hash order of their paths, until round(fraction × captions) captions.

  Args:
    keys: the image of every caption (an image with several captions appears several times).
    fraction: share of captions to hold out, in [0, 1).

  Returns:
    The held-out image paths. At least one image always stays for training.
  """
  counts = collections.Counter(keys)
  target = round(fraction * len(keys))
  held, n = set(), 0
  for key in sorted(counts, key=_hash)[:-1]:
    if n >= target:
      break
    held.add(key)
    n += counts[key]
  return held


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
    raise errors.ConfigError(f"--on_bad_record={on_bad_record!r}: use 'skip' or 'fail'")
  if not 0.0 <= validation_fraction < 1.0:
    raise errors.ConfigError(f"--validation_fraction={validation_fraction} must be in [0, 1)")
  t0 = time.time()
  input_path, image_dir, output_dir = Path(input_path), Path(image_dir), Path(output_dir)
  if not input_path.is_file():
    raise errors.ConfigError(f"--input={str(input_path)!r}: no such file")
  if not image_dir.is_dir():
    raise errors.ConfigError(f"--image_dir={str(image_dir)!r}: no such folder")
  tokenizer = Tokenizer(vocab_path)
  # Bytes, split on b"\n": str.splitlines() would also split inside a JSON string at U+2028 or
  # U+0085 (both legal there), and one invalid byte would fail the whole file's decoding.
  lines = input_path.read_bytes().split(b"\n")
  if lines and lines[0].startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
    lines[0] = lines[0][3:]
  num_lines = sum(1 for line in lines if line.strip())
  # Pass 1, without decoding images: which images hold out how many captions.
  keys = [_image_key(line, image_dir) for line in lines]
  held = choose_validation([k for k in keys if k is not None], validation_fraction)
  num_train_shards = max(1, min(num_train_shards, num_lines))
  output_dir.mkdir(parents=True, exist_ok=True)
  names = {"train": [records.shard_name("train", i, num_train_shards)
                     for i in range(num_train_shards)],
           "validation": [records.shard_name("validation", 0, 1)]}
  counts = {"train": [0] * num_train_shards, "validation": [0]}
  skipped: list[str] = []
  num_skipped = num_truncated = num_unk = max_tokens = sum_tokens = 0

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
      sum_tokens += len(caption_ids)
      split = "validation" if key in held else "train"
      # Round-robin over the training shards keeps their sizes within one record.
      shard = sum(counts[split]) % len(writers[split])
      writers[split][shard].write(example)
      counts[split][shard] += 1
    if not sum(map(sum, counts.values())):
      # Raised inside the ExitStack: every writer aborts, no empty shard is left.
      raise errors.ConfigError(f"no line of {input_path} could be converted ({num_skipped} bad"
                            + (f"; the first: {skipped[0]}" if skipped else "") + ")")

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
      "mean_caption_tokens": round(sum_tokens / max(1, sum(map(sum, counts.values()))), 3),
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
      "validation_split": "images in sha256 order of their path until round(fraction x "
                          "captions) captions",
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
  n_val = meta["splits"]["validation"]["num_records"]
  if n_val < MIN_VALIDATION_CAPTIONS:
    log(f"warning: validation holds {n_val} caption{'s' * (n_val != 1)} (fewer than "
        f"{MIN_VALIDATION_CAPTIONS}), so its perplexity is mostly noise; "
        f"--validation_fraction={validation_fraction} of {meta['num_records']} captions"
        + ("" if validation_fraction >= 0.5 else ": raise it to hold out more"))
  return meta


def _image_key(line: bytes, image_dir: Path):
  """The image of a line that passes the checks short of decoding, or None (a bad line)."""
  try:
    return _check_line(line, image_dir)[0] if line.strip() else None
  except ValueError:
    return None


def _read_line(line: bytes, image_dir: Path) -> tuple[str, str, np.ndarray]:
  """(key, caption, <uint8>[H, W, 3] image) of one JSON line; ValueError says what is wrong."""
  key, caption, path = _check_line(line, image_dir)
  try:
    image = load_rgb(str(path))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return key, caption, image


def _check_line(line: bytes, image_dir: Path) -> tuple[str, str, Path]:
  """(key, caption, image path) of one JSON line, without reading the image; or ValueError."""
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"not UTF-8: byte {e.start} is {line[e.start:e.start + 1]!r}") from None
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON: {e}") from None
  if not isinstance(obj, dict):
    raise ValueError(f'expected a JSON object {{"image": ..., "caption": ...}}, got a '
                     f'{type(obj).__name__}')
  for name in ("image", "caption"):
    if name not in obj:
      keys = ", ".join(f'"{k}"' for k in obj) or "none"
      raise ValueError(f'missing key "{name}" (the line\'s keys: {keys})')
    if not isinstance(obj[name], str):
      got = json.dumps(obj[name], ensure_ascii=False)
      raise ValueError(f'"{name}" must be a string, got {got}')
  if not obj["image"]:
    raise ValueError('empty "image" path')
  caption = obj["caption"]
  if not caption.strip():
    raise ValueError(f"empty caption for image {obj['image']!r}")
  for name in ("image", "caption"):
    try:
      obj[name].encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: not text
      raise ValueError(f"{name} {obj[name]!r} is not valid Unicode (lone surrogate)") from None
  path = image_dir / obj["image"]
  if not path.is_file():
    raise ValueError(f"image file not found: {path}")
  return obj["image"], caption.strip(), path


def main(argv: list[str] | None = None) -> int:
  parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
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
  for name in ("image_size", "num_train_shards"):
    if getattr(args, name) < 1:
      raise errors.ConfigError(f"--{name}={getattr(args, name)} must be >= 1")
  if args.image_size % 4:
    raise errors.ConfigError(f"--image_size={args.image_size} must be a multiple of 4 (M6's 4x4 "
                          f"patch grid), e.g. {max(4, args.image_size // 4 * 4)}")
  if args.max_len < 3:
    raise errors.ConfigError(f"--max_len={args.max_len}: a caption needs [CLS], a token and [SEP]")
  convert(args.input, image_dir=args.image_dir, output_dir=args.output_dir,
          validation_fraction=args.validation_fraction, image_size=args.image_size,
          max_len=args.max_len, num_train_shards=args.num_train_shards,
          on_bad_record=args.on_bad_record, vocab_path=args.vocab_path,
          log=lambda msg: print(msg, file=sys.stderr))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
