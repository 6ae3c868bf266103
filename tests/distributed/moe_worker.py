"""One rank of the expert-parallel MoE checks; started by tests/test_parallel_moe.py under horovodrun.

    horovodrun -np 4 -H localhost:4 --gloo python tests/distributed/moe_worker.py \
        --mode equivalence --data 2 --expert 2 [--scope full|mesh] --out DIR

What "a W-rank run equals a 1-process run" means here. Rank r routes its own T tokens with a
capacity C computed from that T, so routing (and which tokens are dropped) is decided per rank.
The reference is therefore one process holding all E experts that calls the same layer once per
rank's token slice — W separate routing groups with the same C — on the same global batch and
weights, and minimises L = (1/W) Σ_r L_r, L_r the mean loss of slice r (plus its aux/z losses).
Feeding the whole global batch as a single group would be a different function (C computed from
W·T tokens, first-come-first-served across ranks), not a reference.

Under that objective the distributed run must give, on rank r (fp32, to ~1e-5):
  * the output and loss of slice r;
  * dL_r/dx_r (the rank's own tape, through both all-to-alls) = W · dL/dx_r of the reference;
  * router grad after `allreduce_gradients` (average over all ranks) = the reference's;
  * expert grads after `allreduce_gradients` (sum over the replica group / W) = the reference's
    grads of the rank's e experts, i.e. rows `expert_ids` of the full [E, ...] gradients.

`--scope full` runs every routing × dispatch variant, every dropless load, outer-group and drop
policy and unequal-batch variant; `--scope mesh` a subset that still covers both dispatches,
both routing families, the variable-size all-to-all under skew, the policies and the unequal
batches, plus everything that depends on the mesh (replica-group reduction, broadcast roots,
group capacities, metrics, the trainer's interface). `SCOPES` below lists what each runs.

Mode `failures` (mesh (2, 2) on 4 ranks) runs the bad configurations of `FAILURES` in turn, each
of which must fail on every rank: the first two before Horovod starts, the last two after one
good `init_horovod`. Each rank writes DIR/rank{r}.<name>.err with each error, waits (by files,
not Horovod, so a rank stuck in a collective shows up as a missing file) until all ranks wrote
theirs, and exits 1. Without that wait horovodrun kills the remaining ranks as soon as the
first one exits.

The launching test puts the checkout on PYTHONPATH (`tests/jobs.py`), so this script imports
the checkout's `m6t_tf`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# Several ranks share a couple of cores: one thread each keeps them from thrashing.
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

from m6t_tf.layers.moe import MoE  # noqa: E402
from m6t_tf.parallel import communicator as comm_lib  # noqa: E402
from m6t_tf.parallel import context as context_lib  # noqa: E402
from m6t_tf.parallel import horovod as hvd_lib  # noqa: E402
from m6t_tf.parallel.mesh import Mesh  # noqa: E402

# Distinct small sizes so that a transposed axis shows up as a shape error.
B, L, M, I, E = 2, 5, 6, 7, 8
T = B * L
CAPACITY_FACTOR = 1.0  # tight enough that some tokens are dropped
ROUTINGS = (("top_k", 1), ("top_k", 2), ("prototype", 2))
DISPATCHES = ("einsum", "index")
TOL = 1e-5
FP16_TOL = 1e-2

# What each scope runs (tests/test_parallel_moe.py mirrors this): all variants on one mesh,
# the subset that still shows every mesh-dependent property on the others.
SCOPES = {
    "full": dict(
        variants=tuple((r, k, d) for r, k in ROUTINGS for d in DISPATCHES),
        dropless=tuple((load, r, k) for load in ("balanced", "skewed") for r, k in ROUTINGS),
        policies=("groups2", "groups5", "drop_probability", "groups2_drop_probability"),
        policy_routings=(("top_k", 2), ("prototype", 2)),
        unequal=("top_k2_index", "prototype2_einsum", "top_k2_groups2", "dropless_top_k2"),
        fp16_wire=(("top_k", 2), ("prototype", 2))),
    "mesh": dict(
        variants=(("top_k", 2, "index"), ("prototype", 2, "einsum")),
        dropless=(("skewed", "top_k", 2),),
        policies=("groups2_drop_probability",),
        policy_routings=(("top_k", 2),),
        unequal=("top_k2_index", "dropless_top_k2"),
        fp16_wire=(("top_k", 2),)),
}


def env_rank() -> int:
  for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
    if os.environ.get(name, "").isdigit():
      return int(os.environ[name])
  return 0


def global_batch(world: int, tokens: int = T):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((world, tokens, M)).astype(np.float32)
  target = rng.standard_normal((world, tokens, M)).astype(np.float32)
  return x, target


def reference_weights():
  rng = np.random.default_rng(1)
  return dict(router=(0.5 * rng.standard_normal((M, E))).astype(np.float32),
              wi=(0.3 * rng.standard_normal((E, M, I))).astype(np.float32),
              wo=(0.3 * rng.standard_normal((E, I, M))).astype(np.float32))


def make_layer(communicator, routing, k, dispatch, weights, **kwargs):
  layer = MoE(E, I, routing=routing, k=k, capacity_factor=CAPACITY_FACTOR, dispatch=dispatch,
              aux_loss_weight=0.01, z_loss_weight=0.001, communicator=communicator, **kwargs)
  layer.build((None, M))
  ids = layer.expert_ids
  layer.router.kernel.assign(weights["router"])
  layer.experts.wi.assign(weights["wi"][ids])
  layer.experts.wo.assign(weights["wo"][ids])
  return layer


def slice_loss(layer, x, target):
  y = layer(x, training=True)
  loss = tf.reduce_mean(tf.reduce_sum(y * target, axis=-1)) + tf.add_n(layer.losses)
  return y, loss


def reference(routing, k, dispatch, weights, x_all, target_all, **kwargs):
  """One process, all E experts, each rank's slice routed as its own group."""
  world = x_all.shape[0]
  layer = make_layer(comm_lib.LocalCommunicator(), routing, k, dispatch, weights, **kwargs)
  x_all = tf.constant(x_all)
  with tf.GradientTape() as tape:
    tape.watch(x_all)
    outs, losses = [], []
    for s in range(world):
      y, loss = slice_loss(layer, x_all[s], target_all[s])
      outs.append(y)
      losses.append(loss)
    total = tf.add_n(losses) / world
  grads = tape.gradient(total, [x_all, layer.router.kernel, layer.experts.wi, layer.experts.wo])
  return dict(out=np.stack([o.numpy() for o in outs]), loss=np.array([l.numpy() for l in losses]),
              x=grads[0].numpy(), router=grads[1].numpy(), wi=grads[2].numpy(),
              wo=grads[3].numpy(), capacity=layer.last_capacity)


# Unequal batches: rank r routes T_r tokens (odd and even, all different), so on its own it
# would compute another C than its peers; the expert group must use the largest.
UNEQUAL = (("top_k2_index", dict(routing="top_k", k=2, dispatch="index")),
           ("prototype2_einsum", dict(routing="prototype", k=2, dispatch="einsum")),
           ("top_k2_groups2", dict(routing="top_k", k=2, dispatch="index", num_groups=2)),
           ("dropless_top_k2", dict(routing="top_k", k=2, dispatch="index",
                                    capacity_mode="dropless")))


def unequal_tokens(rank: int) -> int:
  return L * (1 + rank) - rank % 2                          # 5, 9, 15, 19, ...


def reference_unequal(kwargs, weights, xs, targets, capacities):
  """One process, all E experts; slice s routed on its own with the C its expert group
  agreed on (`capacities[s]`; None for dropless)."""
  kwargs = dict(kwargs)
  layer = make_layer(comm_lib.LocalCommunicator(), kwargs.pop("routing"), kwargs.pop("k"),
                     kwargs.pop("dispatch"), weights, **kwargs)
  xs = [tf.constant(x) for x in xs]
  with tf.GradientTape() as tape:
    tape.watch(xs)
    outs, losses = [], []
    for x, target, c in zip(xs, targets, capacities):
      y = layer(x, training=True, capacity=c)
      outs.append(y.numpy())
      losses.append(tf.reduce_mean(tf.reduce_sum(y * target, axis=-1)) + tf.add_n(layer.losses))
    total = tf.add_n(losses) / len(xs)
  grads = tape.gradient(total, xs + variables_of(layer))
  return dict(out=outs, loss=np.array([l.numpy() for l in losses]),
              x=[g.numpy() for g in grads[:len(xs)]], router=grads[-3].numpy(),
              wi=grads[-2].numpy(), wo=grads[-1].numpy())


def check_unequal_batches(checks, ctx, weights, tags):
  """Every rank routes a different T, eagerly (static shapes) and traced with T unknown (a
  Keras model's unknown batch): the expert group agrees on the largest C, and the result
  equals one process routing each slice with that C."""
  rank, world, comm = ctx.rank, ctx.size, ctx.communicator
  group = ctx.mesh.expert_group(rank)
  checks.equal("unequal/max_over_group", int(comm.max_over_group(tf.constant(rank * rank))),
               max(g * g for g in group))
  sizes = [unequal_tokens(r) for r in range(world)]
  rng = np.random.default_rng(7)
  x_all = [rng.standard_normal((t, M)).astype(np.float32) for t in sizes]
  target_all = [rng.standard_normal((t, M)).astype(np.float32) for t in sizes]
  x, target = tf.constant(x_all[rank]), tf.constant(target_all[rank])
  signature = [tf.TensorSpec([None, M], tf.float32)] * 2
  for tag, kwargs in UNEQUAL:
    if tag not in tags:
      continue
    kw = dict(kwargs)
    layer = make_layer(comm, kw.pop("routing"), kw.pop("k"), kw.pop("dispatch"), weights, **kw)
    own = lambda r: layer.capacity_for(layer.group_size(sizes[r]), True)
    dropless = kwargs.get("capacity_mode") == "dropless"
    agreed = [None if dropless else max(own(g) for g in ctx.mesh.expert_group(r))
              for r in range(world)]
    ref = reference_unequal(kwargs, weights, x_all, target_all, agreed)
    y, loss, gx, grads = distributed_step(ctx, layer, x, target)
    compare(checks, f"unequal/{tag}/eager", ref, layer.expert_ids, rank, world, y, loss, gx,
            grads, TOL)
    if not dropless:
      checks.equal(f"unequal/{tag}/eager/capacity", layer.last_capacity, agreed[rank])
      checks.info(f"unequal/{tag}/capacity_raised", agreed[rank] - own(rank))
    checks.info(f"unequal/{tag}/dropped_fraction", float(layer.stats["dropped_fraction"]))
    traced = tf.function(lambda x, t: distributed_step(ctx, layer, x, t),
                         input_signature=signature)
    y, loss, gx, grads = traced(x, target)
    compare(checks, f"unequal/{tag}/unknown_t", ref, layer.expert_ids, rank, world, y, loss,
            gx, grads, TOL)


def variables_of(layer):
  return [layer.router.kernel, layer.experts.wi, layer.experts.wo]


def local_grads(layer, x, target):
  with tf.GradientTape() as tape:
    tape.watch(x)
    y, loss = slice_loss(layer, x, target)
  grads = tape.gradient(loss, [x] + variables_of(layer))
  return y, loss, grads[0], grads[1:]


def distributed_step(ctx, layer, x, target, compression="none"):
  y, loss, gx, grads = local_grads(layer, x, target)
  reduced = ctx.allreduce_gradients(zip(grads, variables_of(layer)),
                                    context_lib.is_expert_variable,
                                    compression=compression)
  return y, loss, gx, [g for g, _ in reduced]


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    return float("inf")
  return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


class Checks:

  def __init__(self, rank):
    self.rank = rank
    self.items = []

  def close(self, name, got, want, tol):
    err = rel_err(got, want)
    self.items.append(dict(name=name, err=err, tol=tol, ok=bool(err <= tol)))

  def info(self, name, value):
    self.items.append(dict(name=name, value=value, ok=True))

  def equal(self, name, got, want):
    self.items.append(dict(name=name, got=repr(got), want=repr(want), ok=bool(got == want)))


def compare(checks, tag, ref, ids, rank, world, y, loss, gx, grads, tol):
  router, wi, wo = grads
  checks.close(f"{tag}/out", y, ref["out"][rank], tol)
  checks.close(f"{tag}/loss", loss, ref["loss"][rank], tol)
  checks.close(f"{tag}/grad_x", gx, world * ref["x"][rank], tol)
  checks.close(f"{tag}/grad_router", router, ref["router"], tol)
  checks.close(f"{tag}/grad_wi", wi, ref["wi"][ids], tol)
  checks.close(f"{tag}/grad_wo", wo, ref["wo"][ids], tol)


def check_trainer_interface(checks, ctx, layer, x, target, ref):
  """The methods m6t_tf.run.training calls on its worker context (LocalContext's interface)."""
  rank, world = ctx.rank, ctx.size
  checks.equal("trainer_interface/data_shard", ctx.data_shard(), (rank, world))
  checks.equal("trainer_interface/sizes", (ctx.expert_group_size, ctx.data_parallel_size),
               (ctx.mesh.expert, ctx.mesh.data))
  # reduce_gradients tells experts apart by variable path, allreduce_gradients by identity.
  _, _, _, grads = local_grads(layer, x, target)
  reduced = ctx.reduce_gradients(grads, variables_of(layer))
  for name, g in zip(("router", "wi", "wo"), reduced):
    want = ref[name] if name == "router" else ref[name][layer.expert_ids]
    checks.close(f"trainer_interface/reduce_gradients/{name}", g, want, TOL)
  # Global norm: replicated grads once, each expert once (summed over the expert group).
  norm = context_lib.global_norm(reduced, variables_of(layer), ctx)
  want = np.sqrt(sum(np.sum(ref[n].astype(np.float64) ** 2) for n in ("router", "wi", "wo")))
  checks.close("trainer_interface/global_norm", norm, want, TOL)
  checks.close("trainer_interface/sum_over_expert_group",
               ctx.sum_over_expert_group(tf.constant([float(rank), 1.0])),
               [float(sum(ctx.mesh.expert_group(rank))), float(ctx.mesh.expert)], 0.0)
  checks.equal("trainer_interface/all_finite/all_true",
               bool(ctx.all_finite(tf.constant(True))), True)
  checks.equal("trainer_interface/all_finite/one_false",
               bool(ctx.all_finite(tf.constant(rank != world - 1))), False)
  finite = tf.function(lambda f: ctx.all_finite(f))
  checks.equal("trainer_interface/all_finite/tf_function", bool(finite(tf.constant(True))), True)
  checks.close("trainer_interface/mean_metrics",
               ctx.mean_metrics({"loss": float(rank)})["loss"], (world - 1) / 2, 1e-6)
  # broadcast_state on all of the layer's variables (int32 and float32 statistics included).
  probe = make_layer(ctx.communicator, "top_k", 1, "index", reference_weights())
  probe.router.kernel.assign(np.full((M, E), rank + 1.0, np.float32))
  probe.experts.wi.assign(np.full(probe.experts.wi.shape, rank + 1.0, np.float32))
  probe.stats["tokens_per_expert"].assign(np.full((E,), rank, np.int32))
  ctx.broadcast_state(probe.variables)
  root = ctx.mesh.replica_root(rank)
  checks.equal("trainer_interface/broadcast_state",
               (float(probe.router.kernel.numpy().max()), float(probe.experts.wi.numpy().max()),
                int(probe.stats["tokens_per_expert"].numpy().max())),
               (1.0, root + 1.0, 0))
  checks.equal("trainer_interface/describe", f"as {ctx.mesh}" in ctx.describe(), True)


def run_equivalence(args, checks):
  mesh = Mesh(args.data, args.expert)
  ctx = hvd_lib.init_horovod(mesh, num_experts=E)
  rank, world = ctx.rank, ctx.size
  checks.rank = rank
  scope = SCOPES[args.scope]
  checks.equal("mesh/coords", (ctx.data_index, ctx.expert_index), mesh.coords(rank))
  checks.equal("mesh/expert_rank", ctx.communicator.expert_rank, rank % args.expert)
  weights = reference_weights()
  x_all, target_all = global_batch(world)
  x, target = tf.constant(x_all[rank]), tf.constant(target_all[rank])
  comm = ctx.communicator

  # Every routing × dispatch, eager; the all-to-all payload is counted on the first forward.
  for routing, k, dispatch in scope["variants"]:
    tag = f"{routing}{k}/{dispatch}"
    ref = reference(routing, k, dispatch, weights, x_all, target_all)
    layer = make_layer(comm, routing, k, dispatch, weights)
    comm.reset_counters()
    layer(x, training=True)
    c = layer.last_capacity
    checks.equal(f"{tag}/capacity", c, ref["capacity"])
    checks.equal(f"{tag}/alltoall_bytes", comm.bytes_sent, 2 * E * c * M * 4)
    checks.equal(f"{tag}/alltoall_bytes_reported", layer.alltoall_bytes_per_forward(),
                 2 * E * c * M * 4)
    checks.equal(f"{tag}/alltoall_calls", comm.calls, 2)
    y, loss, gx, grads = distributed_step(ctx, layer, x, target)
    compare(checks, tag, ref, layer.expert_ids, rank, world, y, loss, gx, grads, TOL)
    # Guards against a vacuous pass: the gradients compared are not all zero, and some
    # tokens were dropped (so capacity, not just the arithmetic, is being compared).
    checks.equal(f"{tag}/reference_grads_nonzero",
                 all(np.abs(ref[n]).max() > 1e-3 for n in ("router", "wi", "wo", "x")), True)
    checks.info(f"{tag}/dropped_fraction", float(layer.stats["dropped_fraction"].numpy()))
    if (routing, k, dispatch) == ("top_k", 2, "index"):
      _, _, _, grads16 = distributed_step(ctx, layer, x, target, compression="fp16")
      for name, g16, g in zip(("router", "wi", "wo"), grads16, grads):
        checks.close(f"{tag}/fp16_gradient_compression/{name}", g16, g, FP16_TOL)
      check_trainer_interface(checks, ctx, layer, x, target, ref)

  # Dropless: every rank sends a different number of rows to each other rank (variable-size
  # all-to-all); nothing is dropped, and the result equals one process. Then adversarial
  # routing (every token's first choice is expert 0, held by expert rank 0: inputs shifted
  # positive, router column 0 raised), under tf.function, in training and evaluation: no rank
  # may wait for sizes another rank does not send.
  skewed = dict(weights, router=weights["router"].copy())
  skewed["router"][:, 0] += 20.0
  loads = {"balanced": (weights, 0.0), "skewed": (skewed, 5.0)}
  for name, routing, k in scope["dropless"]:
    w, shift = loads[name]
    tag = f"dropless_{name}/{routing}{k}"
    ref = reference(routing, k, "index", w, x_all + shift, target_all,
                    capacity_mode="dropless")
    layer = make_layer(comm, routing, k, "index", w, capacity_mode="dropless")
    x = tf.constant(x_all[rank] + shift)
    y, loss, gx, grads = distributed_step(ctx, layer, x, target)
    compare(checks, tag, ref, layer.expert_ids, rank, world, y, loss, gx, grads, TOL)
    checks.equal(f"{tag}/no_drop", float(layer.stats["dropped_fraction"].numpy()), 0.0)
    tokens = ctx.sum_over_expert_group(tf.cast(layer.stats["tokens_per_expert"], tf.float32))
    checks.info(f"{tag}/max_over_mean_load", float(tf.reduce_max(tokens) / tf.reduce_mean(tokens)))
    step = tf.function(lambda x, t: distributed_step(ctx, layer, x, t))
    y, loss, gx, grads = step(x, target)
    compare(checks, f"{tag}/tf_function", ref, layer.expert_ids, rank, world, y, loss, gx,
            grads, TOL)
    evaluate = tf.function(lambda x: layer(x, training=False))
    checks.close(f"{tag}/eval", evaluate(x), ref["out"][rank], TOL)
  x = tf.constant(x_all[rank])

  # Outer-batch groups (each rank's T tokens in O groups, C from T/O; one all-to-all carries
  # all groups) and drop by probability, at the tight capacity: equal to one process.
  policies = {"groups2": dict(num_groups=2), "groups5": dict(num_groups=5),
              "drop_probability": dict(drop_policy="probability"),
              "groups2_drop_probability": dict(num_groups=2, drop_policy="probability")}
  for tag in scope["policies"]:
    kwargs = policies[tag]
    for routing, k in scope["policy_routings"]:
      name = f"policies/{tag}/{routing}{k}"
      ref = reference(routing, k, "index", weights, x_all, target_all, **kwargs)
      layer = make_layer(comm, routing, k, "index", weights, **kwargs)
      y, loss, gx, grads = distributed_step(ctx, layer, x, target)
      compare(checks, name, ref, layer.expert_ids, rank, world, y, loss, gx, grads, TOL)
      checks.info(f"{name}/dropped", float(layer.stats["dropped_fraction"].numpy()))

  check_unequal_batches(checks, ctx, weights, scope["unequal"])

  # Graph mode: the trainer runs the step under tf.function (named collectives in a graph).
  routing, k, dispatch = "prototype", 2, "index"
  ref = reference(routing, k, dispatch, weights, x_all, target_all)
  layer = make_layer(comm, routing, k, dispatch, weights)
  step = tf.function(lambda x, t: distributed_step(ctx, layer, x, t))
  for attempt in range(2):  # the second call reuses the trace
    y, loss, gx, grads = step(x, target)
    compare(checks, f"tf_function{attempt}/{routing}{k}/{dispatch}", ref, layer.expert_ids, rank,
            world, y, loss, gx, grads, TOL)

  # FP16 communication (M6-T): payload cast to float16 both ways, results close to fp32.
  comm16 = ctx.make_communicator("float16")
  for routing, k in scope["fp16_wire"]:
    tag = f"fp16_wire/{routing}{k}/index"
    ref = reference(routing, k, "index", weights, x_all, target_all)
    layer = make_layer(comm16, routing, k, "index", weights)
    comm16.reset_counters()
    y, loss, gx, grads = distributed_step(ctx, layer, x, target)
    c = layer.last_capacity
    checks.equal(f"{tag}/alltoall_bytes", comm16.bytes_sent, 2 * E * c * M * 2)
    checks.equal(f"{tag}/alltoall_bytes_reported", layer.alltoall_bytes_per_forward(),
                 2 * E * c * M * 2)
    compare(checks, tag, ref, layer.expert_ids, rank, world, y, loss, gx, grads, FP16_TOL)
    checks.equal(f"{tag}/not_bit_identical", rel_err(y, ref["out"][rank]) > 0, True)

  # Initial-state broadcast: dense from rank 0, experts from data_index 0 of the replica group.
  layer = make_layer(comm, "top_k", 1, "index", weights)
  layer.router.kernel.assign(np.full((M, E), rank + 1.0, np.float32))
  layer.experts.wi.assign(np.full(layer.experts.wi.shape, rank + 1.0, np.float32))
  layer.experts.wo.assign(np.full(layer.experts.wo.shape, -(rank + 1.0), np.float32))
  ctx.broadcast_state([layer.router.kernel, layer.experts.wi, layer.experts.wo])
  root = mesh.replica_root(rank)
  checks.equal("broadcast/router", float(np.unique(layer.router.kernel.numpy())[0]), 1.0)
  checks.equal("broadcast/wi", np.unique(layer.experts.wi.numpy()).tolist(), [root + 1.0])
  checks.equal("broadcast/wo", np.unique(layer.experts.wo.numpy()).tolist(), [-(root + 1.0)])

  # Metrics: averaged over ranks whatever order each rank built its dict in.
  items = [("a", float(rank)), ("b", 2.0 * rank), ("steps", 3)]
  metrics = ctx.mean_metrics(dict(items[::-1] if rank % 2 else items))
  mean_rank = (world - 1) / 2
  checks.close("metrics/a", metrics["a"].numpy(), mean_rank, 1e-6)
  checks.close("metrics/b", metrics["b"].numpy(), 2 * mean_rank, 1e-6)
  checks.close("metrics/steps", metrics["steps"].numpy(), 3.0, 1e-6)

  # The consistency check passes silently when all ranks agree.
  ctx.check_consistent(hvd_lib.capacity_fingerprint([layer], T))
  ctx.check_consistent({"wire": "float16", "gamma": 1.25, "flag": True, "none": None})
  checks.equal("check_consistent/agreeing_ranks_pass", True, True)
  return ctx


# The bad configurations of mode `failures`, in the order they run on mesh (2, 2): the first two
# fail in `init_horovod`'s validation before Horovod starts (so the next can still start it),
# the last two after one good start.
FAILURES = ("mesh_larger_than_world", "experts_not_divisible_at_init",
            "experts_not_divisible_in_layer", "capacity_mismatch")
FAILURE_MESH = (2, 2)
BAD_NUM_EXPERTS = 5


def run_failures(out: pathlib.Path, rank: int, world: int) -> int:
  """Runs each of FAILURES, which must raise on every rank; returns the exit status: 1 when
  every one raised here, 3 when one (wrongly) did not."""
  data, expert = FAILURE_MESH
  state = {}

  def mesh_larger_than_world():
    hvd_lib.init_horovod(Mesh(data, expert + 1))

  def experts_not_divisible_at_init():
    hvd_lib.init_horovod(Mesh(data, expert), num_experts=BAD_NUM_EXPERTS)

  def experts_not_divisible_in_layer():
    state["ctx"] = hvd_lib.init_horovod(Mesh(data, expert), num_experts=E)
    MoE(BAD_NUM_EXPERTS, I)

  def capacity_mismatch():
    ctx = state["ctx"]
    # The last rank was given another capacity factor (say, a stale config file): same T,
    # capacity 2·C there.
    factor = 2 * CAPACITY_FACTOR if ctx.rank == ctx.size - 1 else CAPACITY_FACTOR
    layer = MoE(E, I, capacity_factor=factor)
    layer.build((None, M))
    ctx.check_consistent(hvd_lib.capacity_fingerprint([layer], T))

  checks = dict(mesh_larger_than_world=mesh_larger_than_world,
                experts_not_divisible_at_init=experts_not_divisible_at_init,
                experts_not_divisible_in_layer=experts_not_divisible_in_layer,
                capacity_mismatch=capacity_mismatch)
  status = 1
  started = time.monotonic()
  for name in FAILURES:
    try:
      checks[name]()
    except Exception as e:  # pylint: disable=broad-except
      message = f"{type(e).__name__}: {e}"
      (out / f"rank{rank}.{name}.err").write_text(message)
      print(f"rank {rank} failed as expected in {name} after {time.monotonic() - started:.1f}s: "
            f"{message}", file=sys.stderr, flush=True)
    else:
      (out / f"rank{rank}.{name}.noerror").write_text("no error raised")
      print(f"rank {rank}: {name} raised no error", file=sys.stderr, flush=True)
      status = 3
  wait_for_peers(out, world * len(FAILURES))
  return status


def wait_for_peers(out: pathlib.Path, files: int, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if len(list(out.glob("rank*.err"))) + len(list(out.glob("rank*.noerror"))) >= files:
      return
    time.sleep(0.1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", required=True)
  parser.add_argument("--data", type=int, default=1)
  parser.add_argument("--expert", type=int, default=2)
  parser.add_argument("--scope", choices=sorted(SCOPES), default="full")
  parser.add_argument("--world", type=int, default=0, help="processes started (failures)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rank = env_rank()
  started = time.monotonic()

  if args.mode == "equivalence":
    checks = Checks(rank)
    ctx = run_equivalence(args, checks)
    record = dict(rank=ctx.rank, world=ctx.size, mesh=[args.data, args.expert],
                  seconds=time.monotonic() - started, checks=checks.items)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(record, indent=1))
    bad = [c for c in checks.items if not c["ok"]]
    print(f"rank {ctx.rank}: {len(checks.items) - len(bad)}/{len(checks.items)} checks passed "
          f"in {record['seconds']:.1f}s", flush=True)
    # All ranks leave together (see HorovodContext.shutdown).
    ctx.shutdown()
    return

  if args.mode != "failures":
    raise SystemExit(f"unknown mode {args.mode!r}")
  sys.exit(run_failures(out, rank, args.world))


if __name__ == "__main__":
  try:
    main()
  except SystemExit:
    raise
  except BaseException:  # an unexpected crash must still be visible in the test output
    traceback.print_exc()
    sys.stderr.flush()
    sys.exit(2)
