"""FLOPs of a traced TensorFlow graph: the profiler's count and a count from matmul shapes.

  * TF profiler, all float ops: `tf.compat.v1.profiler.profile(graph, options=
    ProfileOptionBuilder.float_operation())`, i.e. every op with a registered "flops"
    statistic (matmuls and many element-wise ops);
  * TF profiler, matmul ops only: the same per-op statistics summed over MatMul and
    BatchMatMul*, as TF reports them;
  * shape count: 2 × output elements × contracted size of every MatMul, BatchMatMul* and
    Einsum op, from the op's static shapes. Einsum has no registered "flops" statistic, and
    TF's BatchMatMul statistic reads an attribute `transpose_a` that BatchMatMul ops do not
    have (theirs is `adj_x`), so it takes the wrong contracted dimension for weight gradients.
"""

from __future__ import annotations

import math
import re

import tensorflow as tf
# The profiler's own registry of per-op statistics (what `profile` sums); no public path.
from tensorflow.python.framework import ops as tf_ops

MATMUL_OPS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum")
# Expert matmuls: the MoE FFN's expert layer; Keras suffixes scopes with _1, _2 when retraced.
EXPERT_SCOPE = re.compile(r"/moe(_\d+)?/experts(_\d+)?/")
BACKWARD_SCOPE = "gradient_tape/"


def matmul_flops(op) -> int:
  """2 × output elements × contracted size of a MatMul, BatchMatMul* or two-operand Einsum."""
  out = math.prod(op.outputs[0].shape.as_list())
  if op.type == "Einsum":
    lhs, _ = op.get_attr("equation").decode().split("->")
    labels = {}
    for sub, tensor in zip(lhs.split(","), op.inputs):
      dims = tensor.shape.as_list()
      if "..." in sub:
        head, tail = sub.split("...")
        pairs = list(zip(head, dims[:len(head)])) + list(zip(tail, dims[len(dims) - len(tail):]))
      else:
        pairs = list(zip(sub, dims))
      labels.update(pairs)
    out_labels = op.get_attr("equation").decode().split("->")[1]
    return 2 * out * math.prod(labels[c] for c in set(labels) - set(out_labels))
  a = op.inputs[0].shape.as_list()
  adj = op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
  return 2 * out * (a[-2] if adj else a[-1])


def registered_flops(graph, op):
  """The op's registered "flops" statistic (what the profiler sums), or None if it has none."""
  return tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value


def count_graph(graph) -> dict:
  """FLOPs of one traced graph: the profiler's total and per-op-type counts (module docstring).

  Returns:
    {"profiler_total", "profiler_matmul", "profiler_by_type", "shape_matmul", "shape_by_type",
     "shape_forward", "shape_backward", "shape_experts", "matmul_ops_without_flops_statistic",
     "functions"}.

  Raises:
    RuntimeError: an op has a non-static shape, or the per-op statistics do not add up to the
      profiler's total (then the "matmul ops only" column would not be the profiler's).
  """
  options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  options["output"] = "none"
  total = int(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops)
  profiler_by_type: dict = {}
  shape_by_type: dict = {}
  unregistered: dict = {}
  shape = {"forward": 0, "backward": 0, "experts": 0}
  for op in graph.get_operations():
    value = registered_flops(graph, op)
    if value is not None:
      profiler_by_type[op.type] = profiler_by_type.get(op.type, 0) + int(value)
    if op.type not in MATMUL_OPS:
      continue
    if value is None:
      unregistered[op.type] = unregistered.get(op.type, 0) + 1
    if not all(t.shape.is_fully_defined() for t in list(op.inputs) + list(op.outputs)):
      raise RuntimeError(f"{op.name} ({op.type}) has a non-static shape; trace on a real batch")
    flops = matmul_flops(op)
    shape_by_type[op.type] = shape_by_type.get(op.type, 0) + flops
    shape["backward" if op.name.startswith(BACKWARD_SCOPE) else "forward"] += flops
    if EXPERT_SCOPE.search(op.name):
      shape["experts"] += flops
  if sum(profiler_by_type.values()) != total:
    raise RuntimeError(f"per-op flops statistics sum to {sum(profiler_by_type.values())}, the "
                       f"profiler's total is {total}")
  return {"profiler_total": total,
          "profiler_matmul": sum(v for k, v in profiler_by_type.items() if k in MATMUL_OPS),
          "profiler_by_type": dict(sorted(profiler_by_type.items())),
          "shape_matmul": sum(shape_by_type.values()),
          "shape_by_type": dict(sorted(shape_by_type.items())),
          "shape_forward": shape["forward"], "shape_backward": shape["backward"],
          "shape_experts": shape["experts"],
          "matmul_ops_without_flops_statistic": unregistered,
          "functions": function_flops(graph)}


def function_flops(graph) -> dict:
  """Registered flops inside the graph's function-valued ops (the tf.cond that applies the
  optimizer): the profiler sees only the outer graph's ops, so these are not in its total.
  Uses the FuncGraph's private function table; {} when this TF version does not have it."""
  out = {}
  for name, fn in sorted(getattr(graph, "_functions", {}).items()):
    inner = getattr(fn, "graph", None)
    if inner is None:
      continue
    flops = sum(int(v) for op in inner.get_operations()
                for v in [registered_flops(inner, op)] if v is not None)
    out[name] = {"registered_flops": flops, "ops": len(inner.get_operations())}
  return out
