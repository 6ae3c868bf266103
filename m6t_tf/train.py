r"""Trains M6-T.  Single process, or one process per GPU under horovodrun / mpirun:

  python -m m6t_tf.train --gin_file=gin/demo.gin --model_dir=runs/demo
  horovodrun -np 2 -H localhost:2 --gloo python -m m6t_tf.train --gin_file=gin/demo.gin ...
  python -m m6t_tf.train --gin_file=gin/1T.gin --gin_file=gin/layouts/480x1.gin \
      --gin_bindings="train.train_data='/data/m6/train-*'" --model_dir=/ckpt/1T

The final gin config is logged and written to model_dir/config.gin. A configuration or input
error prints one line and exits with status 2 (m6t_tf.cli); `M6T_TF_LOGS=1` shows
TensorFlow's own start-up lines.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging

from m6t_tf import cli

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config files (later ones override earlier ones).")
flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. \"train.num_steps=10\".")
flags.DEFINE_multi_string("gin_search_paths", ["."], "Folders searched for gin includes.")
flags.DEFINE_string("model_dir", None, "Checkpoints, summaries and config.gin go here.")
flags.DEFINE_bool("check_numerics", False, "Debug: stop at the first non-finite tensor, naming "
                  "the op and layer (slow).")


def main(argv):
  del argv
  import gin
  import tensorflow as tf

  from m6t_tf.run import configurables
  from m6t_tf import storage
  from m6t_tf.run import training
  from m6t_tf.parallel import horovod as horovod_lib

  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # the progress lines are the console output
  if not FLAGS.gin_file:
    raise app.UsageError("--gin_file is required, e.g. --gin_file=gin/demo.gin")
  # Each rank's GPU, chosen before anything starts TensorFlow's runtime: parsing the config
  # may read records (MAX_LEN = None), after which the visible devices cannot change.
  horovod_lib.place_process()
  configurables.parse(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
  if not FLAGS.model_dir and not configurables.query("train.model_dir"):
    raise app.UsageError("--model_dir is required (checkpoints, summaries and config.gin go "
                         "there), e.g. --model_dir=runs/mine")
  if FLAGS.check_numerics:
    tf.debugging.enable_check_numerics()
  ctx = configurables.make_context_configured()
  bindings = {}
  if FLAGS.model_dir:
    bindings["model_dir"] = FLAGS.model_dir
  summary = configurables.run_train(ctx=ctx, **bindings)
  operative = gin.operative_config_str()
  logging.info("operative config:\n%s", operative)
  if ctx.is_chief and FLAGS.model_dir:
    storage.write_text(os.path.join(FLAGS.model_dir, "operative_config.gin"), operative)
  if ctx.is_chief and summary.get("eval"):
    e = summary["eval"]
    print(f"Validation perplexity {e['perplexity']:.2f} (log {e['log_perplexity']:.4f}) over "
          f"{e['tokens']:,} caption tokens", flush=True)
  ctx.shutdown()


if __name__ == "__main__":
  cli.run(main)
