r"""The five routings × two capacities on the demo model (paper Figure 3 / Table 3, Table 2).

  python tools/experiments/routing.py                        # the committed docs/results run
  python tools/experiments/routing.py --steps=600 --seeds=0,1,2,3,4
  python tools/experiments/routing.py --variants=top1,2top1_cap_k --seeds=0 --time_rounds=0

Routings: top-1, top-2, top-4 (looped argmax), 2 top-1 and 4 top-1 (expert prototyping), each
under Capacity k× and 1× (`tools/experiments/gin/<variant>.gin`, each `gin/demo.gin` plus
ROUTING / K / CAPACITY_MODE). For k = 1 both capacities are the same C, so top-1 is one arm
drawn in both panels. Every arm is trained with every seed of `--seeds` (default 0, 1, 2; the
seed sets the initialisation, dropout and data order).

Every run: `--steps` steps of the demo recipe (AdamW 1e-3, cosine to 10% after 10% warm-up,
batch 32), validation perplexity on the 388 held-out captions `--eval_points` times, the last
at the end. Then `--time_rounds` interleaved rounds time one `Trainer.train_step` of every
variant and of the dense twin in this process (Table 2's question: what does each routing
cost per step relative to top-1).

Tables give the mean ± sample sd over seeds, and differences to top-1 (and between the arms of
each capacity) paired by seed with their 95% t-interval; an ordering is claimed only where
that interval excludes 0 ("lower" / "higher"), else "tie".

Writes <out_dir>/routing.png (training and validation log-perplexity per capacity, mean and a
±1 sd band over seeds), routing_cost.png (validation log-perplexity against step time, when
timed), routing.md (tables, commands, machine) and routing.json (every number and curve).
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
from m6t_tf.bench import experiments
from m6t_tf.bench import plots
from m6t_tf.bench import report
from m6t_tf.bench import stats
# pylint: enable=g-import-not-at-top

NAME = "routing"
VARIANTS = experiments.ROUTING_VARIANTS
STYLE = {"top-1": ("black", "-"), "top-2": ("tab:blue", "-"), "top-4": ("tab:red", "-"),
         "2 top-1": ("tab:green", "--"), "4 top-1": ("tab:purple", "--")}


def parse_args(argv):
  p = experiments.make_parser(__doc__, NAME)
  p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                 help="comma-separated subset of " + ", ".join(v[0] for v in VARIANTS))
  args, sweep, machine = experiments.start(p, argv)
  known = {v[0] for v in VARIANTS}
  args.variants = [v for v in args.variants.split(",") if v]
  bad = [v for v in args.variants if v not in known]
  if bad or not args.variants:
    p.error(f"unknown or no variants {bad}; choose from {sorted(known)}")
  return args, sweep, machine


def specs_for(args) -> list:
  """Every variant of `--variants`, every seed of `--seeds`."""
  info = {v[0]: v for v in VARIANTS}
  return [experiments.RunSpec(f"{info[v][1]}, capacity {info[v][2]}", (v,), seed)
          for seed in args.seeds for v in args.variants]


def labels(spec) -> tuple:
  """(routing, capacity) of a spec."""
  info = {v[0]: v for v in VARIANTS}
  _, routing, capacity = info[spec.gins[0]]
  return routing, capacity


def in_panel(capacity: str, panel: str) -> bool:
  return capacity in (panel, "k× = 1×")


def plot(runs: dict, arms: dict, timing: dict, summary: dict):
  plt = plots.pyplot()
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
  for col, cap in enumerate(("k×", "1×")):
    train_ax, val_ax = axes[0][col], axes[1][col]
    train_curves, val_curves = [], []
    for gins, specs in arms.items():
      routing, capacity = labels(specs[0])
      if not in_panel(capacity, cap):
        continue
      color, ls = STYLE[routing]
      label = f"{routing} (n={len(specs)})"
      train_curves.append(plots.band(train_ax, [experiments.loss_curve(runs[s]) for s in specs],
                                     color, ls, label))
      val_curves.append(plots.band(val_ax, [experiments.eval_curve(runs[s]) for s in specs],
                                   color, ls, label, marker="o"))
    plots.zoom_to_tail(train_ax, train_curves, skip_fraction=0.3, pad=0.25)
    plots.zoom_to_tail(val_ax, val_curves, skip_fraction=0.3, pad=0.25)
    train_ax.set_title(f"Capacity {cap}: training log-perplexity (running mean)")
    val_ax.set_title(f"Capacity {cap}: validation log-perplexity")
    val_ax.set_xlabel("step")
    train_ax.set_ylabel("log-perplexity")
    val_ax.set_ylabel("log-perplexity")
    train_ax.legend(loc="upper right")
  fig.suptitle("Routing × capacity on the demo model (paper Figure 3): mean over seeds, band "
               "±1 sd; y-axes zoomed to the last 70% of training", fontsize=10)
  fig.tight_layout()
  cost = None
  if timing:
    cost, ax = plt.subplots(figsize=(6.5, 4.5))
    for gins, specs in arms.items():
      routing, capacity = labels(specs[0])
      t = timing.get(specs[0].label)
      if not t:
        continue
      color, _ = STYLE[routing]
      st = summary[gins]["log_ppl"]
      ax.errorbar([t["ratio"]], [st["mean"]], yerr=[st["ci95"] or 0], color=color,
                  marker="s" if capacity == "1×" else "o", ms=6, capsize=3, zorder=3)
      ax.annotate(f"{routing} {capacity}", (t["ratio"], st["mean"]),
                  textcoords="offset points", xytext=(6, 4), fontsize=8)
    if "dense" in timing:
      dense = timing["dense"]["ratio"]
      moe = [t["ratio"] for name, t in timing.items() if name != "dense"]
      if dense <= 1.5 * max(moe):
        ax.axvline(dense, color="grey", ls=":", lw=1)
        ax.text(dense, ax.get_ylim()[1], " dense twin", va="top", fontsize=8, color="grey")
      else:   # a line far right would squeeze every MoE into one column
        ax.text(0.98, 0.02, f"dense twin: {dense:.2f}× top-1 (off scale)", fontsize=8,
                color="grey", ha="right", transform=ax.transAxes)
    ax.set_xlabel("step time relative to top-1 (interleaved, same process)")
    ax.set_ylabel("final validation log-perplexity (mean, 95% interval)")
    ax.set_title("Quality vs cost per step (● capacity k×, ■ capacity 1×)", fontsize=10)
    cost.tight_layout()
  return fig, cost


# The paper's Table 3 at Capacity k×: top-4 < 4 top-1 < 2 top-1 ≈ top-2 < top-1 in PPL.
PAPER_ORDER_K = (("top4_cap_k", "<", "4top1_cap_k"), ("4top1_cap_k", "<", "2top1_cap_k"),
                 ("2top1_cap_k", "≈", "top2_cap_k"), ("top2_cap_k", "<", "top1"))


def agreement(relation: str, verdict: str) -> str:
  """Our paired verdict (row − col) against the paper's relation between the two arms."""
  if relation == "<":
    return {"lower": "agree", "tie": "cannot tell (tie)", "higher": "disagree"}[verdict]
  return {"tie": "consistent (tie)", "lower": "disagree (ours differ)",
          "higher": "disagree (ours differ)"}[verdict]


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, sweep, machine = parse_args(argv)
  specs = specs_for(args)
  runs = sweep.ensure_all(specs)
  arms = experiments.group_arms(specs)
  timing = experiments.time_arms(sweep, arms, args.time_rounds,
                                 ("top1",) if ("top1",) in arms else None, dense_twin=True)
  machine["loadavg_end"] = list(os.getloadavg())

  summary = {}
  for gins, group in arms.items():
    summary[gins] = {
        "log_ppl_by_seed": experiments.by_seed(runs, group, experiments.final_log_ppl),
        "dropped": stats.describe(experiments.layer_mean(runs[s], "dropped_fraction")
                                  for s in group),
        "load_cv": stats.describe(experiments.layer_mean(runs[s], "load_cv") for s in group),
        "train_loss": stats.describe(experiments.final_train_loss(runs[s]) for s in group)}
    summary[gins]["log_ppl"] = stats.describe(summary[gins]["log_ppl_by_seed"].values())
  base = summary.get(("top1",))
  rows, records = [], []
  for gins, group in arms.items():
    routing, capacity = labels(group[0])
    sm = summary[gins]
    delta = (stats.paired(sm["log_ppl_by_seed"], base["log_ppl_by_seed"])
             if base and gins != ("top1",) else None)
    sm["delta_vs_top1"] = delta
    t = timing.get(group[0].label)
    c = runs[group[0]]["experiment"].get("derived", {}).get("capacity")
    rows.append([routing, capacity, c if c is not None else "—", sm["log_ppl"]["n"],
                 report.fmt_sd(sm["log_ppl"]),
                 report.fmt(math.exp(sm["log_ppl"]["mean"])),
                 report.fmt_ci(delta) if delta else "0", delta["verdict"] if delta else "",
                 report.fmt_sd(sm["train_loss"]), report.fmt_sd(sm["dropped"], 1, pct=True),
                 report.fmt_sd(sm["load_cv"], 2), report.fmt(t["ratio"]) if t else "—"])
    for spec in group:
      run = runs[spec]
      layers = experiments.moe_layer_names(run)
      records.append({"label": spec.label, "variant": spec.gins[0], "seed": spec.seed,
                      "routing": routing, "capacity": capacity,
                      "derived": run["experiment"].get("derived", {}),
                      "late_load_cv": {l: experiments.late_mean(run, f"moe/{l}/load_cv")
                                       for l in layers},
                      "late_dropped_fraction": {
                          l: experiments.late_mean(run, f"moe/{l}/dropped_fraction")
                          for l in layers},
                      **experiments.run_record(run)})
  header = ["routing", "capacity", "C", "seeds", "val log-PPL (mean ± sd)", "val PPL (of mean)",
            "Δ log-PPL vs top-1 [95% CI]", "vs top-1", "train loss (last 10%)",
            "dropped (2nd half)", "load cv (2nd half)", "step time vs top-1"]
  table = report.markdown_table(header, rows, align="llrrrrrlrrrr")

  sections = []
  for cap in ("k×", "1×"):
    names = [g for g, group in arms.items() if in_panel(labels(group[0])[1], cap)]
    if len(names) < 2:
      continue
    head = ["row − column"] + [labels(arms[g][0])[0] for g in names]
    body = []
    for g in names:
      cells = [labels(arms[g][0])[0]]
      for h in names:
        if g == h:
          cells.append("")
          continue
        d = stats.paired(summary[g]["log_ppl_by_seed"], summary[h]["log_ppl_by_seed"])
        cells.append(f"{report.fmt_ci(d)} {d['verdict']}")
      body.append(cells)
    sections.append(f"**Capacity {cap}: pairwise differences** of validation log-perplexity "
                    f"(row − column, paired by seed, 95% interval; \"lower\" = the row is "
                    f"better):\n\n" + report.markdown_table(head, body))
  order_rows = []
  for a, rel_, b in PAPER_ORDER_K:
    if (a,) in summary and (b,) in summary:
      d = stats.paired(summary[(a,)]["log_ppl_by_seed"], summary[(b,)]["log_ppl_by_seed"])
      order_rows.append([f"{labels(arms[(a,)][0])[0]} {rel_} {labels(arms[(b,)][0])[0]}",
                         report.fmt_ci(d), d["verdict"], agreement(rel_, d["verdict"])])
  if order_rows:
    sections.append("**The paper's Table 3 ordering at Capacity k×** (top-4 < 4 top-1 < 2 top-1 "
                    "≈ top-2 < top-1 in PPL), pair by pair:\n\n" + report.markdown_table(
                        ["paper", "ours: Δ log-PPL (left − right) [95% CI]", "verdict",
                         "agreement"], order_rows, align="lrll"))
  notes = [
      "", "Columns: C is the training capacity per expert (T = 1,120 positions per step, of "
      "which the real-token share sets C: `REAL_TOKEN_FRACTION = None` in gin/demo.gin). "
      "val log-PPL is the teacher-forced log-perplexity on the validation split at the last "
      "step, mean ± sample sd over the seeds; val PPL is exp of that mean. Δ vs top-1: the "
      "per-seed difference to the top-1 run of the same seed, mean and 95% t-interval; "
      "\"lower\"/\"higher\" only when the interval excludes 0. Dropped is the fraction of "
      "routed token-choices that found their expert full and cv the coefficient of variation of "
      "tokens per expert (after capacity), both averaged over the MoE layers and the logged "
      "steps of the second half of training (mean ± sd over seeds). Step time vs top-1: median "
      "over interleaved rounds of (variant's `Trainer.train_step` / top-1's in the same round), "
      "one process, so no all-to-all is included."]
  if "dense" in timing:
    notes.append(f"The dense twin (same backbone, `moe_placement = 'none'`) steps at "
                 f"{timing['dense']['ratio']:.2f}× top-1's time.")
  md = (experiments.header_block(
            f"Routing × capacity on the demo model, {args.steps} steps, seeds "
            f"{', '.join(map(str, args.seeds))} (paper Figure 3 / Table 3)",
            args, sweep, specs, machine, argv, "tools/experiments/routing.py")
        + f"![routing curves]({NAME}.png)\n\n"
        + (f"![quality vs step time]({NAME}_cost.png)\n\n" if timing else "")
        + table + "\n" + "\n".join(notes) + "\n\n" + "\n\n".join(sections) + "\n")
  fig, cost = plot(runs, arms, timing, summary)
  payload = {"experiment": NAME, "argv": argv, "steps": args.steps, "seeds": args.seeds,
             "machine": machine, "runs": records, "timing": timing,
             "arms": {"+".join(g): {k: v for k, v in sm.items() if k != "log_ppl_by_seed"}
                      | {"log_ppl_by_seed": {str(k): v for k, v in
                                             sm["log_ppl_by_seed"].items()}}
                      for g, sm in summary.items()}}
  experiments.finish(args, NAME, md, table, payload, fig)
  if cost is not None:
    cost.savefig(os.path.join(args.out_dir, f"{NAME}_cost.png"), bbox_inches="tight")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
