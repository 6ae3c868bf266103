r"""The five routings × two capacities on the demo model (paper Figure 3 / Table 3, Table 2).

  python tools/experiments/routing.py --steps=600            # the committed docs/results run
  python tools/experiments/routing.py --steps=1000 --model_root=runs/experiments
  python tools/experiments/routing.py --variants=top1,2top1_cap_k --steps=200 --time_rounds=0

Routings: top-1, top-2, top-4 (looped argmax), 2 top-1 and 4 top-1 (expert prototyping), each
under Capacity k× and 1× (`tools/experiments/gin/<variant>.gin`, each `gin/demo.gin` plus
ROUTING / K / CAPACITY_MODE). For k = 1 both capacities are the same C, so top-1 is one run
drawn in both panels. `--replicate` variants are trained again with `--replicate_seeds` (default:
top-1 with seed 1) to show how much two seeds of one config differ: a difference between
routings smaller than that is noise.

Every run: `--steps` steps of the demo recipe (AdamW 1e-3, cosine to 10% after 10% warm-up,
batch 32), validation perplexity on the 388 held-out captions `--eval_points` times, the last
at the end. Then `--time_rounds` interleaved rounds time one `Trainer.train_step` of every
variant and of the dense twin in this process (Table 2's question: what does each routing
cost per step relative to top-1).

Writes <out_dir>/routing.png (training and validation log-perplexity per capacity),
routing_cost.png (validation log-perplexity against step time, when timed), routing.md (table,
commands, machine) and routing.json (every number and curve).
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

NAME = "routing"
# (gin file, routing label, capacity label); the paper's Table 3 rows.
VARIANTS = (
    ("top1", "top-1", "k× = 1×"),
    ("top2_cap_k", "top-2", "k×"), ("top2_cap_1", "top-2", "1×"),
    ("top4_cap_k", "top-4", "k×"), ("top4_cap_1", "top-4", "1×"),
    ("2top1_cap_k", "2 top-1", "k×"), ("2top1_cap_1", "2 top-1", "1×"),
    ("4top1_cap_k", "4 top-1", "k×"), ("4top1_cap_1", "4 top-1", "1×"))
STYLE = {"top-1": ("black", "-"), "top-2": ("tab:blue", "-"), "top-4": ("tab:red", "-"),
         "2 top-1": ("tab:green", "--"), "4 top-1": ("tab:purple", "--")}


def parse_args(argv):
  p = common.make_parser(__doc__, NAME)
  p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                 help="comma-separated subset of " + ", ".join(v[0] for v in VARIANTS))
  p.add_argument("--replicate", default="top1",
                 help="variants trained again with --replicate_seeds (comma-separated; empty: "
                      "none)")
  p.add_argument("--replicate_seeds", default="1",
                 help="seeds of the replicate runs (comma-separated; the sweep uses seed 0)")
  args, sweep, machine = common.start(p, argv)
  known = {v[0] for v in VARIANTS}
  args.variants = [v for v in args.variants.split(",") if v]
  args.replicate = [v for v in args.replicate.split(",") if v]
  bad = [v for v in args.variants + args.replicate if v not in known]
  if bad or not args.variants:
    p.error(f"unknown or no variants {bad}; choose from {sorted(known)}")
  args.replicate_seeds = [int(s) for s in args.replicate_seeds.split(",") if s.strip()]
  return args, sweep, machine


def specs_for(args) -> list:
  """Every variant of `--variants`, every seed of `--seeds`."""
  info = {v[0]: v for v in VARIANTS}
  return [common.RunSpec(f"{info[v][1]}, capacity {info[v][2]}", (v,), seed)
          for seed in args.seeds for v in args.variants]


def plot(runs: dict, main, reps, timing):
  plt = common.pyplot()
  have_cost = bool(timing)
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
  info = {v[0]: v for v in VARIANTS}
  for col, cap in enumerate(("k×", "1×")):
    train_ax, val_ax = axes[0][col], axes[1][col]
    train_curves, val_curves = [], []
    for spec in main:
      _, routing, capacity = info[spec.gins[0]]
      if capacity not in (cap, "k× = 1×"):
        continue
      color, ls = STYLE[routing]
      run = runs[spec]
      xs, ys = common.loss_curve(run)
      train_ax.plot(xs, ys, color=color, ls=ls, lw=1.4, label=routing)
      train_curves.append((xs, ys))
      ex, ey = common.eval_curve(run)
      val_ax.plot(ex, ey, color=color, ls=ls, lw=1.4, marker="o", ms=4, label=routing)
      val_curves.append((ex, ey))
    for spec in reps:
      _, routing, capacity = info[spec.gins[0]]
      if capacity not in (cap, "k× = 1×"):
        continue
      run = runs[spec]
      xs, ys = common.loss_curve(run)
      train_ax.plot(xs, ys, color="grey", ls=":", lw=1.2, label=f"{routing} seed {spec.seed}")
      ex, ey = common.eval_curve(run)
      val_ax.plot(ex, ey, color="grey", ls=":", lw=1.2, marker="x", ms=4,
                  label=f"{routing} seed {spec.seed}")
      train_curves.append((xs, ys))
      val_curves.append((ex, ey))
    common.zoom_to_tail(train_ax, train_curves, skip_fraction=0.3)
    common.zoom_to_tail(val_ax, val_curves, skip_fraction=0.3)
    train_ax.set_title(f"Capacity {cap}: training log-perplexity (running mean)")
    val_ax.set_title(f"Capacity {cap}: validation log-perplexity")
    val_ax.set_xlabel("step")
    train_ax.set_ylabel("log-perplexity")
    val_ax.set_ylabel("log-perplexity")
    train_ax.legend(loc="upper right")
  fig.suptitle("Routing × capacity on the demo model (paper Figure 3); y-axes zoomed to the "
               "last 70% of training", fontsize=10)
  fig.tight_layout()
  cost = None
  if have_cost:
    cost, ax = plt.subplots(figsize=(6.5, 4.5))
    for spec in main:
      _, routing, capacity = info[spec.gins[0]]
      if spec.label not in timing:
        continue
      color, _ = STYLE[routing]
      marker = "s" if capacity == "1×" else "o"
      x = timing[spec.label]["ratio"]
      y = common.final_eval(runs[spec])["log_perplexity"]
      ax.scatter([x], [y], color=color, marker=marker, s=45, zorder=3)
      ax.annotate(f"{routing} {capacity}", (x, y), textcoords="offset points", xytext=(5, 4),
                  fontsize=8)
    if "dense" in timing:
      dense = timing["dense"]["ratio"]
      moe = [timing[s.label]["ratio"] for s in main if s.label in timing]
      if dense <= 1.5 * max(moe):
        ax.axvline(dense, color="grey", ls=":", lw=1)
        ax.text(dense, ax.get_ylim()[1], " dense twin", va="top", fontsize=8, color="grey")
      else:   # a line far right would squeeze every MoE into one column
        ax.text(0.98, 0.02, f"dense twin: {dense:.2f}× top-1 (off scale)", fontsize=8,
                color="grey", ha="right", transform=ax.transAxes)
    ax.set_xlabel("step time relative to top-1 (interleaved, same process)")
    ax.set_ylabel("final validation log-perplexity")
    ax.set_title("Quality vs cost per step (● capacity k×, ■ capacity 1×)", fontsize=10)
    cost.tight_layout()
  return fig, cost


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, sweep, machine = parse_args(argv)
  main_specs, reps = specs_for(args)
  runs = {spec: sweep.ensure(spec) for spec in main_specs + reps}
  timing = {}
  if args.time_rounds:
    base = next((s for s in main_specs if s.gins == ("top1",)), main_specs[0])
    timing = common.time_step_ratios(sweep, main_specs, base, rounds=args.time_rounds,
                                     dense_twin=True)
  machine["loadavg_end"] = list(os.getloadavg())

  info = {v[0]: v for v in VARIANTS}
  base_spec = next((s for s in main_specs if s.gins == ("top1",)), None)
  base_log = common.final_eval(runs[base_spec])["log_perplexity"] if base_spec else math.nan
  rows, records = [], []
  for spec in main_specs + reps:
    run = runs[spec]
    _, routing, capacity = info[spec.gins[0]]
    ev = common.final_eval(run)
    layers = common.moe_layer_names(run)
    cv = [common.late_mean(run, f"moe/{l}/load_cv") for l in layers]
    drop = [common.late_mean(run, f"moe/{l}/dropped_fraction") for l in layers]
    cv_mean = sum(cv) / len(cv) if cv and None not in cv else None
    drop_mean = sum(drop) / len(drop) if drop and None not in drop else None
    t = timing.get(spec.label)
    derived = run["experiment"].get("derived", {})
    rows.append([routing + (f" (seed {spec.seed})" if spec.seed else ""), capacity,
                 derived.get("capacity", "—"), common.fmt(ev["perplexity"]),
                 common.fmt(ev["log_perplexity"], 3),
                 common.fmt(ev["log_perplexity"] - base_log, 3) if base_spec else "—",
                 common.fmt(common.final_train_loss(run), 3), common.fmt(drop_mean, 1, pct=True),
                 common.fmt(cv_mean), common.fmt(t["ratio"]) if t else "—"])
    records.append({"label": spec.label, "variant": spec.gins[0], "seed": spec.seed,
                    "routing": routing, "capacity": capacity, "derived": derived,
                    "late_load_cv": dict(zip(layers, cv)),
                    "late_dropped_fraction": dict(zip(layers, drop)),
                    "step_time_vs_top1": t["ratio"] if t else None,
                    **common.run_record(run)})
  header = ["routing", "capacity", "C", "val PPL", "val log-PPL", "Δ log-PPL vs top-1",
            "train loss (last 10%)", "dropped (2nd half)", "load cv (2nd half)",
            "step time vs top-1"]
  table = common.markdown_table(header, rows, align="llrrrrrrrr")
  notes = [
      "", "Columns: C is the training capacity per expert (T = 1,120 positions per step; "
      "padding positions are not routed, so fewer tokens compete for it: ~750 = 32 × (16 "
      "patches + ~7.4 caption tokens), the validation split's mean). "
      "val PPL is the teacher-forced perplexity on the validation split at the last step. "
      "Dropped is the fraction of routed token-choices that found their expert full and cv the "
      "coefficient of variation of tokens per expert (after capacity), both averaged over the "
      "MoE layers and the logged steps of the second half of training. Step time vs top-1: "
      "median over interleaved rounds of (variant's `Trainer.train_step` / top-1's in the same "
      "round), one process, so no all-to-all is included."]
  if "dense" in timing:
    notes.append(f"The dense twin (same backbone, `moe_placement = 'none'`) steps at "
                 f"{timing['dense']['ratio']:.2f}× top-1's time.")
  if reps:
    notes.append("Rows with a seed are replicates of the same config with another seed: the "
                 "difference to the seed-0 row is the run-to-run noise of this setup.")
  md = (common.header_block(f"Routing × capacity on the demo model, {args.steps} steps "
                            f"(paper Figure 3 / Table 3)", args, sweep, main_specs + reps,
                            machine, argv, "tools/experiments/routing.py")
        + f"![routing curves]({NAME}.png)\n\n"
        + (f"![quality vs step time]({NAME}_cost.png)\n\n" if timing else "")
        + table + "\n" + "\n".join(notes) + "\n")
  fig, cost = plot(runs, main_specs, reps, timing)
  payload = {"experiment": NAME, "argv": argv, "steps": args.steps, "machine": machine,
             "runs": records, "timing": timing}
  common.finish(args, NAME, md, table, payload, fig)
  if cost is not None:
    cost.savefig(os.path.join(args.out_dir, f"{NAME}_cost.png"), bbox_inches="tight")
  return 0


if __name__ == "__main__":
  from m6t_tf import cli
  sys.exit(cli.run_argparse(main))
