"""Optimisers and learning-rate schedules of the M6-T configs.

* AdamW (base/10B/100B: lr 8e-5; the second paper: β = (0.9, 0.95), ε = 1e-5, decay 0.1) is
  Keras' own `keras.optimizers.AdamW`.
* `Adafactor` is the variant the 1T model was trained with (lr 5e-3 after warmup). It builds on
  Keras' `keras.optimizers.Adafactor` (same slot layout and factoring of the last two axes, so an
  `[e, M, I]` expert weight keeps row statistics `[e, M]` and column statistics `[e, I]`), and
  differs from it in four ways, each chosen to match the paper's explicit schedule and memory:
    1. the learning rate is the schedule's value, used as is — Keras multiplies it by
       max(ε₂, RMS(parameter)) ("relative step") and caps it at 1/√t;
    2. no first moment (β₁ = 0), as in the original Adafactor, which is what saves memory at 1T;
    3. update clipping by RMS (d = 1.0) is applied to the *unscaled* update, per matrix (each
       expert of an `[e, M, I]` stack on its own, so that an expert's update does not depend on
       which experts share its worker), then the optional decoupled weight decay;
    4. a factored weight keeps only its row and column statistics — Keras also allocates a full
       `v` of the weight's size for every factored weight, which costs as much memory as Adam's
       second moment and defeats the point of factoring at 1T.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from m6t_tf.parallel import communicator as comm_lib

OPTIMIZERS = ("adamw", "adafactor")
DECAYS = ("constant", "linear", "cosine")


@keras.saving.register_keras_serializable(package="m6t_tf")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup from 0 to `peak` over `warmup_steps`, then constant, linear or cosine decay
  to `final_fraction · peak` at `total_steps` (the second paper: cosine to 10% after 2000)."""

  def __init__(self, peak: float, warmup_steps: int, *, decay: str = "constant",
               total_steps: int = 0, final_fraction: float = 0.0):
    if decay not in DECAYS:
      raise ValueError(f"lr decay={decay!r}; allowed: {DECAYS}")
    if peak <= 0:
      raise ValueError(f"learning_rate={peak} must be > 0")
    if warmup_steps < 0:
      raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    if decay != "constant" and total_steps <= warmup_steps:
      raise ValueError(f"decay={decay!r} needs total_steps ({total_steps}) > warmup_steps "
                       f"({warmup_steps})")
    if not 0.0 <= final_fraction <= 1.0:
      raise ValueError(f"final_fraction={final_fraction} must be in [0, 1]")
    self.peak, self.warmup_steps, self.decay = peak, warmup_steps, decay
    self.total_steps, self.final_fraction = total_steps, final_fraction

  def __call__(self, step):
    # `step` counts applied updates; the first update uses step 1 of the warmup.
    step = tf.cast(step, tf.float32) + 1.0
    warm = float(max(self.warmup_steps, 1))
    warmup = self.peak * tf.minimum(step / warm, 1.0)
    if self.decay == "constant":
      return warmup
    span = float(self.total_steps - self.warmup_steps)
    progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
    if self.decay == "linear":
      shape = 1.0 - progress
    else:
      shape = 0.5 * (1.0 + tf.cos(math.pi * progress))
    decayed = self.peak * (self.final_fraction + (1.0 - self.final_fraction) * shape)
    return tf.where(step <= self.warmup_steps, warmup, decayed)

  def get_config(self):
    return dict(peak=self.peak, warmup_steps=self.warmup_steps, decay=self.decay,
                total_steps=self.total_steps, final_fraction=self.final_fraction)


@keras.saving.register_keras_serializable(package="m6t_tf")
class Adafactor(keras.optimizers.Adafactor):
  """Adafactor with an explicit learning rate, no first moment and RMS update clipping.

  Args:
    learning_rate: float or schedule, used as given (see module docstring).
    beta_2_decay: the second-moment decay is 1 − t^beta_2_decay (−0.8, as in Adafactor).
    epsilon_1: added to g² (1e-30).
    clip_threshold: d of the RMS update clipping (1.0).
    weight_decay: decoupled weight decay (0 in the 1T config).
    relative_step: must be False (the learning rate is used as given); accepted because
      Keras' `get_config` records it, so that `from_config(get_config())` rebuilds the optimizer.
  """

  def __init__(self, learning_rate=5e-3, *, beta_2_decay: float = -0.8,
               epsilon_1: float = 1e-30, clip_threshold: float = 1.0, weight_decay=None,
               relative_step: bool = False, name: str = "adafactor", **kwargs):
    if relative_step:
      raise ValueError("relative_step=True: this Adafactor uses the learning rate (schedule) as "
                       "given; use keras.optimizers.Adafactor for Keras' relative step")
    super().__init__(learning_rate=learning_rate, beta_2_decay=beta_2_decay, epsilon_1=epsilon_1,
                     clip_threshold=clip_threshold, relative_step=False, weight_decay=weight_decay,
                     name=name, **kwargs)

  def build(self, var_list):
    if self.built:
      return
    keras.optimizers.Optimizer.build(self, var_list)
    self._r, self._c, self._v = [], [], []
    for var in var_list:
      if len(var.shape) >= 2:
        self._r.append(self.add_variable(shape=var.shape[:-1], dtype=var.dtype,
                                         name=var.path.replace("/", "_") + "_row"))
        self._c.append(self.add_variable(shape=var.shape[:-2] + (var.shape[-1],),
                                         dtype=var.dtype, name=var.path.replace("/", "_") + "_col"))
        # Row [e, M] and column [e, I] statistics of an expert weight [e, M, I] hold this
        # worker's experts too (`add_variable_from_reference` marks the full velocity itself).
        if comm_lib.is_expert_sharded(var):
          comm_lib.mark_expert_sharded(self._r[-1])
          comm_lib.mark_expert_sharded(self._c[-1])
        self._v.append(None)
      else:
        self._r.append(None)
        self._c.append(None)
        self._v.append(self.add_variable_from_reference(reference_variable=var, name="velocity"))

  def update_step(self, gradient, variable, learning_rate):
    lr = tf.cast(learning_rate, variable.dtype)
    g = tf.cast(gradient, variable.dtype)
    t = tf.cast(self.iterations + 1, variable.dtype)
    beta_2_t = 1.0 - tf.pow(t, self.beta_2_decay)
    index = self._get_variable_index(variable)
    r, c, v = self._r[index], self._c[index], self._v[index]
    g2 = tf.square(g) + self.epsilon_1
    if len(variable.shape) >= 2:
      # Factored second moment over the last two axes: rows [..., M], columns [..., I].
      r.assign(beta_2_t * r + (1.0 - beta_2_t) * tf.reduce_mean(g2, axis=-1))
      c.assign(beta_2_t * c + (1.0 - beta_2_t) * tf.reduce_mean(g2, axis=-2))
      row_mean = tf.reduce_mean(r, axis=-1, keepdims=True)
      v_hat = (r / row_mean)[..., :, None] * c[..., None, :]
    else:
      v.assign(beta_2_t * v + (1.0 - beta_2_t) * g2)
      v_hat = v
    u = g * tf.math.rsqrt(v_hat)
    # RMS per matrix: over the whole tensor, a worker's e experts would clip each other, and
    # the update would change with the number of workers.
    axes = [-2, -1] if len(variable.shape) >= 2 else None
    rms = tf.sqrt(tf.reduce_mean(tf.square(u), axis=axes, keepdims=True))
    u = u / tf.maximum(1.0, rms / self.clip_threshold)
    variable.assign_sub(lr * u)


def make_optimizer(name: str, schedule, *, weight_decay: float = 0.01, beta_1: float = 0.9,
                   beta_2: float = 0.999, epsilon: float = 1e-6,
                   exclude_from_weight_decay=("bias", "gamma", "beta", "scale", "embeddings")):
  """The optimiser of a config. Loss scaling for mixed_float16 is the trainer's (`LossScale`):
  it must unscale before the cross-worker reduction and the global-norm clipping.

  Weight decay skips biases, norm scales and embeddings (BERT/AdamW practice).
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer={name!r}; allowed: {OPTIMIZERS}")
  if name == "adamw":
    opt = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay,
                                 beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, name="adamw")
  else:
    opt = Adafactor(learning_rate=schedule, weight_decay=weight_decay or None)
  if weight_decay:
    opt.exclude_from_weight_decay(var_names=list(exclude_from_weight_decay))
  return opt
