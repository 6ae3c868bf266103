"""One rank of tests/test_parallel_fp16_gradients.py: FP16 gradient reduction on crafted values.

  horovodrun -np 2 -H localhost:2 --gloo python tests/distributed/fp16_reduce_worker.py --out=P

Mesh (data=2, expert=1), so that dense gradients (over all ranks) and expert gradients (over
the replica group) both travel. Each rank makes gradients whose magnitudes span 1e-9 … 1e2
(log-uniform, the same sign on every rank so that nothing cancels, rank r's value (1 + r/10)
times the base value) and writes `P.rank<R>.npz` with:

  inputs_<kind>      this rank's unscaled float32 gradient (kind: dense, expert)
  float32_<kind>     the float32 reduction (`gradient_compression="none"`)
  fp16_<kind>        the trainer's FP16 reduction of the gradients scaled by LOSS_SCALE
  unscaled_<kind>    the FP16 reduction of unscaled gradients (cast after unscaling)
  overflow_local_finite  per kind, whether this rank's reduction is finite with a loss scale
                     that overflows float16 (the trainer's finite check follows from it)
  scale              LOSS_SCALE
  trainer_*, step_*  a `Trainer` over a Dense layer with FP16 communication: whether its loss
                     scale is on, and an overflowing then a finite `apply_gradients` (finite
                     flag, loss scale after, weights), `skipped`

The launching test puts the checkout on PYTHONPATH (`tests/jobs.py`), so this script imports
the checkout's `m6t_tf`.
"""


from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output prefix.")
flags.DEFINE_integer("size", 4096, "Elements per gradient.")

#: 2^8: the largest power of two that keeps a sum of two scaled 1.1e2 values below 65504.
LOSS_SCALE = 256.0


def main(argv):
  del argv
  import numpy as np
  import tensorflow as tf
  from m6t_tf.parallel import horovod as horovod_lib
  from m6t_tf.parallel.mesh import Mesh

  ctx = horovod_lib.init_horovod(Mesh(data=2, expert=1))
  dense = tf.Variable(tf.zeros([FLAGS.size]), name="dense")
  expert = tf.Variable(tf.zeros([FLAGS.size]), name="expert")
  ctx.is_expert = lambda v: v is expert
  variables = [dense, expert]
  rng = np.random.default_rng(1234)  # the same base values on every rank
  base = [np.sign(rng.standard_normal(FLAGS.size)) * 10.0 ** rng.uniform(-9, 2, FLAGS.size)
          for _ in variables]
  grads = [tf.constant((b * (1.0 + ctx.rank / 10.0)).astype(np.float32)) for b in base]
  out = {f"inputs_{k}": g.numpy() for k, g in zip(("dense", "expert"), grads)}

  def reduce(compression, values, loss_scale):
    ctx.gradient_compression = compression
    return ctx.reduce_gradients(values, variables, loss_scale=loss_scale)

  scale = tf.constant(LOSS_SCALE)
  for name, reduced in (
      ("float32", reduce("none", grads, None)),
      ("fp16", reduce("fp16", [g * scale for g in grads], scale)),
      ("unscaled", [g for g, _ in ctx.allreduce_gradients(zip(grads, variables), ctx.is_expert,
                                                          compression="fp16")])):
    for kind, g in zip(("dense", "expert"), reduced):
      out[f"{name}_{kind}"] = g.numpy()
  # A scale that lifts 1e2 far above 65504: the reduction overflows, and every rank must see
  # the same non-finite flag (the trainer skips the step everywhere).
  big = tf.constant(2.0 ** 15)
  reduced = reduce("fp16", [g * big for g in grads], big)
  out["overflow_local_finite"] = np.array([bool(tf.reduce_all(tf.math.is_finite(g)))
                                          for g in reduced])
  out["scale"] = np.array(LOSS_SCALE)

  # The trainer's side: FP16 communication turns the dynamic loss scale on (float32 compute
  # here), and an overflowed reduction skips the step on every rank and halves the scale.
  import keras
  from m6t_tf.run import trainer as trainer_lib
  from m6t_tf.parallel import context as context_lib
  layer = keras.layers.Dense(FLAGS.size // 8, name="probe")
  layer.build((None, 8))
  ctx.gradient_compression = "fp16"
  trainer = trainer_lib.Trainer(layer, keras.optimizers.SGD(1.0), ctx=ctx)
  ctx.broadcast_state(trainer.variables)
  out["trainer_scale_enabled"] = np.array(trainer.loss_scale.enabled)
  out["trainer_skips_nonfinite"] = np.array(trainer.skip_nonfinite)
  start = [v.numpy() for v in trainer.variables]
  small = [tf.constant(np.reshape(b[:v.shape.num_elements()], v.shape).astype(np.float32) *
                       (1.0 + ctx.rank / 10.0)) for b, v in zip(base, trainer.variables)]
  for name, scale in (("overflow", 2.0 ** 15), ("finite", LOSS_SCALE)):
    trainer.loss_scale.scale.assign(scale)
    s = trainer.loss_scale.scale
    reduced = ctx.reduce_gradients([g * s for g in small], trainer.variables, loss_scale=s)
    norm = context_lib.global_norm(reduced, trainer.variables, ctx)
    finite = ctx.all_finite(tf.math.is_finite(norm))
    trainer.apply_gradients(reduced, {"grad_norm": norm, "finite": finite})
    out[f"step_{name}_finite"] = np.array(bool(finite))
    out[f"step_{name}_scale_after"] = np.array(float(trainer.loss_scale.scale.numpy()))
    out[f"step_{name}_weights"] = np.concatenate([v.numpy().ravel() for v in trainer.variables])
  out["step_start_weights"] = np.concatenate([w.ravel() for w in start])
  out["skipped"] = np.array(int(trainer.loss_scale.skipped.numpy()))
  np.savez(f"{FLAGS.out}.rank{ctx.rank}.npz", **out)
  ctx.shutdown()


if __name__ == "__main__":
  app.run(main)
