"""Sigmoid gating (DeepSeek-V3, arXiv 2412.19437 §2.1.2).

Each expert's affinity to a token is a sigmoid of its logit, s_i = σ(x·w_i), not a softmax
over all experts; the token takes the k experts of largest s, and their gates are those
scores normalised over the chosen k, times a route scale ρ (the routed scaling factor of
DeepSeek-V3's released models; 1 by default):

    g_i = ρ · s_i / Σ_{j chosen} s_j   for the k chosen experts, 0 for the others.

The choice is made on the logits (σ is increasing, so the order is the same, and no score
rounds to 0 or 1 to tie with another), and g_i is computed as ρ · softmax over the chosen of
log σ(x_i), the same quotient without dividing by an underflowed sum. Placement under
capacity, the drop policies, dispatch and dropless all work as for top-k (`routing`'s
building blocks). At k = 1 every gate is ρ: the router then learns only from the auxiliary
losses.

The load-balance loss keeps the layer's Switch form E·Σ_i f_i·P_i, with P_i the mean over the
tokens of s'_i = s_i / Σ_j s_j (the normalised affinities of DeepSeek-V3's sequence-wise
balance loss) and f_i the share of tokens whose first choice is i; the z-loss is that of the
logits.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from m6t_tf.layers import routing as routing_lib
from m6t_tf.layers.routers import base


@dataclasses.dataclass(frozen=True)
class SigmoidOptions:
  route_scale: float = base.option(
      1.0, "sigmoid routing: factor ρ of the normalised gates (DeepSeek-V3's routed scaling "
      "factor)", base.positive())


def sigmoid_routing(logits, *, k: int, capacity, route_scale: float = 1.0, token_mask=None,
                    drop_policy: str = "position") -> routing_lib.Routing:
  """Sigmoid scores, top-k, gates normalised over the chosen k (module docstring).

  Args:
    logits: <float32>[T, E] router logits.
    k: experts per token, 1 ≤ k ≤ E.
    capacity: C, slots per expert.
    route_scale: ρ, multiplies every gate.
    token_mask: optional <bool>[T]; False tokens (padding) take no slot and get a zero output.
    drop_policy: "position" (earlier rounds, then earlier tokens) or "probability" (the C
      choices with the largest gates).

  Returns:
    A `Routing` with K = k choices per token; `probs` holds s'_i = s_i / Σ_j s_j.
  """
  logits, num_tokens, num_experts = routing_lib.check_logits(logits)
  if not 1 <= k <= num_experts:
    raise ValueError(f"k={k} must satisfy 1 <= k <= num_experts={num_experts}")
  routing_lib.check_capacity(capacity)
  routing_lib.check_drop_policy(drop_policy)
  valid = routing_lib.valid_mask(token_mask, num_tokens)
  indices = routing_lib.top_k_choices(logits, k)                         # K × [T]
  expert_index = tf.stack(indices)                                        # [K, T]
  chosen = tf.stack([tf.gather(logits, i, batch_dims=1) for i in indices])  # [K, T]
  gate = route_scale * tf.nn.softmax(tf.math.log_sigmoid(chosen), axis=0)  # [K, T]
  used = tf.tile(valid[None, :], [k, 1])                                  # [K, T]
  slot = routing_lib.assign_slots(expert_index, used, gate, capacity, num_experts, drop_policy)
  normalised = tf.nn.softmax(tf.math.log_sigmoid(logits), axis=-1)        # [T, E] s'
  first_choice = tf.one_hot(indices[0], num_experts) * tf.cast(valid, tf.float32)[:, None]
  return routing_lib.finish(expert_index, slot, gate, normalised, logits, first_choice,
                            capacity, num_experts, balance_groups=1, valid=valid, used=used)


@base.register
class Sigmoid(base.Router):
  """DeepSeek-V3's sigmoid gating (`sigmoid_routing`)."""

  name = "sigmoid"
  Options = SigmoidOptions

  @classmethod
  def check(cls, options) -> None:
    if options.normalization != "auto":
      raise ValueError(f"normalization={options.normalization!r} does not apply to "
                       f"routing='sigmoid': its gates are the chosen scores over their sum; "
                       f"use normalization='auto'")

  def route(self, logits, *, capacity, token_mask=None, uniform=None, training=True):
    del uniform, training
    return sigmoid_routing(logits, k=self.options.k, capacity=capacity,
                           route_scale=self.options.route_scale, token_mask=token_mask,
                           drop_policy=self.options.drop_policy)
