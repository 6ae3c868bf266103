"""Teacher-forced evaluation of a trainer's checkpoint (library side of `m6t_tf.evaluate`)."""

from __future__ import annotations

import os

import gin

from m6t_tf import storage
from m6t_tf.data import metadata
from m6t_tf.data import pipeline
from m6t_tf.errors import ConfigError
from m6t_tf.run import checkpointing
from m6t_tf.run import config as config_lib
from m6t_tf.run import configurables
from m6t_tf.run import inputs
from m6t_tf.run import logs
from m6t_tf.run import trainer as trainer_lib


def load_run_config(model_dir: str, gin_bindings=(), ctx=None):
  """Parses `model_dir/config.gin` (written by the trainer) plus `gin_bindings`; returns the
  evaluation context (`ctx` if given). model_dir may be on any TensorFlow filesystem."""
  config_path = os.path.join(model_dir, "config.gin")
  if not storage.exists(config_path):
    raise ConfigError(f"{config_path} not found: is --model_dir={model_dir!r} a trainer's "
                      f"model_dir?")
  gin.clear_config()
  configurables.parse([config_path], list(gin_bindings))
  return ctx or configurables.make_eval_context()


def evaluate(model_dir: str, *, eval_data: str | None = None, checkpoint: str | None = None,
             gin_bindings=(), batch_size: int = 0, ctx=None) -> dict:
  """Evaluates the checkpoint of `model_dir`; returns (and writes) the result dict."""

  ctx = load_run_config(model_dir, gin_bindings, ctx)
  q = lambda name: configurables.query(f"train.{name}")
  binding = "--eval_data" if eval_data else "train.eval_data"
  eval_data = eval_data or q("eval_data")
  if not eval_data:
    raise ConfigError("no evaluation data: pass --eval_data or set train.eval_data")
  # The trainer's own per-worker batch (capacity, and so perplexity, depends on it).
  batch = batch_size or config_lib.per_worker_batch(q("batch_size_per_worker"),
                                                  q("global_batch_size"), ctx.size)
  max_len, image_mode = q("max_len"), q("image_mode")
  # The evaluation data against the trained model, before building anything.
  facts = metadata.read(eval_data, binding=binding)
  metadata.check_config(facts, image_mode=image_mode, max_len=max_len,
                        truncate_captions=bool(q("truncate_captions")))
  train_data = q("train_data")  # also the unigram baseline's counts
  metadata.check_same_images(metadata.read(train_data, binding="train.train_data"), facts,
                             image_mode)
  dataset = inputs.eval_stream(eval_data, batch_size=batch, max_len=max_len,
                                       image_mode=image_mode, ctx=ctx)
  model = trainer_lib.build_model(configurables.network_fn(), batch=next(iter(dataset.take(1))),
                               mixed_precision=False)
  num_experts = model.moe_layers[0].num_experts if model.moe_layers else 0
  checkpointer = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"),
                                            trainer_lib.variables_by_path(model), ctx=ctx,
                                            num_experts=num_experts)
  path = checkpoint or checkpointer.latest()
  if not path:
    raise ConfigError(f"no checkpoint in {model_dir}/checkpoints: train first, or pass "
                      f"--checkpoint")
  checkpointer.restore(path)
  trainer = trainer_lib.Trainer(model, _NoOpt(), ctx=ctx)
  result = trainer_lib.evaluate_perplexity(trainer, dataset)
  result["unigram_perplexity"] = pipeline.unigram_perplexity(train_data, eval_data,
                                                             max_len=max_len)
  result["checkpoint"] = path
  result["eval_data"] = eval_data
  if ctx.is_chief:
    logs.write_json(os.path.join(model_dir, "eval.json"), result)
  return result


class _NoOpt:
  """Evaluation needs no optimiser; Trainer only calls `build` on it."""

  learning_rate = 0.0

  def build(self, variables):
    del variables
