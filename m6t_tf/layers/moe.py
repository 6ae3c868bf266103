"""The M6-T Mixture-of-Experts layer with the Whale data flow (arXiv 2105.15082 §2-3, appendix A.3).

Dimension cheat sheet (used in every einsum and `# [..]` comment below):

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
import dataclasses
import inspect
import threading
from typing import Callable, Optional

import keras
import tensorflow as tf

from m6t_tf.layers import dropout as dropout_lib
from m6t_tf.layers import experts as experts_lib
from m6t_tf.layers import moe_options
from m6t_tf.layers import routers
from m6t_tf.layers import routing as routing_lib
from m6t_tf.layers.moe_options import CAPACITY_MODES, DISPATCHES, EXPERT_TYPES  # noqa: F401
from m6t_tf.layers.moe_options import MoEOptions  # noqa: F401
from m6t_tf.parallel import communicator as comm_lib
#: Names of the routing statistics every MoE layer exposes after each call (`MoE.stats`).
STAT_NAMES = ("tokens_per_expert", "load_cv", "dropped_fraction", "aux_loss", "z_loss")
# Folded into the call's seed for the second-expert draws, so that other random uses of the same
# per-step, per-layer seed (e.g. dropout) draw different numbers.
_SECOND_EXPERT_SEED_SALT = 0x5EC0


#: Options the layer's weights or router state are made from: fixed once it is built.
BUILT_FROM = ("num_experts", "intermediate_size", "routing", "activation", "expert_type",
              "output_size", "init_std", "router_init_std", "dropout_rate")

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
    num_experts, intermediate_size, and every other option as a keyword: the fields of
      `MoEOptions` (`m6t_tf.layers.moe_options`), which hold each option's default, check
      and doc — among them `routing` (a router of `m6t_tf.layers.routers`: "top_k", looped
      argmax over all E; "prototype", k groups with top-1 in each; ...), `k`,
      `capacity_factor`, `capacity_mode` ("k", "1" or "dropless"), `num_groups`,
      `drop_policy`, the losses' weights, and each registered router's own options
      (`second_expert_policy` of "top_k", ...). The options are readable as attributes
      (`layer.k`) and as one object (`layer.options`).
    communicator: a `Communicator`; defaults to the process default (`LocalCommunicator`).
    **kwargs: Keras layer arguments (name, dtype, ...).

  The router is looked up by name in the table (`layer.gating`, one instance per layer). A
  router that owns state (say, the per-expert bias of auxiliary-loss-free balancing,
  DeepSeek-V3 §2.1.2) creates it in `Router.build` with `add_weight(trainable=False)`: it is
  then a layer weight, saved in checkpoints and `.keras` files and broadcast at start like any
  replicated weight, never trained. It records what it needs during `call` (e.g. the loads it
  routed, into another non-trainable weight), and the trainer calls `after_step` on every MoE
  layer after each step with a function summing over all workers: the router updates its state
  there from the all-worker totals, so every worker holds the same state.

  What the trainer reads, the layer reports: `capacity_for`, `last_capacity`,
  `effective_capacity_factor`, `capacity_summary`, `alltoall_bytes_per_step`,
  `ceiling_warning` and the routing statistics `stats`.
  """

  def __init__(self, num_experts: int, intermediate_size: int = 0, *,
               communicator: Optional[comm_lib.Communicator] = None, **kwargs):
    values = {name: kwargs.pop(name) for name in moe_options.option_names() if name in kwargs}
    super().__init__(**kwargs)
    #: Every option of the layer (validated): one frozen `MoEOptions`.
    self.options = moe_options.MoEOptions(num_experts=num_experts,
                                          intermediate_size=intermediate_size, **values)
    #: The router of `options.routing`, from the table.
    self.gating = routers.get(self.options.routing)(self.options)
    self._seed_generator = None
    self._add_seed_generator()
    self.communicator = communicator or comm_lib.get_default()
    # E must split evenly over the expert group; raised here, before any collective.
    self.expert_ids = self.communicator.expert_ids(num_experts)
    self.num_local_experts = len(self.expert_ids)
    self._last_capacity: Optional[int] = None
    #: Recompute the expert FFNs in the backward pass (set by `M6Transformer.set_remat`).
    self.remat_experts = False

  def _add_seed_generator(self):
    """Seeds the router's random draws (GShard's random second expert) in calls without
    `seed=`. Only a router that draws gets one (other layers' variables are unchanged). Its
    state is a layer variable whose path holds "seed_generator", so the trainer treats it as
    dropout's: reseeded every step from (seed, rank, step), never broadcast, averaged or
    stored, and a resumed run draws the same."""
    if self.gating.draws_at_training and self._seed_generator is None:
      self._seed_generator = keras.random.SeedGenerator(name="second_expert_seed_generator")

  def set_options(self, **changes) -> None:
    """Changes options of this layer (checked again, as at construction).

    Options read at each call (capacity factors and modes, losses' weights, policies, ...)
    may change at any time; those the weights or the router were made from
    (`BUILT_FROM`) only before the layer is built.
    """
    options = dataclasses.replace(self.options, **changes)
    fixed = sorted(n for n in changes if n in BUILT_FROM and changes[n] != getattr(self, n))
    if fixed and self.built:
      raise ValueError(f"{fixed} of a built MoE layer shaped its weights or router state: set "
                       f"them at construction")
    self.options = options
    if options.routing != self.gating.name:
      self.gating = routers.get(options.routing)(options)
    self.gating.options = options
    self._add_seed_generator()

  @property
  def last_capacity(self) -> Optional[int]:
    """C of the last call (static, per group): None when dropless, before the first call, or
    when the call's C was known only at run time."""
    return self._last_capacity

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
    self.gating.build(self)
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
    return self.options.group_size(num_tokens)

  def capacity_for(self, num_tokens, training: bool):
    """C for a call of `num_tokens` tokens (per group with `num_groups`); see
    `MoEOptions.capacity_for`. `num_tokens`: an int, or an <int32>[] run-time tensor."""
    return self.options.capacity_for(num_tokens, training)

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
    n_out = self.hidden_size
    if self.expert_type == "linear":
      n_out = self.output_size or self.hidden_size
    return self.num_experts * c * (self.hidden_size + n_out) * tf.as_dtype(wire).size

  # -- What the trainer reads: the layer reports itself. --------------------------------------

  def alltoall_bytes_per_step(self) -> Optional[float]:
    """Bytes this worker sent by all-to-all in the last training step (forward and backward
    each move the [D, e, C, M] buffer out and back); None when there is no static C (dropless,
    or a run-time T)."""
    if self.last_capacity is None:
      return None
    return 2.0 * self.alltoall_bytes_per_forward()

  def effective_capacity_factor(self, real_tokens: float) -> Optional[float]:
    """γ the routed tokens got in the last call: slots per expert over the mean real choices
    per expert, E·O·C / (k'·real_tokens), k' = k under Capacity k× and 1 under Capacity 1×.

    Args:
      real_tokens: tokens routed per call on this worker (padding excluded).

    Returns:
      The factor, or None without a static C (dropless, a run-time T) or without tokens.
    """
    if self.last_capacity is None or not real_tokens > 0:
      return None
    k_eff = self.k if self.capacity_mode == "k" else 1
    return self.last_capacity * self.num_groups * self.num_experts / (k_eff * real_tokens)

  def capacity_summary(self, positions: int) -> str:
    """One line for people: C of a training call of `positions` token positions and what γ
    is computed over (or that the layer is dropless)."""
    if self.capacity_mode == "dropless":
      return "Experts: dropless (no capacity; every token reaches its experts)"
    fraction = self.capacity_token_fraction
    share = (f"{fraction:.1%} of the {positions:,} positions, the real tokens' share"
             if fraction is not None and fraction < 1 else
             f"all {positions:,} positions (padding included)")
    return (f"Experts: C = {self.capacity_for(self.group_size(positions), True)} slots per "
            f"expert{' per group' if self.num_groups > 1 else ''}, γ = {self.capacity_factor} "
            f"over {share}")

  def ceiling_warning(self, name: str, dropped_fraction: float,
                      max_over_mean_load: float) -> Optional[str]:
    """The warning line when this dropless layer's `max_tokens_per_expert_factor` ceiling
    dropped token choices (`dropped_fraction` > 0, the busiest expert at `max_over_mean_load`
    × the mean load, both over the expert group); None otherwise, and for layers with a
    capacity (their drops are the capacity factor's, by design)."""
    if (self.capacity_mode != "dropless" or self.max_tokens_per_expert_factor is None
        or not dropped_fraction > 0):
      return None
    return (f"warning: {name} is dropless but its max_tokens_per_expert_factor="
            f"{self.max_tokens_per_expert_factor:g} ceiling dropped {dropped_fraction:.2%} of "
            f"its token choices this step (busiest expert {max_over_mean_load:.1f}× the mean "
            f"load); raise the factor if memory allows, or balance the router "
            f"(MoEConfig.aux_loss_weight)")

  def after_step(self, sum_over_workers: Optional[Callable] = None, applied=True) -> None:
    """The trainer's hook after every training step: the router updates its state, if any.

    Args:
      sum_over_workers: x -> Σ of x over all workers (`ctx.sum_over_world`); None on one
        process. A stateful router calls it (a collective: every worker runs the same layers).
      applied: <bool>[] or bool, whether the step's update was applied.
    """
    self.gating.after_step(sum_over_workers or (lambda x: x), applied)

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
    self._last_capacity = c if self.capacity_mode != "dropless" and not tf.is_tensor(c) else None

    uniform = self._router_draws(t, training, seed)                        # [n, T] or None
    if padded and o > 1:
      pad = o * group_tokens - t
      x = tf.concat([x, tf.zeros([pad, m], x.dtype)], axis=0)              # [O·G, M]
      mask = (tf.range(o * group_tokens) < t if mask is None else
              tf.concat([tf.cast(mask, tf.bool), tf.zeros([pad], tf.bool)], axis=0))  # [O·G]
      if uniform is not None:
        uniform = tf.concat([uniform, tf.zeros([uniform.shape[0], pad], uniform.dtype)], axis=1)
    logits = self.router(tf.cast(x, tf.float32))                          # [T, E] float32
    route = lambda lg, cap, m, u: routers.route(
        lg, routing=self.gating, capacity=cap, token_mask=m, uniform=u, training=bool(training))

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

  def _router_draws(self, num_tokens, training, seed):
    """<float32>[n, T] uniform draws the router asks for (`Router.random_draws`: K-1 for the
    random second expert at training), or None. T: an int, or an <int32>[] tensor."""
    rows = self.gating.random_draws(bool(training))
    if not rows:
      return None
    if seed is None:
      # Inside a Transformer block the seed comes from the block's per-step seed scope (so a
      # recomputed forward draws the same values); standalone, from the layer's generator.
      seed = dropout_lib.next_seed()
    if seed is None:
      seed = self._seed_generator.next()
    seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64),
                                                    _SECOND_EXPERT_SEED_SALT)
    return tf.random.stateless_uniform([rows, num_tokens], seed=seed)

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
    config.update(self.options.as_dict())
    return config


def _option_property(name: str) -> property:
  return property(lambda self: getattr(self.options, name),
                  lambda self, value: self.set_options(**{name: value}),
                  doc=f"The `{name}` option (`MoEOptions`); setting it is `set_options`.")


# Every option is a layer attribute (`layer.k`, `layer.aux_loss_weight = 0.1`, ...): a view of
# `layer.options`, the one place the values live.
for _name in moe_options.option_names():
  setattr(MoE, _name, _option_property(_name))
# `inspect.signature(MoE)` (help, IDEs) lists the options; Keras reads `__init__`'s own.
MoE.__signature__ = moe_options.signature(
    leading=("num_experts", "intermediate_size"),
    extra=(inspect.Parameter("communicator", inspect.Parameter.KEYWORD_ONLY, default=None),
           inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)))
