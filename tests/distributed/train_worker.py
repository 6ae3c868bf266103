"""One trainer process for tests/test_parallel_training.py (run alone or under horovodrun).

  python tests/distributed/train_worker.py --out=r.json --model_dir=D --gin_file=... \
      [--gin_bindings=...] [--stop_after=N] [--mode=train|eval|train_eval]

Writes `<out>.rank<R>.json` with this rank's view: losses (global), final evaluation, and a
fingerprint of the weights, so the test can check that dense weights agree on every rank and
expert weights agree within each replica group.

The launching test puts the checkout on PYTHONPATH (`tests/jobs.py`), so this script imports
the checkout's `m6t_tf`.
"""

import hashlib
import json

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Result prefix.")
flags.DEFINE_string("model_dir", None, "Model dir (eval: a comma-separated list of them).")
flags.DEFINE_multi_string("gin_file", [], "Gin files.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings.")
flags.DEFINE_integer("stop_after", None, "Steps of this invocation.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to run.")


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
  if FLAGS.mode == "train":
    ctx = configurables.make_context_configured()
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
  else:
    # Every model dir of the comma-separated list, in one process (one launch, many checks).
    ctx = configurables.make_eval_context()
    result["evals"] = {d: evaluate_lib.evaluate(d, ctx=ctx) for d in FLAGS.model_dir.split(",")}
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
