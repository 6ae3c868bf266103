"""Top-k routing by looped argmax over all E experts (GShard; M6-T's "top-k").

Its own option is GShard's random second expert (`second_expert_policy`); the routing itself is
`routing.top_k_routing`.
"""

from __future__ import annotations

import dataclasses

from m6t_tf.layers import routing as routing_lib
from m6t_tf.layers.routers import base


@dataclasses.dataclass(frozen=True)
class TopKOptions:
  second_expert_policy: str = base.option(
      "all", "'all' (every one of the k choices is used) or 'random' (GShard: a choice after "
      "the first is used with probability min(1, k·p_r / Σ p) over the k chosen probabilities, "
      "2·g2/(g1+g2) at k = 2), at training only: evaluation and decoding use every choice, so "
      "they stay deterministic (Mesh-TF's default also samples at evaluation)",
      lambda name, value: routing_lib.check_second_expert_policy(value))


@base.register
class TopK(base.Router):
  """Looped argmax (`routing.top_k_routing`): round r places every token's r-th choice after
  all choices of earlier rounds, so first choices beat second choices."""

  name = "top_k"
  Options = TopKOptions

  @property
  def draws_at_training(self) -> bool:
    return self.options.second_expert_policy == "random"

  def random_draws(self, training: bool) -> int:
    return self.options.k - 1 if self.draws_at_training and training else 0

  def route(self, logits, *, capacity, token_mask=None, uniform=None, training=True):
    # The random second expert applies at training only: evaluation and decoding are
    # deterministic (and C = T decoding stays batch invariant).
    policy = self.options.second_expert_policy if training else "all"
    return routing_lib.top_k_routing(
        logits, k=self.options.k, capacity=capacity, normalization=self.options.normalization,
        token_mask=token_mask, second_expert_policy=policy,
        drop_policy=self.options.drop_policy, uniform=uniform)
