"""Expert parallelism over Horovod: the all-to-all communicator and the step's collectives.

One process per GPU (or CPU worker), started by `horovodrun` or `mpirun`. The ranks
form a `Mesh(data, expert)` (see `m6t_tf.parallel.mesh`); each expert group of D = `expert`
ranks holds all E experts, e = E / D per rank, and exchanges its `[D, e, C, M]` buffers with
`hvd.alltoall` on its own process set. Typical use in a trainer:

    ctx = init_horovod(expert=8, num_experts=E, wire_dtype="float16")  # or mesh=Mesh(data, 8)
    model = build_model()            # MoE layers pick up ctx.communicator as the default
    ctx.check_consistent(capacity_fingerprint(moe_layers, num_tokens=B * L))
    ctx.broadcast_state(model.variables)   # experts from their replica root, the rest from 0
    ...
    grads_and_vars = ctx.allreduce_gradients(zip(grads, variables), is_expert)
    ...
    ctx.shutdown()                   # barrier first: see `HorovodContext.shutdown`

Gradient scaling. Each rank r minimises its own mean loss L_r over its T tokens; the objective is
L = (1/W) Σ_r L_r over the W = data × expert ranks (the usual data-parallel convention, which
makes W ranks equal one process looping over the W token shards). Dense parameters are
replicated and only see their own rank's tokens, so dL/dθ is the average of the ranks' grads.
An expert's weights are different: the backward all-to-all already *sums* into the expert's
holder the gradients of every rank of its expert group (D of them), so the holder's raw grad
is Σ_{r in group} dL_r/dW. Summing that over the replica group covers all W ranks once, hence

    dL/dW_expert = (1/W) · Σ_{replica group} raw grad      (= replica average / D, not average)

Averaging over the replica group alone would overstate expert gradients by D.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import keras
import tensorflow as tf

from m6t_tf.errors import ConfigError
from m6t_tf.parallel import communicator as comm_lib
from m6t_tf.parallel import launch_env
from m6t_tf.parallel import context as context_lib
# Read before `hvd.init`, so that a wrong mesh fails on every rank before any rendezvous.
from m6t_tf.parallel.launch_env import WORLD_SIZE_ENV as _WORLD_SIZE_ENV
from m6t_tf.parallel.launch_env import world_size_from_env
from m6t_tf.parallel.context import capacity_fingerprint  # noqa: F401  (re-exported)
from m6t_tf.parallel.mesh import Mesh, make_process_sets
from m6t_tf.parallel.watchdog import set_stall_env_defaults

#: Payload dtypes for the all-to-all: None keeps the compute dtype; "float16" halves the bytes
#: (M6-T's FP16 communication). bfloat16 is not offered: Horovod 0.28's TF ops do not accept it.
WIRE_DTYPES = (None, "float32", "float16")
#: dtypes `hvd.alltoall` accepts; anything else (bfloat16 compute) travels as float32, losslessly.
_HOROVOD_FLOATS = (tf.float16, tf.float32, tf.float64)


def check_build():
  """Returns `horovod.tensorflow` after checking it has TensorFlow ops and a controller.

  Raises:
    RuntimeError: Horovod is missing, was built without TensorFlow, or without Gloo and MPI.
  """
  try:
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(
        f"Horovod with TensorFlow support is not importable ({e}). Build it from source with "
        "HOROVOD_WITH_TENSORFLOW=1 and HOROVOD_WITH_GLOO=1 (tools/setup_env.sh does) and check "
        "with `horovodrun --check-build`.") from e
  if not (hvd.gloo_built() or hvd.mpi_built()):
    raise RuntimeError(
        "Horovod was built without Gloo and without MPI, so it cannot start collectives between "
        "processes. Rebuild with HOROVOD_WITH_GLOO=1 (CPU hosts) or HOROVOD_WITH_MPI=1, and "
        "check with `horovodrun --check-build`.")
  return hvd


def _check_wire_dtype(wire_dtype) -> Optional[str]:
  if wire_dtype is not None:
    wire_dtype = tf.as_dtype(wire_dtype).name
  if wire_dtype not in WIRE_DTYPES:
    raise ValueError(f"wire_dtype={wire_dtype!r}; allowed: {WIRE_DTYPES} (Horovod's all-to-all "
                     "does not take bfloat16)")
  return wire_dtype


class HorovodCommunicator(comm_lib.Communicator):
  """All-to-all over this rank's expert group with `hvd.alltoall` (gradient registered).

  `hvd.alltoall` splits dimension 0 equally over the process set's ranks, in rank order, and
  concatenates what it receives in the same order; the expert group's ranks are in expert_index
  order, so row d of `[D, e, C, M]` goes to (and comes back from) the rank holding experts
  [d·e, (d+1)·e). Its gradient is the reverse all-to-all, so backward needs nothing extra.

  Args:
    mesh: the layout.
    rank: this process's Horovod rank.
    process_set: the expert group's process set (`hvd.global_process_set` if it spans the
      world; ignored when the group is one rank).
    wire_dtype: None, "float32" or "float16": dtype of the payload on the wire. With "float16"
      the buffer is cast before the exchange and back after it; the backward exchange then
      also travels in float16, since the gradient of a cast is the reverse cast.
  """

  def __init__(self, mesh: Mesh, rank: int, process_set: Any = None, *,
               wire_dtype: Optional[str] = None):
    mesh.check_rank(rank)
    self.mesh = mesh
    self.rank = rank
    self.expert_group_size = mesh.expert
    self.expert_rank = mesh.expert_index(rank)
    self.wire_dtype = _check_wire_dtype(wire_dtype)
    if self.expert_group_size > 1 and process_set is None:
      raise ValueError(f"rank {rank} of {mesh}: an expert group of {mesh.expert} ranks needs "
                       "a process set")
    self.process_set = process_set
    #: Bytes handed to `hvd.alltoall` (wire dtype) and number of exchanges. Python counters:
    #: they advance on every eager call, and once per trace under `tf.function`.
    self.bytes_sent = 0
    self.calls = 0

  def reset_counters(self) -> None:
    self.bytes_sent = 0
    self.calls = 0

  def all_to_all(self, x: tf.Tensor) -> tf.Tensor:
    """Row d of `x` <[D, ...]> goes to rank d of the expert group; returns the rows received."""
    x = tf.convert_to_tensor(x)
    d = self.expert_group_size
    if x.shape.rank is None or x.shape.rank < 1 or x.shape[0] != d:
      raise ValueError(f"all_to_all expects a [D={d}, ...] tensor, got shape {x.shape}")
    if d == 1:
      return x
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    wire = tf.as_dtype(self.wire_dtype) if self.wire_dtype else x.dtype
    if wire not in _HOROVOD_FLOATS and wire.is_floating:
      wire = tf.float32
    payload = tf.cast(x, wire) if wire != x.dtype else x
    if payload.shape.is_fully_defined():
      self.bytes_sent += payload.shape.num_elements() * wire.size
    self.calls += 1
    received = hvd.alltoall(payload, process_set=self.process_set)
    # Every row has the same shape, so the output's shape is the input's; say so statically.
    received = tf.ensure_shape(received, payload.shape)
    return tf.cast(received, x.dtype) if wire != x.dtype else received

  def all_to_all_v(self, x: tf.Tensor, splits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Rows [Σ splits[:d], Σ splits[:d+1]) of `x` go to rank d of the expert group; returns the
    rows received (rank order) and how many came from each. Floats travel in the wire dtype;
    integers as they are. Every rank calls it the same number of times (sizes may differ)."""
    x = tf.convert_to_tensor(x)
    splits = tf.cast(splits, tf.int32)
    d = self.expert_group_size
    if d == 1:
      return x, tf.reshape(tf.shape(x)[0], [1])
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    wire = x.dtype
    if x.dtype.is_floating:
      wire = tf.as_dtype(self.wire_dtype) if self.wire_dtype else x.dtype
      if wire not in _HOROVOD_FLOATS:
        wire = tf.float32
    payload = tf.cast(x, wire) if wire != x.dtype else x
    self.calls += 1
    received, received_splits = hvd.alltoall(payload, splits=splits,
                                             process_set=self.process_set)
    received = tf.ensure_shape(received, [None, *payload.shape[1:]])
    return (tf.cast(received, x.dtype) if wire != x.dtype else received), received_splits

  def max_over_group(self, x: tf.Tensor) -> tf.Tensor:
    """Element-wise maximum of `x` over the expert group (`hvd.allreduce` with `hvd.Max`).

    Every rank of the group must call it at the same point (it is one collective), as it must
    call the all-to-all that follows.
    """
    x = tf.convert_to_tensor(x)
    if self.expert_group_size == 1:
      return x
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    return hvd.allreduce(x, op=hvd.Max, process_set=self.process_set)


@dataclasses.dataclass
class HorovodContext:
  """What `init_horovod` set up, and the collectives of a training step.

  It is the trainer's worker context under Horovod: `context.WorkerContext`, which
  `LocalContext` implements for one process.

  Attributes:
    mesh: the (data, expert) layout.
    rank, size, local_rank: Horovod's.
    communicator: the `HorovodCommunicator` MoE layers use.
    expert_process_set: process set of this rank's expert group (None if one rank).
    replica_process_set: process set of this rank's replica group (None if one rank).
    is_expert: variable -> bool used by the trainer-interface methods (the layers' expert
      mark, `context.is_expert_variable`).
  """
  mesh: Mesh
  rank: int
  size: int
  local_rank: int
  communicator: HorovodCommunicator
  expert_process_set: Any
  replica_process_set: Any
  is_expert: Callable[[Any], bool] = context_lib.is_expert_variable
  #: "none" or "fp16": payload of the gradient allreduce (the paper's FP16 communication);
  #: with "fp16", `reduce_gradients` sends the loss-scaled gradients and unscales after.
  gradient_compression: str = "none"

  @property
  def data_index(self) -> int:
    return self.mesh.data_index(self.rank)

  @property
  def expert_index(self) -> int:
    return self.mesh.expert_index(self.rank)

  @property
  def is_chief(self) -> bool:
    return self.rank == 0

  def make_communicator(self, wire_dtype: Optional[str] = None) -> HorovodCommunicator:
    """Another communicator over the same expert group (e.g. with a different wire dtype)."""
    return HorovodCommunicator(self.mesh, self.rank, self.expert_process_set,
                               wire_dtype=wire_dtype)

  def allreduce_gradients(self, grads_and_vars: Iterable[tuple[Any, Any]],
                          is_expert: Callable[[Any], bool], *,
                          compression: str = "none") -> list[tuple[Any, Any]]:
    """Reduces gradients: dense ones over all ranks, expert ones over their replica group.

    Dense grads are averaged over the W ranks. Expert grads are summed over the replica group
    and divided by W (see the module docstring: the backward all-to-all has already summed the
    expert group's contributions). Both are then gradients of L = (1/W) Σ_r L_r. One grouped
    allreduce per kind, so a step costs two fused collectives, not one per variable.

    Every rank must call this with the same variables in the same order (Horovod matches
    tensors by position and name); a None gradient stays None and must be None on every rank.

    Args:
      grads_and_vars: (gradient, variable) pairs, e.g. `zip(tape.gradient(...), variables)`.
      is_expert: variable -> bool; True for expert-sharded weights (the layers' mark:
        `context.is_expert_variable`).
      compression: "none" or "fp16" (cast to float16 for the reduction, back after). Cast as
        they are, unscaled gradients are mostly float16 subnormals or zero: the trainer sends
        loss-scaled ones instead (`reduce_gradients`).

    Returns:
      The (reduced gradient, variable) pairs, in the input order.
    """
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    compressor = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}.get(compression)
    if compressor is None:
      raise ValueError(f"compression={compression!r}; allowed: 'none', 'fp16'")
    pairs = list(grads_and_vars)
    grads = [g for g, _ in pairs]
    dense, expert = _split(grads, [v for _, v in pairs], is_expert)
    if dense and self.size > 1:
      reduced = hvd.grouped_allreduce([grads[i] for i in dense], op=hvd.Average,
                                      compression=compressor,
                                      process_set=hvd.global_process_set)
      for i, g in zip(dense, reduced):
        grads[i] = g
    if expert:
      scale = 1.0 / self.size
      expert_grads = [tf.convert_to_tensor(grads[i]) for i in expert]
      if self.replica_process_set is not None:
        reduced = hvd.grouped_allreduce(expert_grads, op=hvd.Sum, prescale_factor=scale,
                                        compression=compressor,
                                        process_set=self.replica_process_set)
      else:
        reduced = [g * tf.cast(scale, g.dtype) for g in expert_grads]
      for i, g in zip(expert, reduced):
        grads[i] = g
    return [(g, v) for g, (_, v) in zip(grads, pairs)]

  def mean_metrics(self, metrics: Mapping[str, Any]) -> dict[str, tf.Tensor]:
    """Averages scalar metrics over all ranks (for logging); keys must match on every rank."""
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    keys = sorted(metrics)  # the same order on every rank, whatever order the dict was built in
    values = [tf.cast(tf.convert_to_tensor(metrics[k]), tf.float32) for k in keys]
    if values and self.size > 1:
      values = hvd.grouped_allreduce(values, op=hvd.Average, process_set=hvd.global_process_set)
    return dict(zip(keys, values))

  def check_consistent(self, values: Mapping[str, Any], *, what: str = "configuration") -> None:
    """Raises ValueError on every rank if `values` differ between ranks (one cheap allgather).

    Meant for the numbers that must agree for the all-to-all to be correct, above all the
    capacity C, which depends on the tokens per worker T (see `capacity_fingerprint`). Call it
    before the first step: with mismatched capacities the exchange would fail or deadlock
    part-way, whereas here every rank sees the same gathered table and raises the same error.

    Args:
      values: name -> int, float, bool, str or None.
      what: how the error message names the values.
    """
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    keys = sorted(values)
    row = [len(keys), zlib.crc32("\n".join(keys).encode())]
    for key in keys:
      row.extend(_encode(values[key]))
    if self.size == 1:
      return
    lengths = hvd.allgather(tf.constant([len(row)], tf.int64), name="m6t_fingerprint_length")
    lengths = lengths.numpy().tolist()
    if len(set(lengths)) > 1:
      raise ValueError(f"{what} differs between ranks: they check different numbers of values "
                       f"({', '.join(f'rank {r}: {(n - 2) // 2}' for r, n in enumerate(lengths))}); "
                       "every rank must run the same configuration")
    table = hvd.allgather(tf.constant([row], tf.int64), name="m6t_fingerprint").numpy()
    if len(set(table[:, 1].tolist())) > 1:
      raise ValueError(f"{what} differs between ranks: they check differently named values "
                       f"(this rank: {keys}); every rank must run the same configuration")
    diffs = []
    for j, key in enumerate(keys):
      pairs = [tuple(p) for p in table[:, 2 + 2 * j:4 + 2 * j].tolist()]
      if len(set(pairs)) > 1:
        shown = ", ".join(f"rank {r}: {_decode(*p)}" for r, p in enumerate(pairs))
        diffs.append(f"{key} ({shown})")
    if diffs:
      raise ValueError(
          f"{what} differs between ranks: {'; '.join(diffs)}. Expert-parallel ranks exchange "
          "[D, e, C, M] buffers, so C (and the tokens per worker T it comes from) must be the "
          "same everywhere: use the same per-worker batch size, sequence length, capacity "
          "factors and number of experts on every rank")

  # ---- The trainer's worker-context interface (see m6t_tf.parallel.context.LocalContext). ----

  @property
  def expert_group_size(self) -> int:
    return self.mesh.expert

  @property
  def data_parallel_size(self) -> int:
    return self.mesh.data

  def data_shard(self) -> tuple[int, int]:
    """(index, count) of the input shard to read: every rank routes its own tokens."""
    return self.rank, self.size

  def reduce_gradients(self, grads: Sequence[Any], variables: Sequence[Any],
                       loss_scale: Any = None) -> list[Any]:
    """Reduced float32 gradients of L, from gradients of `loss_scale`·L on parallel lists.

    Experts are told apart by `self.is_expert`; the reduction is `allreduce_gradients`'.
    With `gradient_compression` "none" the gradients are unscaled, then reduced in float32.
    With "fp16" the *scaled* gradients travel: cast to float16, summed, cast back to float32,
    and only then multiplied by 1 / (W · loss_scale) (`reduce_scaled_fp16`). Unscaled first, most
    of them would be float16 subnormals or zero on the wire.

    Args:
      grads: gradients (float32; None stays None), scaled by `loss_scale`.
      variables: their variables.
      loss_scale: the factor the loss was multiplied by (a scalar tensor); None = 1.
    """
    if self.gradient_compression == "fp16" and self.size > 1:
      return self.reduce_scaled_fp16(grads, variables, 1.0 if loss_scale is None else loss_scale)
    if loss_scale is not None:
      inv = 1.0 / loss_scale
      grads = [None if g is None else g * inv for g in grads]
    reduced = self.allreduce_gradients(zip(grads, variables), self.is_expert,
                                       compression=self.gradient_compression)
    return [g for g, _ in reduced]

  def reduce_scaled_fp16(self, grads: Sequence[Any], variables: Sequence[Any],
                         loss_scale: Any) -> list[Any]:
    """FP16 communication of loss-scaled gradients: Σ in float16, ÷ (W · loss_scale) in float32.

    Dense gradients are summed over all ranks, expert gradients over their replica group (see
    `allreduce_gradients`: both are then divided by W). An element keeps float16's 11-bit
    precision when its scaled value is at least 6.1e-5 (float16's smallest normal), where the
    unscaled value may be far below it; scaled values above 65504, or a sum above it, become
    inf, which the trainer's finite check after the reduction sees on every rank alike (it
    skips the step and halves the scale). A gradient that no rank sends stays float32.
    """
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    out = list(grads)
    unscale = 1.0 / (tf.cast(loss_scale, tf.float32) * float(self.size))
    dense, expert = _split(grads, variables, self.is_expert)
    for indices, process_set in ((dense, hvd.global_process_set),
                                 (expert, self.replica_process_set)):
      if not indices:
        continue
      if process_set is None:  # a replica group of one rank: nothing travels
        summed = [tf.cast(grads[i], tf.float32) for i in indices]
      else:
        wire = [tf.cast(grads[i], tf.float16) for i in indices]
        summed = [tf.cast(g, tf.float32) for g in
                  hvd.grouped_allreduce(wire, op=hvd.Sum, process_set=process_set)]
      for i, g in zip(indices, summed):
        out[i] = g * unscale
    return out

  def sum_over_expert_group(self, x):
    """Σ of `x` over this rank's expert group (identity for a group of one)."""
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    if self.expert_process_set is None:
      return x
    return hvd.allreduce(x, op=hvd.Sum, process_set=self.expert_process_set)

  def sum_over_world(self, x):
    """Σ of `x` over all ranks."""
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    if self.size == 1:
      return x
    return hvd.allreduce(x, op=hvd.Sum, process_set=hvd.global_process_set)

  def all_finite(self, flag):
    """AND of a boolean over all ranks, so that a skipped step is skipped everywhere."""
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    if self.size == 1:
      return flag
    bad = hvd.allreduce(tf.reshape(tf.cast(tf.logical_not(flag), tf.float32), [1]), op=hvd.Sum,
                        process_set=hvd.global_process_set)
    return tf.equal(bad[0], 0.0)

  def broadcast_state(self, variables: Sequence[Any]) -> None:
    """Makes replicas identical before the first step.

    Dense variables come from rank 0; expert variables (`self.is_expert`) from the first rank
    (data_index 0) of each replica group, so each expert block keeps the values its holder at
    data_index 0 drew. Every rank passes the same variables in the same order.
    """
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    variables = list(variables)
    dense = [_tf_variable(v) for v in variables if not self.is_expert(v)]
    expert = [_tf_variable(v) for v in variables if self.is_expert(v)]
    if dense and self.size > 1:
      hvd.broadcast_variables(dense, root_rank=0, process_set=hvd.global_process_set)
    if expert and self.replica_process_set is not None:
      hvd.broadcast_variables(expert, root_rank=self.mesh.replica_root(self.rank),
                              process_set=self.replica_process_set)

  def describe(self) -> str:
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    # The controller in use (MPI under mpirun, Gloo under horovodrun --gloo), as a log shows it.
    controller = "MPI" if hvd.mpi_enabled() else "Gloo" if hvd.gloo_enabled() else "unknown"
    return (f"{self.size} Horovod ranks ({controller} controller) as {self.mesh} (rank "
            f"{self.rank} at data_index "
            f"{self.data_index}, expert_index {self.expert_index}; D = {self.mesh.expert}, "
            f"all-to-all payload {self.communicator.wire_dtype or 'in the compute dtype'})")

  def barrier(self) -> None:
    """Blocks until every rank gets here (a one-element allreduce over the world)."""
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    if self.size > 1:
      hvd.allreduce(tf.zeros([1]), op=hvd.Sum, name="m6t_barrier",
                    process_set=hvd.global_process_set)

  def shutdown(self) -> None:
    """Barrier, then `hvd.shutdown()`.

    The barrier matters: when the last collectives of a run are on process sets (all-to-alls,
    expert reductions), an expert group that finishes first would otherwise shut Horovod down
    under a group still working, which then fails with "Horovod has been shut down" or
    "Process set provided does not exist".
    """
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    self.barrier()
    hvd.shutdown()


def resolve_mesh(mesh: Optional[Mesh], expert: Optional[int],
                 world_size: Optional[int]) -> Optional[Mesh]:
  """The mesh `init_horovod` uses: `mesh`, or (data = world / expert, expert), or None.

  None means "one expert group over every rank", decided after `hvd.init` when the launcher
  did not export the world size.
  """
  if mesh is not None:
    if expert is not None and expert != mesh.expert:
      raise ValueError(f"expert={expert} contradicts mesh={mesh}; pass one of them")
    return mesh
  if world_size is None:
    if expert is not None:
      raise ValueError(
          f"expert={expert} needs the number of processes before Horovod starts, and the "
          f"launcher did not export it ({', '.join(_WORLD_SIZE_ENV)}); pass "
          "mesh=Mesh(data, expert) instead")
    return None
  return Mesh.for_world(world_size, expert=expert)


#: Set to 1 to let more ranks than GPUs share a node's GPUs (round robin by local rank).
SHARE_GPUS_ENV = "M6T_SHARE_GPUS"


def gpus_shared(environ=None) -> bool:
  """Whether the user asked ranks to share GPUs (`M6T_SHARE_GPUS=1`)."""
  value = (os.environ if environ is None else environ).get(SHARE_GPUS_ENV, "").strip()
  if value not in ("", "0", "1"):
    raise ConfigError(f"{SHARE_GPUS_ENV}={value!r}: use {SHARE_GPUS_ENV}=1 to let ranks share "
                      f"GPUs, or leave it unset")
  return value == "1"


def pin_gpu(local_rank: int, config=None, *, local_size: Optional[int] = None,
            share: Optional[bool] = None, environ=None) -> Optional[str]:
  """Makes GPU `local_rank` the only one this process sees, with memory growth, as Horovod's
  TensorFlow guide does: without it every rank of a node computes on GPU 0.

  Must run before anything starts TensorFlow's runtime (`place_process` runs it first thing in
  the entry points); pinning the same GPU again later is a no-op.

  Args:
    local_rank: this process's rank on its node.
    config: `tf.config` (a stand-in in tests).
    local_size: the number of ranks on this node, when the launcher said.
    share: let more ranks than GPUs share them, round robin (default: `M6T_SHARE_GPUS=1`).
    environ: the environment (default `os.environ`).

  Returns:
    The device name, or None without GPUs.

  Raises:
    ConfigError: the node has more ranks than GPUs and sharing was not asked for. One visible
      GPU under `CUDA_VISIBLE_DEVICES` is taken as the launcher's own per-rank assignment (Slurm
      `--gpus-per-task=1`) and is not checked.
    RuntimeError: TensorFlow's runtime started before this call (a different GPU cannot be
      chosen any more).
  """
  config = config or tf.config
  environ = os.environ if environ is None else environ
  gpus = config.list_physical_devices("GPU")
  if not gpus:
    return None
  share = gpus_shared(environ) if share is None else share
  ranks = max(local_size or 0, local_rank + 1)
  assigned = len(gpus) == 1 and environ.get("CUDA_VISIBLE_DEVICES", "").strip() != ""
  if ranks > len(gpus) and not (share or assigned):
    who = (f"this node runs {local_size} ranks" if local_size
           else f"local rank {local_rank} means at least {ranks} ranks on this node")
    raise ConfigError(
        f"{who} but has {len(gpus)} GPU(s): ranks would share a GPU (slower, and out of "
        f"memory sooner); start at most {len(gpus)} ranks per node (e.g. horovodrun -H "
        f"host:{len(gpus)}), or set {SHARE_GPUS_ENV}=1 to share them on purpose")
  gpu = gpus[local_rank % len(gpus)]
  try:
    config.set_visible_devices(gpu, "GPU")
    config.experimental.set_memory_growth(gpu, True)
  except RuntimeError as e:
    raise RuntimeError(
        f"cannot make {gpu.name} local rank {local_rank}'s GPU: {e}. TensorFlow's runtime "
        f"started before the GPU was chosen; call m6t_tf.parallel.horovod.place_process() "
        f"before reading any data or creating any tensor (the entry points do)") from e
  return gpu.name


def place_process(config=None, environ=None) -> Optional[str]:
  """Pins this rank's GPU (`pin_gpu`) from what the launcher exported, before Horovod starts.

  The entry points call it right after their flags are parsed, before the gin config is read:
  resolving `MAX_LEN = None` reads records, and anything that runs a TensorFlow op starts the
  runtime, after which the visible devices cannot change. A process started without a
  launcher (one process) keeps every device.

  Returns:
    The pinned device's name, or None.

  Raises:
    ConfigError: more ranks than GPUs on this node (see `pin_gpu`), or GPUs but no local rank
      from the launcher.
  """
  config = config or tf.config
  environ = os.environ if environ is None else environ
  if launch_env.world_size(environ) <= 1:
    return None
  local_rank = launch_env.local_rank_from_env(environ)
  if local_rank is None:
    if not config.list_physical_devices("GPU"):
      return None
    raise ConfigError(
        f"this process has GPUs but the launcher did not export its rank on the node (one of "
        f"{', '.join(launch_env.LOCAL_RANK_ENV)}), so it cannot choose its own GPU; start it "
        f"with horovodrun or mpirun")
  return pin_gpu(local_rank, config, local_size=launch_env.local_size_from_env(environ),
                 environ=environ)


def init_horovod(mesh: Optional[Mesh] = None, *, expert: Optional[int] = None,
                 num_experts: Optional[int] = None, wire_dtype: Optional[str] = None,
                 set_default: bool = True) -> HorovodContext:
  """Initialises Horovod with the mesh's process sets and installs the MoE communicator.

  Validation happens, when the launcher exports the world size, *before* `hvd.init`, so a wrong
  mesh raises the same ValueError on every rank without any rendezvous; it is repeated against
  `hvd.size()` afterwards. Horovod's stall inspector gets `watchdog.STALL_ENV_DEFAULTS` where
  the environment does not set it (a second line behind the trainer's stall watchdog, see
  `m6t_tf.parallel.watchdog`).

  Args:
    mesh: the (data, expert) layout; None = from `expert`, or one expert group over all ranks.
    expert: size of the expert axis (data = world / expert); an alternative to `mesh`.
    num_experts: E, checked to divide by `mesh.expert` when given.
    wire_dtype: all-to-all payload dtype, None or "float16" (FP16 communication).
    set_default: install the communicator as `communicator.get_default()` for MoE layers.

  Returns:
    The `HorovodContext`.

  Raises:
    RuntimeError: Horovod unusable (see `check_build`) or already initialised.
    ValueError: the mesh does not match the world size, or E does not split over it.
  """
  hvd = check_build()
  wire_dtype = _check_wire_dtype(wire_dtype)
  if hvd.is_initialized():
    raise RuntimeError("Horovod is already initialised: call init_horovod once per process, "
                       "before any other Horovod call (process sets are registered at init)")
  env_size = world_size_from_env()
  mesh = resolve_mesh(mesh, expert, env_size)
  if mesh is not None and env_size is not None:
    mesh.validate(env_size, num_experts)
  process_sets = make_process_sets(mesh, hvd.ProcessSet) if mesh is not None else {}
  set_stall_env_defaults()   # read by hvd.init
  try:
    hvd.init(process_sets=list(process_sets.values()))
  except ValueError as e:
    raise ValueError(f"Horovod could not start with the process sets of {mesh} "
                     f"({[list(g) for g in process_sets]}): {e}. Does the mesh match the "
                     "number of processes started?") from e
  size, rank = hvd.size(), hvd.rank()
  # A no-op when the entry point's `place_process` pinned it already (library callers rely on
  # this one, before any tensor exists).
  pin_gpu(hvd.local_rank(), local_size=hvd.local_size())
  if mesh is None:
    mesh = Mesh.for_world(size)
  mesh.validate(size, num_experts)

  def process_set_of(group):
    if len(group) == 1:
      return None
    if len(group) == size:
      return hvd.global_process_set
    return process_sets[group]

  expert_ps = process_set_of(mesh.expert_group(rank))
  replica_ps = process_set_of(mesh.replica_group(rank))
  communicator = HorovodCommunicator(mesh, rank, expert_ps, wire_dtype=wire_dtype)
  if set_default:
    comm_lib.set_default(communicator)
  return HorovodContext(mesh=mesh, rank=rank, size=size, local_rank=hvd.local_rank(),
                        communicator=communicator, expert_process_set=expert_ps,
                        replica_process_set=replica_ps)


def _split(grads: Sequence[Any], variables: Sequence[Any],
           is_expert: Callable[[Any], bool]) -> tuple[list[int], list[int]]:
  """Indices of the dense and of the expert gradients (None gradients in neither)."""
  dense = [i for i, (g, v) in enumerate(zip(grads, variables)) if g is not None and not is_expert(v)]
  expert = [i for i, (g, v) in enumerate(zip(grads, variables)) if g is not None and is_expert(v)]
  return dense, expert


def _tf_variable(v):
  """The tf.Variable behind a Keras variable (Horovod's ops take tf.Variables)."""
  if isinstance(v, keras.Variable):
    return v.value
  return v


def _encode(value) -> tuple[int, int]:
  """(type tag, int64 payload) standing for `value`: ints exact, floats by bits, str by CRC-32."""
  if value is None:
    return 0, 0
  if isinstance(value, (bool, int)):
    return 1, int(value)
  if isinstance(value, float):
    return 2, struct.unpack("<q", struct.pack("<d", value))[0]
  if isinstance(value, str):
    return 3, zlib.crc32(value.encode())
  raise TypeError(f"check_consistent takes int, float, bool, str or None values, got "
                  f"{type(value).__name__}: {value!r}")


def _decode(tag: int, payload: int) -> str:
  """Shows a gathered (tag, payload) pair."""
  if tag == 0:
    return "None"
  if tag == 2:
    return repr(struct.unpack("<d", struct.pack("<q", payload))[0])
  if tag == 3:
    return f"str with crc32={payload:#010x}"
  return str(payload)
