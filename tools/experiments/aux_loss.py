r"""Auxiliary load-balance loss on vs off: per-layer load cv over training (paper Figure 1).

  python tools/experiments/aux_loss.py                       # the committed docs/results run
  python tools/experiments/aux_loss.py --routing=2top1_cap_k --steps=1000

Two arms of the demo model, each trained with every seed of `--seeds` (default 0, 1, 2), with the routing `--routing` (a file of tools/experiments/gin/;
default top1, the paper's base-model routing): without auxiliary loss (that file alone, the
same run as the routing sweep's) and with the Switch load-balance loss of weight 0.01
(`tools/experiments/gin/aux_loss.gin`). The paper's finding: the loss balances the load (cv
≈ 0.3) but does not improve quality.

The load cv is σ/μ of the tokens each expert computed in one step (after capacity, padding
excluded), logged per MoE layer every `--log_every` steps by the trainer; the dropped fraction
is logged alongside. `--time_rounds` interleaved rounds also time one `Trainer.train_step` of
both (the loss adds a few reductions per layer).

Tables give means ± sd over seeds and the difference with − without the loss paired by seed
with its 95% t-interval ("tie" unless the interval excludes 0).

Writes <out_dir>/aux_loss.png (cv and dropped fraction per layer, training and validation
log-perplexity; mean over seeds and a ±1 sd band), aux_loss.md (table, commands, machine) and
aux_loss.json.
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

NAME = "aux_loss"


def parse_args(argv):
  p = experiments.make_parser(__doc__, NAME)
  p.add_argument("--routing", default="top1",
                 help="routing file of tools/experiments/gin/ (default top1)")
  args, sweep, machine = experiments.start(p, argv)
  if not os.path.exists(os.path.join(experiments.ROOT, experiments.GIN_DIR, f"{args.routing}.gin")):
    p.error(f"--routing={args.routing}: no {experiments.GIN_DIR}/{args.routing}.gin")
  return args, sweep, machine


def specs_for(args) -> list:
  """The two arms (without / with the loss), every seed of `--seeds`."""
  return [experiments.RunSpec(label, gins, seed) for seed in args.seeds for label, gins in (
      (f"{args.routing}, no auxiliary loss", (args.routing,)),
      (f"{args.routing}, auxiliary loss 0.01", (args.routing, "aux_loss")))]


def plot(runs: dict, off: list, on: list, args):
  plt = plots.pyplot()
  layers = experiments.moe_layer_names(runs[off[0]])
  n = len(layers)
  fig, axes = plt.subplots(2, n + 1, figsize=(3.3 * (n + 1), 6.4), squeeze=False)
  styles = ((off, "tab:blue", "no auxiliary loss"), (on, "tab:orange", "auxiliary loss 0.01"))
  window = 5
  for i, layer in enumerate(layers):
    cv_ax, drop_ax = axes[0][i], axes[1][i]
    for specs, color, label in styles:
      for ax, stat, scale in ((cv_ax, "load_cv", 1.0), (drop_ax, "dropped_fraction", 100.0)):
        curves = []
        for spec in specs:
          xs, ys = experiments.series(runs[spec], f"moe/{layer}/{stat}")
          curves.append((xs, [scale * y for y in stats.smooth(ys, window)]))
        plots.band(ax, curves, color, "-", label)
    cv_ax.axhline(0.3, color="grey", ls=":", lw=1)
    cv_ax.set_title(f"{experiments.short_layer(layer)}: load cv")
    cv_ax.set_ylim(bottom=0)
    drop_ax.set_title(f"{experiments.short_layer(layer)}: dropped %")
    drop_ax.set_ylim(bottom=0)
    drop_ax.set_xlabel("step")
  axes[0][0].legend(loc="upper right")
  axes[0][0].text(0.02, 0.3, "cv 0.3 (paper, with aux loss)", color="grey", fontsize=7,
                  transform=axes[0][0].get_yaxis_transform(), va="bottom")
  train_ax, val_ax = axes[0][n], axes[1][n]
  curves_t, curves_v = [], []
  for specs, color, label in styles:
    curves_t.append(plots.band(train_ax, [experiments.loss_curve(runs[s]) for s in specs], color,
                               "-", label))
    curves_v.append(plots.band(val_ax, [experiments.eval_curve(runs[s]) for s in specs], color,
                               "-", label, marker="o"))
  plots.zoom_to_tail(train_ax, curves_t, skip_fraction=0.3, pad=0.25)
  plots.zoom_to_tail(val_ax, curves_v, skip_fraction=0.3, pad=0.25)
  train_ax.set_title("training log-perplexity")
  val_ax.set_title("validation log-perplexity")
  val_ax.set_xlabel("step")
  fig.suptitle(f"Auxiliary load-balance loss on vs off, {args.routing} routing on the demo model "
               f"(paper Figure 1): mean over {len(off)} seeds (running mean of {window} logged "
               f"steps), band ±1 sd", fontsize=10)
  fig.tight_layout()
  return fig


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, sweep, machine = parse_args(argv)
  specs = specs_for(args)
  runs = sweep.ensure_all(specs)
  arms = experiments.group_arms(specs)
  (off_gins, off), (on_gins, on) = arms.items()
  timing = experiments.time_arms(sweep, arms, args.time_rounds)
  machine["loadavg_end"] = list(os.getloadavg())

  layers = experiments.moe_layer_names(runs[off[0]])
  header = (["run", "seeds", "val log-PPL (mean ± sd)", "Δ vs no loss [95% CI]", "",
             "train loss (last 10%)"]
            + [f"cv {experiments.short_layer(l)}" for l in layers]
            + ["cv mean", "dropped (mean)", "balance loss E·Σf·P", "step time vs off"])
  log_ppl = {g: experiments.by_seed(runs, group, experiments.final_log_ppl)
             for g, group in ((off_gins, off), (on_gins, on))}
  rows, records, arms = [], [], {}
  for gins, group in ((off_gins, off), (on_gins, on)):
    per_layer = {l: stats.describe(experiments.late_mean(runs[s], f"moe/{l}/load_cv")
                                   for s in group)
                 for l in layers}
    arm = {"log_ppl": stats.describe(log_ppl[gins].values()),
           "log_ppl_by_seed": {str(k): v for k, v in log_ppl[gins].items()},
           "train_loss": stats.describe(experiments.final_train_loss(runs[s]) for s in group),
           "load_cv_by_layer": per_layer,
           "load_cv": stats.describe(experiments.layer_mean(runs[s], "load_cv") for s in group),
           "dropped": stats.describe(experiments.layer_mean(runs[s], "dropped_fraction")
                                     for s in group),
           "balance_loss": stats.describe(experiments.layer_mean(runs[s], "aux_loss")
                                          for s in group)}
    delta = stats.paired(log_ppl[gins], log_ppl[off_gins]) if gins == on_gins else None
    arm["delta_vs_off"] = delta
    arms["+".join(gins)] = arm
    t = timing.get(group[0].label)
    rows.append([group[0].label, arm["log_ppl"]["n"], report.fmt_sd(arm["log_ppl"]),
                 report.fmt_ci(delta) if delta else "0", delta["verdict"] if delta else "",
                 report.fmt_sd(arm["train_loss"])]
                + [report.fmt_sd(per_layer[l], 2) for l in layers]
                + [report.fmt_sd(arm["load_cv"], 2), report.fmt_sd(arm["dropped"], 1, pct=True),
                   report.fmt_sd(arm["balance_loss"]), report.fmt(t["ratio"]) if t else "—"])
    for spec in group:
      run = runs[spec]
      records.append({"label": spec.label, "gins": list(spec.gins), "seed": spec.seed,
                      "derived": run["experiment"].get("derived"),
                      "late_load_cv": {l: experiments.late_mean(run, f"moe/{l}/load_cv")
                                       for l in layers},
                      "late_dropped_fraction": {
                          l: experiments.late_mean(run, f"moe/{l}/dropped_fraction")
                          for l in layers},
                      "late_balance_loss": {l: experiments.late_mean(run, f"moe/{l}/aux_loss")
                                            for l in layers},
                      **experiments.run_record(run)})
  train_delta = stats.paired(experiments.by_seed(runs, on, experiments.final_train_loss),
                             experiments.by_seed(runs, off, experiments.final_train_loss))
  table = report.markdown_table(header, rows, align="lrrrlr" + "r" * (len(header) - 6))
  notes = ("\nColumns: val log-PPL is the teacher-forced log-perplexity on the validation split "
           "at the last step (mean ± sample sd over seeds); Δ is with − without the loss, paired "
           "by seed, with its 95% t-interval (\"lower\"/\"higher\" only when it excludes 0). "
           "cv and dropped are means over the logged steps of the second half of training (one "
           "step's batch each: 32 captions) and over the MoE layers for the mean columns; the "
           "balance loss E·Σ_e f_e·P_e is the Switch loss the auxiliary term adds ×0.01 (1.0 = "
           "perfectly balanced), logged in both arms although only the second trains on it. "
           f"Training loss, with − without: {report.fmt_ci(train_delta)} "
           f"({train_delta['verdict']}).\n")
  md = (experiments.header_block(f"Auxiliary loss on vs off, {args.routing} routing on the demo "
                                 f"model, {args.steps} steps, seeds "
                                 f"{', '.join(map(str, args.seeds))} (paper Figure 1)", args, sweep,
                                 specs, machine, argv, "tools/experiments/aux_loss.py")
        + f"![aux loss curves]({NAME}.png)\n\n" + table + "\n" + notes)
  fig = plot(runs, off, on, args)
  payload = {"experiment": NAME, "argv": argv, "steps": args.steps, "seeds": args.seeds,
             "machine": machine, "runs": records, "timing": timing, "arms": arms,
             "train_loss_delta": train_delta}
  experiments.finish(args, NAME, md, table, payload, fig)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
