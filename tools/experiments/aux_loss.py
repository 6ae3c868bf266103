r"""Auxiliary load-balance loss on vs off: per-layer load cv over training (paper Figure 1).

  python tools/experiments/aux_loss.py --steps=600           # the committed docs/results run
  python tools/experiments/aux_loss.py --routing=2top1_cap_k --steps=1000

Two runs of the demo model with the routing `--routing` (a file of tools/experiments/gin/;
default top1, the paper's base-model routing): without auxiliary loss (that file alone, the
same run as the routing sweep's) and with the Switch load-balance loss of weight 0.01
(`tools/experiments/gin/aux_loss.gin`). The paper's finding: the loss balances the load (cv
≈ 0.3) but does not improve quality.

The load cv is σ/μ of the tokens each expert computed in one step (after capacity, padding
excluded), logged per MoE layer every `--log_every` steps by the trainer; the dropped fraction
is logged alongside. `--time_rounds` interleaved rounds also time one `Trainer.train_step` of
both (the loss adds a few reductions per layer).

Writes <out_dir>/aux_loss.png (cv and dropped fraction per layer, training and validation
log-perplexity), aux_loss.md (table, commands, machine) and aux_loss.json.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

NAME = "aux_loss"


def parse_args(argv):
  p = common.make_parser(__doc__, NAME)
  p.add_argument("--routing", default="top1",
                 help="routing file of tools/experiments/gin/ (default top1)")
  args, sweep, machine = common.start(p, argv)
  if not os.path.exists(os.path.join(common.ROOT, common.GIN_DIR, f"{args.routing}.gin")):
    p.error(f"--routing={args.routing}: no {common.GIN_DIR}/{args.routing}.gin")
  return args, sweep, machine


def specs_for(args) -> list:
  """The two arms (without / with the loss), every seed of `--seeds`."""
  return [common.RunSpec(label, gins, seed) for seed in args.seeds for label, gins in (
      (f"{args.routing}, no auxiliary loss", (args.routing,)),
      (f"{args.routing}, auxiliary loss 0.01", (args.routing, "aux_loss")))]


def plot(runs: dict, off, on, args):
  plt = common.pyplot()
  layers = common.moe_layer_names(runs[off])
  n = len(layers)
  fig, axes = plt.subplots(2, n + 1, figsize=(3.3 * (n + 1), 6.4), squeeze=False)
  styles = {off: ("tab:blue", "no auxiliary loss"), on: ("tab:orange", "auxiliary loss 0.01")}
  window = 5
  for i, layer in enumerate(layers):
    cv_ax, drop_ax = axes[0][i], axes[1][i]
    for spec, (color, label) in styles.items():
      xs, ys = common.series(runs[spec], f"moe/{layer}/load_cv")
      cv_ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
      cv_ax.plot(xs, common.smooth(ys, window), color=color, lw=1.6, label=label)
      xs, ys = common.series(runs[spec], f"moe/{layer}/dropped_fraction")
      drop_ax.plot(xs, [100 * y for y in ys], color=color, alpha=0.25, lw=0.8)
      drop_ax.plot(xs, [100 * y for y in common.smooth(ys, window)], color=color, lw=1.6,
                   label=label)
    cv_ax.axhline(0.3, color="grey", ls=":", lw=1)
    cv_ax.set_title(f"{common.short_layer(layer)}: load cv")
    cv_ax.set_ylim(bottom=0)
    drop_ax.set_title(f"{common.short_layer(layer)}: dropped %")
    drop_ax.set_ylim(bottom=0)
    drop_ax.set_xlabel("step")
  axes[0][0].legend(loc="upper right")
  axes[0][0].text(0.02, 0.3, "cv 0.3 (paper, with aux loss)", color="grey", fontsize=7,
                  transform=axes[0][0].get_yaxis_transform(), va="bottom")
  train_ax, val_ax = axes[0][n], axes[1][n]
  curves_t, curves_v = [], []
  for spec, (color, label) in styles.items():
    xs, ys = common.loss_curve(runs[spec])
    train_ax.plot(xs, ys, color=color, lw=1.4, label=label)
    curves_t.append((xs, ys))
    ex, ey = common.eval_curve(runs[spec])
    val_ax.plot(ex, ey, color=color, lw=1.4, marker="o", ms=4, label=label)
    curves_v.append((ex, ey))
  common.zoom_to_tail(train_ax, curves_t, skip_fraction=0.3)
  common.zoom_to_tail(val_ax, curves_v, skip_fraction=0.3)
  train_ax.set_title("training log-perplexity")
  val_ax.set_title("validation log-perplexity")
  val_ax.set_xlabel("step")
  fig.suptitle(f"Auxiliary load-balance loss on vs off, {args.routing} routing on the demo model "
               f"(paper Figure 1); faint: every logged step, bold: running mean of {window}",
               fontsize=10)
  fig.tight_layout()
  return fig


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, sweep, machine = parse_args(argv)
  off = common.RunSpec(f"{args.routing}, no auxiliary loss", (args.routing,))
  on = common.RunSpec(f"{args.routing}, auxiliary loss 0.01", (args.routing, "aux_loss"))
  runs = {spec: sweep.ensure(spec) for spec in (off, on)}
  timing = (common.time_step_ratios(sweep, [on], off, rounds=args.time_rounds)
            if args.time_rounds else {})
  machine["loadavg_end"] = list(os.getloadavg())

  layers = common.moe_layer_names(runs[off])
  header = (["run", "val PPL", "val log-PPL", "train loss (last 10%)"]
            + [f"cv {common.short_layer(l)}" for l in layers]
            + ["cv mean", "dropped (mean)", "balance loss E·Σf·P", "step time vs off"])
  rows, records = [], []
  for spec in (off, on):
    run = runs[spec]
    ev = common.final_eval(run)
    cv = [common.late_mean(run, f"moe/{l}/load_cv") for l in layers]
    drop = [common.late_mean(run, f"moe/{l}/dropped_fraction") for l in layers]
    bal = [common.late_mean(run, f"moe/{l}/aux_loss") for l in layers]
    mean = lambda xs: sum(xs) / len(xs) if xs and None not in xs else None
    t = timing.get(spec.label)
    rows.append([spec.label, common.fmt(ev["perplexity"]), common.fmt(ev["log_perplexity"], 3),
                 common.fmt(common.final_train_loss(run), 3)]
                + [common.fmt(c) for c in cv]
                + [common.fmt(mean(cv)), common.fmt(mean(drop), 1, pct=True),
                   common.fmt(mean(bal), 3), common.fmt(t["ratio"]) if t else "—"])
    records.append({"label": spec.label, "gins": list(spec.gins),
                    "derived": run["experiment"].get("derived"),
                    "late_load_cv": dict(zip(layers, cv)),
                    "late_dropped_fraction": dict(zip(layers, drop)),
                    "late_balance_loss": dict(zip(layers, bal)),
                    "step_time_vs_off": t["ratio"] if t else None, **common.run_record(run)})
  table = common.markdown_table(header, rows, align="l" + "r" * (len(header) - 1))
  notes = ("\nColumns: cv and dropped are means over the logged steps of the second half of "
           "training (one step's batch each: 32 captions); the balance loss E·Σ_e f_e·P_e is "
           "the Switch loss the auxiliary term adds ×0.01 (1.0 = perfectly balanced), logged "
           "in both runs although only the second trains on it. val PPL: teacher-forced "
           "perplexity on the validation split at the last step.\n")
  md = (common.header_block(f"Auxiliary loss on vs off, {args.routing} routing on the demo "
                            f"model, {args.steps} steps (paper Figure 1)", args, sweep,
                            [off, on], machine, argv, "tools/experiments/aux_loss.py")
        + f"![aux loss curves]({NAME}.png)\n\n" + table + "\n" + notes)
  fig = plot(runs, off, on, args)
  payload = {"experiment": NAME, "argv": argv, "steps": args.steps, "machine": machine,
             "runs": records, "timing": timing}
  common.finish(args, NAME, md, table, payload, fig)
  return 0


if __name__ == "__main__":
  from m6t_tf import cli
  sys.exit(cli.run_argparse(main))
