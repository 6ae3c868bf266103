"""The M6-T Mixture-of-Experts layer with the Whale data flow (SPEC §1, paper appendix A.3).

Dimension cheat sheet (letters of SPEC.md, used in every einsum and `# [..]` comment below):

    D  workers in the expert-parallel group      e  experts per worker, E = e·D
    E  experts in total                          C  capacity per expert (token slots)
    M  model size                                I  expert intermediate size (N: linear experts)
    T  tokens on this worker (B·L)               K  choices per token (k, or Z prototypes)

Data flow of one forward pass:

    x [T, M] → router logits [T, E] (float32) → routing → dispatch         [E, C, M]
             → reshape [D, e, C, M] → all-to-all → experts → all-to-all back [D, e, C, M]
             → reshape [E, C, M] → combine                                  [T, M]

Parameters of one layer: router M·E, experts E·2·M·I (E·3·M·I with SwiGLU); each worker holds
the router and its e = E/D experts. For the 1T config: 24 layers × 960 experts × 2 × 1024 × 21248
= 1,002,606,428,160 expert parameters.

Two dispatch implementations compute the same function:
  * "einsum": the GShard reference, one-hot `TEC,TM->ECM` and `TEC,ECM->TM`, cost O(T·E·C·M);
  * "index": gather the token rows into their slots and gather them back, cost O(K·T·M + E·C·M).

Token counts known only at run time (a Keras model with `keras.Input((L, M))`, whose batch size
is unknown when traced; `tf.function` with an unknown length): C is then computed by the same
formula as an <int32>[] tensor (`routing.capacity_tensor`, equal to the static value for every
T), and with `num_groups` the tokens are padded to O equal groups with masked positions. With
a static T that O divides, nothing of this runs: a traced call is the same graph as before.
Under expert parallelism (D > 1) a run-time C, and an eager call's, is the maximum over the
expert group, as the all-to-all exchanges equal [D, e, C, M] buffers (`MoE._agreed_capacity`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Optional

import keras
import tensorflow as tf

from m6t_tf.layers import dropout as dropout_lib
from m6t_tf.layers import experts as experts_lib
from m6t_tf.layers import routing as routing_lib
from m6t_tf.parallel import communicator as comm_lib

ROUTINGS = ("top_k", "prototype")
#: "k" and "1" route under a capacity C (`routing.capacity`); "dropless" drops nothing.
CAPACITY_MODES = routing_lib.CAPACITY_MODES + ("dropless",)
DISPATCHES = ("einsum", "index")
EXPERT_TYPES = ("ffn", "linear")
#: Names of the routing statistics every MoE layer exposes after each call (`MoE.stats`).
STAT_NAMES = ("tokens_per_expert", "load_cv", "dropped_fraction", "aux_loss", "z_loss")
# Folded into the call's seed for the second-expert draws, so that other random uses of the same
# per-step, per-layer seed (e.g. dropout) draw different numbers.
_SECOND_EXPERT_SEED_SALT = 0x5EC0


_LOSS_SINK = threading.local()


@contextlib.contextmanager
def collect_losses():
  """Within, MoE layers append their auxiliary and z-losses to the yielded list instead of
  `add_loss`: a recomputed function (`keras.remat`) must return its losses as outputs, or their
  gradient would not reach the router (its forward runs without recording)."""
  previous = getattr(_LOSS_SINK, "losses", None)
  _LOSS_SINK.losses = []
  try:
    yield _LOSS_SINK.losses
  finally:
    _LOSS_SINK.losses = previous


def dispatch_einsum(x, routing: routing_lib.Routing):
  """<T, M> -> <E, C, M> with the one-hot dispatch mask (reference)."""
  return tf.einsum("TEC,TM->ECM", tf.cast(routing.dispatch_mask, x.dtype), x)


def combine_einsum(y, routing: routing_lib.Routing):
  """<E, C, M> -> <T, M>: Σ over (e, c) of combine_weights · y."""
  return tf.einsum("TEC,ECM->TM", tf.cast(routing.combine_weights, y.dtype), y)


def _flat_slots(routing: routing_lib.Routing, num_experts: int):
  """<int32>[K, T] row of each choice in the flattened [E·C] buffer; E·C for dropped choices."""
  c = routing.capacity
  return tf.where(routing.kept, routing.expert_index * c + routing.slot, num_experts * c)


def _num_tokens(routing: routing_lib.Routing):
  """T of a routing: an int, or an <int32>[] tensor when known only at run time."""
  t = routing.expert_index.shape[1]
  return t if t is not None else tf.shape(routing.expert_index)[1]


def _index_maps(routing: routing_lib.Routing, num_experts: int):
  """The maps between choices and slots that both index passes gather with.

  Returns:
    rows: <int32>[K, T] flat slot (e·C + c) of each choice; E·C, a zero row, if dropped.
    slot_choice: <int32>[E·C] flat choice (k·T + t) filling each slot; K·T for padding slots.
    slot_token: <int32>[E·C] token t filling each slot; T, a zero row, for padding slots.
  """
  k, t = routing.expert_index.shape[0], _num_tokens(routing)
  rows = _flat_slots(routing, num_experts)                                 # [K, T]
  # Kept slots are unique, so the update has no collisions except on the extra dump row E·C
  # that collects dropped choices (sliced off).
  slot_choice = tf.tensor_scatter_nd_update(
      tf.fill([num_experts * routing.capacity + 1], k * t), tf.reshape(rows, [-1, 1]),
      tf.range(k * t, dtype=tf.int32))[:-1]                               # [E·C]
  slot_token = tf.where(slot_choice < k * t, slot_choice % t, t)          # [E·C]
  return rows, slot_choice, slot_token


def _pad_row(x):
  """<[R, ...]> -> <[R+1, ...]>: a zero row that out-of-place indices read."""
  return tf.concat([x, tf.zeros_like(x[:1])], axis=0)


def _sum_rows(table, rows):
  """Σ_k table[rows[k]]: <[R, N]>, <int32>[K, T] -> <[T, N]>, with no [K, T, N] pass."""
  return tf.add_n([tf.gather(table, rows[k]) for k in range(rows.shape[0])])


# Both index passes carry their own gradients: each is the other's transpose, so the backward
# pass is again a dense gather. Autodiff of `tf.gather` would instead yield IndexedSlices that TF
# densifies with a single-threaded UnsortedSegmentSum (plus a gather to split them through the
# padding concat) — the largest non-matmul cost of the layer on CPU (docs/bench_moe.md).
def dispatch_index(x, routing: routing_lib.Routing, num_experts: int):
  """<T, M> -> <E, C, M> by gathering each slot's token row (zeros for padding slots)."""
  rows, _, slot_token = _index_maps(routing, num_experts)

  @tf.custom_gradient
  def gather_rows(x):
    def grad(d_out):                                                      # [E·C, M] -> [T, M]
      return _sum_rows(_pad_row(d_out), rows)
    return tf.gather(_pad_row(x), slot_token), grad                      # [E·C, M]

  # M spelled out: with a run-time C, -1 would leave it unknown to the layers after.
  return tf.reshape(gather_rows(x), [num_experts, routing.capacity, x.shape[-1] or -1])


def gate_weighted_sum(y_rows, gate, rows, row_choice, row_token):
  """out[t] = Σ_k gate[k, t] · y_rows[rows[k, t]], with its own gradient.

  Every per-row product runs over the R buffer rows (E·C slots, or a dropless layer's sorted
  rows), not the K·T choices: rows are scaled by their gate first, and the gate's gradient is
  one dot product per row. Autodiff of the gather would give IndexedSlices that TF densifies
  with a single-threaded UnsortedSegmentSum.

  Args:
    y_rows: <float>[R, N] expert outputs.
    gate: <float>[K, T], 0 for dropped choices.
    rows: <int32>[K, T] buffer row of each choice; R (a zero row) for dropped ones.
    row_choice: <int32>[R] flat choice (k·T + t) filling each row; K·T for empty rows.
    row_token: <int32>[R] token t filling each row; T for empty rows.

  Returns:
    <float>[T, N].
  """
  @tf.custom_gradient
  def weighted_sum(y_rows, gate):
    row_gate = tf.gather(_pad_row(tf.reshape(gate, [-1])), row_choice)[:, None]  # [R, 1]
    def grad(d_out):                                                      # [T, N]
      d_row = tf.gather(_pad_row(d_out), row_token)                       # [R, N]; 0 if empty
      row_dot = tf.reduce_sum(y_rows * d_row, axis=-1)                    # [R]
      return d_row * row_gate, tf.gather(_pad_row(row_dot), rows)         # [R, N], [K, T]
    return _sum_rows(_pad_row(y_rows * row_gate), rows), grad            # [T, N]

  return weighted_sum(y_rows, gate)


def combine_index(y, routing: routing_lib.Routing, num_experts: int):
  """<E, C, M> -> <T, M>: Σ over the K choices of gate · y[expert, slot]."""
  rows, slot_choice, slot_token = _index_maps(routing, num_experts)

  y_flat = tf.reshape(y, [num_experts * routing.capacity, y.shape[-1] or -1])  # [E·C, N]
  return gate_weighted_sum(y_flat, tf.cast(routing.gate, y.dtype), rows, slot_choice,
                           slot_token)


@keras.saving.register_keras_serializable(package="m6t_tf")
class MoE(keras.layers.Layer):
  """Sparse Mixture-of-Experts feed-forward layer (M6-T), expert parallel over a communicator.

  Args:
    num_experts: E, experts in total over the expert-parallel group.
    intermediate_size: I (for `expert_type="linear"`, ignored).
    routing: "top_k" (looped argmax over all E) or "prototype" (k groups, top-1 in each).
    k: choices per token; for "prototype" the number of prototypes Z (E must divide by Z).
    capacity_factor: γ at training time (1.25 in M6-T).
    eval_capacity_factor: γ at evaluation (`training=False`); defaults to `capacity_factor`.
    capacity_mode: "k" (Capacity k×), "1" (Capacity 1×, the paper's limited setting) or
      "dropless" (no capacity: every token reaches its k experts, in training and evaluation;
      the experts compute the real rows only, exchanged with variable-size all-to-alls).
    max_tokens_per_expert_factor: dropless only, optional memory guard: an expert takes at
      most ceil(factor · k·T / E) choices of a call and drops the rest (counted in
      `stats["dropped_fraction"]`, and the trainer warns). None = no ceiling.
    capacity_token_fraction: the share of a call's T positions that are real tokens (padding
      is not routed): C is computed from that many tokens, so γ is the effective capacity
      factor over the tokens routed. None or 1.0: every position (the paper's rule). The
      trainer binds it from the data (`REAL_TOKEN_FRACTION`, gin/demo.gin).
    num_groups: O outer-batch groups (the second paper, axlearn's `outer_batch`): the T tokens
      split into O contiguous groups, each routed and capacity-limited on its own (C computed
      from G = ceil(T/O) tokens, `group_size`); one all-to-all carries all groups
      ([D, e, O·C, M]). Any T works: when O does not divide it, the last group is filled up
      with masked positions (never routed, no capacity). 1 = one group.
    normalization: gate normalisation, see `routing.top_k_routing`; "auto" by default.
    dispatch: "index" (fast gather) or "einsum" (GShard reference).
    activation: "relu" | "gelu" | "swiglu" for FFN experts.
    expert_type: "ffn" (two matmuls) or "linear" (one `[e, M, N]` matrix; MoE attention).
    output_size: N for linear experts (defaults to M).
    init_std: truncated-normal std of the experts (0.02; 0.002 at 1T).
    router_init_std: std of the router `[M, E]` (defaults to `init_std`).
    dropout_rate: dropout inside the experts.
    aux_loss_weight: coefficient of the Switch load-balance loss (0 = off).
    z_loss_weight: coefficient of the router z-loss (0 = off).
    min_capacity: lower bound on C.
    second_expert_policy: "all" (every one of the k choices is used) or "random" (GShard: a
      choice after the first is used with probability min(1, k·p_r / Σ p) over the k chosen
      probabilities, 2·g2/(g1+g2) at k = 2; `routing.top_k_routing`). "random" needs
      routing="top_k" and applies at training only: evaluation and decoding use every choice,
      so they stay deterministic (C = T decoding batch invariant). Mesh-TF's default also
      samples at eval; we do not.
    drop_policy: which tokens an overflowing expert keeps: "position" (earlier rounds, then
      earlier tokens) or "probability" (the C with the largest gates, Megatron-Core's "probs").
    communicator: a `Communicator`; defaults to the process default (`LocalCommunicator`).
  """

  def __init__(self, num_experts: int, intermediate_size: int = 0, *, routing: str = "top_k",
               k: int = 1, capacity_factor: float = 1.25,
               eval_capacity_factor: Optional[float] = None, capacity_mode: str = "k",
               normalization: str = "auto", dispatch: str = "index", activation: str = "gelu",
               expert_type: str = "ffn", output_size: Optional[int] = None,
               init_std: float = 0.02, router_init_std: Optional[float] = None,
               dropout_rate: float = 0.0, aux_loss_weight: float = 0.0,
               z_loss_weight: float = 0.0, min_capacity: int = 1,
               second_expert_policy: str = "all", drop_policy: str = "position",
               max_tokens_per_expert_factor: Optional[float] = None, num_groups: int = 1,
               capacity_token_fraction: Optional[float] = None,
               communicator: Optional[comm_lib.Communicator] = None, **kwargs):
    super().__init__(**kwargs)
    if not isinstance(num_experts, int) or num_experts < 1:
      raise ValueError(f"num_experts={num_experts!r} must be an integer >= 1")
    if routing not in ROUTINGS:
      raise ValueError(f"routing={routing!r}; allowed: {ROUTINGS}")
    if not isinstance(k, int) or k < 1:
      raise ValueError(f"k={k!r} must be an integer >= 1")
    if k > num_experts:
      raise ValueError(f"k={k} must be <= num_experts={num_experts}")
    if routing == "prototype" and num_experts % k:
      raise ValueError(f"num_experts={num_experts} must be divisible by the number of "
                       f"prototypes k={k} (E = Z·F)")
    for name, value in (("capacity_factor", capacity_factor),
                        ("eval_capacity_factor", eval_capacity_factor)):
      if value is not None and not value > 0:
        raise ValueError(f"{name}={value!r} must be > 0 (M6-T uses 1.25, the second paper 2.0)")
    if capacity_mode not in CAPACITY_MODES:
      raise ValueError(f"capacity_mode={capacity_mode!r}; allowed: {CAPACITY_MODES}")
    if max_tokens_per_expert_factor is not None:
      if capacity_mode != "dropless":
        raise ValueError(f"max_tokens_per_expert_factor={max_tokens_per_expert_factor!r} is the "
                         f"dropless memory guard; capacity_mode={capacity_mode!r} has a capacity "
                         f"already (capacity_factor): set capacity_mode='dropless' or drop it")
      if not max_tokens_per_expert_factor > 0:
        raise ValueError(f"max_tokens_per_expert_factor={max_tokens_per_expert_factor!r} must be "
                         f"> 0 (e.g. 4.0: an expert takes at most 4× its balanced share)")
    if capacity_token_fraction is not None and not 0.0 < capacity_token_fraction <= 1.0:
      raise ValueError(f"capacity_token_fraction={capacity_token_fraction!r} must be in (0, 1]: "
                       f"the share of positions that are real tokens (None = all)")
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
      raise ValueError(f"num_groups={num_groups!r} must be an integer >= 1")
    if num_groups > 1 and capacity_mode == "dropless":
      raise ValueError(f"num_groups={num_groups} splits the capacity into groups; "
                       f"capacity_mode='dropless' has none: use num_groups=1")
    if normalization not in routing_lib.NORMALIZATIONS:
      raise ValueError(f"normalization={normalization!r}; allowed: {routing_lib.NORMALIZATIONS}")
    if dispatch not in DISPATCHES:
      raise ValueError(f"dispatch={dispatch!r}; allowed: {DISPATCHES}")
    if expert_type not in EXPERT_TYPES:
      raise ValueError(f"expert_type={expert_type!r}; allowed: {EXPERT_TYPES}")
    if expert_type == "ffn":
      experts_lib.activation_fn(activation)
      if intermediate_size < 1:
        raise ValueError(f"intermediate_size={intermediate_size!r} must be >= 1 for FFN experts")
    if not isinstance(min_capacity, int) or min_capacity < 1:
      raise ValueError(f"min_capacity={min_capacity!r} must be an integer >= 1")
    if not init_std > 0 or (router_init_std is not None and not router_init_std > 0):
      raise ValueError(f"init_std={init_std!r} / router_init_std={router_init_std!r} must be > 0")
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"dropout_rate={dropout_rate!r} must be in [0, 1)")
    if output_size is not None and output_size < 1:
      raise ValueError(f"output_size={output_size!r} must be >= 1")
    for name, value in (("aux_loss_weight", aux_loss_weight), ("z_loss_weight", z_loss_weight)):
      if value < 0:
        raise ValueError(f"{name}={value!r} must be >= 0 (0 turns it off)")
    if second_expert_policy not in routing_lib.SECOND_EXPERT_POLICIES:
      raise ValueError(f"second_expert_policy={second_expert_policy!r}; allowed: "
                       f"{routing_lib.SECOND_EXPERT_POLICIES}")
    if second_expert_policy == "random" and routing != "top_k":
      raise ValueError(f"second_expert_policy='random' needs routing='top_k', got "
                       f"routing={routing!r} (prototype routing has no second-best choice); "
                       f"use second_expert_policy='all'")
    if drop_policy not in routing_lib.DROP_POLICIES:
      raise ValueError(f"drop_policy={drop_policy!r}; allowed: {routing_lib.DROP_POLICIES}")
    self.num_experts = num_experts
    self.intermediate_size = intermediate_size
    self.routing = routing
    self.k = k
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.capacity_mode = capacity_mode
    self.normalization = normalization
    self.dispatch = dispatch
    self.activation = activation
    self.expert_type = expert_type
    self.output_size = output_size
    self.init_std = init_std
    self.router_init_std = router_init_std
    self.dropout_rate = dropout_rate
    self.aux_loss_weight = aux_loss_weight
    self.z_loss_weight = z_loss_weight
    self.min_capacity = min_capacity
    self.second_expert_policy = second_expert_policy
    self.drop_policy = drop_policy
    self.max_tokens_per_expert_factor = max_tokens_per_expert_factor
    self.num_groups = num_groups
    self.capacity_token_fraction = capacity_token_fraction
    # Seeds the second-expert draws of calls without `seed=`. Only the random policy creates it
    # (other layers' variables are unchanged). Its state is a layer variable whose path holds
    # "seed_generator", so the trainer treats it as dropout's: reseeded every step from
    # (seed, rank, step), never broadcast, averaged or stored, and a resumed run draws the same.
    self._seed_generator = (keras.random.SeedGenerator(name="second_expert_seed_generator")
                            if second_expert_policy == "random" else None)
    self.communicator = communicator or comm_lib.get_default()
    # E must split evenly over the expert group; raised here, before any collective.
    self.expert_ids = self.communicator.expert_ids(num_experts)
    self.num_local_experts = len(self.expert_ids)
    #: C of the last call (static, per group), for reporting all-to-all volume; None when
    #: dropless.
    self.last_capacity: Optional[int] = None
    #: Recompute the expert FFNs in the backward pass (set by `M6Transformer.set_remat`).
    self.remat_experts = False

  def build(self, input_shape):
    m = int(input_shape[-1])
    self.hidden_size = m
    # The router stays float32 under mixed precision: its softmax and argmax decide placements.
    self.router = keras.layers.Dense(
        self.num_experts, use_bias=False, dtype="float32", name="router",
        kernel_initializer=keras.initializers.TruncatedNormal(
            stddev=self.router_init_std if self.router_init_std is not None else self.init_std))
    self.router.build((None, m))
    if self.expert_type == "ffn":
      self.experts = experts_lib.Experts(
          self.num_local_experts, m, self.intermediate_size, activation=self.activation,
          init_std=self.init_std, dropout_rate=self.dropout_rate, dtype=self.dtype_policy,
          name="experts")
    else:
      self.experts = experts_lib.LinearExperts(
          self.num_local_experts, m, self.output_size or m, init_std=self.init_std,
          dtype=self.dtype_policy, name="experts")
    self.experts.build(None)
    zeros = keras.initializers.Zeros()
    self._stats = {
        "tokens_per_expert": self.add_weight(name="tokens_per_expert", shape=(self.num_experts,),
                                             dtype="int32", initializer=zeros, trainable=False),
    }
    for name in STAT_NAMES[1:]:
      self._stats[name] = self.add_weight(name=name, shape=(), dtype="float32",
                                          initializer=zeros, trainable=False)
    self.built = True

  @property
  def stats(self) -> dict:
    """Routing statistics of the last call, keyed by `STAT_NAMES` (this worker's tokens)."""
    return {name: self._stats[name] for name in STAT_NAMES}

  def compute_output_shape(self, input_shape):
    n = self.output_size if self.expert_type == "linear" and self.output_size else input_shape[-1]
    return tuple(input_shape[:-1]) + (n,)

  def group_size(self, num_tokens: int) -> int:
    """Tokens per routing group in a call of `num_tokens` tokens: ceil(T / O).

    When O does not divide T, the last group is filled up with masked positions (never
    routed, no capacity taken), so every group has this size.
    """
    return -(-num_tokens // self.num_groups)

  def capacity_for(self, num_tokens, training: bool):
    """C for a call of `num_tokens` tokens (per group with `num_groups`). Dropless: the most
    choices an expert may take, K·T, or the `max_tokens_per_expert_factor` ceiling.

    `num_tokens` is an int, or an <int32>[] tensor when T is known only at run time: then C is
    the same value as an <int32>[] tensor (the float64 operations of the Python formula, in
    its order).
    """
    runtime = tf.is_tensor(num_tokens)
    if self.capacity_mode == "dropless":
      if self.max_tokens_per_expert_factor is None:
        return self.k * num_tokens
      if runtime:
        bound = tf.math.ceil(self.max_tokens_per_expert_factor * self.k
                             * tf.cast(num_tokens, tf.float64) / self.num_experts - 1e-9)
        return tf.maximum(tf.cast(bound, tf.int32), 1)
      return max(1, math.ceil(self.max_tokens_per_expert_factor * self.k * num_tokens
                              / self.num_experts - 1e-9))
    factor = self.capacity_factor
    if not training and self.eval_capacity_factor is not None:
      factor = self.eval_capacity_factor
    if self.capacity_token_fraction is not None:
      if runtime:
        real = tf.math.ceil(self.capacity_token_fraction * tf.cast(num_tokens, tf.float64)
                            - 1e-9)
        num_tokens = tf.maximum(tf.cast(real, tf.int32), 1)
      else:
        num_tokens = max(1, math.ceil(self.capacity_token_fraction * num_tokens - 1e-9))
    fn = routing_lib.capacity_tensor if runtime else routing_lib.capacity
    return fn(num_tokens, self.num_experts, k=self.k, capacity_factor=factor,
              mode=self.capacity_mode, min_capacity=self.min_capacity)

  def alltoall_bytes_per_forward(self, capacity: Optional[int] = None) -> int:
    """Bytes this worker sends by all-to-all in one forward pass: 2·E·C·M·bytes (same backward).

    Counts the whole [D, e, C, M] buffer both ways, as the collective moves it (the row a
    worker keeps for itself included), so the figure is independent of D.
    """
    if self.capacity_mode == "dropless" and capacity is None:
      raise ValueError("alltoall_bytes_per_forward: a dropless layer sends its real rows, which "
                       "vary per step (stats['tokens_per_expert']); pass capacity= for a bound")
    c = capacity if capacity is not None else self.last_capacity
    if c is None:
      raise ValueError("alltoall_bytes_per_forward: call the layer once with a static token "
                       "count (a traced call with an unknown T has no static C), or pass "
                       "capacity=")
    c *= self.num_groups
    wire = self.communicator.wire_dtype or self.compute_dtype
    n_out = (self.output_size or self.hidden_size) if self.expert_type == "linear" else self.hidden_size
    return self.num_experts * c * (self.hidden_size + n_out) * tf.as_dtype(wire).size

  def call(self, inputs, training=None, token_mask=None, capacity=None, seed=None):
    """Routes `inputs` <float>[..., M] through the experts; returns <float>[..., M or N].

    Args:
      inputs: tokens; every leading dimension is flattened into T.
      training: selects the capacity factor and dropout; None means inference (Keras'
        convention), i.e. the eval capacity factor — pass training=True in a training loop.
      token_mask: optional <bool>[...] (same leading shape); False tokens (padding) are not
        routed, take no capacity and get a zero output.
      capacity: optional C overriding the capacity factor for this call. C = T drops nothing
        (a token's choices are distinct experts), so every token's output is independent of
        the others in the call: decoding uses it (`m6t_tf.models.decoding`). Must be equal on every
        worker of the expert group.
      seed: optional <int32>[2] stateless RNG seed for second_expert_policy="random" at
        training; the draws are a pure function of it, so a recomputed forward pass (and a
        resumed run given the same per-step, per-layer seed) routes identically. None draws a
        seed from the layer's own `SeedGenerator` (advanced once per call; the trainer
        reseeds it each step).
    """
    shape = tf.shape(inputs)
    m = inputs.shape[-1]
    x = tf.reshape(inputs, [-1, m])                                        # [T, M]
    num_tokens = x.shape[0]                    # None: batch or length known only at run time
    mask = None if token_mask is None else tf.reshape(token_mask, [-1])
    if capacity is not None and not (isinstance(capacity, int) and capacity >= 1):
      raise ValueError(f"capacity={capacity!r} must be an integer >= 1 (or None for the "
                       f"capacity factor)")
    o = self.num_groups
    # O equal groups of G tokens. A static T that O divides (the trainer's case) is split as
    # it is; otherwise G = ceil(T/O) and the tokens are padded to O·G with masked positions,
    # which are never routed and take no capacity (a decode call of 17 positions, O = 2).
    padded = num_tokens is None or num_tokens % o != 0
    t = tf.shape(x)[0] if num_tokens is None else num_tokens              # int or <int32>[]
    group_tokens = t // o if not padded else (t + o - 1) // o
    if capacity is None:
      c = self._agreed_capacity(self.capacity_for(group_tokens, bool(training)))
    else:
      c = capacity
    # C of the slot buffers (per group); a dropless layer has none (its rows vary per step),
    # nor has a traced call whose C is known only at run time.
    self.last_capacity = c if self.capacity_mode != "dropless" and not tf.is_tensor(c) else None

    uniform = self._second_expert_draws(t, training, seed)                 # [K-1, T] or None
    if padded and o > 1:
      pad = o * group_tokens - t
      x = tf.concat([x, tf.zeros([pad, m], x.dtype)], axis=0)              # [O·G, M]
      mask = (tf.range(o * group_tokens) < t if mask is None else
              tf.concat([tf.cast(mask, tf.bool), tf.zeros([pad], tf.bool)], axis=0))  # [O·G]
      if uniform is not None:
        uniform = tf.concat([uniform, tf.zeros([self.k - 1, pad], uniform.dtype)], axis=1)
    logits = self.router(tf.cast(x, tf.float32))                          # [T, E] float32
    policy = "all" if uniform is None else "random"
    route = lambda lg, cap, m, u: routing_lib.route(
        lg, routing=self.routing, k=self.k, capacity=cap, normalization=self.normalization,
        token_mask=m, second_expert_policy=policy, drop_policy=self.drop_policy, uniform=u)

    if self.capacity_mode == "dropless":
      r = route(logits, c, mask, uniform)
      out = self._dropless(x, r, training)                                 # [T, N]
      routings = [r]
    else:
      split = lambda t, axis=0: [None] * o if t is None else tf.split(t, o, axis=axis)
      routings = [route(lg, c, m, u) for lg, m, u in zip(
          split(logits), split(mask), split(uniform, axis=1))]
      out = self._dispatch_and_combine(split(x), routings, training)       # [O·G, N]
      if padded and o > 1:
        out = out[:t]                                                      # [T, N]

    n = out.shape[-1]
    sink = getattr(_LOSS_SINK, "losses", None)
    add_loss = self.add_loss if sink is None else sink.append
    if padded and o > 1:
      # Groups holding at least one position are averaged; a group of padding only (T = 4,
      # O = 3: G = 2) routes nothing and is left out.
      holds = [tf.cast(g * group_tokens < t, tf.float32) for g in range(o)]
      count = tf.add_n(holds)
      aux_loss = tf.math.divide_no_nan(
          tf.add_n([h * r.aux_loss for h, r in zip(holds, routings)]), count)
      z_loss = tf.math.divide_no_nan(
          tf.add_n([h * r.z_loss for h, r in zip(holds, routings)]), count)
    else:
      # Per-group losses are averaged (equal-size groups), as GShard does over its groups.
      aux_loss = tf.add_n([r.aux_loss for r in routings]) / len(routings)
      z_loss = tf.add_n([r.z_loss for r in routings]) / len(routings)
    if self.aux_loss_weight > 0:
      add_loss(self.aux_loss_weight * aux_loss)
    if self.z_loss_weight > 0:
      add_loss(self.z_loss_weight * z_loss)
    tokens_per_expert = tf.add_n([r.tokens_per_expert for r in routings])
    used = tf.add_n([tf.reduce_sum(tf.cast(r.used, tf.float32)) for r in routings])
    kept = tf.add_n([tf.reduce_sum(tf.cast(r.kept, tf.float32)) for r in routings])
    self._stats["tokens_per_expert"].assign(tokens_per_expert)
    self._stats["load_cv"].assign(routing_lib.coefficient_of_variation(tokens_per_expert))
    self._stats["dropped_fraction"].assign(tf.math.divide_no_nan(used - kept, used))
    self._stats["aux_loss"].assign(aux_loss)
    self._stats["z_loss"].assign(z_loss)
    return tf.reshape(out, tf.concat([shape[:-1], [n]], axis=0))

  def _agreed_capacity(self, c):
    """C the whole expert group uses: the maximum over its workers where it may differ.

    The all-to-all exchanges [D, e, C, M] buffers, so C must be equal on the D workers. A C
    known only at run time (unknown batch or length when traced) is agreed on every call
    (one scalar max-allreduce per layer call, `Communicator.max_over_group`). So is an eager
    call's, where each worker's T may differ (say, unequal last batches). A traced call with
    a static T adds nothing: the trainer checks once that every worker has the same T and C
    (`check_consistent`). Every worker must therefore trace alike: all with a static, equal
    T, or all with an unknown one. Dropless layers exchange variable-size rows: no C to agree.
    """
    if self.capacity_mode == "dropless" or self.communicator.expert_group_size == 1:
      return c
    if tf.is_tensor(c):
      return self.communicator.max_over_group(c)
    if tf.executing_eagerly():
      return int(self.communicator.max_over_group(tf.constant(c, tf.int32)))
    return c

  def _second_expert_draws(self, num_tokens, training, seed):
    """<float32>[K-1, T] uniform draws of second_expert_policy="random" (training), or None.
    T: an int, or an <int32>[] tensor (run-time token count)."""
    if not (self.second_expert_policy == "random" and training and self.k > 1):
      return None
    if seed is None:
      # Inside a Transformer block the seed comes from the block's per-step seed scope (so a
      # recomputed forward draws the same values); standalone, from the layer's generator.
      seed = dropout_lib.next_seed()
    if seed is None:
      seed = self._seed_generator.next()
    seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64),
                                                    _SECOND_EXPERT_SEED_SALT)
    return tf.random.stateless_uniform([self.k - 1, num_tokens], seed=seed)

  def _run_experts(self, x, training, group_sizes=None):
    """The local experts on their buffer (or grouped rows); with `remat_experts` recomputed in
    the backward pass — routing and the all-to-alls stay outside, so nothing is sent again.
    Same dropout masks either way (`dropout_lib.maybe_remat`)."""
    kwargs = {} if group_sizes is None else {"group_sizes": group_sizes}
    return dropout_lib.maybe_remat(lambda t: self.experts(t, training=training, **kwargs),
                                   bool(self.remat_experts and training))(x)

  def _dispatch_and_combine(self, xs, routings, training):
    """Capacity routing: O groups' slot buffers [O, E, C, M] travel as [D, e, O·C, M]."""
    o, c, m = len(routings), routings[0].capacity, xs[0].shape[-1]
    d, e = self.communicator.expert_group_size, self.num_local_experts
    if self.dispatch == "einsum":
      dispatched = [dispatch_einsum(x, r) for x, r in zip(xs, routings)]  # O × [E, C, M]
    else:
      dispatched = [dispatch_index(x, r, self.num_experts) for x, r in zip(xs, routings)]
    buffer = tf.stack(dispatched, axis=1) if o > 1 else dispatched[0][:, None]  # [E, O, C, M]
    buffer = tf.reshape(buffer, [d, e, o * c, m])                          # [D, e, O·C, M]
    received = self.communicator.all_to_all(buffer)                       # [D, e, O·C, M]
    y = self._run_experts(received, training)                             # [D, e, O·C, N]
    n = y.shape[-1]
    returned = self.communicator.all_to_all(y)                            # [D, e, O·C, N]
    returned = tf.reshape(returned, [self.num_experts, o, c, n])           # [E, O, C, N]
    combine = combine_einsum if self.dispatch == "einsum" else (
        lambda y_, r_: combine_index(y_, r_, self.num_experts))
    outs = [combine(returned[:, g], r) for g, r in enumerate(routings)]   # O × [T/O, N]
    return tf.concat(outs, axis=0) if o > 1 else outs[0]

  def _dropless(self, x, r: routing_lib.Routing, training):
    """Every kept choice computed on real rows: no capacity padding, nothing dropped (unless
    `max_tokens_per_expert_factor` caps an expert).

    The kept choices are laid out sorted by expert: choice (k, t) goes to row
    offset[expert] + slot, since the routing's slots of an expert's kept choices are
    0, 1, ... in order. With experts sharded, each worker's rows for worker d's experts are
    contiguous, so one variable-size all-to-all (`Communicator.all_to_all_v`) sends them and
    the per-expert counts (a fixed [D, e] all-to-all) say which received rows belong to
    which local expert. A loop over the e local experts runs `tf.matmul` on each expert's
    dynamic row range (`experts.grouped_apply`); the reverse all-to-all brings the rows back.
    """
    k, t = r.expert_index.shape[0], _num_tokens(r)
    n_rows = k * t
    d, e = self.communicator.expert_group_size, self.num_local_experts
    counts = r.tokens_per_expert                                          # [E] kept choices
    offsets = tf.cumsum(counts, exclusive=True)                           # [E]
    rows = tf.where(r.kept, tf.gather(offsets, r.expert_index) + r.slot, n_rows)  # [K, T]
    # Kept rows are unique; dropped choices all land on the dump row K·T (sliced off).
    row_choice = tf.tensor_scatter_nd_update(
        tf.fill([n_rows + 1], n_rows), tf.reshape(rows, [-1, 1]),
        tf.range(n_rows, dtype=tf.int32))[:-1]                            # [K·T]; K·T: none
    row_token = tf.where(row_choice < n_rows, row_choice % t, t)          # [K·T]; T: none
    total = tf.reduce_sum(counts)

    @tf.custom_gradient
    def gather_rows(x):
      def grad(d_out):                                                    # [K·T, M] -> [T, M]
        return _sum_rows(_pad_row(d_out), rows)
      return tf.gather(_pad_row(x), row_token), grad                     # [K·T, M]

    x_sorted = gather_rows(x)                                             # [K·T, M]
    if d == 1:
      y_sorted = self._run_experts(x_sorted, training,
                                   tf.concat([counts, [n_rows - total]], axis=0))
    else:
      counts_de = tf.reshape(counts, [d, e])                              # for worker d's experts
      # received[s, j]: rows worker s sends for my expert j (integers travel exactly).
      received_counts, _ = self.communicator.all_to_all_v(
          tf.reshape(counts_de, [-1]), tf.fill([d], e))
      received_counts = tf.reshape(received_counts, [d, e])               # [D, e]
      x_recv, recv_splits = self.communicator.all_to_all_v(
          x_sorted[:total], tf.reduce_sum(counts_de, axis=1))              # [R, M]
      # Received rows come by source, then expert; group them by local expert.
      expert_of_row = tf.repeat(tf.tile(tf.range(e), [d]), tf.reshape(received_counts, [-1]))
      order = tf.argsort(expert_of_row, stable=True)                      # [R]
      inverse = tf.math.invert_permutation(order)                         # [R]

      def permute(v, perm, inv):
        """v[perm]; its gradient is the inverse permutation's gather, not IndexedSlices."""
        @tf.custom_gradient
        def gather(v):
          return tf.gather(v, perm), lambda d: tf.gather(d, inv)
        return gather(v)

      y_grouped = self._run_experts(permute(x_recv, order, inverse), training,
                                    tf.reduce_sum(received_counts, axis=0))
      y_recv = permute(y_grouped, inverse, order)                         # [R, N]
      y_back, _ = self.communicator.all_to_all_v(y_recv, recv_splits)      # [total, N]
      y_sorted = tf.concat([y_back, tf.zeros([n_rows - total, y_back.shape[-1]],
                                             y_back.dtype)], axis=0)      # [K·T, N]

    # gate is 0 where not kept; those choices read the zero row K·T.
    return gate_weighted_sum(y_sorted, tf.cast(r.gate, y_sorted.dtype), rows, row_choice,
                             row_token)

  def get_config(self):
    config = super().get_config()
    config.update(
        num_experts=self.num_experts, intermediate_size=self.intermediate_size,
        routing=self.routing, k=self.k, capacity_factor=self.capacity_factor,
        eval_capacity_factor=self.eval_capacity_factor, capacity_mode=self.capacity_mode,
        normalization=self.normalization, dispatch=self.dispatch, activation=self.activation,
        expert_type=self.expert_type, output_size=self.output_size, init_std=self.init_std,
        router_init_std=self.router_init_std, dropout_rate=self.dropout_rate,
        aux_loss_weight=self.aux_loss_weight, z_loss_weight=self.z_loss_weight,
        min_capacity=self.min_capacity, second_expert_policy=self.second_expert_policy,
        drop_policy=self.drop_policy,
        max_tokens_per_expert_factor=self.max_tokens_per_expert_factor,
        num_groups=self.num_groups, capacity_token_fraction=self.capacity_token_fraction)
    return config
