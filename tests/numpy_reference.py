"""A pure-NumPy reference of M6-T routing, capacity and the MoE forward pass (arXiv 2105.15082
§2-3).

Written from the specification, not from the TensorFlow code, and deliberately naive: explicit
Python loops over rounds, tokens and experts, float64 arithmetic, so that it is easy to check by
eye. The tests compare `m6t_tf.layers.routing` / `m6t_tf.layers.moe` against it.

Conventions (the letters of `m6t_tf.layers.moe`):
  T tokens, E experts, C capacity, K choices per token (k for top-k, Z for prototypes).

Choices: the argmax of the logits, never of the probabilities (float32 probabilities more than
~90 below the top one underflow to 0.0 and would tie); gates come from the probabilities.

Ties: argmax picks the lowest expert index (NumPy's and TensorFlow's `argmax` both do), so
e.g. all-zero logits send every token to expert 0 first, expert 1 second, and so on.
"""

from __future__ import annotations

import dataclasses
import fractions
import math

import numpy as np


def capacity(num_tokens, num_experts, *, k=1, capacity_factor=1.25, mode="k", min_capacity=1):
  """C = ceil(k' · T / E · γ), k' = k for "Capacity k×" and 1 for "Capacity 1×", exactly.

  γ is taken as the decimal number it was written as (1.1 means 11/10), in exact rational
  arithmetic, so no float rounding can push an integer product up to the next integer.
  """
  k_eff = k if mode == "k" else 1
  exact = fractions.Fraction(k_eff * num_tokens, num_experts) * fractions.Fraction(
      repr(float(capacity_factor)))
  return max(min_capacity, math.ceil(exact))


def softmax(x, axis=-1):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def logsumexp(x, axis=-1):
  x = np.asarray(x, np.float64)
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


@dataclasses.dataclass
class Routing:
  expert_index: np.ndarray      # int   [K, T]
  slot: np.ndarray              # int   [K, T]  position in the expert (may be >= C); -1 padding
  kept: np.ndarray              # bool  [K, T]
  gate: np.ndarray              # float [K, T]  0 where not kept
  probs: np.ndarray             # float [T, E]  (per-prototype softmax for prototypes)
  combine_weights: np.ndarray   # float [T, E, C]
  dispatch_mask: np.ndarray     # bool  [T, E, C]
  tokens_per_expert: np.ndarray  # int  [E]
  aux_loss: float
  z_loss: float
  dropped_fraction: float
  capacity: int


def _gates(chosen_probs, chosen_logits, normalization):
  """[K] gate values of one token's K choices (before capacity)."""
  if normalization == "none":
    return chosen_probs
  if normalization == "renormalize":
    return chosen_probs / chosen_probs.sum()
  if normalization == "softmax_topk":
    return softmax(chosen_logits)
  raise ValueError(normalization)


def _assemble(expert_index, slot, kept, gate, probs, cap, num_experts, valid):
  num_choices, num_tokens = expert_index.shape
  combine = np.zeros((num_tokens, num_experts, cap))
  dispatch = np.zeros((num_tokens, num_experts, cap), bool)
  tokens_per_expert = np.zeros(num_experts, np.int64)
  for r in range(num_choices):
    for t in range(num_tokens):
      if kept[r, t]:
        e, s = expert_index[r, t], slot[r, t]
        combine[t, e, s] = gate[r, t]
        dispatch[t, e, s] = True
        tokens_per_expert[e] += 1
  n_valid = int(valid.sum())
  dropped = 0.0 if n_valid == 0 else 1.0 - kept.sum() / (num_choices * n_valid)
  return combine, dispatch, tokens_per_expert, dropped


def top_k_routing(logits, *, k, capacity, normalization="auto", token_mask=None):
  """Looped-argmax top-k routing.

  Round r (r = 0..k-1) takes every token's r-th best expert. Inside an expert, round r's tokens
  are placed in token order *after* every token that rounds < r kept there; a token whose
  position reaches C is dropped for that expert. Padding tokens (token_mask False) are routed
  nowhere and take no position.
  """
  logits = np.asarray(logits, np.float64)
  num_tokens, num_experts = logits.shape
  if normalization == "auto":
    normalization = "none" if k == 1 else "renormalize"
  valid = np.ones(num_tokens, bool) if token_mask is None else np.asarray(token_mask, bool)
  probs = softmax(logits)

  # The k choices of every token, best first.
  expert_index = np.zeros((k, num_tokens), np.int64)
  for t in range(num_tokens):
    remaining = logits[t].copy()
    for r in range(k):
      e = int(np.argmax(remaining))
      expert_index[r, t] = e
      remaining[e] = -np.inf

  slot = np.full((k, num_tokens), -1, np.int64)
  kept = np.zeros((k, num_tokens), bool)
  kept_so_far = np.zeros(num_experts, np.int64)    # tokens held by each expert after earlier rounds
  for r in range(k):
    next_position = kept_so_far.copy()
    for t in range(num_tokens):
      if not valid[t]:
        continue
      e = expert_index[r, t]
      slot[r, t] = next_position[e]
      next_position[e] += 1
      kept[r, t] = slot[r, t] < capacity
    kept_so_far = np.minimum(next_position, capacity)

  gate = np.zeros((k, num_tokens))
  for t in range(num_tokens):
    g = _gates(probs[t, expert_index[:, t]], logits[t, expert_index[:, t]], normalization)
    gate[:, t] = np.where(kept[:, t], g, 0.0)

  combine, dispatch, tpe, dropped = _assemble(expert_index, slot, kept, gate, probs, capacity,
                                              num_experts, valid)
  # Switch load balance: E · Σ_i f_i · P_i over real tokens, f from first choices before capacity.
  n = max(valid.sum(), 1)
  f = np.zeros(num_experts)
  for t in range(num_tokens):
    if valid[t]:
      f[expert_index[0, t]] += 1.0 / n
  p = probs[valid].sum(axis=0) / n
  aux = num_experts * float((f * p).sum())
  z = float((logsumexp(logits)[valid] ** 2).sum() / n)
  return Routing(expert_index, slot, kept, gate, probs, combine, dispatch, tpe, aux, z, dropped,
                 capacity)


def prototype_routing(logits, *, num_prototypes, capacity, normalization="none",
                      token_mask=None):
  """Expert prototyping ("Z top-1"): experts [z·F, (z+1)·F) form prototype z; each prototype
  takes a softmax over its own F logits and sends the token to its best expert. Every expert
  belongs to one prototype, so it simply keeps its first C real tokens in token order."""
  logits = np.asarray(logits, np.float64)
  num_tokens, num_experts = logits.shape
  z_count = num_prototypes
  f_size = num_experts // z_count
  if normalization == "auto":
    normalization = "none"
  valid = np.ones(num_tokens, bool) if token_mask is None else np.asarray(token_mask, bool)

  probs = np.zeros((num_tokens, num_experts))
  expert_index = np.zeros((z_count, num_tokens), np.int64)
  for z in range(z_count):
    group = slice(z * f_size, (z + 1) * f_size)
    probs[:, group] = softmax(logits[:, group])
    for t in range(num_tokens):
      expert_index[z, t] = z * f_size + int(np.argmax(logits[t, group]))

  slot = np.full((z_count, num_tokens), -1, np.int64)
  kept = np.zeros((z_count, num_tokens), bool)
  next_position = np.zeros(num_experts, np.int64)
  for t in range(num_tokens):
    if not valid[t]:
      continue
    for z in range(z_count):
      e = expert_index[z, t]
      slot[z, t] = next_position[e]
      next_position[e] += 1
      kept[z, t] = slot[z, t] < capacity

  gate = np.zeros((z_count, num_tokens))
  for t in range(num_tokens):
    g = _gates(probs[t, expert_index[:, t]], logits[t, expert_index[:, t]], normalization)
    gate[:, t] = np.where(kept[:, t], g, 0.0)

  combine, dispatch, tpe, dropped = _assemble(expert_index, slot, kept, gate, probs, capacity,
                                              num_experts, valid)
  # Load balance per prototype (F · Σ_j f_j · P_j inside the prototype), averaged over prototypes;
  # z-loss averages logsumexp² of each prototype's own logits over tokens and prototypes.
  n = max(valid.sum(), 1)
  aux = 0.0
  lse2 = np.zeros(num_tokens)
  for z in range(z_count):
    group = slice(z * f_size, (z + 1) * f_size)
    f = np.zeros(f_size)
    for t in range(num_tokens):
      if valid[t]:
        f[expert_index[z, t] - z * f_size] += 1.0 / n
    p = probs[valid, group].sum(axis=0) / n
    aux += f_size * float((f * p).sum()) / z_count
    lse2 += logsumexp(logits[:, group]) ** 2 / z_count
  z_loss = float(lse2[valid].sum() / n)
  return Routing(expert_index, slot, kept, gate, probs, combine, dispatch, tpe, aux, z_loss,
                 dropped, capacity)


def route(logits, *, routing, k, capacity, normalization="auto", token_mask=None):
  if routing == "top_k":
    return top_k_routing(logits, k=k, capacity=capacity, normalization=normalization,
                         token_mask=token_mask)
  return prototype_routing(logits, num_prototypes=k, capacity=capacity,
                           normalization=normalization, token_mask=token_mask)


def coefficient_of_variation(tokens_per_expert):
  x = np.asarray(tokens_per_expert, np.float64)
  return 0.0 if x.mean() == 0 else float(x.std() / x.mean())   # population std (ddof=0)


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
  return x / (1.0 + np.exp(-x))


def ffn(x, wi, wo, activation, wi_gate=None):
  """One expert: [.., M] -> [.., M]."""
  h = x @ wi
  if activation == "relu":
    h = np.maximum(h, 0.0)
  elif activation == "gelu":
    h = gelu_tanh(h)
  elif activation == "swiglu":
    h = silu(x @ wi_gate) * h
  elif activation != "linear":
    raise ValueError(activation)
  return h @ wo


def moe_forward(x, router_kernel, wi, wo, *, activation, routing, k, capacity,
                normalization="auto", token_mask=None, wi_gate=None):
  """out[t] = Σ over token t's kept choices of gate · FFN_expert(x[t]); zero if none kept."""
  x = np.asarray(x, np.float64)
  r = route(x @ np.asarray(router_kernel, np.float64), routing=routing, k=k, capacity=capacity,
            normalization=normalization, token_mask=token_mask)
  out = np.zeros((x.shape[0], np.asarray(wo).shape[-1]))
  for c in range(r.expert_index.shape[0]):
    for t in range(x.shape[0]):
      if r.kept[c, t]:
        e = r.expert_index[c, t]
        out[t] += r.gate[c, t] * ffn(x[t], wi[e], wo[e], activation,
                                     None if wi_gate is None else wi_gate[e])
  return out, r


# ---------------------------------------------------------------------------------------------
# Adafactor, RMSNorm and RoPE (written from the papers, float64)
# ---------------------------------------------------------------------------------------------

class Adafactor:
  """Adafactor of Shazeer & Stern (2018, arXiv 1804.04235) for one weight, β₁ = 0.

  Algorithm 4 for every matrix and Algorithm 5 for vectors, as the paper writes them (row and
  column *sums* R_t = β̂₂ₜ R_{t-1} + (1 − β̂₂ₜ)(G² + ε₁)1_m, C_t likewise, V̂_t = R_t C_t / 1ᵀR_t),
  with β̂₂ₜ = 1 − t^decay_exponent and update clipping Û = U / max(1, RMS(U)/d) per matrix.
  A weight of rank ≥ 3 is a stack of matrices over its last two axes (an expert weight
  [e, M, I] is e matrices [M, I]); each one is factored and clipped on its own, so the update of
  an expert does not depend on which other experts share its worker.

  The documented differences of m6t_tf's variant: the step size is the learning rate itself
  (no relative step max(ε₂, RMS(X))·min(10⁻², 1/√t)), and the optional weight decay is decoupled:
  X_t = X_{t-1} − lr·wd·X_{t-1} − lr·Û_t.
  """

  def __init__(self, shape, *, decay_exponent=-0.8, epsilon_1=1e-30, clip_threshold=1.0,
               weight_decay=0.0):
    self.shape = tuple(shape)
    self.decay_exponent, self.epsilon_1 = decay_exponent, epsilon_1
    self.clip_threshold, self.weight_decay = clip_threshold, weight_decay
    self.t = 0
    self.factored = len(self.shape) >= 2
    if self.factored:
      lead, (n, m) = self.shape[:-2], self.shape[-2:]
      self.row = {i: np.zeros(n) for i in np.ndindex(*lead)}    # R per matrix
      self.col = {i: np.zeros(m) for i in np.ndindex(*lead)}    # C per matrix
    else:
      self.v = np.zeros(self.shape)
    self.clipped = []   # per step: whether any matrix (or the vector) was clipped

  def _clip(self, u):
    rms = math.sqrt(np.mean(u * u))
    return u / max(1.0, rms / self.clip_threshold), rms > self.clip_threshold

  def step(self, x, g, lr):
    """One update of weight `x` with gradient `g` at learning rate `lr`; returns the new x."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    self.t += 1
    beta = 1.0 - self.t ** self.decay_exponent
    if self.factored:
      update = np.zeros_like(g)
      clipped = False
      for i in self.row:
        g2 = g[i] ** 2 + self.epsilon_1                            # [n, m]
        self.row[i] = beta * self.row[i] + (1 - beta) * g2.sum(axis=1)
        self.col[i] = beta * self.col[i] + (1 - beta) * g2.sum(axis=0)
        v_hat = np.outer(self.row[i], self.col[i]) / self.row[i].sum()
        update[i], c = self._clip(g[i] / np.sqrt(v_hat))
        clipped = clipped or c
    else:
      self.v = beta * self.v + (1 - beta) * (g ** 2 + self.epsilon_1)
      update, clipped = self._clip(g / np.sqrt(self.v))
    self.clipped.append(clipped)
    return x - lr * self.weight_decay * x - lr * update


def rms_norm(x, scale, epsilon):
  """x / sqrt(mean(x²) + ε) · scale over the last axis (Zhang & Sennrich 2019), float64."""
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + epsilon) * scale


def rotary_half_split(x, positions, base=10000.0):
  """RoPE (Su et al. 2021) in the half-split ("rotate_half", GPT-NeoX / LLaMA-HF) layout.

  Feature j of the first half and feature j + d/2 are the real and imaginary parts of one
  complex number, turned by the angle position · base^(−2j/d). x: [B, S, H, d], positions: [S].
  """
  x = np.asarray(x, np.float64)
  d = x.shape[-1]
  z = x[..., :d // 2] + 1j * x[..., d // 2:]
  theta = np.asarray(positions, np.float64)[:, None] * base ** (-2.0 * np.arange(d // 2) / d)
  z = z * np.exp(1j * theta)[None, :, None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


# ---------------------------------------------------------------------------------------------
# Routing policies: which choices are used (second_expert_policy) and which tokens a full expert
# keeps (drop_policy), written from the routing docstrings, with explicit loops
# ---------------------------------------------------------------------------------------------

def _place_with_policies(expert_index, gate_before, chosen_probs, valid, capacity, num_experts,
                         *, second_expert_policy, drop_policy, uniform):
  """Used choices, slots and kept choices of one routing.

  Used: the first choice of a real token always; choice r ≥ 1 under "random" only when
  uniform[r-1, t] < K · p_r / Σ_j p_j over the token's K chosen probabilities (GShard's
  2·g2/(g1+g2) at K = 2). Unused choices take no slot (slot -1).

  "position": as `top_k_routing` above, over used choices only: round r's choices take
  positions in token order after the tokens earlier rounds kept (an expert of a prototype only
  ever appears in one round, so this is token order there).
  "probability": each expert ranks its used choices by gate, largest first, equal gates in
  round-then-token order; slot = rank, kept = rank < C.
  """
  num_choices, num_tokens = expert_index.shape
  used = np.zeros((num_choices, num_tokens), bool)
  for r in range(num_choices):
    for t in range(num_tokens):
      if not valid[t]:
        continue
      if r == 0 or second_expert_policy == "all":
        used[r, t] = True
      else:
        share = chosen_probs[r, t] / chosen_probs[:, t].sum()
        used[r, t] = uniform[r - 1, t] < num_choices * share
  slot = np.full((num_choices, num_tokens), -1, np.int64)
  if drop_policy == "position":
    kept_so_far = np.zeros(num_experts, np.int64)
    for r in range(num_choices):
      next_position = kept_so_far.copy()
      for t in range(num_tokens):
        if used[r, t]:
          slot[r, t] = next_position[expert_index[r, t]]
          next_position[expert_index[r, t]] += 1
      kept_so_far = np.minimum(next_position, capacity)
  elif drop_policy == "probability":
    for e in range(num_experts):
      members = [(r, t) for r in range(num_choices) for t in range(num_tokens)
                 if used[r, t] and expert_index[r, t] == e]
      members.sort(key=lambda rt: (-gate_before[rt], rt[0], rt[1]))
      for rank, rt in enumerate(members):
        slot[rt] = rank
  else:
    raise ValueError(drop_policy)
  kept = used & (slot < capacity)
  return used, slot, kept


def routing_with_policies(logits, *, routing, k, capacity, normalization="auto", token_mask=None,
                          second_expert_policy="all", drop_policy="position", uniform=None):
  """`route` with a second-expert policy and a drop policy (the routing functions' defaults
  "all" / "position" give `route` exactly). Choices, probabilities and both router losses do
  not depend on the policies (the load-balance f counts first choices before capacity), so
  they are taken from `route`; the placement is redone. Returns (Routing, used)."""
  base = route(logits, routing=routing, k=k, capacity=capacity, normalization=normalization,
               token_mask=token_mask)
  logits = np.asarray(logits, np.float64)
  num_tokens, num_experts = logits.shape
  valid = np.ones(num_tokens, bool) if token_mask is None else np.asarray(token_mask, bool)
  if normalization == "auto":
    normalization = ("none" if k == 1 else "renormalize") if routing == "top_k" else "none"
  expert_index = base.expert_index
  chosen_probs = np.take_along_axis(base.probs, expert_index.T, axis=1).T       # [K, T]
  gate_before = np.zeros(expert_index.shape)
  for t in range(num_tokens):
    gate_before[:, t] = _gates(chosen_probs[:, t], logits[t, expert_index[:, t]], normalization)
  used, slot, kept = _place_with_policies(
      expert_index, gate_before, chosen_probs, valid, capacity, num_experts,
      second_expert_policy=second_expert_policy, drop_policy=drop_policy,
      uniform=None if uniform is None else np.asarray(uniform, np.float64))
  gate = np.where(kept, gate_before, 0.0)
  combine, dispatch, tpe, _ = _assemble(expert_index, slot, kept, gate, base.probs, capacity,
                                        num_experts, valid)
  dropped = 0.0 if used.sum() == 0 else 1.0 - kept.sum() / used.sum()
  return Routing(expert_index, slot, kept, gate, base.probs, combine, dispatch, tpe,
                 base.aux_loss, base.z_loss, dropped, capacity), used
