r"""Routing beyond fixed capacity on the demo model: dropless, GShard's random second expert and
drop by probability, each against the same routing without the option (seeds paired).

  python tools/experiments/routing_options.py                 # the committed docs/results run
  python tools/experiments/routing_options.py --seeds=0,1,2,3 --captions=0 --time_rounds=0

Arms (`tools/experiments/gin/` overlays on a routing file) and the run each is compared with:

  top-1 dropless              top1 + dropless             vs top1 (Capacity 1.25)
  top-2 dropless              top2_cap_k + dropless       vs top2_cap_k (Capacity k×)
  top-2 random second         top2_cap_k + second_random  vs top2_cap_k (naive second expert)
  top-1 drop by probability   top1 + drop_probability     vs top1 (drop by position)
  top-2 drop by probability   top2_cap_1 + drop_probability  vs top2_cap_1 (Capacity 1×)

Every arm and baseline is trained with every seed of `--seeds` (default 0, 1, 2). A comparison
is the per-seed difference arm − baseline of the final validation log-perplexity, its mean and
95% t-interval: "lower"/"higher" only when the interval excludes 0, else "tie". Beside it: the
dropped fraction of token-choices, the dropless arms' max/mean expert load, greedy captions'
BLEU-4 and CIDEr-D on the validation split (`--captions`, `python -m m6t_tf.generate
--split=validation` on every final model) and the step time of arm / baseline (`--time_rounds`
interleaved rounds of `Trainer.train_step` in this process).

Writes <out_dir>/routing_options.png (validation log-perplexity per comparison, mean and a ±1 sd
band; final values with 95% intervals), routing_options.md and routing_options.json.
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
from m6t_tf.bench import timing
# pylint: enable=g-import-not-at-top

NAME = "routing_options"
# (arm name, gin files of the arm, gin files of its baseline, baseline name)
ARMS = (
    ("top-1 dropless", ("top1", "dropless"), ("top1",), "top-1, capacity 1.25"),
    ("top-2 dropless", ("top2_cap_k", "dropless"), ("top2_cap_k",), "top-2, capacity k×"),
    ("top-2 random second expert", ("top2_cap_k", "second_random"), ("top2_cap_k",),
     "top-2, naive second expert"),
    ("top-1 drop by probability", ("top1", "drop_probability"), ("top1",),
     "top-1, drop by position"),
    ("top-2 drop by probability, Capacity 1×", ("top2_cap_1", "drop_probability"),
     ("top2_cap_1",), "top-2 Capacity 1×, drop by position"),
)


def parse_args(argv):
  p = experiments.make_parser(__doc__, NAME)
  p.add_argument("--arms", default="",
                 help="comma-separated subset of the arms by their gin files joined by '_' "
                      "(e.g. top1_dropless,top2_cap_k_second_random; default: all)")
  p.add_argument("--captions", type=int, default=1, choices=(0, 1),
                 help="1: greedy-caption the validation split with every final model and "
                      "report BLEU-4 / CIDEr-D (default 1; ~30 s per run)")
  args, sweep, machine = experiments.start(p, argv)
  known = {"_".join(gins): (name, gins, base, base_name) for name, gins, base, base_name in ARMS}
  chosen = [a for a in args.arms.split(",") if a]
  bad = [a for a in chosen if a not in known]
  if bad:
    p.error(f"--arms: unknown {bad}; choose from {', '.join(known)}")
  args.arms = [known[a] for a in chosen] if chosen else list(ARMS)
  return args, sweep, machine


def specs_for(args) -> list:
  """Every arm and its baseline, every seed of `--seeds`."""
  out = []
  for seed in args.seeds:
    for name, gins, base, base_name in args.arms:
      out.append(experiments.RunSpec(name, gins, seed))
      out.append(experiments.RunSpec(base_name, base, seed))
  return out


def plot(runs: dict, arms: dict, summary: list, chosen: list):
  plt = plots.pyplot()
  n = len(chosen)
  cols = min(3, n + 1)
  rows_ = (n + 1 + cols - 1) // cols
  fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.5 * rows_), squeeze=False)
  flat = [ax for row in axes for ax in row]
  for ax, (name, gins, base, base_name) in zip(flat, chosen):
    curves = []
    for g, label, color in ((base, base_name, "black"), (gins, name, "tab:orange")):
      curves.append(plots.band(ax, [experiments.eval_curve(runs[s]) for s in arms[g]], color, "-",
                               label, marker="o"))
    plots.zoom_to_tail(ax, curves, skip_fraction=0.3, pad=0.3)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("val log-perplexity")
    ax.legend(loc="upper right", fontsize=7)
  ax = flat[n]
  for i, row in enumerate(summary):
    for j, (key, color) in enumerate((("base", "black"), ("arm", "tab:orange"))):
      st = row[key]["log_ppl"]
      ax.errorbar([st["mean"]], [i + 0.15 * (j - 0.5)], xerr=[st["ci95"] or 0], color=color,
                  marker="o", ms=4, capsize=3)
  ax.set_yticks(range(len(summary)))
  ax.set_yticklabels([r["name"] for r in summary], fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("final val log-perplexity (mean, 95% interval)")
  ax.set_title("arm (orange) vs baseline (black)", fontsize=9)
  for extra in flat[n + 1:]:
    extra.axis("off")
  fig.suptitle("Routing options on the demo model: validation log-perplexity, mean over seeds, "
               "band ±1 sd", fontsize=10)
  fig.tight_layout()
  return fig


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, sweep, machine = parse_args(argv)
  specs = specs_for(args)
  runs = sweep.ensure_all(specs)
  arms = experiments.group_arms(specs)
  captions = (experiments.caption_metrics({s: runs[s] for s in specs}, args.jobs, sweep.log)
              if args.captions else {})
  step_times = experiments.time_arms(sweep, arms, args.time_rounds)
  machine["loadavg_end"] = list(os.getloadavg())

  def arm_summary(gins):
    group = arms[gins]
    by = experiments.by_seed(runs, group, experiments.final_log_ppl)
    out = {"gins": list(gins), "log_ppl": stats.describe(by.values()),
           "log_ppl_by_seed": {str(k): v for k, v in by.items()},
           "dropped": stats.describe(experiments.layer_mean(runs[s], "dropped_fraction")
                                     for s in group),
           "max_over_mean_load": stats.describe(
               experiments.layer_mean(runs[s], "max_over_mean_load") for s in group),
           "capacity": runs[group[0]]["experiment"].get("derived", {}).get("capacity")}
    if captions:
      for metric in ("BLEU-4", "CIDEr-D"):
        out[metric] = stats.describe(captions[s][metric] for s in group)
        out[metric + "_by_seed"] = {str(s.seed): captions[s][metric] for s in group}
    return out, by

  rows, summary = [], []
  for name, gins, base, base_name in args.arms:
    arm, arm_by = arm_summary(gins)
    bas, base_by = arm_summary(base)
    delta = stats.paired(arm_by, base_by)
    t_arm, t_base = step_times.get(arms[gins][0].label), step_times.get(arms[base][0].label)
    step = (timing.paired_ratio(t_arm["times_s"], t_base["times_s"])
            if t_arm and t_base else None)
    summary.append({"name": name, "baseline": base_name, "arm": arm, "base": bas,
                    "delta": delta, "step_time_ratio": step})
    cap = lambda d: "dropless" if d["capacity"] is None else str(d["capacity"])
    row = [name, base_name, f"{cap(arm)} / {cap(bas)}", report.fmt_sd(arm["log_ppl"]),
           report.fmt_sd(bas["log_ppl"]), report.fmt_ci(delta), delta["verdict"],
           f"{report.fmt_sd(arm['dropped'], 1, pct=True)} / "
           f"{report.fmt_sd(bas['dropped'], 1, pct=True)}",
           report.fmt_sd(arm["max_over_mean_load"], 2)]
    if captions:
      row += [f"{report.fmt_sd(arm['BLEU-4'], 3)} / {report.fmt_sd(bas['BLEU-4'], 3)}",
              f"{report.fmt_sd(arm['CIDEr-D'], 3)} / {report.fmt_sd(bas['CIDEr-D'], 3)}"]
    row.append(report.fmt(step) if step else "—")
    rows.append(row)
  header = (["arm", "baseline", "C (arm / baseline)", "arm val log-PPL", "baseline val log-PPL",
             "Δ arm − baseline [95% CI]", "", "dropped (arm / baseline)",
             "max/mean expert load (arm)"]
            + (["BLEU-4 (arm / baseline)", "CIDEr-D (arm / baseline)"] if captions else [])
            + ["step time arm / baseline"])
  table = report.markdown_table(header, rows, align="llrrrrlrr" + "r" * (len(header) - 9))
  notes = ("\nColumns: val log-PPL is the teacher-forced log-perplexity on the validation split "
           "at the last step (mean ± sample sd over seeds); Δ is arm − baseline paired by seed "
           "with its 95% t-interval (\"lower\" = the arm is better, \"higher\" = worse, only "
           "when the interval excludes 0). Dropped: the fraction of routed token-choices that "
           "found their expert full, over the logged steps of the second half of training and "
           "the MoE layers. max/mean expert load: the busiest expert's tokens over the mean "
           "(dropless arms log it; with a capacity C bounds it). BLEU-4 and CIDEr-D (x10 scale) "
           "of greedy captions of the 388 validation images by the final model, against all "
           "their references (m6t_tf.run.caption_metrics). Step time: median over interleaved "
           "rounds of arm / baseline `Trainer.train_step`, one process (no all-to-all).\n")
  md = (experiments.header_block(f"Routing options on the demo model, {args.steps} steps, seeds "
                                 f"{', '.join(map(str, args.seeds))}", args, sweep, specs, machine,
                                 argv, "tools/experiments/routing_options.py")
        + f"![routing options]({NAME}.png)\n\n" + table + "\n" + notes)
  fig = plot(runs, arms, summary, args.arms)
  records = [{"label": s.label, "gins": list(s.gins), "seed": s.seed,
              "derived": runs[s]["experiment"].get("derived"),
              "caption_metrics": captions.get(s), **experiments.run_record(runs[s])}
             for s in specs]
  payload = {"experiment": NAME, "argv": argv, "steps": args.steps, "seeds": args.seeds,
             "machine": machine, "comparisons": summary, "timing": step_times, "runs": records}
  experiments.finish(args, NAME, md, table, payload, fig)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
