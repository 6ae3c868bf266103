r"""Trains M6-T.  Single process, or one process per GPU under horovodrun / mpirun:

  python -m m6t_tf.train --gin_file=gin/demo.gin --model_dir=runs/demo
  horovodrun -np 2 -H localhost:2 --gloo python -m m6t_tf.train --gin_file=gin/demo.gin ...
  python -m m6t_tf.train --gin_file=gin/1T.gin --gin_file=gin/layouts/1x480.gin \
      --gin_bindings="train.train_data='/data/m6/train-*'" --model_dir=/ckpt/1T
  python -m m6t_tf.train --gin_file=gin/1T.gin --gin_file=gin/layouts/1x480.gin --dry_run

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
flags.DEFINE_bool("dry_run", False, "Check every binding and print the plan of the run — "
                  "parameters, memory per worker with and without recomputation, expert capacity, "
                  "all-to-all bytes per step, whether it fits the layout's device memory — "
                  "without reading data or building the model.")
flags.DEFINE_integer("num_workers", None, "With --dry_run: the run's workers (default: the "
                     "layout's mesh_data × mesh_expert).", lower_bound=1)


def dry_run(model_dir) -> int:
  """`--dry_run`: the trainer's checks and the planner's arithmetic on the config, no data read
  and no weight made (seconds, on any machine, for any worker count)."""
  from m6t_tf.run import configurables  # pylint: disable=g-import-not-at-top
  from m6t_tf.run import planning  # pylint: disable=g-import-not-at-top
  from m6t_tf.errors import ConfigError  # pylint: disable=g-import-not-at-top
  planning.parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths, read_data=False)
  if configurables.query("%MAX_LEN", 0) is None:
    raise ConfigError("MAX_LEN = None follows the data, which a dry run does not read: pass "
                      "--gin_bindings=MAX_LEN=<caption tokens incl. [CLS]/[SEP]>, e.g. "
                      "--gin_bindings=MAX_LEN=20", fix=("MAX_LEN=20",))
  # The trainer's own checks first, for the layout's workers: the planner's arithmetic assumes
  # a valid config. What only the real run needs stands in, and is named.
  mesh_data = configurables.query("make_context.mesh_data", 1)
  mesh_expert = configurables.query("make_context.mesh_expert", 0)
  workers = FLAGS.num_workers or mesh_data * max(mesh_expert, 1)
  unset = configurables.required_unset()
  stand_ins = {"train_data": "(train.train_data)", "num_steps": 1_000_000}
  config = configurables.validate_run(num_workers=workers, model_dir=model_dir or "(dry run)",
                                      **{name: stand_ins.get(name) for name in unset})
  plan = planning.plan_from_gin(FLAGS.gin_file, FLAGS.gin_bindings, num_workers=FLAGS.num_workers,
                                search_paths=FLAGS.gin_search_paths, read_data=False)
  print(f"Dry run: every binding is valid for {workers} worker(s); no data read, no weight "
        f"made." + (f" Still required to train: {', '.join(f'train.{n}' for n in unset)}."
                    if unset else "") + "\n")
  print(planning.markdown_table({" + ".join(os.path.basename(f) for f in FLAGS.gin_file): plan}))
  remat = config.execution.remat
  total = plan["memory_bytes"]["total_recompute" if remat != "none" else "total"]
  device = plan["gpu_memory_bytes"]
  print(f"\nThis run (train.remat={remat!r}): {total / 2**30:.2f} of {device / 2**30:g} GiB "
        f"per worker: {'fits' if total <= device else 'DOES NOT FIT'}. Planner: "
        f"{plan['verdict']}.", flush=True)
  return 0


def main(argv):
  del argv
  import gin
  import tensorflow as tf

  from m6t_tf import storage
  from m6t_tf.parallel import horovod as horovod_lib
  from m6t_tf.run import configurables

  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # the progress lines are the console output
  if not FLAGS.gin_file:
    raise app.UsageError("--gin_file is required, e.g. --gin_file=gin/demo.gin")
  if FLAGS.dry_run:
    return dry_run(FLAGS.model_dir)
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
