r"""MoE attention vs the MoE baseline on the demo model (paper §3.4, Figure 4).

  python tools/experiments/moe_attention.py --steps=600      # the committed docs/results run
  python tools/experiments/moe_attention.py --routings=top1 --steps=1000

For each routing of `--routings` (files of tools/experiments/gin/; default top1, the paper's
baseline, and 2top1_cap_k, since the paper found that expert prototyping helps MoE attention
converge), two runs: the MoE baseline (that file alone: MoE FFNs, dense attention; the same
run as the routing sweep's) and MoE attention (`tools/experiments/gin/moe_attention.gin`: Q, K,
V and the output projection of every MoE layer are MoEs of linear experts with the same
routing and capacity). The paper's finding: MoE attention hurts quality and stability.

Stability is read from the curves and from the gradient norm the trainer logs every
`--log_every` steps (before clipping at 1.0). `--time_rounds` interleaved rounds time one
`Trainer.train_step` of every model relative to the first baseline.

Writes <out_dir>/moe_attention.png (training and validation log-perplexity, gradient norm),
moe_attention.md (table, commands, machine) and moe_attention.json.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

NAME = "moe_attention"
COLORS = ("tab:blue", "tab:green", "tab:purple", "tab:red", "black")


def parse_args(argv):
  p = common.make_parser(__doc__, NAME)
  p.add_argument("--routings", default="top1,2top1_cap_k",
                 help="comma-separated routing files of tools/experiments/gin/ (default "
                      "top1,2top1_cap_k)")
  args, sweep, machine = common.start(p, argv)
  args.routings = [r for r in args.routings.split(",") if r]
  for r in args.routings:
    if not os.path.exists(os.path.join(common.ROOT, common.GIN_DIR, f"{r}.gin")):
      p.error(f"--routings: no {common.GIN_DIR}/{r}.gin")
  if not args.routings:
    p.error("--routings is empty")
  return args, sweep, machine


def specs_for(args) -> list:
  """For each routing: the MoE FFN baseline and MoE attention, every seed of `--seeds`."""
  return [common.RunSpec(label, gins, seed) for seed in args.seeds for r in args.routings
          for label, gins in ((f"{r}, MoE FFN", (r,)),
                              (f"{r}, MoE FFN + MoE attention", (r, "moe_attention")))]


def plot(runs: dict, pairs, args):
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
  train_ax, val_ax, grad_ax = axes
  curves_t, curves_v = [], []
  for i, (routing, base, attn) in enumerate(pairs):
    color = COLORS[i % len(COLORS)]
    for spec, ls, what in ((base, "-", "MoE FFN"), (attn, "--", "+ MoE attention")):
      label = f"{routing}: {what}"
      xs, ys = common.loss_curve(runs[spec])
      train_ax.plot(xs, ys, color=color, ls=ls, lw=1.4, label=label)
      curves_t.append((xs, ys))
      ex, ey = common.eval_curve(runs[spec])
      val_ax.plot(ex, ey, color=color, ls=ls, lw=1.4, marker="o", ms=4, label=label)
      curves_v.append((ex, ey))
      gx, gy = common.series(runs[spec], "grad_norm")
      grad_ax.plot(gx, gy, color=color, ls=ls, lw=1.1, label=label)
  common.zoom_to_tail(train_ax, curves_t, skip_fraction=0.3)
  common.zoom_to_tail(val_ax, curves_v, skip_fraction=0.3)
  train_ax.set_title("training log-perplexity (running mean)")
  val_ax.set_title("validation log-perplexity")
  grad_ax.set_title("gradient global norm (before clipping at 1.0)")
  grad_ax.set_yscale("log")
  for ax in axes:
    ax.set_xlabel("step")
  train_ax.legend(loc="upper right")
  fig.suptitle("MoE attention vs the MoE baseline on the demo model (paper Figure 4); "
               "log-perplexity y-axes zoomed to the last 70% of training", fontsize=10)
  fig.tight_layout()
  return fig


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, sweep, machine = parse_args(argv)
  pairs = [(r, common.RunSpec(f"{r}, MoE FFN", (r,)),
            common.RunSpec(f"{r}, MoE FFN + MoE attention", (r, "moe_attention")))
           for r in args.routings]
  specs = [s for _, b, a in pairs for s in (b, a)]
  runs = {spec: sweep.ensure(spec) for spec in specs}
  timing = (common.time_step_ratios(sweep, specs, pairs[0][1], rounds=args.time_rounds)
            if args.time_rounds else {})
  machine["loadavg_end"] = list(os.getloadavg())

  header = ["routing", "attention", "val PPL", "val log-PPL", "Δ log-PPL vs MoE FFN",
            "train loss (last 10%)", "max grad norm (after warm-up)", "dropped, attention MoEs",
            f"step time vs {pairs[0][0]} baseline"]
  rows, records = [], []
  for routing, base, attn in pairs:
    base_log = common.final_eval(runs[base])["log_perplexity"]
    for spec, what in ((base, "dense"), (attn, "MoE (Q, K, V, O)")):
      run = runs[spec]
      ev = common.final_eval(run)
      warm = max(1, args.steps // 10)
      gx, gy = common.series(run, "grad_norm")
      grad_max = max((y for x, y in zip(gx, gy) if x > warm), default=None)
      attn_layers = [l for l in common.moe_layer_names(run) if "/attention/" in l]
      drops = [common.late_mean(run, f"moe/{l}/dropped_fraction") for l in attn_layers]
      drop = sum(drops) / len(drops) if drops and None not in drops else None
      t = timing.get(spec.label)
      rows.append([routing, what, common.fmt(ev["perplexity"]),
                   common.fmt(ev["log_perplexity"], 3),
                   common.fmt(ev["log_perplexity"] - base_log, 3),
                   common.fmt(common.final_train_loss(run), 3), common.fmt(grad_max),
                   common.fmt(drop, 1, pct=True) if attn_layers else "—",
                   common.fmt(t["ratio"]) if t else "—"])
      records.append({"label": spec.label, "gins": list(spec.gins),
                      "derived": run["experiment"].get("derived"),
                      "max_grad_norm_after_warmup": grad_max,
                      "late_dropped_fraction_attention": dict(zip(attn_layers, drops)),
                      "step_time_ratio": t["ratio"] if t else None, **common.run_record(run)})
  table = common.markdown_table(header, rows, align="llrrrrrrr")
  notes = ("\nColumns: val PPL is the teacher-forced perplexity on the validation split at "
           "the last step; max grad norm is over the logged steps after warm-up; dropped is "
           "the mean dropped fraction of the Q, K, V, O MoEs over the second half of training. "
           "Step time: median over interleaved rounds of (model's `Trainer.train_step` / the "
           "first baseline's in the same round), one process.\n")
  md = (common.header_block(f"MoE attention vs the MoE baseline on the demo model, "
                            f"{args.steps} steps (paper Figure 4)", args, sweep, specs,
                            machine, argv, "tools/experiments/moe_attention.py")
        + f"![MoE attention curves]({NAME}.png)\n\n" + table + "\n" + notes)
  fig = plot(runs, pairs, args)
  payload = {"experiment": NAME, "argv": argv, "steps": args.steps, "machine": machine,
             "runs": records, "timing": timing}
  common.finish(args, NAME, md, table, payload, fig)
  return 0


if __name__ == "__main__":
  from m6t_tf import cli
  sys.exit(cli.run_argparse(main))
