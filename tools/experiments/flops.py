r"""FLOPs per training step of the five routings × two capacities (paper Table 1, our scale).

  python tools/experiments/flops.py                      # the committed docs/results run
  python tools/experiments/flops.py --tiny --out_dir=runs/flops_tiny

The paper counted per-GPU GFLOPs with the TensorFlow profiler. For every routing of
`tools/experiments/gin/` (top-1, top-2, top-4, 2 top-1, 4 top-1 under Capacity k× and 1×; each
`gin/demo.gin` plus ROUTING / K / CAPACITY_MODE) this script puts side by side:

  planner   `m6t_tf.run.planning.plan()`: "flops_per_step" = 3 × "flops_forward" total, matmul
            FLOPs only (2 per multiply-add), arithmetic on the gin config.
  graph     the trainer's own step: `Trainer.train_step` traced on a real batch of the demo data
            (`get_concrete_function`, every shape static), and the forward pass alone
            (`M6Captioner.losses_and_metrics`), counted three ways:
              * TF profiler, all float ops: `tf.compat.v1.profiler.profile(graph, options=
                ProfileOptionBuilder.float_operation())`, i.e. every op with a registered
                "flops" statistic (matmuls and many element-wise ops);
              * TF profiler, matmul ops only: the same per-op statistics summed over MatMul and
                BatchMatMul*, as TF reports them;
              * shape count: 2 × output elements × contracted size of every MatMul,
                BatchMatMul* and Einsum op, from the op's static shapes. Einsum has no
                registered "flops" statistic, and TF's BatchMatMul statistic reads an attribute
                `transpose_a` that BatchMatMul ops do not have (theirs is `adj_x`), so it takes
                the wrong contracted dimension for the weight gradients; the shape count is
                what the planner is compared with.

C is the capacity per expert. The demo config binds REAL_TOKEN_FRACTION = None (C from the real
tokens' share in the data's metadata.json); the planner's C and the C of the trainer's MoE
layers are both reported and must agree (the script stops otherwise). Capacity mode 'dropless'
has data-dependent shapes, so no static count exists; it is not in the paper's Table 1 either.

Writes <out_dir>/flops.md (tables, command, machine) and flops.json (every count, per op type).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time

from m6t_tf import cli

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

# pylint: disable=g-import-not-at-top
import gin
import tensorflow as tf

from m6t_tf.run import planning
from m6t_tf.bench import experiments
from m6t_tf.bench import flops as flops_lib
from m6t_tf.bench import models
from m6t_tf.bench import report
from m6t_tf.bench import timing
# pylint: enable=g-import-not-at-top

NAME = "flops"
VARIANTS = experiments.ROUTING_VARIANTS


def parse_args(argv):
  p = cli.ArgumentParser(description=__doc__.split("\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                 help="comma-separated subset of " + ", ".join(v[0] for v in VARIANTS))
  p.add_argument("--tiny", action="store_true",
                 help="overlay gin/tiny.gin (seconds per variant; the test's run)")
  p.add_argument("--out_dir", default="docs/results",
                 help="where flops.md / flops.json are written (default docs/results)")
  args = p.parse_args(argv)
  known = [v[0] for v in VARIANTS]
  args.variants = [v for v in args.variants.split(",") if v]
  bad = [v for v in args.variants if v not in known]
  if bad or not args.variants:
    p.error(f"unknown or no variants {bad}; choose from {known}")
  if "top1" not in args.variants:
    p.error("--variants must include top1: every row is also given relative to it")
  args.out_dir = os.path.abspath(args.out_dir)
  return args


# --------------------------------------------------------------------------------------------
# One variant


def measure(gins: list[str]) -> dict:
  """Planner and graph counts of one config (gin files relative to the repository)."""
  cand = models.GinModel("flops", gins, [], False, [experiments.ROOT])
  cand.build()
  model, trainer, batch = cand.trainer.model, cand.trainer, cand.batch
  if cand.batch_source != "data":
    raise RuntimeError(f"no demo data ({cand.batch_source}); `make data` builds it")
  patch_dim = next(int(v.shape[0]) for v in model.trainable_variables
                   if "patch_embedding" in v.path and v.path.endswith("kernel"))
  plan = planning.plan_from_gin(gins, [], patch_dim=patch_dim, search_paths=[experiments.ROOT])
  c_plan = plan["config"]["capacity"]
  c_trainer = sorted({layer.last_capacity for layer in model.moe_layers})
  if c_trainer != [c_plan]:
    raise RuntimeError(f"{gins}: the planner's C = {c_plan} but the trainer's MoE layers use "
                       f"C = {c_trainer}; the two read REAL_TOKEN_FRACTION / MAX_LEN differently")
  step_graph = trainer.train_step.get_concrete_function(batch).graph
  forward = tf.function(lambda b: model.losses_and_metrics(b, training=True), autograph=False)
  forward_graph = forward.get_concrete_function(batch).graph
  out = {"gin_files": gins, "capacity_planner": c_plan, "capacity_trainer": c_trainer[0],
         "patch_dim": patch_dim, "batch_shapes": {k: v.shape.as_list() for k, v in batch.items()},
         "planner": {"flops_per_step": plan["flops_per_step"],
                     "flops_forward": plan["flops_forward"], "config": plan["config"]},
         "step": flops_lib.count_graph(step_graph),
         "forward": flops_lib.count_graph(forward_graph)}
  del cand, model, trainer, step_graph, forward_graph, forward
  gc.collect()
  return out


def expected_matmuls(planner: dict) -> dict:
  """What the planner's formulas predict the graph's matmul ops to hold.

  The planner counts two things no matmul op computes: the index dispatch's gate-weighted
  combine (element-wise multiply and sum, `dispatch_combine`) and, in 3 × forward, the input
  gradient of the patch projection (the image is data: nothing upstream wants its gradient).
  """
  fl = planner["flops_forward"]
  combine = fl["dispatch_combine"] if planner["config"]["dispatch"] == "index" else 0
  forward = fl["total"] - combine
  return {"forward": forward, "step": 3 * forward - fl["embeddings"],
          "combine_per_step": 3 * combine, "patch_input_grad": fl["embeddings"],
          "experts_per_step": 3 * fl["experts"]}


# --------------------------------------------------------------------------------------------
# Report


def _g(x) -> str:
  return f"{x / 1e9:.3f}"


def _r(x, digits: int = 3) -> str:
  return report.fmt(x, digits)


def build_rows(results: list) -> list:
  base = next(r for r in results if r["variant"] == "top1")
  rows = []
  for r in results:
    p, s = r["planner"]["flops_per_step"], r["step"]
    rows.append({
        "variant": r["variant"], "routing": r["routing"], "capacity": r["capacity"],
        "C_planner": r["capacity_planner"], "C_trainer": r["capacity_trainer"],
        "planner_flops_per_step": p, "shape_matmul_flops_per_step": s["shape_matmul"],
        "profiler_matmul_flops_per_step": s["profiler_matmul"],
        "profiler_total_flops_per_step": s["profiler_total"],
        "shape_over_planner": s["shape_matmul"] / p,
        "profiler_matmul_over_planner": s["profiler_matmul"] / p,
        "planner_vs_top1": p / base["planner"]["flops_per_step"],
        "shape_vs_top1": s["shape_matmul"] / base["step"]["shape_matmul"],
        "profiler_total_vs_top1": s["profiler_total"] / base["step"]["profiler_total"],
        "expert_flops_per_step_planner": r["expected"]["experts_per_step"],
        "expert_flops_per_step_graph": s["shape_experts"],
        "experts_vs_top1": s["shape_experts"] / base["step"]["shape_experts"],
        "forward_planner": r["planner"]["flops_forward"]["total"],
        "forward_shape_matmul": r["forward"]["shape_matmul"],
        "forward_profiler_matmul": r["forward"]["profiler_matmul"],
        "forward_profiler_total": r["forward"]["profiler_total"],
        "step_residual": p - s["shape_matmul"],
        "step_residual_explained": r["expected"]["combine_per_step"]
                                   + r["expected"]["patch_input_grad"],
        "forward_residual": r["planner"]["flops_forward"]["total"]
                            - r["forward"]["shape_matmul"],
        "optimizer_branch_flops": sum(f["registered_flops"]
                                      for f in s["functions"].values()),
    })
  return rows


def markdown(args, argv, machine, rows, results, share_1t) -> tuple[str, str]:
  cmd = " ".join(shlex.quote(a) for a in ["python", "tools/experiments/flops.py", *argv])
  header = ["routing", "capacity", "C (planner / trainer)", "planner GFLOPs/step",
            "matmul GFLOPs/step, shape count", "shape / planner",
            "profiler matmul GFLOPs/step (as TF reports)", "profiler matmul / planner",
            "profiler all float ops GFLOPs/step", "planner × top-1", "shape count × top-1",
            "expert matmuls GFLOPs/step", "experts × top-1"]
  table = report.markdown_table(header, [[
      r["routing"], r["capacity"], f"{r['C_planner']} / {r['C_trainer']}",
      _g(r["planner_flops_per_step"]), _g(r["shape_matmul_flops_per_step"]),
      _r(r["shape_over_planner"], 4), _g(r["profiler_matmul_flops_per_step"]),
      _r(r["profiler_matmul_over_planner"]), _g(r["profiler_total_flops_per_step"]),
      _r(r["planner_vs_top1"]), _r(r["shape_vs_top1"]), _g(r["expert_flops_per_step_graph"]),
      _r(r["experts_vs_top1"])] for r in rows], align="llr" + "r" * 10)
  fwd_table = report.markdown_table(
      ["routing", "capacity", "planner forward GFLOPs", "forward matmul GFLOPs, shape count",
       "planner − shape (MFLOPs)", "planner dispatch_combine (MFLOPs)",
       "profiler matmul forward GFLOPs", "profiler all float ops forward GFLOPs"],
      [[r["routing"], r["capacity"], _g(r["forward_planner"]), _g(r["forward_shape_matmul"]),
        f"{r['forward_residual'] / 1e6:.3f}",
        f"{res['planner']['flops_forward']['dispatch_combine'] / 1e6:.3f}",
        _g(r["forward_profiler_matmul"]), _g(r["forward_profiler_total"])]
       for r, res in zip(rows, results)], align="ll" + "r" * 6)

  top1 = next(r for r in rows if r["variant"] == "top1")
  res1 = next(r for r in results if r["variant"] == "top1")
  st1 = res1["step"]
  fl1 = res1["planner"]["flops_forward"]
  cfg = res1["planner"]["config"]
  explained = all(r["step_residual"] == r["step_residual_explained"] for r in rows)
  fwd_explained = all(
      r["forward_residual"] == (res["planner"]["flops_forward"]["dispatch_combine"]
                                if res["planner"]["config"]["dispatch"] == "index" else 0)
      for r, res in zip(rows, results))
  einsum_share = st1["shape_by_type"].get("Einsum", 0) / st1["shape_matmul"]
  bmm_shape = sum(v for k, v in st1["shape_by_type"].items() if k.startswith("BatchMatMul"))
  bmm_prof = sum(v for k, v in st1["profiler_by_type"].items() if k.startswith("BatchMatMul"))
  mm_shape, mm_prof = st1["shape_by_type"].get("MatMul", 0), st1["profiler_by_type"].get(
      "MatMul", 0)
  unregistered = sorted({t for r in results for t in r["step"]["matmul_ops_without_flops_statistic"]})
  non_matmul1 = st1["profiler_total"] - st1["profiler_matmul"]
  cap1 = [r for r in rows if r["capacity"] == "1×"]
  capk = [r for r in rows if r["capacity"] == "k×"]
  output_share = 3 * fl1["output_softmax"] / top1["planner_flops_per_step"]
  opt1 = top1["optimizer_branch_flops"]
  lines = [
      f"# FLOPs per training step of the routings (paper Table 1 at the demo scale)", "",
      f"Machine: {machine['nproc']} cores ({machine['cpu_model']}); TensorFlow "
      f"{machine['tensorflow']}, Keras {machine['keras']}, Python {machine['python']}. "
      f"Counts do not depend on the machine (they are read from traced graphs, nothing is timed).",
      "", "Produced by (from the repository root, `.venv/bin/python` with "
      "`TF_CPP_MIN_LOG_LEVEL=2`):", "", "```bash", cmd, "```", "",
      f"One worker (D = 1, so per-worker = whole model), "
      f"{'gin/tiny.gin overlay, ' if args.tiny else ''}batch "
      f"{cfg['batch_size_per_worker']} × {cfg['sequence_length']} positions = T = "
      f"{cfg['tokens_per_worker']:,}, E = {cfg['num_experts']}, M = {cfg['hidden_size']}, "
      f"I = {cfg['intermediate_size']}, {len(cfg['moe_layers'])} MoE layers, γ = "
      f"{cfg['capacity_factor']}, float32, dispatch '{cfg['dispatch']}'. Each config is "
      f"`tools/experiments/gin/<variant>.gin`{' + gin/tiny.gin' if args.tiny else ''}; the step "
      f"is `Trainer.train_step` traced on one batch of the demo data. Capacity mode "
      f"'dropless' is not here: its expert buffers have data-dependent shapes, so a traced "
      f"graph has no static count (and the paper's Table 1 has no such row).", "",
      table, "",
      "Columns. C: slots per expert, from the planner and from the trainer's MoE layers "
      "(they agree in every row; the script stops if not). Planner: `plan()[\"flops_per_step\"]` "
      "= 3 × forward matmul FLOPs. Shape count: 2 × output elements × contracted size of "
      "every MatMul, BatchMatMul* and Einsum op of the traced step (forward and gradient). "
      "Profiler matmul: the TF profiler's per-op \"flops\" statistics of the same ops. "
      "Profiler all float ops: `tf.compat.v1.profiler.profile(graph, options="
      "ProfileOptionBuilder.float_operation()).total_float_ops` of the step graph. "
      "Expert matmuls: the shape count of the ops under the MoE layers' `experts` scope.", "",
      "## What the profiler counts", "",
      f"It sums, over the ops of one graph, the \"flops\" statistic registered for the op's type "
      f"(`tensorflow/python/profiler/internal/flops_registry.py`): 2 per multiply-add for "
      f"MatMul and BatchMatMul (2 × output elements × contracted size), one per output element "
      f"for the registered element-wise ops (Mul, AddV2, Sub, RealDiv, Square, Rsqrt, ...), "
      f"about one per input element for reductions (Sum, Mean); ops with no registered "
      f"statistic (Einsum, Exp, Tanh, gathers, ...) count 0. Of the top-1 step's "
      f"{st1['profiler_total'] / 1e9:.3f} profiler GFLOPs, matmul ops are "
      f"{st1['profiler_matmul'] / 1e9:.3f} and element-wise and reduction ops "
      f"{non_matmul1 / 1e9:.3f} (by op type in flops.json).", "",
      f"Two gaps make the raw profiler matmul column disagree with the planner:", "",
      f"* {', '.join(unregistered) or 'no matmul type'} ops have no registered \"flops\" "
      f"statistic in TF {machine['tensorflow']}, so the profiler counts them as 0. Here they "
      f"are the attention scores (Q·Kᵀ, P·V) and the tied output softmax, "
      f"{100 * einsum_share:.1f}% of the top-1 step's matmul FLOPs by shape count. The shape "
      f"count includes them.",
      f"* BatchMatMul's statistic reads the attribute `transpose_a`, which BatchMatMul ops do "
      f"not have (they have `adj_x`): for the weight gradient of the expert matmuls "
      f"(adj_x = True) it multiplies by the wrong dimension (the last instead of the "
      f"contracted one). In the top-1 step it reports {bmm_prof / 1e9:.3f} GFLOPs of "
      f"BatchMatMul where the shapes give {bmm_shape / 1e9:.3f}; for MatMul, whose attribute "
      f"it reads correctly, both are {mm_prof / 1e9:.3f} vs {mm_shape / 1e9:.3f}.", "",
      f"The profiler also sees only the step graph's own ops: the optimizer update runs inside "
      f"a `tf.cond` (skipped on a non-finite step) whose branch functions it does not enter "
      f"(their registered element-wise FLOPs: {opt1 / 1e6:.1f} MFLOPs for top-1, not in the "
      f"all-float-ops column).", "",
      "## Why shape count / planner is not exactly 1", "",
      f"The planner counts two things no matmul op of the graph computes: (1) the index "
      f"dispatch's gate-weighted combine, 2·k·T·M per MoE layer, which the layer computes "
      f"element-wise (multiply, then sum over the k choices), × 3 for the step; (2) in "
      f"\"3 × forward\", the input gradient of the patch projection, "
      f"{fl1['embeddings'] / 1e6:.1f} MFLOPs: the image is data, so no op computes it. "
      + ("Planner − shape count equals (1) + (2) to the FLOP in every row"
         if explained else "Planner − shape count does NOT equal (1) + (2) in every row "
         "(flops.json: step_residual vs step_residual_explained)")
      + ("; for the forward pass alone planner − shape count equals (1) in every row"
         if fwd_explained else "; for the forward pass alone it does NOT equal (1) in every row")
      + " (below). "
      + ("So the planner's \"backward = 2 × forward\" holds exactly for every other matmul "
         "(the gathers of the token embedding and index dispatch have matmul-free gradients), "
         "and what remains outside its count is element-wise: " if explained and fwd_explained
         else "So some matmul is counted differently by the planner and the graph; ")
      + f"the profiler's all-float-ops column adds "
      f"{100 * (top1['profiler_total_flops_per_step'] - st1['profiler_matmul']) / top1['planner_flops_per_step']:.1f}% "
      f"of the planner's top-1 number in element-wise ops, plus the optimizer above.", "",
      "## The paper's question: cost relative to top-1", "",
      f"Capacity 1× rows cost {', '.join(_r(r['shape_vs_top1'], 4) for r in cap1)} × top-1's "
      f"matmul FLOPs (shape count; {', '.join(r['routing'] for r in cap1)}), since C and thus "
      f"the expert buffers are top-1's. Capacity k× rows cost "
      f"{', '.join(_r(r['shape_vs_top1']) for r in capk)} × top-1 "
      f"({', '.join(r['routing'] for r in capk)}): the expert matmuls scale with C, about "
      f"k × top-1's (experts column: {', '.join(_r(r['experts_vs_top1'], 2) for r in capk)} "
      f"× top-1's). The planner gives Capacity 1× "
      f"{', '.join(_r(r['planner_vs_top1']) for r in cap1)} × top-1: its element-wise "
      f"combine term grows with k. At this scale the tied output softmax "
      f"(V = {cfg['vocab_size']:,}) is {100 * output_share:.0f}% of top-1's planner FLOPs, "
      f"which flattens the whole-step ratios; in the paper's models the experts dominate "
      f"(the planner's `moe_expert_flops_share` of one MoE layer of gin/1T.gin: "
      f"{100 * share_1t:.1f}%).", "",
      "## Forward pass alone", "", fwd_table, "",
      "The forward graph is `M6Captioner.losses_and_metrics(batch, training=True)`; its "
      "profiler columns have the same two gaps as the step's.", ""]
  return "\n".join(lines), table


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  experiments.quiet_retracing()
  machine = timing.machine_info()
  info = {v[0]: v for v in VARIANTS}
  results = []
  cwd = os.getcwd()
  os.chdir(experiments.ROOT)   # gin files name includes and data relative to the repository
  try:
    for variant in args.variants:
      gins = ([f"{experiments.GIN_DIR}/{variant}.gin"]
              + ([experiments.TINY_GIN] if args.tiny else []))
      start = time.time()
      r = measure(gins)
      _, r["routing"], r["capacity"] = info[variant]
      r["variant"] = variant
      r["expected"] = expected_matmuls(r["planner"])
      results.append(r)
      print(f"{variant}: C={r['capacity_planner']}, planner "
            f"{r['planner']['flops_per_step'] / 1e9:.3f} GFLOPs/step, shape count "
            f"{r['step']['shape_matmul'] / 1e9:.3f} ({time.time() - start:.1f} s)",
            file=sys.stderr, flush=True)
  finally:
    gin.clear_config()
    os.chdir(cwd)
  # The paper's scale, for the text: arithmetic only, nothing is built.
  share_1t = planning.plan_from_gin(
      ["gin/1T.gin"], search_paths=[experiments.ROOT])["moe_expert_flops_share"]
  gin.clear_config()
  rows = build_rows(results)
  machine["loadavg_end"] = list(os.getloadavg())
  md, table = markdown(args, argv, machine, rows, results, share_1t)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, f"{NAME}.md"), "w") as f:
    f.write(md.rstrip() + "\n")
  with open(os.path.join(args.out_dir, f"{NAME}.json"), "w") as f:
    json.dump({"experiment": NAME, "argv": argv, "tiny": args.tiny, "machine": machine,
               "rows": rows, "results": results,
               "moe_expert_flops_share_1T": share_1t}, f, indent=1, sort_keys=True, default=int)
  print(table)
  print(f"wrote {experiments.rel(os.path.join(args.out_dir, NAME + '.md'))}, "
        f"{experiments.rel(os.path.join(args.out_dir, NAME + '.json'))}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
