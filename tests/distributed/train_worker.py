"""One trainer process for tests/test_parallel_training.py (run alone or under horovodrun).

  python tests/distributed/train_worker.py --out=r.json --model_dir=D --gin_file=... \
      [--gin_bindings=...] [--stop_after=N] [--init_dir=I] [--eval_dirs=D1,D2 --eval_data=F]

Trains (`--model_dir`), then continues `--continue_dir` (a model dir with a checkpoint) to
`--continue_steps`, then evaluates each of `--eval_dirs` (whatever worker count trained it; on
this launch's workers, all on the expert axis: the evaluation layout), all in one process per
rank, so that one launch makes several checks; every run builds its model, optimiser and input
stream afresh and restores what it resumes from the checkpoint files. `--init_dir` first
writes this config's step-0 checkpoint there (what every run of the test starts from) and
starts `--model_dir` from it.

Writes `<out>.rank<R>.json` with this rank's view: losses (global), final evaluation, and a
fingerprint of the weights, so the test can check that dense weights agree on every rank and
expert weights agree within each replica group.

The launching test puts the checkout on PYTHONPATH (`tests/jobs.py`), so this script imports
the checkout's `m6t_tf`.
"""

import hashlib
import json
import os
import shutil

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Result prefix.")
flags.DEFINE_string("model_dir", None, "Model dir to train.")
flags.DEFINE_string("continue_dir", None, "Model dir to continue after --model_dir.")
flags.DEFINE_integer("continue_steps", None, "train.num_steps of --continue_dir.")
flags.DEFINE_multi_string("gin_file", [], "Gin files.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings.")
flags.DEFINE_integer("stop_after", None, "Steps of this invocation.")
flags.DEFINE_string("init_dir", None, "Write the step-0 checkpoint here first, start from it.")
flags.DEFINE_list("eval_dirs", [], "Model dirs to evaluate after training.")
flags.DEFINE_string("eval_data", None, "Evaluation data of --eval_dirs.")


def fingerprint(values) -> str:
  h = hashlib.sha256()
  for v in values:
    h.update(v.tobytes())
  return h.hexdigest()


def main(argv):
  del argv
  import tensorflow as tf
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  from m6t_tf.run import configurables
  from m6t_tf.run import evaluation as evaluate_lib
  from m6t_tf.parallel import context as context_lib

  configurables.parse(FLAGS.gin_file, FLAGS.gin_bindings, ["."])
  result = {}
  ctx = configurables.make_context_configured()
  if FLAGS.init_dir:
    configurables.run_train(ctx=ctx, model_dir=FLAGS.init_dir, stop_after=0, eval_data=None)
    if ctx.is_chief:
      shutil.copytree(os.path.join(FLAGS.init_dir, "checkpoints"),
                      os.path.join(FLAGS.model_dir, "checkpoints"))
    ctx.barrier()
  summary = configurables.run_train(ctx=ctx, model_dir=FLAGS.model_dir,
                                    stop_after=FLAGS.stop_after)
  result["losses"] = summary["losses"]
  result["step"] = summary["step"]
  result["eval_captions"] = (summary["eval"] or {}).get("captions")
  model = summary["model"]
  dense = [v.numpy() for v in model.trainable_variables if not context_lib.is_expert_variable(v)]
  expert = [v.numpy() for v in model.trainable_variables if context_lib.is_expert_variable(v)]
  result["dense_fingerprint"] = fingerprint(dense)
  result["expert_fingerprint"] = fingerprint(expert)
  if FLAGS.continue_dir:
    summary = configurables.run_train(ctx=ctx, model_dir=FLAGS.continue_dir,
                                      num_steps=FLAGS.continue_steps, eval_data=None)
    result["continued"] = {"step": summary["step"], "losses": summary["losses"]}
  if FLAGS.eval_dirs:
    # Evaluation puts every worker on the expert axis; a training context may only be reused
    # for it when its mesh is that one.
    if ctx.size > 1 and (ctx.mesh.data, ctx.mesh.expert) != (1, ctx.size):
      raise ValueError(f"--eval_dirs needs mesh (1, {ctx.size}), not {ctx.mesh}")
    result["evals"] = {d: evaluate_lib.evaluate(d, eval_data=FLAGS.eval_data, ctx=ctx)
                       for d in FLAGS.eval_dirs}
  result["rank"] = ctx.rank
  result["size"] = ctx.size
  result["data_index"] = getattr(ctx, "data_index", 0)
  result["expert_index"] = getattr(ctx, "expert_index", 0)
  with open(f"{FLAGS.out}.rank{result['rank']}.json", "w") as f:
    json.dump(result, f)
  ctx.barrier()
  if not isinstance(ctx, context_lib.LocalContext):
    ctx.shutdown()


if __name__ == "__main__":
  app.run(main)
