"""The routers of the MoE layer, one module each, registered in one table (`base.ROUTERS`).

Importing this package imports every module in it, and each registers its router, so a new
router is one new module here (and its test): the MoE layer, its options, `get_config`, gin's
`MoEConfig` and the planner find it in the table. See `base` for what a router is, and each
module's docstring for its rule (`names()` lists them).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
from typing import Optional

from m6t_tf.layers import routing as routing_lib
from m6t_tf.layers.routers import base
from m6t_tf.layers.routers.base import ROUTERS, Router, get, option, register  # noqa: F401

# Every module of the package registers its router on import. Sorted: the table's order (and
# the order of the options each router adds) does not depend on the filesystem's.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
  if _module != "base":
    importlib.import_module(f"{__name__}.{_module}")


def names() -> tuple[str, ...]:
  """The registered router names."""
  return tuple(ROUTERS)


def route(logits, *, routing, capacity, k: Optional[int] = None, normalization: str = "auto",
          token_mask=None, drop_policy: str = "position", uniform=None, training: bool = True,
          **router_options) -> routing_lib.Routing:
  """Routes <float32>[T, E] `logits` with a router of the table (a pure function of its inputs,
  and of the router's state if it has one).

  Args:
    logits: router logits.
    routing: a registered router name (`names()`), or a `Router` instance (an MoE layer's
      `gating`), whose options then apply: k, normalization, drop_policy and router options
      must not be given.
    capacity: C, slots per expert.
    k: choices per token (prototypes Z for "prototype"); required with a name.
    normalization, token_mask, drop_policy: the common routing options (`MoE`).
    uniform: the draws the router needs (e.g. `top_k` with second_expert_policy="random").
    training: whether this is a training call.
    **router_options: options of the routers (`second_expert_policy`, ...); one of another
      router set away from its default raises ValueError.
  """
  if isinstance(routing, Router):
    router = routing
  else:
    if k is None:
      raise TypeError("route() needs k= with a router name")
    cls = get(routing)
    unknown = sorted(set(router_options) - set(base.option_fields()))
    if unknown:
      raise TypeError(f"route() got unknown router options {unknown}; known: "
                      f"{sorted(base.option_fields())}")
    base.check_foreign_options(routing, router_options)
    own = cls.Options(**{f.name: router_options[f.name]
                         for f in dataclasses.fields(cls.Options) if f.name in router_options})
    base.check_fields(own)
    logits, _, num_experts = routing_lib.check_logits(logits)
    router = cls(types.SimpleNamespace(k=k, normalization=normalization,
                                       drop_policy=drop_policy, num_experts=num_experts,
                                       **dataclasses.asdict(own)))
  return router.route(logits, capacity=capacity, token_mask=token_mask, uniform=uniform,
                      training=training)
