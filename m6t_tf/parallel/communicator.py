"""Communicators: how an MoE layer exchanges its `[D, e, C, M]` buffers between workers.

The MoE layer never imports Horovod. It asks its communicator for D (the size of the expert
group it belongs to) and calls `all_to_all` twice per forward pass (the Whale data flow, arXiv
2105.15082 appendix A.3):

    dispatched [D, e, C, M]  --all_to_all-->  [D, e, C, M]   row d now holds worker d's tokens
                                                            for *my* e experts
    expert out [D, e, C, M]  --all_to_all-->  [D, e, C, M]   row d holds my tokens back from the
                                                            experts of worker d

`LocalCommunicator` (D = 1) is the identity; `m6t_tf.parallel.horovod` adds the real one.
"""

from __future__ import annotations

import keras
import tensorflow as tf

#: The mesh axis expert weights are split over: each worker of an expert group holds e = E / D
#: of the E experts, dimension 0 of every expert weight.
EXPERT_AXIS = "expert"


def mark_expert_sharded(variable) -> None:
  """Marks `variable` as expert-sharded: dimension 0 holds this worker's e experts.

  The one mark every reader goes by: the gradient reduction (expert gradients reduced over
  their replicas only), the initial broadcast (from the replica root), the gradient norm
  (summed over the expert group) and checkpoints (written as slices of the global [E, ...]
  tensor). Layers mark their expert weights when they create them (`Experts.build`); layers
  import this module, never the other way round.

  The mark is the variable's Keras layout, `TensorLayout(("expert", None, ...))`, which is what
  Keras itself copies onto every optimizer slot made from a variable
  (`Optimizer.add_variable_from_reference`): AdamW's moments of an expert weight carry the mark
  too, with no name matching. The TensorFlow backend does not act on layouts.
  """
  axes = (EXPERT_AXIS,) + (None,) * (len(variable.shape) - 1)
  # Keras has no public setter; `_layout` is the attribute its optimizers read.
  variable._layout = keras.distribution.TensorLayout(axes)  # pylint: disable=protected-access


def is_expert_sharded(variable) -> bool:
  """Whether `variable` (a model weight or an optimizer slot) carries the expert mark."""
  axes = getattr(getattr(variable, "_layout", None), "axes", None)
  return bool(axes) and axes[0] == EXPERT_AXIS


class Communicator:
  """Interface of the expert-parallel exchange used by `m6t_tf.layers.moe.MoE`."""

  #: D, workers in this worker's expert group.
  expert_group_size: int = 1
  #: this worker's index inside its expert group (which e experts it holds).
  expert_rank: int = 0
  #: dtype name of the all-to-all payload on the wire ("float16" for FP16 communication), or
  #: None to send in the compute dtype.
  wire_dtype = None

  def all_to_all(self, x: tf.Tensor) -> tf.Tensor:
    """Exchanges rows of `x` <[D, ...]>: row d goes to worker d; returns the rows received."""
    raise NotImplementedError

  def all_to_all_v(self, x: tf.Tensor, splits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Variable-size exchange (dropless MoE): the first splits[0] rows of `x` <[R, ...]> go
    to worker 0 of the group, the next splits[1] to worker 1, ...; returns the rows received
    (from worker 0 first) and <int32>[D] how many came from each. Differentiable for floats:
    the gradient is the reverse exchange."""
    raise NotImplementedError

  def max_over_group(self, x: tf.Tensor) -> tf.Tensor:
    """Element-wise maximum of `x` over the expert group (identity for a group of one).

    MoE layers agree on a capacity C computed at run time with it: the all-to-all exchanges
    [D, e, C, M] buffers, so C must be the same on every worker of the group.
    """
    if self.expert_group_size == 1:
      return x
    raise NotImplementedError(f"{type(self).__name__} has an expert group of "
                              f"D={self.expert_group_size} but no max_over_group")

  def expert_ids(self, num_experts: int) -> list[int]:
    """Global ids of the e = E / D experts this worker holds (contiguous block)."""
    d = self.expert_group_size
    if num_experts % d:
      raise ValueError(
          f"num_experts={num_experts} is not divisible by the expert-parallel group size D={d}; "
          f"choose E as a multiple of {d} or change the mesh")
    e = num_experts // d
    return list(range(self.expert_rank * e, (self.expert_rank + 1) * e))


class LocalCommunicator(Communicator):
  """A single worker holding every expert: D = 1 and the all-to-all is the identity."""

  expert_group_size = 1
  expert_rank = 0

  def all_to_all(self, x: tf.Tensor) -> tf.Tensor:
    return x

  def all_to_all_v(self, x: tf.Tensor, splits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return x, tf.cast(tf.reshape(splits, [1]), tf.int32)

  def max_over_group(self, x: tf.Tensor) -> tf.Tensor:
    return x


_DEFAULT: list[Communicator] = [LocalCommunicator()]


def get_default() -> Communicator:
  """The communicator MoE layers use when none is passed (set once by the trainer)."""
  return _DEFAULT[0]


def set_default(communicator: Communicator) -> None:
  """Installs `communicator` for MoE layers built afterwards (e.g. Horovod's, in train.py)."""
  if not isinstance(communicator, Communicator):
    raise TypeError(f"expected a Communicator, got {type(communicator).__name__}")
  _DEFAULT[0] = communicator
