"""One gradient-probe process for tests/test_parallel_gradients.py (alone or under horovodrun).

  python tests/distributed/grad_worker.py --out=P --data=F --init=I.npz --global_batch=G \
      --steps=K --learning_rate=LR --gin_file=... [--gin_bindings=...] [--remat=none,block]

Reads the first K global batches of G examples from the TFRecord file F (no shuffling) and
deals each one to the W ranks in contiguous blocks: rank r trains on rows [r·G/W, (r+1)·G/W).
It builds the gin-configured model and starts from the weights in I.npz (one process writes
them, keyed by variable path; expert stacks [E, ...] are sliced to this rank's experts), then

  * `Trainer.compute_gradients` on its block of batch 0: the reduced gradients the optimiser
    would receive, written to `P-<remat>.rank<R>.grads.npz`;
  * K steps of `Trainer.train_step` with plain SGD (no momentum, no clipping, no weight decay)
    on batches 0..K-1, then the weights, written to `P-<remat>.rank<R>.weights.npz`;
  * `P-<remat>.rank<R>.json`: rank, size, expert_index, data_index, e, this rank's target
    tokens;
for each recomputation option of --remat, each from the same initial weights.

The launching test puts the checkout on PYTHONPATH (`tests/jobs.py`), so this script imports
the checkout's `m6t_tf`.
"""

import json
import os

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output prefix.")
flags.DEFINE_string("data", None, "TFRecord file of the global batches.")
flags.DEFINE_string("init", None, "Initial weights (.npz); a single process writes it if absent.")
flags.DEFINE_integer("global_batch", 4, "Examples per global batch.")
flags.DEFINE_integer("steps", 3, "SGD steps.")
flags.DEFINE_float("learning_rate", 0.5, "SGD learning rate.")
flags.DEFINE_multi_string("gin_file", [], "Gin files.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings.")
flags.DEFINE_string("remat", "none", "Trainer recomputation options (train.remat), "
                    "comma-separated: each is computed from the same initial weights.")


def main(argv):
  del argv
  import numpy as np
  import keras
  import tensorflow as tf
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  from m6t_tf.run import configurables
  from m6t_tf.run import trainer as trainer_lib
  from m6t_tf.data import pipeline
  from m6t_tf.parallel import context as context_lib

  configurables.parse(FLAGS.gin_file, FLAGS.gin_bindings, ["."])
  ctx = configurables.make_context_configured()
  if FLAGS.global_batch % ctx.size:
    raise ValueError(f"--global_batch={FLAGS.global_batch} does not split over {ctx.size} ranks")
  rows = FLAGS.global_batch // ctx.size
  max_len = configurables.query("train.max_len")
  ds = pipeline.make_dataset(FLAGS.data, batch_size=FLAGS.global_batch, max_len=max_len,
                             training=False, repeat=False, image_mode="pixels")
  batches = [{k: v[ctx.rank * rows:(ctx.rank + 1) * rows] for k, v in b.items()}
             for b in ds.take(FLAGS.steps)]
  if len(batches) != FLAGS.steps:
    raise ValueError(f"{FLAGS.data} holds fewer than {FLAGS.steps} batches of "
                     f"{FLAGS.global_batch}")

  group = ctx.expert_group_size
  e = None
  # One model per recomputation option, each from the same initial weights: one launch of the
  # mesh checks them all.
  for remat in FLAGS.remat.split(","):
    keras.utils.set_random_seed(0)
    network = configurables.network_fn()(name="m6")
    model = trainer_lib.build_model(batch=batches[0], network=network)
    variables = [v for v in model.variables if not context_lib.is_rng_state(v)]
    if not os.path.exists(FLAGS.init):
      if ctx.size != 1:
        raise ValueError(f"--init={FLAGS.init} is missing: one process writes it first")
      np.savez(FLAGS.init, **{v.path: v.numpy() for v in variables})
    init = np.load(FLAGS.init)
    for v in variables:
      value = init[v.path]
      if context_lib.is_expert_variable(v):
        e = value.shape[0] // group
        value = value[ctx.expert_index * e:(ctx.expert_index + 1) * e]
      v.assign(value)

    trainer = trainer_lib.Trainer(model, keras.optimizers.SGD(FLAGS.learning_rate), ctx=ctx,
                               clip_norm=0.0, remat=remat)
    compute = tf.function(tf.autograph.experimental.do_not_convert(trainer.compute_gradients))
    grads, metrics = compute(batches[0])
    out = f"{FLAGS.out}-{remat}.rank{ctx.rank}"
    np.savez(f"{out}.grads.npz",
             **{v.path: g.numpy() for v, g in zip(trainer.variables, grads) if g is not None})
    result = {"rank": ctx.rank, "size": ctx.size, "expert_index": ctx.expert_index,
              "data_index": ctx.data_index, "experts_per_rank": e,
              "num_tokens": float(metrics["num_tokens"]), "loss": float(metrics["loss"]),
              "finite": bool(metrics["finite"]),
              "no_gradient": [v.path for v, g in zip(trainer.variables, grads) if g is None]}
    for batch in batches:
      trainer.train_step(batch)
    np.savez(f"{out}.weights.npz", **{v.path: v.numpy() for v in trainer.variables})
    with open(f"{out}.json", "w") as f:
      json.dump(result, f)
  ctx.barrier()
  if not isinstance(ctx, context_lib.LocalContext):
    ctx.shutdown()


if __name__ == "__main__":
  app.run(main)
