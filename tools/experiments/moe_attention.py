r"""MoE attention vs the MoE baseline on the demo model (paper §3.4, Figure 4).

  python tools/experiments/moe_attention.py                  # the committed docs/results run
  python tools/experiments/moe_attention.py --routings=top1 --steps=1000

Every arm is trained with every seed of `--seeds` (default 0, 1, 2). For each routing of
`--routings` (files of tools/experiments/gin/; default top1, the paper's
baseline, and 2top1_cap_k, since the paper found that expert prototyping helps MoE attention
converge), two runs: the MoE baseline (that file alone: MoE FFNs, dense attention; the same
run as the routing sweep's) and MoE attention (`tools/experiments/gin/moe_attention.gin`: Q, K,
V and the output projection of every MoE layer are MoEs of linear experts with the same
routing and capacity). The paper's finding: MoE attention hurts quality and stability.

Stability is read from the curves and from the gradient norm the trainer logs every
`--log_every` steps (before clipping at 1.0). `--time_rounds` interleaved rounds time one
`Trainer.train_step` of every model relative to the first baseline.

Tables give means ± sd over seeds and MoE attention − baseline paired by seed with its 95%
t-interval ("tie" unless the interval excludes 0).

Writes <out_dir>/moe_attention.png (training and validation log-perplexity, gradient norm; mean
over seeds and a ±1 sd band), moe_attention.md (table, commands, machine) and
moe_attention.json.
"""

from __future__ import annotations

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

NAME = "moe_attention"
COLORS = ("tab:blue", "tab:green", "tab:purple", "tab:red", "black")


def parse_args(argv):
  p = experiments.make_parser(__doc__, NAME)
  p.add_argument("--routings", default="top1,2top1_cap_k",
                 help="comma-separated routing files of tools/experiments/gin/ (default "
                      "top1,2top1_cap_k)")
  args, sweep, machine = experiments.start(p, argv)
  args.routings = [r for r in args.routings.split(",") if r]
  for r in args.routings:
    if not os.path.exists(os.path.join(experiments.ROOT, experiments.GIN_DIR, f"{r}.gin")):
      p.error(f"--routings: no {experiments.GIN_DIR}/{r}.gin")
  if not args.routings:
    p.error("--routings is empty")
  return args, sweep, machine


def specs_for(args) -> list:
  """For each routing: the MoE FFN baseline and MoE attention, every seed of `--seeds`."""
  return [experiments.RunSpec(label, gins, seed) for seed in args.seeds for r in args.routings
          for label, gins in ((f"{r}, MoE FFN", (r,)),
                              (f"{r}, MoE FFN + MoE attention", (r, "moe_attention")))]


def plot(runs: dict, pairs, args):
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
  train_ax, val_ax, grad_ax = axes
  curves_t, curves_v = [], []
  for i, (routing, base, attn) in enumerate(pairs):
    color = COLORS[i % len(COLORS)]
    for specs, ls, what in ((base, "-", "MoE FFN"), (attn, "--", "+ MoE attention")):
      label = f"{routing}: {what}"
      curves_t.append(plots.band(train_ax, [experiments.loss_curve(runs[s]) for s in specs],
                                 color, ls, label))
      curves_v.append(plots.band(val_ax, [experiments.eval_curve(runs[s]) for s in specs], color,
                                 ls, label, marker="o"))
      # Every seed's gradient norm: a spike in one seed would vanish in a mean.
      for spec in specs:
        gx, gy = experiments.series(runs[spec], "grad_norm")
        grad_ax.plot(gx, gy, color=color, ls=ls, lw=0.8, alpha=0.7,
                     label=label if spec is specs[0] else None)
  plots.zoom_to_tail(train_ax, curves_t, skip_fraction=0.3, pad=0.25)
  plots.zoom_to_tail(val_ax, curves_v, skip_fraction=0.3, pad=0.25)
  train_ax.set_title("training log-perplexity (running mean)")
  val_ax.set_title("validation log-perplexity")
  grad_ax.set_title("gradient global norm, every seed (before clipping)")
  grad_ax.set_yscale("log")
  for ax in axes:
    ax.set_xlabel("step")
  train_ax.legend(loc="upper right")
  fig.suptitle("MoE attention vs the MoE baseline on the demo model (paper Figure 4): mean over "
               "seeds, band ±1 sd; log-perplexity y-axes zoomed to the last 70% of training",
               fontsize=10)
  fig.tight_layout()
  return fig


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, sweep, machine = parse_args(argv)
  specs = specs_for(args)
  runs = sweep.ensure_all(specs)
  arms = experiments.group_arms(specs)
  pairs = [(r, arms[(r,)], arms[(r, "moe_attention")]) for r in args.routings]
  timing = experiments.time_arms(sweep, arms, args.time_rounds, (args.routings[0],))
  machine["loadavg_end"] = list(os.getloadavg())

  header = ["routing", "attention", "seeds", "val log-PPL (mean ± sd)",
            "Δ vs MoE FFN [95% CI]", "", "train loss (last 10%)",
            "max grad norm after warm-up (mean ± sd)", "dropped, attention MoEs",
            f"step time vs {pairs[0][0]} baseline"]
  warm = max(1, args.steps // 10)

  def grad_max(run):
    gx, gy = experiments.series(run, "grad_norm")
    return max((y for x, y in zip(gx, gy) if x > warm), default=None)

  attn_layer = lambda layer: "/attention/" in layer
  rows, records, summary = [], [], {}
  for routing, base, attn in pairs:
    base_seed = experiments.by_seed(runs, base, experiments.final_log_ppl)
    for specs_, what in ((base, "dense"), (attn, "MoE (Q, K, V, O)")):
      by = experiments.by_seed(runs, specs_, experiments.final_log_ppl)
      delta = stats.paired(by, base_seed) if specs_ is attn else None
      arm = {"log_ppl": stats.describe(by.values()),
             "log_ppl_by_seed": {str(k): v for k, v in by.items()}, "delta_vs_base": delta,
             "train_loss": stats.describe(experiments.final_train_loss(runs[s]) for s in specs_),
             "max_grad_norm": stats.describe(grad_max(runs[s]) for s in specs_),
             "dropped_attention": stats.describe(
                 experiments.layer_mean(runs[s], "dropped_fraction", attn_layer) for s in specs_)}
      summary["+".join(specs_[0].gins)] = arm
      t = timing.get(specs_[0].label)
      rows.append([routing, what, arm["log_ppl"]["n"], report.fmt_sd(arm["log_ppl"]),
                   report.fmt_ci(delta) if delta else "0", delta["verdict"] if delta else "",
                   report.fmt_sd(arm["train_loss"]), report.fmt_sd(arm["max_grad_norm"], 2),
                   report.fmt_sd(arm["dropped_attention"], 1, pct=True)
                   if specs_ is attn else "—",
                   report.fmt(t["ratio"]) if t else "—"])
      for spec in specs_:
        run = runs[spec]
        attn_layers = [l for l in experiments.moe_layer_names(run) if attn_layer(l)]
        records.append({"label": spec.label, "gins": list(spec.gins), "seed": spec.seed,
                        "derived": run["experiment"].get("derived"),
                        "max_grad_norm_after_warmup": grad_max(run),
                        "late_dropped_fraction_attention": {
                            l: experiments.late_mean(run, f"moe/{l}/dropped_fraction")
                            for l in attn_layers},
                        "step_time_ratio": t["ratio"] if t else None,
                        **experiments.run_record(run)})
  table = report.markdown_table(header, rows, align="llrrrlrrrr")
  notes = ("\nColumns: val log-PPL is the teacher-forced log-perplexity on the validation split "
           "at the last step (mean ± sample sd over seeds); Δ is MoE attention − its MoE FFN "
           "baseline, paired by seed, with its 95% t-interval (\"lower\"/\"higher\" only when "
           "it excludes 0); max grad norm is over the logged steps after warm-up; dropped is the "
           "mean dropped fraction of the Q, K, V, O MoEs over the second half of training. Step "
           "time: median over interleaved rounds of (model's `Trainer.train_step` / the first "
           "baseline's in the same round), one process.\n")
  md = (experiments.header_block(f"MoE attention vs the MoE baseline on the demo model, "
                                 f"{args.steps} steps, seeds {', '.join(map(str, args.seeds))} "
                                 f"(paper Figure 4)", args, sweep, specs, machine, argv,
                                 "tools/experiments/moe_attention.py")
        + f"![MoE attention curves]({NAME}.png)\n\n" + table + "\n" + notes)
  fig = plot(runs, pairs, args)
  payload = {"experiment": NAME, "argv": argv, "steps": args.steps, "seeds": args.seeds,
             "machine": machine, "runs": records, "timing": timing, "arms": summary}
  experiments.finish(args, NAME, md, table, payload, fig)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
