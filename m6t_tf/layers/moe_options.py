"""The options of the MoE layer, in one dataclass: default, type, check and doc of each.

`MoEOptions` is the one source of every option of `m6t_tf.layers.moe.MoE`: the layer's keyword
arguments, its validation, its `get_config`, gin's `MoEConfig` (`gin_config_class`) and the
planner's checks all come from its fields. Its fields are the common options below plus the
options of every registered router (`m6t_tf.layers.routers`), added when this module is
imported, so a router's own option needs no line here.

Checks run once, at construction (`MoEOptions.validate`): each field's own check, then the
rules between options, then the router's (`Router.check`). They raise ValueError with one line
naming the value and the fix; the trainer and the planner report it as a config error.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import Optional

import tensorflow as tf

from m6t_tf.layers import experts as experts_lib
from m6t_tf.layers import routers
from m6t_tf.layers import routing as routing_lib
from m6t_tf.layers.routers.base import option

#: "k" and "1" route under a capacity C (`routing.capacity`); "dropless" drops nothing.
CAPACITY_MODES = routing_lib.CAPACITY_MODES + ("dropless",)
DISPATCHES = ("einsum", "index")
EXPERT_TYPES = ("ffn", "linear")


def _routing(name, value):
  routers.get(value)


def _capacity_factor(name, value):
  if value is not None and not (_is_number(value) and value > 0):
    raise ValueError(f"{name}={value!r} must be > 0 (M6-T uses 1.25, the second paper 2.0)")


def _ceiling(name, value):
  if value is not None and not (_is_number(value) and value > 0):
    raise ValueError(f"{name}={value!r} must be > 0 (e.g. 4.0: an expert takes at most 4× its "
                     f"balanced share)")


def _fraction(name, value):
  if value is not None and not (_is_number(value) and 0.0 < value <= 1.0):
    raise ValueError(f"{name}={value!r} must be in (0, 1]: the share of positions that are "
                     f"real tokens (None = all)")


def _rate(name, value):
  if not (_is_number(value) and 0.0 <= value < 1.0):
    raise ValueError(f"{name}={value!r} must be in [0, 1)")


def _size(name, value):
  if value is not None and not (isinstance(value, int) and value >= 1):
    raise ValueError(f"{name}={value!r} must be >= 1")


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _with_router_options(cls):
  """Appends every registered router's option fields to `cls`, then makes it a dataclass."""
  annotations = cls.__dict__.get("__annotations__", {})
  for name, f in routers.base.option_fields().items():
    if name in annotations:
      raise ValueError(f"router option {name!r} clashes with a common MoE option")
    annotations[name] = f.type
    setattr(cls, name, dataclasses.field(default=f.default, metadata=f.metadata))
  routers.base.freeze_options()
  return dataclasses.dataclass(frozen=True)(cls)


@_with_router_options
class MoEOptions:
  """Every option of an MoE layer (see `m6t_tf.layers.moe.MoE` for how the layer uses them).

  Constructing one validates it (ValueError naming the bad value); the fields after the common
  ones are the registered routers' own options.
  """

  num_experts: int = option(dataclasses.MISSING,
                            "E, experts in total over the expert-parallel group",
                            routers.base.integer_at_least(1))
  intermediate_size: int = option(0, "I of the FFN experts (ignored for linear experts)",
                                  gin=False)
  routing: str = option("top_k", "the router, a name of the routers table "
                        "(`m6t_tf.layers.routers`), e.g. 'top_k' or 'prototype'", _routing)
  k: int = option(1, "choices per token; for 'prototype' the number of prototypes Z "
                  "(E must divide by Z)", routers.base.integer_at_least(1))
  capacity_factor: float = option(1.25, "γ at training time (1.25 in M6-T)", _capacity_factor)
  eval_capacity_factor: Optional[float] = option(
      None, "γ at evaluation (`training=False`); None: `capacity_factor`", _capacity_factor)
  capacity_mode: str = option(
      "k", "'k' (Capacity k×), '1' (Capacity 1×, the paper's limited setting) or 'dropless' "
      "(no capacity: every token reaches its k experts; the experts compute the real rows "
      "only, exchanged with variable-size all-to-alls)", routers.base.choice(*CAPACITY_MODES))
  normalization: str = option(
      "auto", "gate normalisation over the chosen experts: 'auto', 'none', 'renormalize' or "
      "'softmax_topk' (`routing.top_k_routing`)",
      lambda name, value: routing_lib.check_normalization(value))
  dispatch: str = option("index", "'index' (fast gather) or 'einsum' (GShard reference)",
                         routers.base.choice(*DISPATCHES))
  activation: str = option("gelu", "'relu', 'gelu' or 'swiglu' for FFN experts", gin=False)
  expert_type: str = option("ffn", "'ffn' (two matmuls) or 'linear' (one [e, M, N] matrix; "
                            "MoE attention)", routers.base.choice(*EXPERT_TYPES), gin=False)
  output_size: Optional[int] = option(None, "N of linear experts (None: M)", _size, gin=False)
  init_std: float = option(0.02, "truncated-normal std of the experts (0.002 at 1T)",
                           routers.base.positive(), gin=False)
  router_init_std: Optional[float] = option(None, "std of the router [M, E] (None: init_std)",
                                            routers.base.positive(), gin=False)
  dropout_rate: float = option(0.0, "dropout inside the experts", _rate, gin=False)
  aux_loss_weight: float = option(0.0, "coefficient of the Switch load-balance loss (0: off)",
                                  routers.base.non_negative)
  z_loss_weight: float = option(0.0, "coefficient of the router z-loss (0: off)",
                                routers.base.non_negative)
  min_capacity: int = option(1, "lower bound on C", routers.base.integer_at_least(1))
  drop_policy: str = option(
      "position", "which tokens an overflowing expert keeps: 'position' (earlier rounds, then "
      "earlier tokens) or 'probability' (the C with the largest gates, Megatron-Core's "
      "'probs')", lambda name, value: routing_lib.check_drop_policy(value))
  max_tokens_per_expert_factor: Optional[float] = option(
      None, "dropless only, a memory guard: an expert takes at most ceil(factor · k·T / E) "
      "choices of a call and drops the rest (counted in stats['dropped_fraction']; the "
      "trainer warns). None: no ceiling", _ceiling)
  num_groups: int = option(
      1, "O outer-batch groups (the second paper; axlearn's outer_batch): the T tokens split "
      "into O contiguous groups, each routed and "
      "capacity-limited on its own (C from G = ceil(T/O) tokens); one all-to-all carries all "
      "groups. The last group is filled up with masked positions when O does not divide T",
      routers.base.integer_at_least(1))
  capacity_token_fraction: Optional[float] = option(
      None, "the share of a call's T positions that are real tokens (padding is not routed): "
      "C is computed from that many tokens, so γ is the effective capacity factor over the "
      "tokens routed. None or 1.0: every position (the paper's rule). The trainer binds it "
      "from the data (REAL_TOKEN_FRACTION, gin/demo.gin)", _fraction)

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError for the first bad value: each option's check, then the rules between
    options, then the router's own."""
    routers.base.check_fields(self)
    if self.k > self.num_experts:
      raise ValueError(f"k={self.k} must be <= num_experts={self.num_experts}")
    if self.max_tokens_per_expert_factor is not None and self.capacity_mode != "dropless":
      raise ValueError(f"max_tokens_per_expert_factor={self.max_tokens_per_expert_factor!r} is "
                       f"the dropless memory guard; capacity_mode={self.capacity_mode!r} has a "
                       f"capacity already (capacity_factor): set capacity_mode='dropless' or "
                       f"drop it")
    if self.num_groups > 1 and self.capacity_mode == "dropless":
      raise ValueError(f"num_groups={self.num_groups} splits the capacity into groups; "
                       f"capacity_mode='dropless' has none: use num_groups=1")
    if self.expert_type == "ffn":
      experts_lib.activation_fn(self.activation)
      if not (isinstance(self.intermediate_size, int) and self.intermediate_size >= 1):
        raise ValueError(f"intermediate_size={self.intermediate_size!r} must be >= 1 for FFN "
                         f"experts")
    routers.base.check_foreign_options(self.routing, self.as_dict())
    routers.get(self.routing).check(self)

  def as_dict(self) -> dict:
    """{option: value} of every field (the layer's `get_config` entries)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def group_size(self, num_tokens):
    """Tokens per routing group in a call of `num_tokens` tokens: ceil(T / O)."""
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


def option_names() -> tuple[str, ...]:
  """Every option name, in field order."""
  return tuple(f.name for f in dataclasses.fields(MoEOptions))


def describe() -> list[tuple[str, str, object, str]]:
  """(name, type, default, doc) of every option, for docs and the README's options table.
  The default of a required option is `dataclasses.MISSING`."""
  return [(f.name, str(f.type), f.default, f.metadata["doc"])
          for f in dataclasses.fields(MoEOptions)]


def signature(leading=(), extra=()) -> inspect.Signature:
  """A call signature over the options: `leading` ones positional-or-keyword, the others
  keyword-only with their defaults, then the `extra` `inspect.Parameter`s."""
  params = []
  for f in dataclasses.fields(MoEOptions):
    kind = (inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name in leading
            else inspect.Parameter.KEYWORD_ONLY)
    default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
    params.append(inspect.Parameter(f.name, kind, default=default, annotation=f.type))
  params.sort(key=lambda p: p.kind)   # stable: positional ones first, in field order
  return inspect.Signature(params + list(extra))


def gin_config_class(name: str, module: str, **defaults) -> type:
  """A dataclass of the gin-bound MoE options, for `gin.external_configurable`.

  Its fields are `MoEOptions`' except those the network sets itself (`gin=False`: sizes,
  activation, initialisation), with `defaults` overriding theirs; `kwargs()` gives the layer's
  keyword arguments. A router's option is thereby a binding `<name>.<option>` as soon as the
  router is registered.
  """
  fields, lines = [], []
  for f in dataclasses.fields(MoEOptions):
    if not f.metadata["gin"]:
      continue
    default = defaults.get(f.name, f.default)
    fields.append((f.name, f.type, dataclasses.field(default=default)))
    lines.append(f"  {f.name}: {f.metadata['doc']}.")
  cls = dataclasses.make_dataclass(
      name, fields, namespace={"kwargs": lambda self: dataclasses.asdict(self)})
  cls.__module__ = module
  cls.__doc__ = ("Keyword arguments of every MoE layer of the network (`MoEOptions`'s gin-bound "
                 "fields; see `m6t_tf.layers.moe.MoE`).\n\nAttributes:\n" + "\n".join(lines))
  return cls
