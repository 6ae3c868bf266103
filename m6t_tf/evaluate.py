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

from m6t_tf import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "A trainer's model_dir (config.gin + checkpoints/).")
flags.DEFINE_string("eval_data", None, "TFRecord pattern; default: train.eval_data of config.gin.")
flags.DEFINE_string("checkpoint", None, "A checkpoint prefix; default: the latest in model_dir.")
flags.DEFINE_multi_string("gin_bindings", [], "Overrides applied after config.gin.")
flags.DEFINE_integer("batch_size", 0, "Evaluation batch per worker; 0 = the training batch.")


def main(argv):
  del argv
  if not FLAGS.model_dir:
    raise app.UsageError("--model_dir is required")
  from m6t_tf.parallel import horovod as horovod_lib
  horovod_lib.place_process()  # each rank's GPU, before anything starts TensorFlow's runtime
  from m6t_tf.run import evaluation
  r = evaluation.evaluate(FLAGS.model_dir, eval_data=FLAGS.eval_data,
                          checkpoint=FLAGS.checkpoint, gin_bindings=FLAGS.gin_bindings,
                          batch_size=FLAGS.batch_size)
  ratio = r["unigram_perplexity"] / r["perplexity"]
  verdict = (f"the model is {ratio:.1f}× lower" if ratio > 1 else "the model does NOT beat it")
  print(f"Validation perplexity {r['perplexity']:.2f} (log {r['log_perplexity']:.4f}) over "
        f"{r['tokens']:,} caption tokens; unigram perplexity of the same captions "
        f"{r['unigram_perplexity']:.2f}: {verdict}", flush=True)
  print(f"Written to {os.path.join(FLAGS.model_dir, 'eval.json')}")


if __name__ == "__main__":
  cli.run(main)
