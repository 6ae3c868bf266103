r"""Does expert prototyping pay more as the model grows? top-1 vs 4 top-1 at three sizes.

  python tools/experiments/scale.py                           # the committed docs/results run
  python tools/experiments/scale.py --seeds=0,1,2,3,4 --steps=600

The paper (§3, Figure 6): expert prototyping is "more effective in training larger models". At
the sizes this machine trains, three models differ in their number of experts: the demo (E = 8
per MoE layer), 2× (E = 16, `tools/experiments/gin/experts16.gin`) and 4× (E = 32,
`experts32.gin`) — under Capacity k× the expert compute per step stays that of E = 8 (E·C ≈
γ·k·T), so the models differ in parameters, not in FLOPs, as the paper's 100B → 1T models did in
experts. At each size top-1 and 4 top-1 (Capacity k×) train for the same `--steps` with every
seed of `--seeds` (default 0, 1, 2).

The benefit of prototyping at a size is top-1 − 4 top-1 in final validation log-perplexity
(positive: prototyping is better), per seed, with its mean and 95% t-interval. The trend is
the least-squares slope of those per-seed benefits against log2(parameters), with its 95%
interval: "grows" / "shrinks" only when the interval excludes 0, else "cannot be told apart".

Writes <out_dir>/scale.png (validation log-perplexity of both routings and the benefit against
parameters, 95% intervals), scale.md and scale.json.
"""

from __future__ import annotations

import math
import os
import sys

from m6t_tf import cli

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

# pylint: disable=g-import-not-at-top
from m6t_tf.run import planning
from m6t_tf.bench import experiments
from m6t_tf.bench import plots
from m6t_tf.bench import report
from m6t_tf.bench import stats
# pylint: enable=g-import-not-at-top

NAME = "scale"
# (size label, overlay gin files): the demo (E = 8) and 2× / 4× its experts.
SIZES = {8: ("E = 8 (demo)", ()), 16: ("E = 16", ("experts16",)), 32: ("E = 32", ("experts32",))}
ROUTINGS = (("top-1", "top1"), ("4 top-1", "4top1_cap_k"))


def parse_args(argv):
  p = experiments.make_parser(__doc__, NAME)
  p.add_argument("--sizes", default="8,16,32",
                 help="comma-separated experts per MoE layer of the sizes, from "
                      f"{sorted(SIZES)} (default 8,16,32; at least two)")
  args, sweep, machine = experiments.start(p, argv)
  try:
    args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
  except ValueError:
    p.error(f"--sizes={args.sizes!r}: expected e.g. 8,16,32")
  if len(set(args.sizes)) < 2 or any(e not in SIZES for e in args.sizes):
    p.error(f"--sizes={args.sizes}: give two or more distinct sizes of {sorted(SIZES)}")
  return args, sweep, machine


def specs_for(args) -> list:
  return [experiments.RunSpec(f"{routing}, {SIZES[e][0]}", (gin,) + SIZES[e][1], seed)
          for seed in args.seeds for e in args.sizes for routing, gin in ROUTINGS]


def param_counts(sweep, gins: tuple) -> dict:
  """The planner's parameter counts of a run's config (no model is built)."""
  cwd = os.getcwd()
  os.chdir(experiments.ROOT)
  try:
    spec = experiments.RunSpec("", gins)
    p = planning.plan_from_gin(sweep.files(spec), sweep.bindings(spec),
                               search_paths=[experiments.ROOT])
  finally:
    os.chdir(cwd)
  return {"params_total": p["params_total"],
          "params_expert": p["params_by_component"]["experts"],
          "params_non_embedding": p["params_total"] - p["params_by_component"]["embeddings"]}


def plot(sizes: list, trend: dict):
  plt = plots.pyplot()
  fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
  for routing, color in (("top-1", "black"), ("4 top-1", "tab:purple")):
    xs = [s["params"]["params_total"] for s in sizes]
    ys = [s[routing]["mean"] for s in sizes]
    ax.errorbar(xs, ys, yerr=[s[routing]["ci95"] or 0 for s in sizes], color=color,
                marker="o", capsize=3, label=routing)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("parameters (log scale)")
  ax.set_ylabel("final val log-perplexity (mean, 95% interval)")
  ax.set_title("Validation log-perplexity by size", fontsize=10)
  ax.legend()
  for s in sizes:
    ax.annotate(s["size"], (s["params"]["params_total"], s["top-1"]["mean"]),
                textcoords="offset points", xytext=(4, 6), fontsize=8)
  xs = [s["params"]["params_total"] for s in sizes]
  gap_ax.errorbar(xs, [s["benefit"]["mean"] for s in sizes],
                  yerr=[s["benefit"]["ci95"] or 0 for s in sizes], color="tab:purple",
                  marker="o", capsize=3, label="top-1 − 4 top-1 (mean, 95% interval)")
  for s in sizes:
    gap_ax.scatter([s["params"]["params_total"]] * len(s["benefit"]["values"]),
                   s["benefit"]["values"], color="tab:purple", alpha=0.35, s=12)
  lo, hi = min(xs), max(xs)
  line = [trend["intercept"] + trend["slope"] * math.log2(x) for x in (lo, hi)]
  gap_ax.plot([lo, hi], line, color="grey", ls="--", lw=1,
              label=f"slope {trend['slope']:+.3f} ± {trend['ci95'] or math.nan:.3f} per 2×")
  gap_ax.axhline(0, color="black", lw=0.8)
  gap_ax.set_xscale("log", base=2)
  gap_ax.set_xlabel("parameters (log scale)")
  gap_ax.set_ylabel("benefit of 4 top-1 (Δ log-PPL)")
  gap_ax.set_title("Benefit of expert prototyping by size (dots: seeds)", fontsize=10)
  gap_ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, sweep, machine = parse_args(argv)
  specs = specs_for(args)
  runs = sweep.ensure_all(specs)
  arms = experiments.group_arms(specs)
  timing = experiments.time_arms(sweep, arms, args.time_rounds)
  machine["loadavg_end"] = list(os.getloadavg())

  sizes, xs, ys, rows = [], [], [], []
  for e in args.sizes:
    size, overlay = SIZES[e]
    by = {routing: experiments.by_seed(runs, arms[(gin,) + overlay], experiments.final_log_ppl)
          for routing, gin in ROUTINGS}
    params = param_counts(sweep, (ROUTINGS[0][1],) + overlay)
    benefit = stats.paired(by["top-1"], by["4 top-1"])   # top-1 − 4 top-1
    benefit["verdict"] = {"higher": "4 top-1 better", "lower": "top-1 better",
                          "tie": "tie"}[benefit["verdict"]]
    entry = {"size": size, "gins": list(overlay), "params": params, "benefit": benefit,
             **{r: stats.describe(by[r].values()) for r, _ in ROUTINGS},
             "by_seed": {r: {str(k): v for k, v in by[r].items()} for r, _ in ROUTINGS}}
    for routing, gin in ROUTINGS:
      t = timing.get(arms[(gin,) + overlay][0].label)
      entry[f"step_time_{routing}"] = t["ratio"] if t else None
    sizes.append(entry)
    xs += [math.log2(params["params_total"])] * benefit["n"]
    ys += benefit["values"]
    rows.append([size, f"{params['params_total'] / 1e6:.2f}M",
                 f"{params['params_expert'] / 1e6:.2f}M", report.fmt_sd(entry["top-1"]),
                 report.fmt_sd(entry["4 top-1"]), report.fmt_ci(benefit), benefit["verdict"],
                 report.fmt(entry["step_time_4 top-1"] / entry["step_time_top-1"])
                 if timing else "—"])
  trend = stats.slope(xs, ys)
  lo = trend["slope"] - (trend["ci95"] or math.inf)
  hi = trend["slope"] + (trend["ci95"] or math.inf)
  trend["verdict"] = ("grows" if lo > 0 else "shrinks" if hi < 0
                      else "cannot be told apart")
  header = ["size", "parameters", "expert parameters", "top-1 val log-PPL",
            "4 top-1 val log-PPL", "benefit: top-1 − 4 top-1 [95% CI]", "",
            "step time 4 top-1 / top-1"]
  table = report.markdown_table(header, rows, align="lrrrrrlr")
  ci = "—" if trend["ci95"] is None else f"{trend['ci95']:.3f}"
  notes = (f"\nTrend: the benefit changes by {trend['slope']:+.3f} ± {ci} log-PPL per doubling "
           f"of the parameters (least-squares slope over {trend['n']} per-seed benefits, 95% "
           f"interval): **{trend['verdict']}**.\n\nColumns: val log-PPL is the teacher-forced "
           "log-perplexity on the validation split at the last step (mean ± sample sd over "
           "seeds); the benefit is top-1 − 4 top-1 paired by seed with its 95% t-interval "
           "(positive: prototyping better). Parameters: trainable, from the planner (the tied "
           "21128-entry embedding is 2.70M of each). Step time: median over interleaved rounds, "
           "one process.\n")
  md = (experiments.header_block(
            f"Expert prototyping by model size on the demo model, {args.steps} steps, seeds "
            f"{', '.join(map(str, args.seeds))} (paper Figure 6's question)", args, sweep, specs,
            machine, argv, "tools/experiments/scale.py")
        + f"![scale]({NAME}.png)\n\n" + table + "\n" + notes)
  fig = plot(sizes, trend)
  records = [{"label": s.label, "gins": list(s.gins), "seed": s.seed,
              "derived": runs[s]["experiment"].get("derived"), **experiments.run_record(runs[s])}
             for s in specs]
  payload = {"experiment": NAME, "argv": argv, "steps": args.steps, "seeds": args.seeds,
             "machine": machine, "sizes": sizes, "trend": trend, "timing": timing,
             "runs": records}
  experiments.finish(args, NAME, md, table, payload, fig)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
