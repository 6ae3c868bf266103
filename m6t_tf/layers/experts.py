"""Batched expert feed-forward networks: e experts applied to `[..., e, C, M]` buffers.

    h = act(einsum("...eCM,eMI->...eCI", x, wi))       first matmul  (SwiGLU: act(x·wi_0) ⊙ x·wi_1)
    y =     einsum("...eCI,eIM->...eCM", h, wo)        second matmul

At the 1T scale these two matmuls are ~98% of an MoE layer's FLOPs (arXiv 2105.15082 §3.1;
`tools/plan.py` counts them). Experts carry no biases (as in Mesh-TF / Switch), so an expert holds
2·M·I parameters (3·M·I with SwiGLU).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from m6t_tf.layers import dropout as dropout_lib
from m6t_tf.parallel import communicator as comm_lib

ACTIVATIONS = ("relu", "gelu", "swiglu", "linear")


def activation_fn(name: str):
  if name == "relu":
    return tf.nn.relu
  if name == "gelu":
    # BERT / M6 use the tanh approximation of GeLU.
    return lambda x: tf.nn.gelu(x, approximate=True)
  if name == "swiglu":
    return tf.nn.silu
  if name == "linear":
    return tf.identity
  raise ValueError(f"activation={name!r}; allowed: {ACTIVATIONS}")


def expert_matmul(x, w):
  """<[..., e, C, M]> · <[e, M, N]> -> <[..., e, C, N]>, one batched matmul over the e experts.

  `tf.matmul`, not `tf.einsum("...eCM,eMN->...eCN")`: on CPU (oneDNN) einsum's weight gradient
  transposes its operands explicitly and its leading `...` becomes a broadcast batch; the
  matmul's gradient is a matmul with `adjoint_a`. Forward+backward of an expert FFN is ~20%
  faster (tools/bench_moe.py). Leading axes (D) are folded into the token axis, so the batch
  is e alone; for D = 1 the transposes move only a size-1 axis and copy nothing.
  """
  rank = x.shape.rank
  if rank == 3:
    return tf.matmul(x, w)
  e_axis = rank - 3
  perm = [e_axis, *range(e_axis), rank - 2, rank - 1]                  # [e, ..., C, M]
  xt = tf.transpose(x, perm)
  lead = tf.shape(xt)[:-1]
  y = tf.matmul(tf.reshape(xt, [w.shape[0], -1, w.shape[1]]), w)        # [e, ...·C, N]
  y = tf.reshape(y, tf.concat([lead, [w.shape[2]]], axis=0))           # [e, ..., C, N]
  return tf.transpose(y, [*range(1, e_axis + 1), 0, rank - 2, rank - 1])


def grouped_apply(x, group_sizes, num_experts: int, expert_fn, output_size: int, training):
  """Runs `expert_fn(j, rows_j, training)` on each expert's row range of <float>[R, M].

  Dropless MoE computes on the real rows only: R = Σ group_sizes varies per step, so each
  expert runs a plain matmul on its dynamic slice (`tf.split` with run-time sizes; its
  gradient is a concat). A trailing (e+1)-th group gets zeros.

  Returns:
    <float>[R, output_size], rows in the input's order.
  """
  num_groups = group_sizes.shape[0]
  if num_groups not in (num_experts, num_experts + 1):
    raise ValueError(f"group_sizes has {num_groups} groups; expected e={num_experts} or e+1")
  parts = tf.split(x, group_sizes, num=num_groups, axis=0)
  outs = [expert_fn(j, parts[j], training) for j in range(num_experts)]
  if num_groups > num_experts:
    outs.append(tf.zeros([tf.shape(parts[-1])[0], output_size], x.dtype))
  return tf.concat(outs, axis=0)


@keras.saving.register_keras_serializable(package="m6t_tf")
class Experts(keras.layers.Layer):
  """e expert FFNs with stacked weights `[e, M, I]` and `[e, I, M]`.

  Args:
    num_local_experts: e, experts held by this worker.
    hidden_size: M.
    intermediate_size: I.
    activation: "relu" | "gelu" | "swiglu" (gated: two `[e, M, I]` input matrices).
    init_std: std of the truncated-normal initialiser (0.02; 0.002 for the 1T model).
    dropout_rate: dropout on the intermediate activations (0.1 in M6).
  """

  def __init__(self, num_local_experts: int, hidden_size: int, intermediate_size: int, *,
               activation: str = "gelu", init_std: float = 0.02, dropout_rate: float = 0.0,
               **kwargs):
    super().__init__(**kwargs)
    if num_local_experts < 1:
      raise ValueError(f"num_local_experts={num_local_experts} must be >= 1")
    activation_fn(activation)  # validates the name
    self.num_local_experts = num_local_experts
    self.hidden_size = hidden_size
    self.intermediate_size = intermediate_size
    self.activation = activation
    self.init_std = init_std
    self.dropout_rate = dropout_rate
    # Same dtype policy as this layer: a Dropout on the global policy would cast the float16
    # activations of a per-layer "mixed_float16" expert back to float32.
    self._dropout = dropout_lib.Dropout(dropout_rate, dtype=self.dtype_policy)

  def build(self, input_shape=None):
    e, m, i = self.num_local_experts, self.hidden_size, self.intermediate_size
    init = keras.initializers.TruncatedNormal(stddev=self.init_std)
    self.wi = self.add_weight(name="wi", shape=(e, m, i), initializer=init)
    if self.activation == "swiglu":
      self.wi_gate = self.add_weight(name="wi_gate", shape=(e, m, i), initializer=init)
    self.wo = self.add_weight(name="wo", shape=(e, i, m), initializer=init)
    # Each worker holds its own e experts: `m6t_tf.parallel` and checkpoints read the mark.
    for v in (self.wi, self.wo) + ((self.wi_gate,) if self.activation == "swiglu" else ()):
      comm_lib.mark_expert_sharded(v)
    self.built = True

  def call(self, x, training=None, group_sizes=None):
    """<float>[..., e, C, M] -> <float>[..., e, C, M]; with `group_sizes`, grouped rows.

    Args:
      x: the e experts' slot buffers, or (with `group_sizes`) <float>[R, M] rows grouped by
        expert: the first group_sizes[0] rows for expert 0, and so on (dropless MoE).
      training: dropout on.
      group_sizes: optional <int32>[e] or [e + 1]: rows per expert; an (e+1)-th group is rows
        no expert computes (they get zeros).
    """
    if group_sizes is not None:
      # The [e, ...] weights are split once per call: slicing w[j] per expert would give each
      # slice a dense full-size gradient, summed by an AddN (most of dropless' extra time in
      # tools/bench_moe.py --suite=dropless --profile); unstack's gradient is one stack.
      names = ("wi", "wi_gate", "wo") if self.activation == "swiglu" else ("wi", "wo")
      per_expert = {n: tf.unstack(tf.cast(getattr(self, n), x.dtype)) for n in names}
      return grouped_apply(
          x, group_sizes, self.num_local_experts,
          lambda j, rows, training: self._expert_rows(
              rows, {n: w[j] for n, w in per_expert.items()}, training),
          self.hidden_size, training)
    act = activation_fn(self.activation)
    h = expert_matmul(x, self.wi)                                        # [..., e, C, I]
    if self.activation == "swiglu":
      h = act(expert_matmul(x, self.wi_gate)) * h
    else:
      h = act(h)
    h = self._dropout(h, training=training)
    return expert_matmul(h, self.wo)                                     # [..., e, C, M]

  def _expert_rows(self, x, w: dict, training):
    """One expert on its rows <float>[R_j, M] -> [R_j, M]; `w`: its "wi", "wo" ("wi_gate")."""
    act = activation_fn(self.activation)
    h = tf.matmul(x, w["wi"])                                            # [R_j, I]
    h = act(tf.matmul(x, w["wi_gate"])) * h if self.activation == "swiglu" else act(h)
    h = self._dropout(h, training=training)
    return tf.matmul(h, w["wo"])                                         # [R_j, M]

  def get_config(self):
    config = super().get_config()
    config.update(num_local_experts=self.num_local_experts, hidden_size=self.hidden_size,
                  intermediate_size=self.intermediate_size, activation=self.activation,
                  init_std=self.init_std, dropout_rate=self.dropout_rate)
    return config


@keras.saving.register_keras_serializable(package="m6t_tf")
class LinearExperts(keras.layers.Layer):
  """e one-matrix experts without non-linearity, `[e, M, N]` (MoE attention, paper §3.4)."""

  def __init__(self, num_local_experts: int, input_size: int, output_size: int, *,
               init_std: float = 0.02, **kwargs):
    super().__init__(**kwargs)
    self.num_local_experts = num_local_experts
    self.input_size = input_size
    self.output_size = output_size
    self.init_std = init_std

  def build(self, input_shape=None):
    self.kernel = self.add_weight(
        name="kernel", shape=(self.num_local_experts, self.input_size, self.output_size),
        initializer=keras.initializers.TruncatedNormal(stddev=self.init_std))
    comm_lib.mark_expert_sharded(self.kernel)   # this worker's e experts (see `Experts.build`)
    self.built = True

  def call(self, x, training=None, group_sizes=None):
    """<float>[..., e, C, M] -> <float>[..., e, C, N]; rows grouped by expert with
    `group_sizes` (see `Experts.call`)."""
    if group_sizes is not None:
      kernels = tf.unstack(tf.cast(self.kernel, x.dtype))   # once per call (see Experts.call)
      return grouped_apply(x, group_sizes, self.num_local_experts,
                           lambda j, rows, training: tf.matmul(rows, kernels[j]),
                           self.output_size, training)
    return expert_matmul(x, self.kernel)

  def get_config(self):
    config = super().get_config()
    config.update(num_local_experts=self.num_local_experts, input_size=self.input_size,
                  output_size=self.output_size, init_std=self.init_std)
    return config
