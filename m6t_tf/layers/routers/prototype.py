"""Expert prototyping, "k top-1" (M6-T, arXiv 2105.15082 §3.3): the E experts form k groups
(prototypes) of E/k, and each token takes the top-1 expert of every group.

It reads only the common options; the routing itself is `routing.prototype_routing`.
"""

from __future__ import annotations

from m6t_tf.layers import routing as routing_lib
from m6t_tf.layers.routers import base


@base.register
class Prototype(base.Router):
  """Z = k prototypes of F = E/Z experts, top-1 in each (`routing.prototype_routing`)."""

  name = "prototype"

  @classmethod
  def check(cls, options) -> None:
    if options.num_experts % options.k:
      raise ValueError(f"num_experts={options.num_experts} must be divisible by the number of "
                       f"prototypes k={options.k} (E = Z·F)")

  def route(self, logits, *, capacity, token_mask=None, uniform=None, training=True):
    del training
    if uniform is not None:
      raise ValueError("prototype routing makes its k choices in parallel, none is a second "
                       "choice: it takes no uniform draws (second_expert_policy needs "
                       "routing='top_k')")
    return routing_lib.prototype_routing(
        logits, num_prototypes=self.options.k, capacity=capacity,
        normalization=self.options.normalization, token_mask=token_mask,
        drop_policy=self.options.drop_policy)
