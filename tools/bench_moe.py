r"""Forward+backward benchmark of one M6-T MoE FFN layer, against its floor, a dense FFN and peers.

  python tools/bench_moe.py                        # full run (~25 min on 2 cores), table
  python tools/bench_moe.py --format=json --out=runs/bench_moe.json
  python tools/bench_moe.py --smoke --format=json  # tiny shapes, a few seconds (tests)
  python tools/bench_moe.py --tokens=2048,8192 --repeats=7 --sections=routing,peers
  python tools/bench_moe.py --profile              # which ops the MoE adds to its expert matmuls

What is timed: one `tf.function` step = forward + backward (gradients w.r.t. the input and every
trainable weight) of one layer, training=True, float32, dropout 0; tracing and one warm-up call
excluded. Machines here are shared, so no absolute time is a claim: every shape's candidates are
built in one process and timed *interleaved* (round r times every candidate once, in an order
rotated each round), and each ratio is the median over rounds of (candidate / baseline) measured
in the same round. `median_s` is reported to show scale only.

Shapes (dimension letters of `m6t_tf.layers.moe`'s docstring):
  * "worker": one worker of the paper's base model (E = 32 experts over D = 8 workers, so e = 4
    local experts; M = 1024, I = 4096, γ = 1.25) with T = 4096 tokens (B = 32 × L = 128, 4× the
    paper's 8 sequences per GPU so that top-1 takes about a second here). The all-to-all is a
    loopback (identity): the worker computes exactly its real [D, e, C, M] share; the network
    is not measured.
  * "T=<n>" for each --tokens value: the issue's target shapes, one process holding all experts
    (D = 1): E = 8, M = 512, I = 2048, γ = 1.25.
  * scaling: T = 1k…16k at the issue's E, M, I, top-1, both dispatches, with peak memory.

Groups (the `name` of a result) and their baselines (`ratio_to_baseline` = median over rounds of
median_s / baseline's, so < 1 is faster; for peers it is peer time / ours = our tokens/s ÷ theirs):
  routing   top1, top2, top4, 2xtop1, 4xtop1 (expert prototyping) × capacity k× and 1×, index
            dispatch, baseline top1 (capacity k× = 1× for top-1; both are measured, an A/A check)
  dispatch  einsum vs index for top1 and top2 (capacity k×); baseline the same routing, index
  floor     the whole MoE layer (index, einsum) vs the bare `Experts` layer on [e, D·C, M] inputs
            of the same size; baseline the floor
  dense     MoE top-k (capacity k×) vs a dense FFN of intermediate k·I (same activated FLOPs; the
            MoE also computes the γ = 1.25 capacity padding): one `Experts` expert on all T
            tokens (see `_dense`); baseline the dense FFN
  peer      Model Garden `MoeLayer` (experts-choose routing, capacity factor k·γ, so the same
            E·C slots) vs ours (GeLU); Keras-Hub `MixtralSparseMoeBlock` (SwiGLU, top-k, computes
            all E experts on every token) vs ours with SwiGLU; baseline ours at the same k
  scaling   time and peak memory vs T; baseline the smallest T of the same dispatch

JSON (--format=json), schema_version 1:
  {"schema_version": 1, "tool": "tools/bench_moe.py", "argv": [...], "smoke": bool,
   "repeats": int, "isolated": bool (one process per shape and for the scaling),
   "machine": {"nproc", "cpu_model", "loadavg_start", "loadavg_end", "tensorflow", "keras", ...},
   "shape": {"worker": {"E", "D", "e", "M", "I", "T", "B", "L", "gamma"}, "T=2048": {...}, ...},
   "peers": {"model_garden": {"available": bool, "version", "how", "reason"}, "keras_hub": {...}},
   "results": [{"name", "variant", "shape", "tokens", "median_s", "ratio_to_baseline",
                "baseline", "is_baseline", "tokens_per_s", "repeats", "times_s", and for scaling
                "peak_bytes", "largest_intermediate_bytes", "largest_intermediate"}],
   "skipped": [{"name", "variant", "shape", "reason"}],
   "scaling_fit": {"index": {"slope", "slope_last_doubling", "slope_abs_medians", "tokens"},
                   "einsum": {...}},
   "targets": [{"name", "threshold", "comparison" ("<=" or ">="), "measured" (float or null),
                "evaluated": bool, "holds": bool, "note"}]}
A target that could not be measured (e.g. a peer is not installed) has evaluated=false and
holds=false. The exit status is 0 whether or not targets hold (they are benchmarks, not tests).

Suite dropless (--suite=dropless; sections balanced, skewed, groups, alltoall; ~5 min):
  python tools/bench_moe.py --suite=dropless --out=runs/bench_dropless.json
  python tools/bench_moe.py --suite=dropless --profile   # dropless vs bare vs capacity, by op
Top-1 at the issue's shapes (E = 8, M = 512, I = 2048, one process, T = each --tokens). The
routing is fixed: the router maps the inputs' first E features, which carry the one-hot of each
token's expert, to its logits with a margin (`m6t_tf.bench.moe.dropless`):
  balanced  token t to expert t mod E. dropless vs capacity 1.25 (target <= 0.90: it computes
            T rows instead of γ·T slots), vs the bare `Experts` on [E, T/E, M] (<= 1.10), and
            the bare expert matmuls on per-expert row blocks (`dropless.bare_rows`)
  skewed    60% of the tokens to expert 0, the rest evenly over the others: dropless vs the
            bare matmuls on the same per-expert rows (<= 1.15); capacity 1.25's dropped fraction
  groups    capacity 1.25 with O = 1, 2, 4, 8 outer groups, the model's own router (natural)
            and skewed: time ratio to O = 1, dropped fraction
  what-if   rows "experts' weights unstacked once": formerly a benchmark-only variant of the
            experts' grouped call, which the layer adopted; now a second copy of the layer
            itself, the same computation: a control of run-to-run noise
  alltoall  `horovodrun -np 2 --gloo` (mesh data 1 × expert 2, T per rank = first --tokens,
            one intra-op thread per rank): layer steps of capacity 1.25 (fixed all-to-all),
            dropless with variable splits, and dropless padded to the expert group's maximum
            count with the fixed all-to-all (`alltoall.PaddedDropless`), balanced and skewed;
            each one's all-to-alls alone (`exchanges`), so share = exchanges / layer step
JSON as above plus "suite": "dropless" and
  "alltoall": {routing: {"step_padded_over_variable", "step_capacity_over_variable",
               "alone_padded_over_variable", "share_capacity", "share_variable",
               "share_padded", "padded_max_rel_difference",
               "bytes": {variant: {"bytes", "remote_bytes", ..., "per_rank": [...]}}}};
result rows carry "dropped_fraction", "load_cv", "rows_computed" (slots or real rows).
Bytes are those handed to the all-to-all per step, forward and backward, float32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from m6t_tf import cli

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

# pylint: disable=g-import-not-at-top
import tensorflow as tf

from m6t_tf.bench import processes
from m6t_tf.bench import report as report_lib
from m6t_tf.bench import timing
from m6t_tf.bench.moe import alltoall
from m6t_tf.bench.moe import dropless
from m6t_tf.bench.moe import peers
from m6t_tf.bench.moe import profile
from m6t_tf.bench.moe import routing
from m6t_tf.bench.moe import scaling
from m6t_tf.bench.moe import tables
# pylint: enable=g-import-not-at-top

SCHEMA_VERSION = 1
SUITES = ("layer", "dropless")


def _parse_ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv):
  p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--format", choices=("table", "json"), default="table")
  p.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds (tests)")
  p.add_argument("--tokens", type=_parse_ints, default=None,
                 help="T of the issue's target shapes, comma-separated (default 2048,8192)")
  p.add_argument("--scaling_tokens", type=_parse_ints, default=None,
                 help="T of the scaling section (default 1024,2048,4096,8192,16384)")
  p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; smoke 3)")
  p.add_argument("--suite", choices=SUITES, default="layer",
                 help="layer: the sections above (default); dropless: dropless experts, "
                      "outer groups and the 2-rank all-to-all (see 'Suite dropless' above)")
  p.add_argument("--sections", default=None,
                 help=f"comma-separated subset of the suite's sections (layer: "
                      f"{','.join(routing.SECTIONS)}; dropless: "
                      f"{','.join(dropless.DROPLESS_SECTIONS)})")
  p.add_argument("--no_worker", action="store_true", help="skip the per-worker shape")
  p.add_argument("--no_peers", action="store_true", help="do not import the peers")
  p.add_argument("--profile", action="store_true",
                 help="instead of timing: per-op profile of MoE (top-1; index and einsum) vs its "
                      "floor at the worker shape, or with --no_worker the first --tokens shape "
                      "(inter-op parallelism 1, so op times add up)")
  p.add_argument("--out", default=None,
                 help="also write the JSON report to this file (rewritten after every task)")
  p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                 help="run each shape and the scaling in its own process (auto: yes unless "
                      "--smoke); TF's CPU allocator keeps the memory a large einsum grew")
  p.add_argument("--task", default=None, help=argparse.SUPPRESS)  # internal: one child task
  p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # internal: 2-rank output
  args = p.parse_args(argv)
  allowed = routing.SECTIONS if args.suite == "layer" else dropless.DROPLESS_SECTIONS
  if args.sections is None:
    args.sections = ",".join(allowed)
  unknown = set(args.sections.split(",")) - set(allowed)
  if unknown:
    p.error(f"unknown --sections {sorted(unknown)} for --suite={args.suite}; allowed: {allowed}")
  args.sections = tuple(s for s in allowed if s in args.sections.split(","))
  if args.repeats is None:
    args.repeats = 3 if args.smoke else 7
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  if args.tokens is None:
    args.tokens = [64] if args.smoke else [2048, 8192]
  if args.scaling_tokens is None:
    args.scaling_tokens = [32, 64, 128] if args.smoke else [1024, 2048, 4096, 8192, 16384]
  return args


def run_task(task: str, args, shapes, peer_modules, log) -> dict:
  """One task of the suite in this process: a shape, or the scaling section."""
  results, skipped, fit = [], [], {}
  if args.suite == "dropless":
    dropless.measure_dropless(task, shapes[task], args, results, skipped, log)
  elif task == "scaling":
    scaling.measure_scaling(args, results, skipped, fit, log)
  else:
    routing.measure_shape(task, shapes[task], args, peer_modules, results, skipped, log)
  return {"results": results, "skipped": skipped, "scaling_fit": fit}


def _child_argv(args, task: str) -> list[str]:
  argv = [f"--tokens={','.join(map(str, args.tokens))}",
          f"--scaling_tokens={','.join(map(str, args.scaling_tokens))}",
          f"--repeats={args.repeats}", f"--sections={','.join(args.sections)}", f"--task={task}",
          f"--suite={args.suite}"]
  return argv + [flag for flag, on in (("--smoke", args.smoke), ("--no_peers", args.no_peers),
                                       ("--no_worker", args.no_worker)) if on]


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  tf.get_logger().setLevel("ERROR")  # one tf.function per candidate is the design, not a retrace
  if args.profile:
    tf.config.threading.set_inter_op_parallelism_threads(1)
    prof = profile.profile(args, log)
    print(json.dumps(prof, indent=1) if args.format == "json" else profile.profile_table(prof))
    return 0
  is_dropless = args.suite == "dropless"
  shapes = dropless.dropless_shapes(args) if is_dropless else routing.shapes_for(args)
  peer_status, peer_modules = (({}, {}) if is_dropless else peers.import_peers(
      not args.no_peers and "peers" in args.sections))
  if args.task == "alltoall":                       # one rank of the 2-rank run
    part = alltoall.measure_alltoall(args, shapes[dropless.A2A_SHAPE], log)
    with open(f"{args.result}.rank{part['rank']}.json", "w") as f:
      json.dump(part, f)
    return 0
  if args.task:
    print(json.dumps(run_task(args.task, args, shapes, peer_modules, log)))
    return 0
  machine = timing.machine_info()
  isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.smoke)
  if is_dropless:
    layer_sections = {"balanced", "skewed", "groups"} & set(args.sections)
    tasks = [s for s in shapes if s != dropless.A2A_SHAPE] if layer_sections else []
    tasks += ["alltoall"] if "alltoall" in args.sections else []
  else:
    tasks = list(shapes) + (["scaling"] if "scaling" in args.sections else [])
  report = {"schema_version": SCHEMA_VERSION, "tool": "tools/bench_moe.py", "argv": argv,
            "suite": args.suite, "smoke": args.smoke, "repeats": args.repeats,
            "isolated": isolate, "machine": machine, "shape": shapes, "peers": peer_status,
            "results": [], "skipped": [], "scaling_fit": {}, "targets": []}
  if is_dropless:
    report["alltoall"] = {}

  def evaluate():
    if is_dropless:
      return dropless.evaluate_dropless_targets(report["results"], shapes, args.sections)
    return routing.evaluate_targets(report["results"], report["scaling_fit"], shapes,
                                    peer_status, args.sections)

  for task in tasks:
    if task == "alltoall":
      part = alltoall.run_alltoall(os.path.abspath(__file__), _child_argv(args, "alltoall"), log)
    elif isolate:
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), *_child_argv(args, task)],
                            stdout=subprocess.PIPE, text=True, env=processes.child_env())
      if proc.returncode != 0:
        report["skipped"].append({"name": task, "variant": "*", "shape": task,
                                  "reason": f"its process exited with status {proc.returncode}"})
        continue
      part = json.loads(proc.stdout)
    else:
      part = run_task(task, args, shapes, peer_modules, log)
    report["results"] += part["results"]
    report["skipped"] += part["skipped"]
    report["scaling_fit"].update(part["scaling_fit"])
    if is_dropless:
      report["alltoall"].update(part.get("alltoall", {}))
    machine["loadavg_end"] = list(os.getloadavg())
    report["targets"] = evaluate()
    if args.out:                                    # rewritten after every task
      report_lib.write_json(args.out, report)
  machine["loadavg_end"] = list(os.getloadavg())
  report["targets"] = evaluate()
  report_lib.emit(report, format=args.format,
                  table=tables.dropless_table if is_dropless else tables.table)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
