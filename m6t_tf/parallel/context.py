"""The trainer's view of the worker world: one process (`LocalContext`) or Horovod ranks.

`WorkerContext` is the interface; the trainer calls only it, so the same step function runs
on 1 CPU and on 480 GPUs (`LocalContext` here, `m6t_tf.parallel.horovod.HorovodContext`):

    rank, size, is_chief            who am I (rank 0 logs, writes TensorBoard and config.gin)
    data_shard()                    (index, count) of the input shard this worker reads
    reduce_gradients(grads, vars,   dense: mean over all workers; experts: sum over their
        loss_scale)                 replicas / world size (the backward all-to-all has already
                                    summed the expert group's contributions); takes gradients
                                    of loss_scale·L and returns float32 gradients of L (FP16
                                    communication sends them scaled, unscales after)
    sum_over_world(x)               Σ over all workers (global token counts, logged sums)
    sum_over_expert_group(x)        Σ over this worker's expert group (the expert-gradient norm²,
                                    the per-expert loads)
    all_finite(flag)                AND over all workers (a skipped step is skipped everywhere)
    broadcast_state(vars)           initial weights from rank 0 (experts from their replica root)
    mean_metrics(dict)              averages for logging
    barrier()
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import tensorflow as tf

from m6t_tf.parallel import communicator as comm_lib


def is_rng_state(variable) -> bool:
  """Keras dropout seed-generator states (per worker: never broadcast or averaged)."""
  return "seed_generator" in variable.path


def is_expert_variable(variable) -> bool:
  """Expert weights (and their optimizer slots) are sharded over the expert axis; everything
  else is replicated. Read from the layers' mark (`communicator.mark_expert_sharded`)."""
  return comm_lib.is_expert_sharded(variable)


@runtime_checkable
class WorkerContext(Protocol):
  """What the trainer, the evaluator and the caption decoder ask of the worker world (module
  docstring). Both contexts implement it; `isinstance(ctx, WorkerContext)` checks the methods."""

  rank: int
  size: int
  is_chief: bool
  expert_group_size: int
  expert_index: int
  data_index: int

  def data_shard(self) -> tuple[int, int]: ...

  def reduce_gradients(self, grads: Sequence[Any], variables: Sequence[Any],
                       loss_scale: Any = None) -> list[Any]: ...

  def sum_over_world(self, x): ...

  def sum_over_expert_group(self, x): ...

  def all_finite(self, flag): ...

  def broadcast_state(self, variables: Sequence[Any]) -> None: ...

  def mean_metrics(self, metrics: Mapping[str, Any]) -> dict: ...

  def check_consistent(self, values: Mapping[str, Any], *, what: str = "configuration") -> None:
    ...

  def barrier(self) -> None: ...

  def shutdown(self) -> None: ...

  def describe(self) -> str: ...


class LocalContext:
  """A single process holding every expert (D = 1)."""

  rank = 0
  size = 1
  is_chief = True
  expert_group_size = 1
  data_parallel_size = 1
  expert_index = 0
  data_index = 0

  def data_shard(self) -> tuple[int, int]:
    return 0, 1

  def reduce_gradients(self, grads, variables, loss_scale=None):
    """The gradients of L from those of `loss_scale`·L (None = 1): one worker has nothing to
    reduce."""
    del variables
    if loss_scale is None:
      return grads
    inv = 1.0 / loss_scale
    return [None if g is None else g * inv for g in grads]

  def all_finite(self, flag):
    return flag

  def broadcast_state(self, variables) -> None:
    del variables

  def mean_metrics(self, metrics: dict) -> dict:
    return metrics

  def sum_over_expert_group(self, x):
    return x

  def sum_over_world(self, x):
    return x

  def check_consistent(self, values, *, what: str = "configuration") -> None:
    del values, what

  def shutdown(self) -> None:
    pass

  def barrier(self) -> None:
    pass

  def describe(self) -> str:
    return "1 process, all experts local (D = 1)"


def global_norm(grads, variables, ctx) -> tf.Tensor:
  """√(Σ g²) over the whole model: replicated grads once, expert grads summed over the group."""
  dense_sq = tf.constant(0.0)
  expert_sq = tf.constant(0.0)
  for g, v in zip(grads, variables):
    if g is None:
      continue
    sq = tf.reduce_sum(tf.square(tf.cast(g, tf.float32)))
    if is_expert_variable(v):
      expert_sq += sq
    else:
      dense_sq += sq
  # The expert group holds each expert exactly once, and after `reduce_gradients` every group
  # holds the same values: its sum is the whole model's.
  return tf.sqrt(dense_sq + ctx.sum_over_expert_group(expert_sq))


def capacity_fingerprint(moe_layers, num_tokens: int) -> dict:
  """Values every worker must agree on before the first all-to-all."""
  out = {"tokens_per_worker": int(num_tokens)}
  for i, layer in enumerate(moe_layers):
    out[f"moe{i}.num_experts"] = layer.num_experts
    out[f"moe{i}.expert_group_size"] = layer.communicator.expert_group_size
    out[f"moe{i}.capacity_train"] = layer.capacity_for(num_tokens, True)
    out[f"moe{i}.capacity_eval"] = layer.capacity_for(num_tokens, False)
  return out
