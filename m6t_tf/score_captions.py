r"""Scores a captions file with BLEU-1..4 and CIDEr-D, beside two baselines, and draws a page.

  python -m m6t_tf.score_captions --captions=runs/demo/captions.jsonl \
      [--references='.data/demo/validation-*'] [--train_data='.data/demo/train-*'] \
      [--html=runs/demo/captions.html] [--out=runs/demo/caption_metrics.json]

The captions file has one JSON object per line, as `python -m m6t_tf.generate` writes it
({"key", "caption", "log_prob", "score", "candidates", "references", ...}). References are
every caption of the image's key in the `--references` records, or, without that flag, the
rows' own "references". With `--train_data` (and `--references`, which holds the evaluation
images) the two baselines of `m6t_tf.run.caption_metrics` are scored on the same images: the most
frequent training caption, and the caption of the nearest training image in pixel space.
Prints the table; `--out` writes it as JSON; `--html` writes the page (images from the
records, or from the rows' "image" paths).
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("captions", None, "Captions JSON lines (python -m m6t_tf.generate --out).")
flags.DEFINE_string("references", None, "TFRecord pattern of the evaluation split: the "
                    "references of each key and its image; default: the rows' references.")
flags.DEFINE_string("train_data", None, "TFRecord pattern of the training split: adds the two "
                    "baselines (needs --references for the evaluation images).")
flags.DEFINE_string("html", None, "Write the page of images and captions here.")
flags.DEFINE_string("out", None, "Write the metrics table as JSON here.")
flags.DEFINE_string("title", None, "Page title; default: the captions file name.")


def read_captions(path: str) -> list[dict]:
  """The rows of a captions JSONL file; raises ValueError naming the line of a bad row."""
  import tensorflow as tf
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"--captions={path!r} does not exist; write it with "
                            "`python -m m6t_tf.generate --out=...`")
  rows, seen = [], set()
  with tf.io.gfile.GFile(path, "r") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
      if (not isinstance(row, dict) or not isinstance(row.get("key"), str) or
          not isinstance(row.get("caption"), str)):
        raise ValueError(f"{path}:{n}: a row needs a string 'key' and 'caption', got "
                         f"{line.strip()[:120]}")
      if row["key"] in seen:
        raise ValueError(f"{path}:{n}: key {row['key']!r} appears twice; one caption per image")
      seen.add(row["key"])
      rows.append(row)
  if not rows:
    raise ValueError(f"{path} has no captions")
  return rows


def score_file(captions: str, *, references: str | None = None,
               train_data: str | None = None, html: str | None = None,
               out: str | None = None, title: str | None = None) -> dict:
  """What the command does; returns {system: metrics} (also written to `out`).

  The systems are "model" and, with `train_data`, the baselines "most_frequent" and
  "nearest_image" (the keys `python -m m6t_tf.generate` writes to caption_metrics.json).
  """
  from m6t_tf.run import caption_metrics as cm
  if train_data and not references:
    raise ValueError("--train_data needs --references: the baselines look up the evaluation "
                     "images in those records")
  rows = read_captions(captions)
  keys = [r["key"] for r in rows]
  evaluation = None
  if references:
    evaluation = cm.read_split(references)
    refs = evaluation.references()
    missing = [k for k in keys if k not in refs]
    if missing:
      raise ValueError(f"caption key {missing[0]!r} is not in --references={references!r} "
                       f"({len(missing)} of {len(keys)} keys missing, e.g. {missing[:5]})")
  else:
    refs = {r["key"]: r.get("references") or [] for r in rows}
    empty = [k for k, v in refs.items() if not v]
    if empty:
      raise ValueError(f"row {empty[0]!r} of {captions} has no 'references' ({len(empty)} "
                       "rows without); give --references=<TFRecord pattern of the split>")
  images = evaluation.image_of() if evaluation is not None else {}
  no_image = [r["key"] for r in rows if not r.get("image") and r["key"] not in images]
  if html and no_image:
    raise ValueError(f"row {no_image[0]!r} has neither an 'image' path nor a record in "
                     "--references to take its image from; give --references")
  table: dict[str, dict] = {}
  table["model"], per_image = cm.score_captions_per_image(
      {r["key"]: r["caption"] for r in rows}, refs)
  base = {}
  if train_data:
    base = cm.baselines_from_splits(cm.read_split(train_data), evaluation, keys)
    for name, caps in base.items():
      table[name] = cm.score_captions(caps, refs)
  print(cm.format_table(table), flush=True)
  if out:
    from m6t_tf import storage  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
    mode = next(iter(base["most_frequent"].values())) if base else None
    storage.write_whole(out, json.dumps(
        {"captions": captions, "references": references, "train_data": train_data,
         "metrics": table, "most_frequent_training_caption": mode},
        ensure_ascii=False, indent=1))
    print(f"Written to {out}")
  if html:
    page_rows = []
    for r in rows:
      r = dict(r, references=refs[r["key"]], scores=per_image[r["key"]])
      if base:
        r["baselines"] = {name: caps[r["key"]] for name, caps in base.items()}
      if not r.get("image") and r["key"] in images:
        r["image_png"] = cm.encode_png(images[r["key"]])
      page_rows.append(r)
    cm.write_html(html, page_rows, title=title or os.path.basename(captions), metrics=table)
    print(f"Page: {html}")
  return table


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if not FLAGS.captions:
    raise app.UsageError("--captions is required")
  score_file(FLAGS.captions, references=FLAGS.references, train_data=FLAGS.train_data,
             html=FLAGS.html, out=FLAGS.out, title=FLAGS.title)


if __name__ == "__main__":
  app.run(main)
