"""Captions from a trainer's checkpoint (library side of `m6t_tf.generate`).

`restore` rebuilds the model from `model_dir/config.gin` and its latest checkpoint, as
`m6t_tf.run.evaluation` does; `generate` reads images (files, or the records of a split),
decodes them on every worker (`m6t_tf.run.captioning`), and returns (and writes) one JSON row
per image:

    {"key", "image", "caption", "log_prob", "score", "num_tokens", "candidates", "references"}

`num_tokens` counts the generated tokens, the final [SEP] included ([CLS] excluded); `log_prob`
is the model's log-probability of exactly those tokens; `score` is the beam score (the
length-penalised log-prob, see `m6t_tf.models.decoding`), equal to `log_prob` for greedy and sampling.

Under horovodrun every worker is on the expert axis (`configurables.make_eval_context`): rank r
decodes images r, r + W, r + 2W, ... in batches of the same size on every rank (the last ones
padded with filler rows), all ranks run the same number of decode steps (`lockstep`), and rank 0
gathers the rows in input order and writes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional, Sequence

import tensorflow as tf

from m6t_tf import storage
from m6t_tf.data import tokenizer as tokenizer_lib
from m6t_tf.errors import ConfigError
from m6t_tf.models import decoding
from m6t_tf.run import captioning
from m6t_tf.run import checkpointing
from m6t_tf.run import configurables
from m6t_tf.run import evaluation
from m6t_tf.run import trainer as trainer_lib

_PATCH_KERNEL = "patch_embedding/proj/kernel"


@dataclasses.dataclass
class Restored:
  """A model restored from a trainer's model_dir.

  Attributes:
    model: the `M6Captioner` (its `network` decodes).
    ctx: the worker context.
    checkpoint: the restored checkpoint prefix.
    max_len: the training caption length (tokens incl. [CLS] and [SEP]).
    image_mode: "pixels" or "features".
    image_size: side of the square training images (pixels), else None.
    feature_dim: P of patch features (features), else None.
    train_data, eval_data: the record patterns of config.gin.
  """
  model: object
  ctx: object
  checkpoint: str
  max_len: int
  image_mode: str
  image_size: Optional[int]
  feature_dim: Optional[int]
  train_data: Optional[str]
  eval_data: Optional[str]

  @property
  def network(self):
    return self.model.network


def restore(model_dir: str, *, checkpoint: Optional[str] = None, gin_bindings=(),
            ctx=None) -> Restored:
  """Rebuilds the model of `model_dir` and restores its latest (or the given) checkpoint."""

  ctx = evaluation.load_run_config(model_dir, gin_bindings, ctx)
  q = lambda name: configurables.query(f"train.{name}")
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  path = checkpoint or checkpointing.Checkpointer(ckpt_dir, {}, ctx=ctx).latest()
  if not path:
    raise ConfigError(f"no checkpoint in {ckpt_dir}: train first (make train)")
  # The image size is the dataset's, not the config's: read it off the patch projection.
  shapes = tf.compat.v1.train.NewCheckpointReader(path).get_variable_to_shape_map()
  kernel = [s for k, s in shapes.items() if k.endswith(_PATCH_KERNEL)]
  if len(kernel) != 1:
    raise ValueError(f"checkpoint {path} has no single '{_PATCH_KERNEL}' entry")
  width = kernel[0][0]
  image_mode = q("image_mode") or "pixels"
  image_size = feature_dim = None
  if image_mode == "pixels":
    side = math.isqrt(width // 3)
    if side * side * 3 != width:
      raise ValueError(f"patch projection input {width} is not 3·p·p: not square images")
    image_size = 4 * side
    batch = {"image": tf.zeros([1, image_size, image_size, 3], tf.uint8)}
  else:
    feature_dim = width
    batch = {"patch_features": tf.zeros([1, 16, width], tf.float32)}
  batch["tokens"] = tf.constant([[decoding.CLS_ID, decoding.SEP_ID]], tf.int32)
  model = trainer_lib.build_model(configurables.network_fn(), batch=batch, mixed_precision=False)
  num_experts = model.moe_layers[0].num_experts if model.moe_layers else 0
  checkpointer = checkpointing.Checkpointer(ckpt_dir, trainer_lib.variables_by_path(model), ctx=ctx,
                                            num_experts=num_experts)
  checkpointer.restore(path)
  return Restored(model=model, ctx=ctx, checkpoint=path, max_len=int(q("max_len")),
                  image_mode=image_mode, image_size=image_size, feature_dim=feature_dim,
                  train_data=q("train_data"), eval_data=q("eval_data"))


def generate(model_dir: str, *, images: Optional[str] = None, split: Optional[str] = None,
             data: Optional[str] = None, options: decoding.DecodeOptions,
             batch_size: int = 64, num_images: int = 0, out: Optional[str] = None,
             html: Optional[str] = None, checkpoint: Optional[str] = None, gin_bindings=(),
             ctx=None, log=print) -> dict:
  """Captions images of files (`images`) or of a split's records; writes JSON lines.

  Args:
    model_dir: a trainer's model_dir.
    images: comma-separated glob patterns of image files.
    split: "validation" or "train": the records of train.eval_data / train.train_data.
    data: a record pattern overriding the split's.
    options: how to decode (`max_len` 0 = the training max_len).
    batch_size: images per decode batch per worker.
    num_images: caption only the first N images (0 = all).
    out: the JSON-lines file (default model_dir/captions.jsonl).
    html: also write this page (needs `m6t_tf.run.caption_metrics`).
    checkpoint, gin_bindings, ctx: as `restore`.
    log: where progress lines go (rank 0 only).

  Returns:
    {"rows": [...], "metrics": {...} or None, "out": path, "ctx": the worker context}
    (all rows and the metrics on rank 0, this rank's rows elsewhere).
  """
  if (images is None) == (split is None):
    raise ConfigError("give exactly one of --images='photos/*.jpg' and --split=validation")
  if split is not None and split not in ("validation", "train"):
    raise ConfigError(f"--split={split!r}; allowed: 'validation', 'train'")
  if batch_size < 1 or num_images < 0:
    raise ConfigError(f"batch_size={batch_size} must be >= 1 and num_images={num_images} >= 0")
  files = captioning.list_image_files(images) if images is not None else None
  restored = restore(model_dir, checkpoint=checkpoint, gin_bindings=gin_bindings, ctx=ctx)
  ctx = restored.ctx
  world, rank = captioning.world_rank(ctx)
  say = log if rank == 0 else (lambda *a, **k: None)
  max_len = options.max_len or restored.max_len
  options = dataclasses.replace(options, max_len=max_len)
  options.check(restored.network.max_text_length, restored.network.vocab_size)
  if files is not None:
    if restored.image_mode != "pixels":
      raise ConfigError(f"--images needs a model trained on pixels; {model_dir} was trained on "
                       f"patch features: use --split")
    items = captioning.read_image_files(files[:num_images or None], restored.image_size)
  else:
    pattern = data or (restored.eval_data if split == "validation" else restored.train_data)
    if not pattern:
      raise ConfigError(f"no records for --split={split}: config.gin sets no train data pattern; "
                       f"pass --data")
    items = captioning.read_split_items(pattern, image_mode=restored.image_mode, max_len=max_len)
    items = items[:num_images or None]
  if not items:
    raise ConfigError("no images to caption")
  tokenizer = tokenizer_lib.Tokenizer()
  captioner = captioning.Captioner(restored.network, options, lockstep=world > 1,
                        vocab=tokenizer_lib.load_vocab(tokenizer.vocab_path))
  feature = "image" if restored.image_mode == "pixels" else "patch_features"
  say(f"Captioning {len(items)} images on {world} worker(s) ({options.method}, max_len "
      f"{max_len}) with {restored.checkpoint}")
  rows = captioning.decode_items(items, captioner, feature=feature, ctx=ctx, batch_size=batch_size,
                      tokenizer=tokenizer)
  result = {"rows": rows, "metrics": None, "ctx": ctx,
            "out": out or os.path.join(model_dir, "captions.jsonl")}
  if rank != 0:
    return result
  write_jsonl(result["out"], rows)
  say(f"Wrote {len(rows)} captions to {result['out']}")
  metrics_lib = _caption_metrics()
  baseline_captions = {}
  if split is not None and metrics_lib is not None:
    result["metrics"], baseline_captions = score_with_baselines(
        metrics_lib, rows, restored, pattern if split == "validation" else None, max_len, say)
    path = os.path.join(model_dir, "caption_metrics.json")
    storage.write_whole(path, json.dumps(result["metrics"], ensure_ascii=False, indent=1))
    say(f"Wrote {path}")
  elif split is not None:
    say("caption metrics skipped: m6t_tf.run.caption_metrics is not available")
  if html:
    if metrics_lib is None:
      raise ConfigError("--html needs m6t_tf.run.caption_metrics (write_html)")
    page_rows = [dict(r) for r in rows]
    if files is None:
      by_key = {it.key: it for it in items}
      for r in page_rows:
        r["image_png"] = tf.io.encode_png(by_key[r["key"]].features).numpy()
    for r in page_rows:
      if baseline_captions:
        r["baselines"] = {name: by_key.get(r["key"]) for name, by_key in baseline_captions.items()}
    metrics_lib.write_html(html, page_rows, title=f"Captions of {model_dir}",
                           metrics=result["metrics"])
    say(f"Wrote {html}")
  return result


def _caption_metrics():
  try:
    from m6t_tf.run import caption_metrics  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return caption_metrics


def score_with_baselines(metrics_lib, rows, restored, eval_pattern, max_len, say):
  """Scores of the model and, for the validation split, of the two baselines on the same images.

  Returns:
    ({"model": scores, "most_frequent": scores, "nearest_image": scores},
     {baseline name: {key: caption}}).
  """
  candidates = {r["key"]: r["caption"] for r in rows}
  references = {r["key"]: r["references"] for r in rows}
  table = {"model": metrics_lib.score_captions(candidates, references)}
  captions = {}
  if eval_pattern and restored.train_data and restored.image_mode == "pixels":
    for name, by_key in metrics_lib.baselines(restored.train_data, eval_pattern,
                                              max_len).items():
      captions[name] = {k: by_key[k] for k in candidates if k in by_key}
      table[name] = metrics_lib.score_captions(captions[name], references)
  say(metrics_lib.format_table(table))
  return table, captions


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
  """One JSON object a line (UTF-8, Chinese unescaped), published whole on any TensorFlow
  filesystem (`storage.write_whole`)."""
  parent = os.path.dirname(path)
  if parent:
    storage.makedirs(parent)
  storage.write_whole(path, "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                    for row in rows))
