"""Routing for M6-T Mixture-of-Experts layers: top-k (looped argmax) and expert prototyping.

Dimension cheat sheet (the letters of `m6t_tf.layers.moe`; every einsum and shape comment in
`m6t_tf.layers` uses it):

    T  tokens routed together on this worker (B·L)     E  experts in total (E = e·D)
    C  capacity per expert (token slots)               k  choices per token
    Z  prototypes (groups of experts), F = E / Z       K  placements per token (k or Z)

The routing functions are pure: `[T, E]` float32 router logits in, a `Routing` out. The MoE
layer reaches them through the table of routers (`m6t_tf.layers.routers`), which also holds
routers written elsewhere from this module's building blocks: `check_logits`, `valid_mask`,
`top_k_choices` (looped argmax), `assign_slots` (capacity placement by drop policy) and
`finish` (both placement forms and the router losses). The functions give
the GShard form (`combine_weights`/`dispatch_mask` over `[T, E, C]`, used by the reference einsum
dispatch) and an index form (`expert_index`/`slot`/`gate` over `[K, T]`, used by the index
dispatch whose cost is O(K·T·M) instead of O(T·E·C·M)). Both forms describe the same placement.

Choices are made on the logits, gates come from the probabilities: softmax preserves the order
of the logits, but in float32 every probability more than ~90 below the top logit underflows to
exactly 0.0, and an argmax over those zeros would pick by index, not by logit.

Priority (arXiv 2105.15082 §2, GShard's looped argmax): top-k is a looped argmax. Round r
places every token's r-th choice *after* all tokens that rounds < r already placed in that expert,
in token order; a token whose slot
would be ≥ C is dropped for that expert. First choices therefore always beat second choices.
Prototype routing makes its Z choices in parallel: expert j of prototype z only ever receives
tokens of prototype z, so one cumulative sum over tokens places them all (no loop over k),
which is why its step time stays near top-1 (paper Table 2).

Two policies change this (both off by default, so the paper's routing is unchanged):
  * `second_expert_policy="random"` (GShard): every choice after the first is used only with a
    probability that grows with its gate (`_used_choices`); an unused choice takes no slot.
  * `drop_policy="probability"` (Megatron-Core's "probs" drop policy): an overflowing expert
    keeps the C choices with the largest gates, whatever their round or token position
    (`_slots_by_probability`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import tensorflow as tf

NORMALIZATIONS = ("auto", "none", "renormalize", "softmax_topk")
# Looped-argmax marks: an expert already chosen, and the floor of a logit still in the running.
_CHOSEN = float(np.finfo(np.float32).min)
_ABOVE_CHOSEN = float(np.nextafter(np.float32(_CHOSEN), np.float32(0)))
CAPACITY_MODES = ("k", "1")
SECOND_EXPERT_POLICIES = ("all", "random")
DROP_POLICIES = ("position", "probability")
# The random second expert of GShard's Top2Gating (lingvo `Top2GatingOnLogits`, Mesh-TF
# `_top_2_gating`): the second expert is used iff uniform < g2 / threshold, g2 = p2 / (p1 + p2)
# renormalised before capacity and not renormalised after a skip (lingvo's default
# `legacy_mtf_behavior`). The threshold is 1/2 as in fairseq's `top2gating` ("2·g2 > uniform");
# Mesh-TF defaults to 0.2. Here it is 1/k over the top k, the same rule at k = 2
# (`_used_choices`).


def capacity(num_tokens: int, num_experts: int, *, k: int = 1, capacity_factor: float = 1.25,
             mode: str = "k", min_capacity: int = 1) -> int:
  """Expert capacity `C = ceil(k' · T / E · γ)` (arXiv 2105.15082 §3.2).

  Args:
    num_tokens: T, tokens routed together on one worker.
    num_experts: E, experts in total.
    k: choices per token of the routing (for prototype routing, the number of prototypes Z).
    capacity_factor: γ (1.25 in M6-T, 2.0 in the second paper; a separate factor is used at eval).
    mode: "k" for "Capacity k×" (k' = k), "1" for the paper's limited "Capacity 1×" (k' = 1
      whatever the routing).
    min_capacity: lower bound, so that tiny test batches still route somewhere.

  Returns:
    The integer capacity C. It depends only on static shapes and config values, so it is
    identical on every worker (a mismatch would deadlock the all-to-all).
  """
  if num_tokens < 1 or num_experts < 1:
    raise ValueError(f"capacity: num_tokens={num_tokens} and num_experts={num_experts} must be >= 1")
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor={capacity_factor!r} must be > 0 (M6-T uses 1.25)")
  if mode not in CAPACITY_MODES:
    raise ValueError(f"capacity mode={mode!r}; allowed: 'k' (Capacity k×) or '1' (Capacity 1×)")
  k_eff = k if mode == "k" else 1
  # A small epsilon keeps e.g. 1.25 * 8 = 10.000000000000002 from rounding up to 11.
  return max(min_capacity, int(math.ceil(k_eff * num_tokens / num_experts * capacity_factor - 1e-9)))


def capacity_tensor(num_tokens: tf.Tensor, num_experts: int, *, k: int = 1,
                    capacity_factor: float = 1.25, mode: str = "k",
                    min_capacity: int = 1) -> tf.Tensor:
  """`capacity` for a token count known only at run time: <int32>[] C, the same integer.

  The float64 operations are those of `capacity` in the same order (k'·T exact, then / E, · γ,
  - ε, each rounded once as IEEE doubles), so the tensor equals the Python value for every T.

  Args:
    num_tokens: <int>[] T (> 0; an empty call routes nothing and gets C = min_capacity).
    num_experts, k, capacity_factor, mode, min_capacity: as for `capacity`.
  """
  if num_experts < 1:
    raise ValueError(f"capacity: num_experts={num_experts} must be >= 1")
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor={capacity_factor!r} must be > 0 (M6-T uses 1.25)")
  if mode not in CAPACITY_MODES:
    raise ValueError(f"capacity mode={mode!r}; allowed: 'k' (Capacity k×) or '1' (Capacity 1×)")
  k_eff = k if mode == "k" else 1
  kt = tf.cast(k_eff * tf.cast(num_tokens, tf.int64), tf.float64)
  c = tf.math.ceil(kt / float(num_experts) * float(capacity_factor) - 1e-9)
  return tf.maximum(tf.cast(c, tf.int32), min_capacity)


@dataclasses.dataclass
class Routing:
  """The placement of T tokens into E experts of C slots.

  Attributes (and the lazily built GShard form, `combine_weights` <float32>[T, E, C] and
  `dispatch_mask` <bool>[T, E, C]):
    expert_index: <int32>[K, T] expert of each token's choice (placement) K.
    slot: <int32>[K, T] position in that expert's buffer (may be ≥ C when dropped).
    gate: <float32>[K, T] combine weight of each choice, already 0 for dropped choices.
    kept: <bool>[K, T] whether the choice was used and fit under capacity.
    used: <bool>[K, T] whether the choice takes part in routing: a real token's choice that the
      second-expert policy did not skip ("all": every real token's choices). `slot` is only
      meaningful where `used`.
    probs: <float32>[T, E] router probabilities (per prototype for prototype routing).
    valid: <bool>[T] tokens that take part in routing (padding tokens do not).
    tokens_per_expert: <int32>[E] real tokens each expert computes (after capacity).
    aux_loss: <float32>[] Switch load-balance loss; 1.0 at perfect balance.
    z_loss: <float32>[] router z-loss, mean of logsumexp(logits)² over tokens (and prototypes).
    capacity: C, an int, or an <int32>[] tensor when T is known only at run time.
    num_experts: E.
  """
  expert_index: tf.Tensor
  slot: tf.Tensor
  gate: tf.Tensor
  kept: tf.Tensor
  used: tf.Tensor
  probs: tf.Tensor
  valid: tf.Tensor
  tokens_per_expert: tf.Tensor
  aux_loss: tf.Tensor
  z_loss: tf.Tensor
  capacity: int | tf.Tensor
  num_experts: int

  # The GShard [T, E, C] form is built only when asked for (by the einsum dispatch or a test):
  # the index dispatch never pays its O(T·E·C) cost, eagerly or in a graph.
  @functools.cached_property
  def _onehots(self):
    expert_onehot = tf.one_hot(self.expert_index, self.num_experts, dtype=tf.float32)  # [K, T, E]
    slot_onehot = tf.one_hot(tf.where(self.kept, self.slot, -1), self.capacity,
                             dtype=tf.float32)                                    # [K, T, C]
    return expert_onehot, slot_onehot

  @functools.cached_property
  def combine_weights(self) -> tf.Tensor:
    """<float32>[T, E, C]: gate of token t in slot c of expert e (0 where it is not)."""
    expert_onehot, slot_onehot = self._onehots
    return tf.einsum("KTE,KTC,KT->TEC", expert_onehot, slot_onehot, self.gate)

  @functools.cached_property
  def dispatch_mask(self) -> tf.Tensor:
    """<bool>[T, E, C]: whether token t occupies slot c of expert e."""
    expert_onehot, slot_onehot = self._onehots
    # Σ over choices; a token sits in at most one slot of an expert (its choices are distinct).
    return tf.einsum("KTE,KTC->TEC", expert_onehot, slot_onehot) > 0.5

  @property
  def dropped_fraction(self) -> tf.Tensor:
    """<float32>[] fraction of used token-choices that found their expert full.

    A choice the random second-expert policy skipped was never sent, so it is not a drop.
    """
    choices = tf.reduce_sum(tf.cast(self.used, tf.float32))
    return tf.math.divide_no_nan(
        choices - tf.reduce_sum(tf.cast(self.kept, tf.float32)), choices)


def check_logits(logits) -> tuple[tf.Tensor, int | tf.Tensor, int]:
  """<float32>[T, E] logits from a tensor, NumPy array or nested list (as TF ops accept), T, E.

  T is an int when static, else an <int32>[] tensor (a Keras model with an unknown batch size);
  E must be static (it sizes the router and the expert buffers).
  """
  try:
    logits = tf.convert_to_tensor(logits)
  except (TypeError, ValueError) as err:
    raise TypeError(f"router logits must be a [T, E] tensor, array or nested list of numbers, got "
                    f"{type(logits).__name__}: {err}") from None
  if not (logits.dtype.is_floating or logits.dtype.is_integer):
    raise TypeError(f"router logits must be numbers, got dtype {logits.dtype.name}")
  if logits.shape.rank != 2:
    raise ValueError(f"router logits must be [T, E], got shape {logits.shape}")
  t, e = logits.shape
  if e is None:
    raise ValueError(f"router logits need a static number of experts E, got shape {logits.shape}")
  if t is None:
    t = tf.shape(logits)[0]
  return tf.cast(logits, tf.float32), t, e


def check_normalization(normalization: str) -> None:
  """ValueError unless `normalization` is one of `NORMALIZATIONS`."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization={normalization!r}; allowed: {NORMALIZATIONS}")


def check_second_expert_policy(second_expert_policy: str) -> None:
  """ValueError unless `second_expert_policy` is one of `SECOND_EXPERT_POLICIES`."""
  if second_expert_policy not in SECOND_EXPERT_POLICIES:
    raise ValueError(f"second_expert_policy={second_expert_policy!r}; allowed: "
                     f"{SECOND_EXPERT_POLICIES}")


def check_drop_policy(drop_policy: str) -> None:
  """ValueError unless `drop_policy` is one of `DROP_POLICIES`."""
  if drop_policy not in DROP_POLICIES:
    raise ValueError(f"drop_policy={drop_policy!r}; allowed: {DROP_POLICIES}")


def _normalize(gates: tf.Tensor, top_logits: tf.Tensor, normalization: str, k: int) -> tf.Tensor:
  """Gate values of the K choices, <float32>[K, T], before capacity drops."""
  check_normalization(normalization)
  if normalization == "auto":
    # Top-1 keeps the raw probability so that the router receives a gradient (Switch);
    # k > 1 renormalises over the chosen k (GShard).
    normalization = "none" if k == 1 else "renormalize"
  if normalization == "none":
    return gates
  if normalization == "renormalize":
    return gates / tf.maximum(tf.reduce_sum(gates, axis=0, keepdims=True), 1e-9)
  # The paper's eq. (1): softmax over the top-k *logits*. In exact arithmetic this equals
  # "renormalize"; it is computed from the logits, which is what the literal form means.
  return tf.nn.softmax(top_logits, axis=0)


def check_capacity(capacity_) -> None:
  """ValueError for a static capacity below 1."""
  # A run-time C (a tensor) comes from `capacity_tensor`, which is >= min_capacity >= 1.
  if not tf.is_tensor(capacity_) and capacity_ < 1:
    raise ValueError(f"capacity={capacity_} must be >= 1")


def valid_mask(token_mask, num_tokens):
  """<bool>[T] tokens that take part in routing: `token_mask` checked, or all of them."""
  if token_mask is None:
    return tf.ones([num_tokens], tf.bool)
  token_mask = tf.convert_to_tensor(token_mask)
  static_t = num_tokens if isinstance(num_tokens, int) else None
  if token_mask.shape.rank != 1 or token_mask.shape[0] not in (None, static_t):
    raise ValueError(f"token_mask must be [T={num_tokens}], got shape {token_mask.shape}")
  return tf.cast(token_mask, tf.bool)


def _used_choices(chosen_probs: tf.Tensor, valid: tf.Tensor, second_expert_policy: str,
                  uniform) -> tf.Tensor:
  """<bool>[K, T] choices that take part in routing.

  "all": every real token's K choices. "random" (GShard's Top2Gating): the first choice is
  always used; choice r ≥ 1 is used iff `uniform[r-1] < k · p_r / Σ_j p_j`, the p the router
  probabilities of the token's k chosen experts. At k = 2 that is GShard's
  `uniform < g2 / 0.5` with g2 = p_2 / (p_1 + p_2), i.e. a second expert holding at least half
  of the pair's weight is always used and a weaker one with probability 2·g2. For k > 2 every
  choice after the first gets the same rule with threshold 1/k (its even share of the top k);
  each draw decides its own choice, the shares being those of all k before any is skipped.

  Args:
    chosen_probs: <float32>[K, T] router probabilities of the chosen experts, best first.
    valid: <bool>[T] real tokens.
    second_expert_policy: "all" or "random".
    uniform: for "random" with K > 1, <float32>[K-1, T] draws in [0, 1); else None.
  """
  k, num_tokens = chosen_probs.shape
  used = tf.tile(valid[None, :], [k, 1])                                  # [K, T]
  static_t = num_tokens                                                   # None: run-time T
  if second_expert_policy == "all":
    if uniform is not None:
      raise ValueError("uniform draws are only used by second_expert_policy='random'; pass "
                       "uniform=None with second_expert_policy='all'")
    return used
  if k == 1:
    if uniform is not None and not tf.convert_to_tensor(uniform).shape.is_compatible_with(
        [0, static_t]):
      raise ValueError(f"uniform must be None or [0, T={static_t}] for k=1 (no second "
                       f"choice), got shape {tf.convert_to_tensor(uniform).shape}")
    return used
  if uniform is None:
    raise ValueError(f"second_expert_policy='random' needs uniform=<float32>[k-1={k - 1}, "
                     f"T={num_tokens}] draws in [0, 1) (the routing stays a pure function)")
  uniform = tf.cast(tf.convert_to_tensor(uniform), tf.float32)
  if not uniform.shape.is_compatible_with([k - 1, static_t]) or uniform.shape[0] is None:
    raise ValueError(f"uniform must have shape [k-1={k - 1}, T={static_t}], got "
                     f"{uniform.shape}")
  # Probabilities, not the normalised gates: the rule is GShard's whatever `normalization` is.
  # The top probability is ≥ 1/E, so the sum is never 0.
  share = tf.stop_gradient(chosen_probs[1:] / tf.reduce_sum(chosen_probs, axis=0))  # [K-1, T]
  sampled = uniform < share * float(k)                                    # [K-1, T]
  first = (tf.ones([1, num_tokens], tf.bool) if num_tokens is not None
           else tf.ones_like(sampled[:1]))                                # [1, T]
  return tf.logical_and(used, tf.concat([first, sampled], axis=0))


def _slots_by_position(expert_index: tf.Tensor, used: tf.Tensor, capacity_: int,
                       num_experts: int) -> tf.Tensor:
  """<int32>[K, T] slots in round order, then token order (the looped-argmax priority)."""
  placed = tf.zeros([num_experts], tf.int32)                              # tokens kept so far, [E]
  slots = []
  for r in range(expert_index.shape[0]):
    mask = tf.one_hot(expert_index[r], num_experts, dtype=tf.int32)       # [T, E]
    mask *= tf.cast(used[r], tf.int32)[:, None]                           # used choices only
    # Position of each token among the tokens choosing the same expert in this round,
    # after those already placed there by earlier rounds.
    position = tf.cumsum(mask, axis=0, exclusive=True) + placed[None, :]  # [T, E]
    slots.append(tf.reduce_sum(position * mask, axis=-1))                 # [T]
    placed = tf.minimum(placed + tf.reduce_sum(mask, axis=0), capacity_)
  return tf.stack(slots)


def _slots_by_probability(expert_index: tf.Tensor, used: tf.Tensor, gate: tf.Tensor,
                          num_experts: int) -> tf.Tensor:
  """<int32>[K, T] slot = rank of the choice among its expert's used choices by gate.

  All K rounds compete together inside an expert (as Megatron-Core's "probs" policy takes the
  top C of every expert's column over all token-choices): the C largest gates get slots
  0..C-1, so `slot < C` keeps exactly them and kept slots stay unique per expert. Equal gates
  go to the earlier choice in round-then-token order (the "position" priority), so the result
  is deterministic. Two stable sorts of the K·T choices (gate descending, then expert) cost
  O(K·T log(K·T)); no [K·T, K·T] comparison is formed.
  """
  k, num_tokens = expert_index.shape
  n = k * num_tokens if num_tokens is not None else tf.size(expert_index)  # K·T
  # Unused choices go to an extra bucket E, after every real expert, so they take no rank there.
  bucket = tf.reshape(tf.where(used, expert_index, num_experts), [-1])  # [K·T]
  by_gate = tf.argsort(tf.reshape(tf.stop_gradient(gate), [-1]), direction="DESCENDING",
                       stable=True)                                       # [K·T]
  order = tf.gather(by_gate, tf.argsort(tf.gather(bucket, by_gate), stable=True))  # [K·T]
  counts = tf.math.unsorted_segment_sum(tf.ones([n], tf.int32), bucket, num_experts + 1)
  start = tf.cumsum(counts, exclusive=True)                               # [E+1]
  rank_sorted = tf.range(n, dtype=tf.int32) - tf.gather(start, tf.gather(bucket, order))
  rank = tf.gather(rank_sorted, tf.math.invert_permutation(order))        # [K·T]
  return tf.reshape(rank, [k, -1 if num_tokens is None else num_tokens])


def finish(expert_index, slot, gates, probs, logits_z, first_choice, capacity_, num_experts,
           balance_groups, valid, used) -> Routing:
  """Builds both placement forms from [K, T] choices and computes the router losses."""
  kept = tf.logical_and(slot < capacity_, used)                          # [K, T]
  gate = tf.where(kept, gates, tf.zeros_like(gates))                     # [K, T]
  tokens_per_expert = tf.math.unsorted_segment_sum(
      tf.reshape(tf.cast(kept, tf.int32), [-1]), tf.reshape(expert_index, [-1]), num_experts)

  # Switch load balance per balance group of G experts: G · Σ_i f_i · P_i, where f_i is the
  # fraction of tokens whose (first) choice is i before capacity and P_i the mean probability.
  v = tf.cast(valid, tf.float32)                                          # [T]
  t = tf.maximum(tf.reduce_sum(v), 1.0)
  z, g = balance_groups, num_experts // balance_groups
  f = tf.reshape(tf.reduce_sum(first_choice * v[:, None], axis=0) / t, [z, g])  # [Z, F]
  p = tf.reshape(tf.reduce_sum(probs * v[:, None], axis=0) / t, [z, g])         # [Z, F]
  aux_loss = tf.reduce_mean(g * tf.reduce_sum(f * p, axis=-1))
  lse2 = tf.square(tf.reduce_logsumexp(logits_z, axis=-1))               # [T] or [T, Z]
  lse2 = tf.reshape(lse2, [tf.shape(lse2)[0], -1])
  z_loss = tf.reduce_sum(tf.reduce_mean(lse2, axis=-1) * v) / t
  return Routing(
      expert_index=expert_index,
      slot=slot,
      gate=gate,
      kept=kept,
      used=used,
      probs=probs,
      valid=valid,
      tokens_per_expert=tokens_per_expert,
      aux_loss=aux_loss,
      z_loss=z_loss,
      capacity=capacity_,
      num_experts=num_experts)


def top_k_choices(logits: tf.Tensor, k: int) -> list[tf.Tensor]:
  """The k best experts of every token, by looped argmax on the logits: k × <int32>[T].

  Choice r is the r-th largest logit, distinct from choices < r, ties to the lower index.
  Padding tokens get choices too (the caller masks them out), always k distinct ones.

  Args:
    logits: <float32>[T, E] scores whose order decides (logits, or any increasing function's
      arguments: the order of sigmoid(x) or softmax(x) is that of x).
    k: choices per token, 1 ≤ k ≤ E.
  """
  num_experts = logits.shape[-1]
  # An expert already chosen is marked with the lowest float32, and a -inf logit is lifted
  # just above it, so the choices stay distinct (TF's CPU argmax never picks a value <= the
  # lowest float32 over an earlier index: it would repeat expert 0).
  remaining = tf.maximum(logits, _ABOVE_CHOSEN)                           # [T, E]
  indices = []
  for _ in range(k):
    index = tf.argmax(remaining, axis=-1, output_type=tf.int32)           # [T]
    indices.append(index)
    # Mask the chosen expert so the next round picks the next best. Padding tokens must also
    # move on, or they would list the same expert k times.
    remaining = tf.where(tf.one_hot(index, num_experts) > 0, _CHOSEN, remaining)
  return indices


def assign_slots(expert_index: tf.Tensor, used: tf.Tensor, gate: tf.Tensor, capacity_,
                 num_experts: int, drop_policy: str) -> tf.Tensor:
  """<int32>[K, T] slot of every choice in its expert's buffer, by `drop_policy`.

  "position": the looped-argmax priority (round, then token order; `_slots_by_position`);
  "probability": rank by gate among the expert's choices (`_slots_by_probability`). A slot
  ≥ C means the choice is dropped; unused choices take no slot.
  """
  check_drop_policy(drop_policy)
  if drop_policy == "position":
    return _slots_by_position(expert_index, used, capacity_, num_experts)
  return _slots_by_probability(expert_index, used, gate, num_experts)


def top_k_routing(logits: tf.Tensor, *, k: int, capacity: int, normalization: str = "auto",
                  token_mask: tf.Tensor | None = None, second_expert_policy: str = "all",
                  drop_policy: str = "position", uniform: tf.Tensor | None = None) -> Routing:
  """Top-k routing by looped argmax (GShard / M6-T "top-k").

  Args:
    logits: <float32>[T, E] router logits.
    k: experts per token, 1 ≤ k ≤ E.
    capacity: C, slots per expert (see `capacity()`).
    normalization: "auto" (raw probability for k = 1, renormalised over the chosen k for k > 1),
      "none", "renormalize", or "softmax_topk" (the paper's eq. (1), softmax over top-k logits).
    token_mask: optional <bool>[T]; False tokens (padding) take no slot and get a zero output.
    second_expert_policy: "all" (every choice is used: the second paper's "naive" top-k) or
      "random" (GShard's Top2Gating: choice r ≥ 1 is used iff `uniform[r-1] < k·p_r / Σ_j p_j`
      over the k chosen probabilities, i.e. `uniform < 2·g2/(g1+g2)` at k = 2; see
      `_used_choices`). An unused choice takes no slot and its gate is 0. The other gates are
      not renormalised: as in GShard (lingvo's default `legacy_mtf_behavior`) the gates are
      normalised over all k before any choice is skipped or dropped, like a capacity drop.
    drop_policy: which choices an overflowing expert keeps: "position" (the looped-argmax
      priority: earlier rounds first, then earlier tokens) or "probability" (the C choices with
      the largest gates, all rounds competing together; ties to the earlier round, then token;
      see `_slots_by_probability`). Slots are then ranks by gate, largest gate in slot 0.
    uniform: <float32>[k-1, T] draws in [0, 1) for second_expert_policy="random" (None for
      "all", or for k = 1); draw them from a stateless RNG so that the routing stays a pure,
      reproducible function (`MoE.call(seed=...)`).

  Returns:
    A `Routing` with K = k choices per token.
  """
  logits, num_tokens, num_experts = check_logits(logits)
  if not 1 <= k <= num_experts:
    raise ValueError(f"k={k} must satisfy 1 <= k <= num_experts={num_experts}")
  check_capacity(capacity)
  check_second_expert_policy(second_expert_policy)
  check_drop_policy(drop_policy)
  valid = valid_mask(token_mask, num_tokens)
  probs = tf.nn.softmax(logits, axis=-1)                                  # [T, E]
  indices = top_k_choices(logits, k)                                      # K × [T]
  expert_index = tf.stack(indices)                                        # [K, T]
  chosen_probs = tf.stack([tf.gather(probs, i, batch_dims=1) for i in indices])  # [K, T]
  top_logits = tf.stack([tf.gather(logits, i, batch_dims=1) for i in indices])   # [K, T]
  gate = _normalize(chosen_probs, top_logits, normalization, k)           # [K, T]
  used = _used_choices(chosen_probs, valid, second_expert_policy, uniform)  # [K, T]
  slot = assign_slots(expert_index, used, gate, capacity, num_experts, drop_policy)
  first_choice = tf.one_hot(indices[0], num_experts) * tf.cast(valid, tf.float32)[:, None]
  return finish(expert_index, slot, gate, probs, logits, first_choice, capacity, num_experts,
                balance_groups=1, valid=valid, used=used)


def prototype_routing(logits: tf.Tensor, *, num_prototypes: int, capacity: int,
                      normalization: str = "none", token_mask: tf.Tensor | None = None,
                      drop_policy: str = "position") -> Routing:
  """Expert prototyping, "Z top-1" (M6-T §3.3): top-1 inside each of Z groups of F experts.

  Experts [z·F, (z+1)·F) form prototype z; each prototype has its own softmax over its F logits
  (the router's [M, F] slice). The output is `y = Σ_z Σ_j p_zj E_zj(x)` over the Z chosen experts.

  Args:
    logits: <float32>[T, E] router logits, E = Z·F.
    num_prototypes: Z, 1 ≤ Z ≤ E with E divisible by Z.
    capacity: C, slots per expert.
    normalization: "none" (default, the paper's per-prototype probability), "renormalize" (over
      the Z chosen gates), "softmax_topk" (softmax over the Z chosen logits), or "auto" (= "none").
    token_mask: optional <bool>[T]; False tokens (padding) take no slot and get a zero output.
    drop_policy: "position" (an expert keeps its first C tokens) or "probability" (the C tokens
      with the largest gates, ties to the earlier token; slots are ranks by gate). An expert
      only receives choices of its own prototype, so either way tokens compete per expert.

  There is no `second_expert_policy`: the Z choices are made in parallel, one per prototype, so
  none of them is a "second" choice (the routers table rejects "random" with prototype routing).

  Returns:
    A `Routing` with K = Z choices per token.
  """
  logits, num_tokens, num_experts = check_logits(logits)
  check_drop_policy(drop_policy)
  z = num_prototypes
  if not 1 <= z <= num_experts or num_experts % z:
    raise ValueError(f"num_prototypes={z} must divide num_experts={num_experts} (E = Z·F)")
  check_capacity(capacity)
  f = num_experts // z
  valid = valid_mask(token_mask, num_tokens)
  logits_z = tf.reshape(logits, [-1, z, f])                               # [T, Z, F]
  probs_z = tf.nn.softmax(logits_z, axis=-1)                              # [T, Z, F]
  local = tf.argmax(logits_z, axis=-1, output_type=tf.int32)             # [T, Z] on logits
  index = local + tf.range(z, dtype=tf.int32)[None, :] * f                # [T, Z] global expert
  mask = tf.reduce_sum(tf.one_hot(index, num_experts, dtype=tf.int32), axis=1)  # [T, E]
  mask *= tf.cast(valid, tf.int32)[:, None]
  gates = tf.gather(probs_z, local, batch_dims=2)                         # [T, Z]
  top_logits = tf.gather(logits_z, local, batch_dims=2)                   # [T, Z]
  if normalization == "auto":
    normalization = "none"
  gate = _normalize(tf.transpose(gates), tf.transpose(top_logits), normalization, z)  # [Z, T]
  used = tf.tile(valid[None, :], [z, 1])                                  # [Z, T]
  if drop_policy == "position":
    position = tf.cumsum(mask, axis=0, exclusive=True)                    # [T, E]
    slot = tf.transpose(tf.gather(position, index, batch_dims=1))         # [Z, T]
  else:
    slot = _slots_by_probability(tf.transpose(index), used, gate, num_experts)  # [Z, T]
  probs = tf.reshape(probs_z, [-1, num_experts])
  return finish(tf.transpose(index), slot, gate, probs, logits_z, tf.cast(mask, tf.float32),
                capacity, num_experts, balance_groups=z, valid=valid, used=used)


def coefficient_of_variation(tokens_per_expert: tf.Tensor) -> tf.Tensor:
  """Population std / mean of real tokens per expert (arXiv 2105.15082 §3.3, Figure 1), 0 when
  no token was kept."""
  x = tf.cast(tokens_per_expert, tf.float32)
  mean = tf.reduce_mean(x)
  return tf.math.divide_no_nan(tf.math.reduce_std(x), mean)

