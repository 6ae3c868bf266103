r"""Teacher-forced perplexity of a trained model on the validation split.

  python -m m6t_tf.evaluate --model_dir=runs/demo [--eval_data='.data/demo/validation-*']
      [--gin_bindings="MoEConfig.eval_capacity_factor=2.0"] [--checkpoint=runs/demo/checkpoints/ckpt-500]

Reads `model_dir/config.gin` (written by the trainer), restores the latest checkpoint, and
prints and writes `model_dir/eval.json`: log-perplexity, perplexity, the number of caption
tokens scored, and the unigram perplexity of the same captions (a model that ignores the image
and the preceding words) as the baseline the model must beat. Uses the MoE layers'
`eval_capacity_factor` (training=False).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "A trainer's model_dir (config.gin + checkpoints/).")
flags.DEFINE_string("eval_data", None, "TFRecord pattern; default: train.eval_data of config.gin.")
flags.DEFINE_string("checkpoint", None, "A checkpoint prefix; default: the latest in model_dir.")
flags.DEFINE_multi_string("gin_bindings", [], "Overrides applied after config.gin.")
flags.DEFINE_integer("batch_size", 0, "Evaluation batch per worker; 0 = the training batch.")


def evaluate(model_dir: str, *, eval_data: str | None = None, checkpoint: str | None = None,
             gin_bindings=(), batch_size: int = 0, ctx=None) -> dict:
  """Evaluates the checkpoint of `model_dir`; returns (and writes) the result dict."""
  import gin
  from m6t_tf import checkpointing
  from m6t_tf import configurables
  from m6t_tf import training
  from m6t_tf.data import pipeline

  config_path = os.path.join(model_dir, "config.gin")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: is --model_dir={model_dir!r} a trainer's "
                            f"model_dir?")
  gin.clear_config()
  configurables.parse([config_path], list(gin_bindings))
  ctx = ctx or configurables.make_eval_context()
  q = lambda name: configurables.query(f"train.{name}")
  eval_data = eval_data or q("eval_data")
  if not eval_data:
    raise ValueError("no evaluation data: pass --eval_data or set train.eval_data")
  batch = batch_size or q("batch_size_per_worker")
  max_len, image_mode = q("max_len"), q("image_mode")
  dataset = training._batches_for_eval(eval_data, batch_size=batch, max_len=max_len,
                                       image_mode=image_mode, ctx=ctx)
  model = training.build_model(configurables.network_fn(), batch=next(iter(dataset.take(1))),
                               mixed_precision=False)
  num_experts = model.moe_layers[0].num_experts if model.moe_layers else 0
  checkpointer = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"),
                                            training.variables_by_path(model), ctx=ctx,
                                            num_experts=num_experts)
  path = checkpoint or checkpointer.latest()
  if not path:
    raise FileNotFoundError(f"no checkpoint in {model_dir}/checkpoints")
  checkpointer.restore(path)
  trainer = training.Trainer(model, _NoOpt(), ctx=ctx)
  result = training.evaluate_perplexity(trainer, dataset)
  train_data = q("train_data")
  result["unigram_perplexity"] = pipeline.unigram_perplexity(train_data, eval_data,
                                                             max_len=max_len)
  result["checkpoint"] = path
  result["eval_data"] = eval_data
  if ctx.is_chief:
    training.write_json(os.path.join(model_dir, "eval.json"), result)
  return result


class _NoOpt:
  """Evaluation needs no optimiser; Trainer only calls `build` on it."""

  learning_rate = 0.0

  def build(self, variables):
    del variables


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if not FLAGS.model_dir:
    raise app.UsageError("--model_dir is required")
  r = evaluate(FLAGS.model_dir, eval_data=FLAGS.eval_data, checkpoint=FLAGS.checkpoint,
               gin_bindings=FLAGS.gin_bindings, batch_size=FLAGS.batch_size)
  ratio = r["unigram_perplexity"] / r["perplexity"]
  verdict = (f"the model is {ratio:.1f}× lower" if ratio > 1 else "the model does NOT beat it")
  print(f"Validation perplexity {r['perplexity']:.2f} (log {r['log_perplexity']:.4f}) over "
        f"{r['tokens']:,} caption tokens; unigram perplexity of the same captions "
        f"{r['unigram_perplexity']:.2f}: {verdict}", flush=True)
  print(f"Written to {os.path.join(FLAGS.model_dir, 'eval.json')}")


if __name__ == "__main__":
  app.run(main)
