"""The table of routers: what a router is, how it declares its options, and how it is found.

A router turns router logits <float32>[T, E] into a `routing.Routing` (which experts, which
slots, which gates). Each one is a `Router` subclass registered under its name with
`@register`; its `Options` dataclass holds the options only it reads, each field made by
`option(default, doc, check)`. The MoE layer's options (`m6t_tf.layers.moe_options.MoEOptions`)
are the common ones plus every registered router's, so a router's option is a keyword of
`MoE(...)`, a key of its `get_config()` and a gin binding `MoEConfig.<name>`, with no other
file naming it. An option of one router set away from its default while another routes is an
error (`check_foreign_options`).

A router may own state: a non-trainable variable made in `build` with `layer.add_weight`
(saved in checkpoints with the layer's weights, replicated on every worker, never trained)
and updated in `after_step`, which the trainer calls for every MoE layer after each step
(`MoE.after_step`) with a function summing a tensor over all workers. Auxiliary-loss-free load
balancing (DeepSeek-V3, arXiv 2412.19437 §2.1.2) is the case this seam is for: a per-expert
bias added to the logits for the choice only, moved after each step by u·sign(mean load −
load) from the loads summed over the workers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import tensorflow as tf

from m6t_tf.layers import routing as routing_lib

#: name -> Router subclass, filled by `register` (the modules of this package register on import).
ROUTERS: dict[str, type["Router"]] = {}
# Set once `MoEOptions` has taken the routers' option fields (`freeze_options`).
_OPTIONS_FROZEN = []


def option(default: Any, doc: str, check: Optional[Callable[[str, Any], None]] = None, *,
           gin: bool = True) -> Any:
  """A dataclass field for an MoE option: its default, its doc and its check.

  Args:
    default: the value when not given (also `MoEConfig`'s default).
    doc: one sentence for people (the docstrings and the README's options table).
    check: `check(name, value)` raising ValueError with a one-line message naming the value and
      the fix; None: any value of the field's type.
    gin: False for options the network sets itself (`MoEConfig` leaves them out).
  """
  return dataclasses.field(default=default, metadata={"doc": doc, "check": check, "gin": gin})


def choice(*allowed) -> Callable[[str, Any], None]:
  """A check: the value is one of `allowed`."""
  def check(name, value):
    if value not in allowed:
      raise ValueError(f"{name}={value!r}; allowed: {allowed}")
  return check


def positive(hint: str = "") -> Callable[[str, Any], None]:
  """A check: None or a number > 0."""
  def check(name, value):
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
      raise ValueError(f"{name}={value!r} must be > 0{hint}")
  return check


def non_negative(name: str, value) -> None:
  """A check: a number >= 0."""
  if not (isinstance(value, (int, float)) and value >= 0):
    raise ValueError(f"{name}={value!r} must be >= 0 (0 turns it off)")


def integer_at_least(low: int) -> Callable[[str, Any], None]:
  """A check: an int (not a bool) >= `low`."""
  def check(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ValueError(f"{name}={value!r} must be an integer >= {low}")
  return check


def check_fields(options) -> None:
  """Runs the `check` of every field of the dataclass instance `options`."""
  for f in dataclasses.fields(options):
    check = f.metadata.get("check")
    if check is not None:
      check(f.name, getattr(options, f.name))


@dataclasses.dataclass(frozen=True)
class NoOptions:
  """The options of a router that reads only the common ones."""


class Router:
  """A routing rule with the options only it reads; one instance per MoE layer.

  Subclasses set `name` and `Options`, implement `route`, and may override `check` (option
  combinations the router rejects), `random_draws` (uniform draws it needs per call), `build`
  and `after_step` (state). `self.options` holds the layer's options (an `MoEOptions`, or any
  object with the same attributes): the common ones (`k`, `normalization`, `drop_policy`, ...)
  and this router's own.
  """

  name: ClassVar[str] = ""
  Options: ClassVar[type] = NoOptions

  def __init__(self, options):
    self.options = options

  @property
  def draws_at_training(self) -> bool:
    """True when the router draws random numbers at training (`random_draws`): the layer then
    owns an RNG state that the trainer reseeds every step."""
    return False

  @classmethod
  def check(cls, options) -> None:
    """Raises ValueError for option values this router cannot route with (beyond each option's
    own check, which has run)."""

  def random_draws(self, training: bool) -> int:
    """Rows n of the <float32>[n, T] uniform draws in [0, 1) a call needs (0: none)."""
    del training
    return 0

  def build(self, layer) -> None:
    """Creates the router's state on `layer` (`layer.add_weight(..., trainable=False)`)."""
    del layer

  def route(self, logits: tf.Tensor, *, capacity, token_mask=None, uniform=None,
            training: bool = True) -> routing_lib.Routing:
    """<float32>[T, E] logits -> `Routing` of K choices per token under `capacity`.

    Args:
      logits: router logits (float32; T may be known only at run time).
      capacity: C, an int or an <int32>[] tensor.
      token_mask: optional <bool>[T]; False tokens take no slot.
      uniform: the <float32>[n, T] draws asked for by `random_draws`, or None.
      training: whether this call trains (a router may route differently at evaluation).
    """
    raise NotImplementedError

  def after_step(self, sum_over_workers: Callable[[tf.Tensor], tf.Tensor], applied) -> None:
    """Updates the router's state after a training step (nothing for a stateless router).

    Args:
      sum_over_workers: x -> Σ of x over every worker (the identity on one process); a
        collective, so every worker calls it for the same layers in the same order.
      applied: <bool>[] whether the step's update was applied (False: skipped as non-finite).
    """
    del sum_over_workers, applied


def register(cls: type[Router]) -> type[Router]:
  """Class decorator: adds `cls` to `ROUTERS` under `cls.name`.

  Routers of this package register when it is imported, before `MoEOptions` takes their
  options; a router registered later (a test's, a user's) may read only the common options.

  Raises:
    ValueError: the name is taken, an option clashes with another router's (same name,
      different default or type), or the router brings options after `MoEOptions` was made.
  """
  if _OPTIONS_FROZEN and dataclasses.fields(cls.Options):
    raise ValueError(f"router {cls.name!r} has options, but the MoE options were made before "
                     f"it registered: add its module to m6t_tf/layers/routers")
  if not cls.name or cls.name in ROUTERS:
    raise ValueError(f"router name {cls.name!r} is empty or already registered "
                     f"({sorted(ROUTERS)})")
  fields = option_fields()
  for f in dataclasses.fields(cls.Options):
    other = fields.get(f.name)
    if other is not None and (other.default != f.default or other.type != f.type):
      raise ValueError(f"router {cls.name!r} option {f.name!r} clashes with another router's")
  ROUTERS[cls.name] = cls
  return cls


def freeze_options() -> None:
  """Called by `MoEOptions` once it has added the registered routers' options."""
  _OPTIONS_FROZEN.append(True)


def get(name: str) -> type[Router]:
  """The router registered as `name`; ValueError naming the registered ones otherwise."""
  try:
    return ROUTERS[name]
  except (KeyError, TypeError):
    raise ValueError(f"routing={name!r}; allowed: {tuple(ROUTERS)}") from None


def option_fields() -> dict[str, dataclasses.Field]:
  """Every registered router's option fields by name (the first declaration of a shared one)."""
  out = {}
  for cls in ROUTERS.values():
    for f in dataclasses.fields(cls.Options):
      out.setdefault(f.name, f)
  return out


def readers(option_name: str) -> list[str]:
  """Names of the routers whose `Options` declare `option_name`."""
  return [name for name, cls in ROUTERS.items()
          if option_name in {f.name for f in dataclasses.fields(cls.Options)}]


def check_foreign_options(routing: str, values: dict) -> None:
  """ValueError if an option of routers other than `routing` is set away from its default.

  Such a value would be silently ignored, which is never what the caller meant.
  """
  own = {f.name for f in dataclasses.fields(get(routing).Options)}
  for name, f in option_fields().items():
    if name in own or name not in values or values[name] == f.default:
      continue
    wanted = " or ".join(f"routing={r!r}" for r in readers(name))
    raise ValueError(f"{name}={values[name]!r} needs {wanted}: routing={routing!r} does not "
                     f"read it; use {name}={f.default!r} with routing={routing!r}")
