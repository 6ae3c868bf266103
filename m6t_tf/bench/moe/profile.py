"""Profile mode: per-op device time of the MoE against its floor, what the MoE adds op by op.

Layer suite: MoE top-1 (index and einsum dispatch) vs the bare expert matmuls at the first
shape; dropless suite: dropless and capacity top-1 at balanced routing vs the bare experts.
Run with inter-op parallelism 1 (the command line sets it), so op times add up.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile

import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from m6t_tf.bench.moe import candidates
from m6t_tf.bench.moe import dropless
from m6t_tf.bench.moe import routing


def profile(args, log) -> dict:
  """Per-op device time of MoE (top1, index) and its floor: what the MoE adds, op by op."""
  if args.suite == "dropless":
    shape_name, shape = next(iter(dropless.dropless_shapes(args).items()))
    x_shape = (shape["B"], shape["L"], shape["M"])
    balanced = dropless.pinned_experts(shape["T"], shape["E"])
    # (MoE, its floor, a third column): dropless and capacity top-1 at balanced routing.
    inputs = dropless.pinned_inputs(x_shape, balanced, shape["E"])
    specs = (("dropless", dropless.moe(shape, mode="dropless", pinned=True), x_shape, inputs),
             ("bare", candidates.floor(shape), (shape["E"], shape["T"] // shape["E"], shape["M"]),
              None),
             ("capacity", dropless.moe(shape, pinned=True), x_shape, inputs))
  else:
    shape_name, shape = next(iter(routing.shapes_for(args).items()))
    x_shape = (shape["B"], shape["L"], shape["M"])
    specs = (("moe_index", candidates.ours(shape), x_shape, None),
             ("floor", candidates.floor(shape),
              (shape["E"] // shape["D"], shape["D"] * candidates.capacity(shape), shape["M"]),
              None),
             ("moe_einsum", candidates.ours(shape, dispatch="einsum"), x_shape, None))
  out = {"shape": shape_name, "steps": 3, "ops": {}}
  # The first profiler session of a process runs its ops markedly slower: warm it up first.
  tf.profiler.experimental.start(tempfile.mkdtemp(prefix="bench_moe_profile_"))
  tf.reduce_sum(tf.matmul(tf.ones([512, 512]), tf.ones([512, 512]))).numpy()
  tf.profiler.experimental.stop()
  for key, make, in_shape, inputs in specs:
    c = candidates.Candidate(key, make, in_shape, shape["T"], inputs=inputs)
    c.build()
    c.run()
    logdir = tempfile.mkdtemp(prefix="bench_moe_profile_")
    tf.profiler.experimental.start(logdir)
    for _ in range(out["steps"]):
      c.run()
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
      space.ParseFromString(f.read())
    ops = collections.Counter()
    for plane in space.planes:
      for line in plane.lines:
        if not line.name.startswith("tf_Compute"):
          continue
        for ev in line.events:
          name = plane.event_metadata[ev.metadata_id].name
          if name in ("ExecutorState::Process", "ParallelFor"):
            continue
          name = re.sub(r"(mo_e|experts|router)(_\d+)*/", "", name)
          ops[name] += ev.duration_ps / 1e9 / out["steps"]           # ms per step
    out["ops"][key] = dict(ops)
    c.release()
    log(f"  profiled {key}: {sum(ops.values()):.1f} ms of op time per step")
  return out


def profile_table(prof, top=12) -> str:
  cands = tuple(prof["ops"])                    # (MoE, its floor, a third MoE), as profiled
  first, floor, third = cands
  by_type = {c: {} for c in cands}
  for c in cands:
    for name, ms in prof["ops"][c].items():
      kind = name.rsplit(":", 1)[-1]
      by_type[c][kind] = by_type[c].get(kind, 0.0) + ms
  a, b, e = (by_type[c] for c in cands)
  lines = [f"Op time by op type, ms per step, shape {prof['shape']} (inter-op parallelism 1)", "",
           f"| op type | {first} | {floor} | {first} - {floor} | {third} |",
           "|---|---:|---:|---:|---:|"]
  for k in sorted(set(a) | set(b) | set(e), key=lambda k: -max(a.get(k, 0), e.get(k, 0)))[:top]:
    lines.append(f"| {k} | {a.get(k, 0):.2f} | {b.get(k, 0):.2f} | "
                 f"{a.get(k, 0) - b.get(k, 0):+.2f} | {e.get(k, 0):.2f} |")
  total = {c: sum(prof["ops"][c].values()) for c in cands}
  lines.append(f"| **all ops** | {total[first]:.1f} | {total[floor]:.1f} | "
               f"{total[first] - total[floor]:+.1f} | {total[third]:.1f} |")
  for c in (first, third):
    ops = sorted(((ms, n) for n, ms in prof["ops"][c].items()
                  if "MatMul" not in n and "Einsum" not in n.split(":")[-1]), reverse=True)[:top]
    lines += ["", f"{c}: largest ops other than matmuls (ms per step)", ""]
    lines += [f"- {n}: {ms:.2f}" for ms, n in ops]
  return "\n".join(lines)
