"""Adafactor (the 1T optimiser) against the NumPy reference of Shazeer & Stern (2018).

The reference (`numpy_reference.Adafactor`) is written from the paper's Algorithms 4 and 5 with
row/column *sums*, float64 and explicit loops over the matrices of a stacked weight; the
TensorFlow code uses means and batched ops. Gradients vary by row, column and step (so factoring
changes the update, β̂₂ₜ matters, and update clipping switches on and off) and are fed for six
steps to weights of every kind the model has: expert stacks [e, M, I], dense kernels [M, N],
small matrices, biases and norm scales [N], and a one-element weight.
"""

import os

import gin
import keras
import numpy as np
import tensorflow as tf

from m6t_tf.run import configurables
from m6t_tf import optimizers
from tests import numpy_reference as ref
from tests.support import REPO


SHAPES = {
    "experts_wi": (2, 5, 7),    # [e, M, I]: factored over (M, I), one matrix per expert
    "experts_wo": (3, 7, 5),
    "kernel": (5, 7),           # [M, N]
    "small": (2, 3),            # small matrices are factored too (no size threshold)
    "row": (1, 6),
    "bias": (7,),               # vectors: full second moment
    "scale": (5,),
    "one": (1,),
}
STEPS = 6


def _gradients(seed=0):
  """[STEPS] lists of float32 gradients whose size differs by row, column and step."""
  rng = np.random.default_rng(seed)
  # Step 4 is 30× larger than its predecessors, so the second moment lags it and the update
  # is clipped; steps 5 and 6 are 10× smaller again.
  step_scale = [1.0, 0.5, 2.0, 30.0, 0.1, 0.2]
  out = []
  for t in range(STEPS):
    grads = {}
    for name, shape in SHAPES.items():
      g = rng.normal(size=shape)
      if len(shape) >= 2:
        g = g * np.exp(rng.normal(size=shape[:-1]))[..., None]            # row scales
        g = g * np.exp(rng.normal(size=shape[:-2] + shape[-1:]))[..., None, :]  # column scales
      grads[name] = (g * step_scale[t]).astype(np.float32)
    out.append(grads)
  return out


def _run_tf(opt, initial, grads_per_step, *, reset=False):
  """Applies the gradients with `opt`; returns the weights after every step (float64).

  With `reset`, the weights are set back to `initial` before every step (the optimiser's
  state carries on), so each step's result is that step's update alone.
  """
  variables = {n: keras.Variable(initial[n], name=n) for n in SHAPES}
  history = []
  for grads in grads_per_step:
    if reset:
      for n in SHAPES:
        variables[n].assign(initial[n])
    opt.apply([tf.constant(grads[n]) for n in SHAPES], [variables[n] for n in SHAPES])
    history.append({n: np.asarray(variables[n].numpy(), np.float64) for n in SHAPES})
  return history


def _run_reference(initial, grads_per_step, lrs, *, reset=False, **kwargs):
  states = {n: ref.Adafactor(shape, **kwargs) for n, shape in SHAPES.items()}
  x = {n: np.asarray(initial[n], np.float64) for n in SHAPES}
  history = []
  for grads, lr in zip(grads_per_step, lrs):
    if reset:
      x = {n: np.asarray(initial[n], np.float64) for n in SHAPES}
    x = {n: states[n].step(x[n], grads[n], lr) for n in SHAPES}
    history.append(x)
  return history, states


class AdafactorTest(tf.test.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def _one_t_optimizer(self):
    """The optimiser `train()` builds from gin/1T.gin (the 1T settings, read from the file)."""
    gin.clear_config()
    configurables.parse([os.path.join(REPO, "gin", "1T.gin")], [], [REPO])
    q = configurables.query
    settings = {k: q(f"train.{k}") for k in ("optimizer", "learning_rate", "warmup_steps",
                                              "lr_decay", "weight_decay")}
    # arXiv 2105.15082 Table 5: Adafactor at 5e-3 after 500 warmup steps, no weight decay.
    self.assertEqual(settings, dict(optimizer="adafactor", learning_rate=5e-3, warmup_steps=500,
                                    lr_decay="constant", weight_decay=0.0))
    schedule = optimizers.WarmupSchedule(settings["learning_rate"], settings["warmup_steps"],
                                         decay=settings["lr_decay"])
    opt = optimizers.make_optimizer("adafactor", schedule, weight_decay=settings["weight_decay"])
    self.assertIsInstance(opt, optimizers.Adafactor)
    return opt

  def test_one_t_settings_match_reference_over_six_steps(self):
    opt = self._one_t_optimizer()
    grads = _gradients()
    # The weights are set to zero before every step, so that each step's weight is that step's
    # update alone, −lr·Û, held to full float32 precision (summed over steps, the updates cancel
    # in places and float32 keeps fewer digits of the sum). The second-moment state runs on
    # over the six steps; an update that depended on the weight (Keras' relative step) would
    # show as a factor max(ε₂, 0) = 1e-3.
    initial = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    lrs = [5e-3 * min(t / 500, 1.0) for t in range(1, STEPS + 1)]    # linear warmup
    got = _run_tf(opt, initial, grads, reset=True)
    want, states = _run_reference(initial, grads, lrs, reset=True)
    # The test has to exercise clipping: step 4 clips every weight, step 1 none of the matrices.
    self.assertTrue(all(s.clipped[3] for s in states.values()))
    self.assertFalse(any(states[n].clipped[4] for n in SHAPES))
    for t in range(STEPS):
      for n in SHAPES:
        self.assertAllClose(got[t][n], want[t][n], rtol=1e-6, atol=0,
                            msg=f"weight {n} {SHAPES[n]} after step {t + 1}")

  def test_weight_decay_and_nonzero_weights_match_reference(self):
    opt = optimizers.make_optimizer("adafactor", 1e-2, weight_decay=0.1,
                                    exclude_from_weight_decay=())
    grads = _gradients(seed=1)
    rng = np.random.default_rng(2)
    initial = {n: (0.05 * rng.normal(size=s)).astype(np.float32) for n, s in SHAPES.items()}
    got = _run_tf(opt, initial, grads)
    want, _ = _run_reference(initial, grads, [1e-2] * STEPS, weight_decay=0.1)
    for t in range(STEPS):
      for n in SHAPES:
        # Relative 1e-6, or a few float32 ulps of the largest weight where the sum of the
        # updates and the start value cancel.
        self.assertAllClose(got[t][n], want[t][n], rtol=1e-6,
                            atol=2e-7 * np.max(np.abs(want[t][n])),
                            msg=f"weight {n} {SHAPES[n]} after step {t + 1}")

  def test_expert_update_does_not_depend_on_the_other_experts_of_its_worker(self):
    # One worker holding 4 experts [4, M, I] must update each expert exactly as two workers
    # holding [2, M, I] each (the 1-worker == D-worker promise, for the optimiser).
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=(4, 5, 3)).astype(np.float32)
    steps = [(rng.normal(size=(4, 5, 3)) * np.array([1.0, 1.0, 50.0, 0.02])[:, None, None])
             .astype(np.float32) for _ in range(3)]
    whole = keras.Variable(w0, name="whole")
    halves = [keras.Variable(w0[:2], name="first"), keras.Variable(w0[2:], name="second")]
    opt_whole = optimizers.Adafactor(1e-2)
    opt_halves = [optimizers.Adafactor(1e-2), optimizers.Adafactor(1e-2)]
    for g in steps:
      opt_whole.apply([tf.constant(g)], [whole])
      opt_halves[0].apply([tf.constant(g[:2])], [halves[0]])
      opt_halves[1].apply([tf.constant(g[2:])], [halves[1]])
    self.assertAllClose(whole.numpy(), np.concatenate([h.numpy() for h in halves]),
                        rtol=1e-6, atol=0)

  def test_factored_weights_keep_only_row_and_column_statistics(self):
    opt = self._one_t_optimizer()
    variables = [keras.Variable(np.zeros(s, np.float32), name=n) for n, s in SHAPES.items()]
    opt.build(variables)
    for var, r, c, v in zip(variables, opt._r, opt._c, opt._v):
      if len(var.shape) >= 2:
        self.assertEqual(tuple(r.shape), tuple(var.shape[:-1]))
        self.assertEqual(tuple(c.shape), tuple(var.shape[:-2]) + (var.shape[-1],))
        self.assertIsNone(v)
      else:
        self.assertEqual(tuple(v.shape), tuple(var.shape))
        self.assertIsNone(r)
        self.assertIsNone(c)


if __name__ == "__main__":
  tf.test.main()
