"""The dropless suite's 2-rank run: fixed, variable-split and padded all-to-alls.

`horovodrun -np 2 --gloo` (mesh data 1 × expert 2, T per rank = first --tokens, one intra-op
thread per rank), each routing of `dropless` (balanced, skewed):
  * layer steps of capacity 1.25 (the fixed [D, e, C, M] all-to-all), dropless with variable
    splits (`Communicator.all_to_all_v`), and dropless padded to the expert group's maximum
    count with the fixed all-to-all (`PaddedDropless`);
  * each one's all-to-alls alone (`exchanges`), so share = exchanges / layer step.
Bytes are those handed to the all-to-all per step, forward and backward, float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

from m6t_tf.bench import processes
from m6t_tf.bench.moe import candidates
from m6t_tf.bench.moe import dropless
from m6t_tf.layers import moe as moe_lib
from m6t_tf.parallel import horovod as hvd_lib

A2A_RANKS = dropless.A2A_RANKS
A2A_SHAPE = dropless.A2A_SHAPE


def _pad_row(x):
  """<[R, ...]> -> <[R+1, ...]>: a zero row that out-of-range indices read."""
  return tf.concat([x, tf.zeros_like(x[:1])], axis=0)


def _moved(x, src, inv):
  """x[src] (src injective) with a dense gradient: d_x = pad(d)[inv]."""
  @tf.custom_gradient
  def f(x):
    return tf.gather(x, src), lambda d: tf.gather(_pad_row(d), inv)
  return f(x)


class PaddedDropless(keras.layers.Layer):
  """A dropless MoE whose exchange pads every worker's rows to the expert group's maximum
  count and uses the fixed-size all-to-all: the alternative to variable splits (benchmark
  only), computing the same function as the MoE it wraps.

  It reuses the wrapped `MoE`'s public parts (its `router` and `experts` sublayers, its
  registered router `gating` and `capacity_for`) and the layer module's public dispatch functions, so its
  weights are the MoE's. Choice (k, t) goes to slot offset e·Cmax + its slot, Cmax = max over
  the group (`Communicator.max_over_group`) of any worker's rows for any one expert: the
  capacity path's index dispatch and combine with a run-time C = Cmax. The receiver computes
  the real rows only (unpadded into the grouped layout of `Experts` with `group_sizes`) and
  pads the results back for the return trip.
  """

  def __init__(self, moe: moe_lib.MoE, **kwargs):
    super().__init__(**kwargs)
    if moe.capacity_mode != "dropless":
      raise ValueError(f"PaddedDropless wraps a dropless MoE, got capacity_mode="
                       f"{moe.capacity_mode!r}")
    self.moe = moe

  def build(self, input_shape):
    self._dropped = self.add_weight(name="dropped_fraction", shape=(), initializer="zeros",
                                    trainable=False)
    self.built = True

  @property
  def stats(self) -> dict:
    """{"dropped_fraction"} of the last call, as `MoE.stats` names it."""
    return {"dropped_fraction": self._dropped}

  def call(self, inputs, training=None):
    moe = self.moe
    comm = moe.communicator
    m = inputs.shape[-1]
    x = tf.reshape(inputs, [-1, m])                                       # [T, M]
    logits = moe.router(tf.cast(x, tf.float32))                           # [T, E]
    r = moe.gating.route(logits, capacity=moe.capacity_for(x.shape[0], training=bool(training)),
                         training=bool(training))                       # the MoE's own router
    d, e = comm.expert_group_size, moe.num_local_experts
    counts = r.tokens_per_expert                                          # [E]
    cmax = comm.max_over_group(tf.reduce_max(counts))                     # Cmax over the group
    rp = dataclasses.replace(r, capacity=cmax)
    buffer = tf.reshape(moe_lib.dispatch_index(x, rp, moe.num_experts),
                        [d, e, cmax, m])                                  # [D, e, Cmax, M]
    received = comm.all_to_all(buffer)                                    # [D, e, Cmax, M]
    received_counts = comm.all_to_all(tf.reshape(counts, [d, e]))        # [D, e]
    # Expert-major [e, D, Cmax]: the real rows of expert j are contiguous once unpadded.
    real = tf.reshape(tf.range(cmax)[None, None] < tf.transpose(received_counts)[..., None],
                      [-1])                                               # [e·D·Cmax]
    src = tf.cast(tf.where(real)[:, 0], tf.int32)                         # [R]
    inv = tf.where(real, tf.cumsum(tf.cast(real, tf.int32)) - 1, tf.size(src))
    flat = tf.reshape(tf.transpose(received, [1, 0, 2, 3]), [-1, m])
    y = moe.experts(_moved(flat, src, inv), training=training,
                    group_sizes=tf.reduce_sum(received_counts, axis=0))   # [R, N]
    n = y.shape[-1]
    y_pad = _moved(_pad_row(y), inv, tf.concat([src, [tf.size(real)]], 0))  # [e·D·Cmax, N]
    y_pad = tf.transpose(tf.reshape(y_pad, [e, d, cmax, n]), [1, 0, 2, 3])
    returned = comm.all_to_all(y_pad)                                     # [D, e, Cmax, N]
    out = moe_lib.combine_index(returned, rp, moe.num_experts)            # [T, N]
    out = tf.ensure_shape(out, [x.shape[0], n])
    self._dropped.assign(r.dropped_fraction)
    return tf.reshape(out, tf.concat([tf.shape(inputs)[:-1], [n]], axis=0))


def padded_dropless(make_moe):
  """The `PaddedDropless` of the MoE `make_moe()` builds (same weights, same call)."""
  def make():
    layer, call = make_moe()
    return PaddedDropless(layer), call
  return make


def exchanges(comm, shape, counts) -> dict:
  """{variant: (fn, args)}: the all-to-alls one layer step makes (forward then backward),
  alone, on payloads of the sizes the layer sends, given the (identical) per-expert counts of
  each rank. Payloads and counts are arguments: made inside the function they would be
  constants, and Grappler's constant folding would run the chain once at trace time."""
  d, e, m = shape["D"], shape["e"], shape["M"]
  c = candidates.capacity(shape)
  counts_de = np.asarray(counts, np.int32).reshape(d, e)
  send = counts_de.sum(axis=1)                          # rows to worker d
  cmax = int(counts_de.max())
  normal = lambda *s: tf.random.stateless_normal(s, [5, 6])

  def capacity(y):
    for _ in range(4):                                  # forward x, y; backward dy, dx
      y = comm.all_to_all(y)
    return y

  def variable(y, counts, send):
    got, _ = comm.all_to_all_v(tf.reshape(counts, [-1]), tf.fill([d], e))  # counts
    for _ in range(2):                                  # forward x, y; backward dy, dx
      y, back = comm.all_to_all_v(y, send)
      y, _ = comm.all_to_all_v(y, back)
    return y, got

  def padded(y, counts):
    cm = comm.max_over_group(tf.reduce_max(counts))   # Cmax over the group
    got = comm.all_to_all(counts)
    y = y[:, :, :cm]
    for _ in range(4):
      y = comm.all_to_all(y)
    return y, got

  return {"capacity": (capacity, (normal(d, e, c, m),)),
          "variable": (variable, (normal(int(send.sum()), m), tf.constant(counts_de),
                                  tf.constant(send))),
          "padded": (padded, (normal(d, e, cmax, m), tf.constant(counts_de)))}


def measure_alltoall(args, shape, log) -> dict:
  """One rank of the 2-rank run (`horovodrun -np 2 --gloo`, mesh data=1 × expert=2).

  Per routing (balanced, skewed): the layer step of capacity 1.25 (fixed [D, e, C, M]
  all-to-all), dropless with variable splits (`Communicator.all_to_all_v`) and dropless padded
  to the group's maximum (`PaddedDropless`), each with its exchanges timed alone.

  Returns:
    {"rank", "results", "skipped", "alltoall": {routing: summary}} of this rank.
  """
  tf.config.threading.set_intra_op_parallelism_threads(1)   # 2 ranks share the 2 cores
  ctx = hvd_lib.init_horovod(expert=A2A_RANKS, num_experts=shape["E"], set_default=False)
  comm = ctx.communicator
  d, e, big_e, m, t = shape["D"], shape["e"], shape["E"], shape["M"], shape["T"]
  c = candidates.capacity(shape)
  x_shape = (shape["B"], shape["L"], m)
  cands, info = {}, {}
  for r in ("balanced", "skewed"):
    assign = dropless.pinned_experts(t, big_e, None if r == "balanced" else dropless.SKEW)
    counts = np.bincount(assign, minlength=big_e)                        # same on every rank
    counts_de = counts.reshape(d, e)
    send = counts_de.sum(axis=1)                                         # rows to worker d
    recv = d * counts_de[ctx.expert_index]                               # rows from each worker
    cmax = int(counts.max())
    f32 = 4
    info[r] = {
        "capacity": {"bytes": 4 * big_e * c * m * f32,
                     "remote_bytes": 4 * (d - 1) * e * c * m * f32, "slots": big_e * c},
        "variable": {"bytes": 2 * (int(send.sum()) + int(recv.sum())) * m * f32 + big_e * 4,
                     "remote_bytes": 2 * (int(send.sum() - send[ctx.expert_index])
                                          + int(recv.sum()) // d * (d - 1)) * m * f32,
                     "rows_received": int(recv.sum())},
        "padded": {"bytes": 4 * big_e * cmax * m * f32 + big_e * 4,
                   "remote_bytes": 4 * (d - 1) * e * cmax * m * f32, "cmax": cmax,
                   "rows_received": int(recv.sum())}}
    inputs = dropless.pinned_inputs(x_shape, assign, big_e)
    for variant, make in (
        ("capacity", dropless.moe(shape, pinned=True, communicator=comm)),
        ("variable", dropless.moe(shape, mode="dropless", pinned=True, communicator=comm)),
        ("padded", padded_dropless(dropless.moe(shape, mode="dropless", pinned=True,
                                                communicator=comm)))):
      cands[f"{r}/{variant}"] = candidates.Candidate(f"{r}/{variant}", make, x_shape, t,
                                                     inputs=inputs)

    for variant, (fn, fn_args) in exchanges(comm, shape, counts).items():
      cands[f"{r}/a2a/{variant}"] = candidates.ExchangeCandidate(f"{r}/a2a/{variant}", fn,
                                                                 fn_args, t)
  log(f"[{A2A_SHAPE} rank {ctx.rank}] {len(cands)} candidates, {args.repeats} rounds")
  times = candidates.time_candidates(list(cands.values()), args.repeats,
                                     log if ctx.rank == 0 else (lambda msg: None))
  results, skipped = [], []
  labels = {"capacity": f"capacity {shape['gamma']}, fixed all-to-all",
            "variable": "dropless, variable-split all-to-all",
            "padded": "dropless, padded to the group max, fixed all-to-all"}
  for key, cand in cands.items():
    if key not in times:
      skipped.append({"name": "alltoall", "variant": key, "shape": A2A_SHAPE,
                      "reason": cand.error})
  summary = {}
  row = candidates.row
  for r in ("balanced", "skewed"):
    sname = f"{A2A_SHAPE} {r}"
    base = f"{r}/variable"
    for variant in ("capacity", "variable", "padded"):
      key = f"{r}/{variant}"
      if key in times and base in times:
        stats = {"dropped_fraction": dropless.stat(cands[key].layer, "dropped_fraction")}
        results.append(row("alltoall-step", labels[variant], sname, cands[key], times, base,
                           labels["variable"], routing=r, exchange=variant, **stats,
                           **info[r][variant]))
    for variant in ("capacity", "variable", "padded"):
      key, a2a = f"{r}/{variant}", f"{r}/a2a/{variant}"
      if key in times and a2a in times:
        name = f"alltoall-share-{variant}"
        results.append(row(name, f"layer step, {labels[variant]}", sname, cands[key], times,
                           key, "its layer step", routing=r, exchange=variant))
        results.append(row(name, "its all-to-alls alone", sname, cands[a2a], times, key,
                           "its layer step", routing=r, exchange=variant, **info[r][variant]))
    a2a_base = f"{r}/a2a/variable"
    for variant in ("variable", "padded"):
      key = f"{r}/a2a/{variant}"
      if key in times and a2a_base in times:
        results.append(row("alltoall-alone", f"all-to-alls of {labels[variant]}", sname,
                           cands[key], times, a2a_base, "variable-split all-to-alls",
                           routing=r, exchange=variant, **info[r][variant]))
    got = lambda k, b: candidates.ratio(times, k, b) if k in times and b in times else None
    # The padded variant is the same function: same weights (seeded) and inputs, so its loss
    # and gradients must match the variable-split layer's.
    mismatch = None
    if base in times and f"{r}/padded" in times:
      (lv, gv), (lp, gp) = (cands[k].step(cands[k].x) for k in (base, f"{r}/padded"))
      mismatch = max(float(tf.reduce_max(tf.abs(a - b)) / (tf.reduce_max(tf.abs(a)) + 1e-30))
                     for a, b in zip([lv] + gv, [lp] + gp))
    summary[r] = {
        "padded_max_rel_difference": mismatch,
        "step_padded_over_variable": got(f"{r}/padded", base),
        "step_capacity_over_variable": got(f"{r}/capacity", base),
        "alone_padded_over_variable": got(f"{r}/a2a/padded", a2a_base),
        **{f"share_{v}": got(f"{r}/a2a/{v}", f"{r}/{v}") for v in ("capacity", "variable",
                                                                  "padded")},
        "bytes": {v: info[r][v] for v in ("capacity", "variable", "padded")}}
  for cand in cands.values():
    cand.release()
  out = {"rank": ctx.rank, "results": results, "skipped": skipped, "alltoall": summary}
  ctx.shutdown()
  return out


def run_alltoall(script: str, child_argv: list, log) -> dict:
  """Launches the 2-rank task under `horovodrun --gloo`; returns rank 0's part with every
  rank's byte counts.

  Args:
    script: the command line whose `--task=alltoall --result=<prefix>` runs one rank
      (`measure_alltoall`) and writes `<prefix>.rank<R>.json`.
    child_argv: its other arguments (suite, shapes, repeats).
    log: prints one progress line.
  """
  tmp = tempfile.mkdtemp(prefix="bench_moe_a2a-")
  try:
    result = os.path.join(tmp, "part")
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    cmd = [horovodrun, "-np", str(A2A_RANKS), "-H", f"localhost:{A2A_RANKS}", "--gloo",
           sys.executable, script, *child_argv, f"--result={result}"]
    env = processes.child_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    log(f"[{A2A_SHAPE}] horovodrun -np {A2A_RANKS} --gloo")
    proc = subprocess.run(cmd, cwd=processes.PACKAGE_ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    parts = []
    for rank in range(A2A_RANKS):
      path = f"{result}.rank{rank}.json"
      if os.path.exists(path):
        with open(path) as f:
          parts.append(json.load(f))
    if proc.returncode or len(parts) != A2A_RANKS:
      tail = (proc.stderr or proc.stdout or "")[-600:].strip().replace("\n", " | ")
      return {"results": [], "scaling_fit": {}, "alltoall": {},
              "skipped": [{"name": "alltoall", "variant": "*", "shape": A2A_SHAPE,
                           "reason": f"horovodrun exited with status {proc.returncode}: {tail}"}]}
    first = parts[0]
    for r, s in first["alltoall"].items():
      for v, b in s["bytes"].items():
        b["per_rank"] = [dict(p["alltoall"][r]["bytes"][v]) for p in parts]
    return {"results": first["results"], "skipped": first["skipped"], "scaling_fit": {},
            "alltoall": first["alltoall"]}
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
