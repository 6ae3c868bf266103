"""Caption metrics from the COCO caption evaluation, two baselines that give them meaning, a page.

Metrics. BLEU-1..4 and CIDEr-D exactly as the COCO caption evaluation computes them: the
scorers of `pycocoevalcap` (the Python 3 package of coco-caption, the code behind the reported
COCO numbers), called on our tokens:

  * `pycocoevalcap.bleu.bleu.Bleu(4)`: corpus BLEU (clipped n-gram counts summed over all
    images, brevity penalty from the reference length closest to each candidate), plus the
    per-image sentence BLEU that the same scorer returns.
  * `pycocoevalcap.cider.cider.Cider()`: this class *is* CIDEr-D (Vedantam et al., 2015, sec.
    4.4), not plain CIDEr: TF-IDF vectors of 1..4-grams whose document frequencies come from
    the references of the scored images, the candidate's counts clipped to the reference's
    (`min(vec_hyp, vec_ref)`), a Gaussian length penalty exp(-delta^2 / (2 * 6^2)), averaged
    over n and over the references, times 10. Because the IDF comes from the scored images'
    references, CIDEr-D is a corpus quantity: with a single image every n-gram has IDF 0 and
    the score is 0, and an image's CIDEr-D changes with the set it is scored in.

The package's PTB tokenizer, METEOR and SPICE run Java and are not used. Chinese is scored by
character, the usual practice for Chinese captions and how the model's WordPiece vocabulary
splits CJK text; `tokenize` (below) does it, and the scorers get space-separated tokens.

Baselines. For every evaluation image: (a) the most frequent training caption (the same
caption for every image; a model that ignores the image and answers with the mode), and (b)
the caption of the nearest training image in pixel space (L2 distance between the uint8
images, exact). A captioner that does not beat (b) has learnt nothing a lookup table would not.

Page. `write_html` writes one self-contained HTML file: the metrics table on top, then a grid
with each image (embedded as a base64 data: URI), its generated caption(s) with log-probability
and score, its references, the baselines' captions and the per-image scores. To look at it as
a person would, render it with headless Chromium (a CJK font, e.g. Debian's fonts-noto-cjk,
must be installed, or Chinese renders as boxes):

  chromium --headless --no-sandbox --disable-gpu --screenshot=page.png \
      --window-size=1200,1600 file://$PWD/runs/demo/captions.html
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime
import html
import os
import re
import unicodedata
from typing import Any, Mapping, Sequence

import numpy as np

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D")
# Names of the two baselines, as keys of `baselines(...)` and labels of the table.
BASELINE_LABELS = {"most_frequent": "most frequent training caption",
                   "nearest_image": "nearest training image (pixel L2)"}
_SHORT_LABELS = {"most_frequent": "most frequent", "nearest_image": "nearest image"}

# The punctuation the COCO PTB tokenizer removes (quotes, brackets, . ? ! , : ; - -- ...) and
# its Chinese / full-width forms. Other symbols ("#", "*", "+") stay: in "按键#" they are the
# content.
_PUNCTUATION = frozenset(".?!,:;'\"`-()[]{}" "。、，！？：；“”‘’（）《》〈〉【】「」『』…—–～·")
# Below U+2E80 (where the CJK radicals start) letters and digits form words ("ok", "18",
# "café"); from there on (CJK ideographs, kana, Hangul, CJK symbols) each character is a token.
_WORD = re.compile(r"[^\W_\u2e80-\U0010ffff]+|\S")


def tokenize(text: str) -> list[str]:
  """Tokens of a caption for scoring: Chinese by character, Latin words and numbers whole.

  NFKC-normalised (full-width "ＯＫ" becomes "OK") and lower-cased, as the model's uncased
  BERT-Chinese tokenizer sees text; the PTB punctuation (see `_PUNCTUATION`) is dropped, as
  the COCO evaluation drops it.

  Example: "OK手势(男)" -> ["ok", "手", "势", "男"]; "按键9" -> ["按", "键", "9"].
  """
  if not isinstance(text, str):
    raise TypeError(f"a caption must be a str, got {type(text).__name__}: {text!r}")
  text = unicodedata.normalize("NFKC", text).lower()
  return [t for t in _WORD.findall(text) if t not in _PUNCTUATION]


def _check(candidates: Mapping[str, str],
           references: Mapping[str, Sequence[str]]) -> None:
  """Raises ValueError, naming the key, for anything the scorers cannot score."""
  if not candidates:
    raise ValueError("no captions to score (candidates is empty)")
  missing = [k for k in candidates if k not in references]
  if missing:
    raise ValueError(f"no references for caption key {missing[0]!r} ({len(missing)} of "
                     f"{len(candidates)} keys have none, e.g. {missing[:5]}); give every "
                     "scored image its references")
  for k, c in candidates.items():
    if not isinstance(c, str):
      raise ValueError(f"caption of key {k!r} must be a str, got {type(c).__name__}: {c!r}")
    refs = references[k]
    if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
      raise ValueError(f"references of key {k!r} must be a non-empty list of str, got "
                       f"{refs!r}")


def score_captions_per_image(candidates: Mapping[str, str],
                             references: Mapping[str, Sequence[str]]
                             ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """Corpus metrics and per-image scores of `candidates` (see `score_captions`).

  Returns:
    (corpus, per_image): corpus as `score_captions` returns it; per_image maps every key to
    {"BLEU-1".."BLEU-4", "CIDEr-D"}: the sentence BLEU and the CIDEr-D of that image as the
    scorers report them (CIDEr-D with the IDF of the whole scored set).
  """
  _check(candidates, references)
  keys = list(candidates)
  res = {k: [" ".join(tokenize(candidates[k]))] for k in keys}
  gts = {k: [" ".join(tokenize(r)) for r in references[k]] for k in keys}
  bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
  cider, cider_per_image = Cider().compute_score(gts, res)
  corpus = {f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)}
  corpus["CIDEr-D"] = float(cider)
  corpus["num_images"] = len(keys)
  per_image = {}
  for i, k in enumerate(keys):
    per_image[k] = {f"BLEU-{n + 1}": float(bleu_per_image[n][i]) for n in range(4)}
    per_image[k]["CIDEr-D"] = float(cider_per_image[i])
  return corpus, per_image


def score_captions(candidates: Mapping[str, str],
                   references: Mapping[str, Sequence[str]]) -> dict[str, float]:
  """BLEU-1..4 and CIDEr-D of one caption per image against all references of that image.

  Computed by coco-caption's own scorers (`Bleu(4)`, `Cider()`, which is CIDEr-D; see the
  module docstring) on `tokenize`d text. BLEU is in [0, 1]; CIDEr-D on the library's scale
  (x10, a perfect match to every reference scores about 10).

  Args:
    candidates: {image key: generated caption}.
    references: {image key: [reference caption, ...]}; may hold more keys than scored.

  Returns:
    {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D": float, "num_images": int}.

  Raises:
    ValueError: naming the key, when a candidate has no references (or they are not a
      non-empty list of str) or a caption is not a str; when there are no candidates.
  """
  return score_captions_per_image(candidates, references)[0]


# ------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Split:
  """The records of a split, in the order the pipeline reads them.

  Attributes:
    keys: record keys, one per record (a key repeats when an image has several captions).
    captions: the reference caption of each record.
    images: <uint8>[N, H, W, 3] the pixels of each record.
  """
  keys: list[str]
  captions: list[str]
  images: np.ndarray

  def references(self) -> dict[str, list[str]]:
    """{key: all captions of that key in the split}, keys in first-seen order."""
    out: dict[str, list[str]] = {}
    for k, c in zip(self.keys, self.captions):
      out.setdefault(k, []).append(c)
    return out

  def image_of(self) -> dict[str, np.ndarray]:
    """{key: the image of the key's first record}."""
    out: dict[str, np.ndarray] = {}
    for k, im in zip(self.keys, self.images):
      out.setdefault(k, im)
    return out


def read_split(file_pattern: str | Sequence[str], *, max_len: int | None = None,
               batch_size: int = 256) -> Split:
  """Reads key, caption and pixels of every good record with the project's input pipeline.

  Args:
    file_pattern: TFRecord files in the `records` format, with pixels.
    max_len: the pipeline's token length; irrelevant here (the text is read whole), default 2.
    batch_size: records per pipeline batch.
  """
  from m6t_tf.data import pipeline  # TensorFlow only when records are read
  ds = pipeline.make_dataset(file_pattern, batch_size=batch_size, max_len=max_len or 2,
                             training=False, repeat=False, drop_remainder=False,
                             include_text=True, image_mode="pixels")
  keys, captions, images = [], [], []
  for batch in ds.as_numpy_iterator():
    real = batch["key"] != b""  # all-[PAD] filler rows of the last batch have no key
    keys += [k.decode("utf-8") for k in batch["key"][real]]
    captions += [c.decode("utf-8") for c in batch["caption"][real]]
    images.append(batch["image"][real])
  if not keys:
    raise ValueError(f"no readable records in {file_pattern!r}")
  return Split(keys, captions, np.concatenate(images))


def most_frequent_caption(captions: Sequence[str]) -> str:
  """The most frequent caption; ties go to the caption made of the most frequent tokens.

  When every caption is unique (as in the demo, one emoji name per image) the count ties
  everywhere and the tie-break decides: the largest mean training frequency of its `tokenize`
  tokens, then the alphabetically first. That is the caption a model ignoring the image would
  do best to repeat, which makes the baseline as strong as an image-blind answer can be.
  """
  if not captions:
    raise ValueError("no captions to choose the most frequent from")
  counts = collections.Counter(captions)
  token_counts = collections.Counter(t for c in captions for t in tokenize(c))

  def mean_token_count(c):
    toks = tokenize(c)
    return sum(token_counts[t] for t in toks) / len(toks) if toks else 0.0

  return min(counts, key=lambda c: (-counts[c], -mean_token_count(c), c))


def nearest_images(train_images: np.ndarray, eval_images: np.ndarray,
                   chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """Index of the nearest training image of every eval image, by squared L2 on the pixels.

  Exact: ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b in float64, where every term is an integer
  below 2^53 for uint8 images of up to 2^53 / 255^2 values, so the BLAS sums are exact and a
  tie goes to the first training image.

  Args:
    train_images: <uint8>[N, H, W, 3].
    eval_images: <uint8>[Q, H, W, 3].
    chunk: training images per matrix product (bounds memory to chunk x H x W x 3 doubles).

  Returns:
    (index <int64>[Q], squared distance <int64>[Q]).
  """
  train_images, eval_images = np.asarray(train_images), np.asarray(eval_images)
  if train_images.shape[1:] != eval_images.shape[1:]:
    raise ValueError(f"training images {train_images.shape[1:]} and evaluation images "
                     f"{eval_images.shape[1:]} differ in size; pixel distance needs one size")
  if len(train_images) == 0 or len(eval_images) == 0:
    raise ValueError(f"need images on both sides, got {len(train_images)} training and "
                     f"{len(eval_images)} evaluation images")
  q = eval_images.reshape(len(eval_images), -1).astype(np.float64)
  q_norm = np.einsum("qd,qd->q", q, q)
  best = np.full(len(q), np.inf)
  index = np.zeros(len(q), np.int64)
  for start in range(0, len(train_images), chunk):
    t = train_images[start:start + chunk].reshape(-1, q.shape[1]).astype(np.float64)
    d = q_norm[:, None] + np.einsum("td,td->t", t, t)[None, :] - 2.0 * (q @ t.T)
    j = np.argmin(d, axis=1)
    dj = d[np.arange(len(q)), j]
    better = dj < best  # strict: an equal distance later keeps the earlier image
    best[better], index[better] = dj[better], start + j[better]
  return index, best.astype(np.int64)


def baselines_from_splits(train: Split, evaluation: Split,
                          keys: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
  """`baselines` on splits already read; optionally for `keys` only (each must be in it)."""
  eval_images = evaluation.image_of()
  keys = list(eval_images) if keys is None else list(keys)
  missing = [k for k in keys if k not in eval_images]
  if missing:
    raise ValueError(f"key {missing[0]!r} is not a record of the evaluation split "
                     f"({len(missing)} keys missing, e.g. {missing[:5]})")
  mode = most_frequent_caption(train.captions)
  index, _ = nearest_images(train.images, np.stack([eval_images[k] for k in keys]))
  return {"most_frequent": {k: mode for k in keys},
          "nearest_image": {k: train.captions[i] for k, i in zip(keys, index)}}


def baselines(train_pattern: str | Sequence[str], eval_pattern: str | Sequence[str],
              max_len: int | None = None) -> dict[str, dict[str, str]]:
  """Captions of the two baselines for every evaluation image key.

  Args:
    train_pattern: training TFRecords (pixels); the baselines' captions come from them.
    eval_pattern: evaluation TFRecords (pixels); one baseline caption per distinct key.
    max_len: the pipeline's token length; the captions are used whole (see `read_split`).

  Returns:
    {"most_frequent": {key: caption}, "nearest_image": {key: caption}} (see the module
    docstring and `most_frequent_caption`, `nearest_images`).
  """
  return baselines_from_splits(read_split(train_pattern, max_len=max_len),
                               read_split(eval_pattern, max_len=max_len))


# ------------------------------------------------------------------------------------------
# Table and page
# ------------------------------------------------------------------------------------------


def _as_table(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
  """{system label: metrics}; a flat metrics dict becomes the single system "model".

  The baselines' keys ("most_frequent", "nearest_image") get their labels.
  """
  if metrics and all(isinstance(v, Mapping) for v in metrics.values()):
    return {BASELINE_LABELS.get(k, k): v for k, v in metrics.items()}
  return {"model": metrics}


def format_table(metrics: Mapping[str, Any]) -> str:
  """Plain-text table of `score_captions` results: one row per system.

  Args:
    metrics: {system name: score_captions(...)} or one score_captions(...) result; the
      names "most_frequent" and "nearest_image" are shown as the baselines' labels.
  """
  table = _as_table(metrics)
  width = max(len("system"), *(len(s) for s in table))
  lines = [f"{'system':<{width}}  " + "  ".join(f"{m:>7}" for m in METRIC_NAMES) + "  images"]
  for name, m in table.items():
    lines.append(f"{name:<{width}}  " + "  ".join(f"{m[n]:7.4f}" for n in METRIC_NAMES) +
                 f"  {m.get('num_images', '')!s:>6}")
  return "\n".join(lines)


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of <uint8>[H, W, 3] pixels."""
  import tensorflow as tf  # only for images from records
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
    raise ValueError(f"image must be uint8 [H, W, 1|3|4], got {image.dtype} {image.shape}")
  return tf.io.encode_png(image).numpy()


_MIME = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
         (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))
_MAX_EMBEDDED_SIDE = 384  # larger photos are embedded as thumbnails: the page stays small


def _image_data(row: Mapping[str, Any]) -> tuple[str, bytes]:
  """(mime type, bytes) of a row's image: `image_png` bytes, else the file at `image`."""
  data = row.get("image_png")
  path = row.get("image")
  if data is None and path:
    import tensorflow as tf
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    if max(image.shape[:2]) > _MAX_EMBEDDED_SIDE:
      image = tf.image.resize(image, [_MAX_EMBEDDED_SIDE] * 2, preserve_aspect_ratio=True,
                              antialias=True)
      data = tf.io.encode_jpeg(tf.cast(tf.round(image), tf.uint8), quality=90).numpy()
  if data is None:
    raise ValueError(f"row {row.get('key')!r} has no image: give 'image_png' bytes or an "
                     "'image' file path")
  for magic, mime in _MIME:
    if data.startswith(magic):
      return mime, data
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "image/webp", data
  raise ValueError(f"row {row.get('key')!r}: image bytes are not PNG, JPEG, GIF, BMP or WebP")


# Chinese needs a CJK font; the list covers Linux (Noto/Source Han, WenQuanYi), macOS and
# Windows before the generic family.
_FONTS = ('"Noto Sans CJK SC", "Source Han Sans SC", "Noto Sans SC", "WenQuanYi Micro Hei", '
          '"PingFang SC", "Hiragino Sans GB", "Microsoft YaHei", sans-serif')
_CSS = f"""
body {{ font-family: {_FONTS}; margin: 16px; color: #222; }}
table.metrics {{ border-collapse: collapse; margin-bottom: 16px; }}
table.metrics td, table.metrics th {{ border: 1px solid #ccc; padding: 3px 8px;
  text-align: right; }}
table.metrics td:first-child, table.metrics th:first-child {{ text-align: left; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 10px; }}
.cell {{ border: 1px solid #ddd; border-radius: 6px; padding: 8px; display: grid;
        grid-template-columns: 96px 1fr; gap: 8px; align-items: start; font-size: 13px; }}
.cell img {{ width: 96px; height: auto; image-rendering: auto; background: #f4f4f4; }}
.caption {{ font-size: 16px; font-weight: bold; }}
.label {{ color: #777; }}
.small {{ color: #777; font-size: 11px; word-break: break-all; }}
ul {{ margin: 2px 0; padding-left: 16px; }}
"""


def _fmt(x: Any) -> str:
  return f"{x:.3f}" if isinstance(x, (float, np.floating)) else html.escape(str(x))


def _metrics_html(metrics: Mapping[str, Any]) -> str:
  table = _as_table(metrics)
  head = "".join(f"<th>{m}</th>" for m in METRIC_NAMES)
  body = "".join(
      f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(m.get(n, ''))}</td>"
                                                     for n in METRIC_NAMES) +
      f"<td>{_fmt(m.get('num_images', ''))}</td></tr>" for name, m in table.items())
  return (f'<table class="metrics"><tr><th>system</th>{head}<th>images</th></tr>{body}'
          "</table>")


def _cell_html(row: Mapping[str, Any], scores: Mapping[str, float] | None) -> str:
  mime, data = _image_data(row)
  src = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
  key = str(row.get("key", ""))
  parts = [f'<div class="caption">{html.escape(row["caption"])}</div>']
  if "log_prob" in row or "score" in row:
    parts.append('<div class="label">' + " · ".join(
        f"{n} {_fmt(row[f])}" for n, f in (("log p", "log_prob"), ("score", "score"))
        if f in row) + "</div>")
  others = [c for c in row.get("candidates", []) if c.get("caption") != row["caption"]]
  if others:
    parts.append('<div class="label">other candidates</div><ul>' + "".join(
        f'<li class="candidate">{html.escape(c["caption"])} '
        f'<span class="label">{_fmt(c.get("score", ""))}</span></li>' for c in others) +
                 "</ul>")
  refs = row.get("references") or []
  if refs:
    parts.append('<div class="label">references</div><ul>' + "".join(
        f'<li class="reference">{html.escape(r)}</li>' for r in refs) + "</ul>")
  for name, caption in (row.get("baselines") or {}).items():
    if caption is None:
      continue
    parts.append(f'<div class="label">{html.escape(_SHORT_LABELS.get(name, name))}: '
                 f'<span class="baseline">{html.escape(caption)}</span></div>')
  if scores:
    parts.append('<div class="label">' + " · ".join(
        f"{n} {_fmt(scores[n])}" for n in ("CIDEr-D", "BLEU-4") if n in scores) + "</div>")
  parts.append(f'<div class="small">{html.escape(key)}</div>')
  return (f'<div class="cell"><img src="{src}" alt="{html.escape(key, quote=True)}">'
          f'<div>{"".join(parts)}</div></div>')


def write_html(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], *,
               title: str = "Captions", metrics: Mapping[str, Any] | None = None) -> None:
  """Writes one self-contained page (images embedded) of generated captions.

  Args:
    path: the .html file to write, on any TensorFlow filesystem (`storage.write_whole`).
    rows: captions JSON rows ("key", "caption", optional "log_prob", "score", "candidates",
      "references"), each with its image as "image_png" (encoded PNG/JPEG bytes) or "image"
      (a file path). Optional "scores" ({"CIDEr-D": ..., "BLEU-4": ...}) and "baselines"
      ({"most_frequent": caption, "nearest_image": caption}) are shown too. Without "scores",
      per-image scores are computed with `score_captions_per_image` over the rows that have
      references, when there are at least two (CIDEr-D's IDF needs a set of images).
    title: the page title.
    metrics: shown as a table on top: one `score_captions` result, or {system: result}.

  Raises:
    ValueError: a row without a caption or an image, naming its key (before anything is
      written).
  """
  for i, row in enumerate(rows):
    if not isinstance(row.get("caption"), str):
      raise ValueError(f"row {i} (key {row.get('key')!r}) has no 'caption' string")
  scored = [r for r in rows if r.get("references") and "scores" not in r]
  per_image: dict[str, dict[str, float]] = {}
  if len(scored) >= 2:
    _, per_image = score_captions_per_image({r["key"]: r["caption"] for r in scored},
                                            {r["key"]: r["references"] for r in scored})
  cells = [_cell_html(r, r.get("scores") or per_image.get(r.get("key"))) for r in rows]
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  page = (f'<!DOCTYPE html>\n<html lang="zh-CN"><head><meta charset="utf-8">'
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
          f"<h1>{html.escape(title)}</h1>"
          f'<p class="small">{len(rows)} images · written {stamp} · BLEU and CIDEr-D by '
          "pycocoevalcap, Chinese scored by character</p>" +
          (_metrics_html(metrics) if metrics else "") +
          f'<div class="grid">{"".join(cells)}</div></body></html>\n')
  from m6t_tf import storage  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  storage.write_whole(os.fspath(path), page)
