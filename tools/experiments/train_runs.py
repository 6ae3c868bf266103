r"""Trains every run of the experiments at once, `--jobs` processes at a time.

  python tools/experiments/train_runs.py                      # the docs/results runs
  python tools/experiments/train_runs.py --experiments=routing,scale --seeds=0,1,2,3

The experiment scripts train what they miss themselves; this one only trains (seed by seed, so
an interrupted sweep has whole seeds), which keeps both cores busy across experiments whose
runs overlap. Then each script (`routing.py`, `aux_loss.py`, ...) with the same flags reuses
the runs and writes its tables and plots.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from m6t_tf import cli

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

from m6t_tf.bench import experiments  # pylint: disable=g-import-not-at-top

EXPERIMENTS = ("routing", "aux_loss", "moe_attention", "routing_options", "scale")


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = experiments.cli_parser(__doc__, "train_runs")
  p.add_argument("--experiments", default=",".join(EXPERIMENTS),
                 help="comma-separated subset of " + ", ".join(EXPERIMENTS))
  args = p.parse_args(argv)
  experiments.check_common_flags(p, args)
  names = [n for n in args.experiments.split(",") if n]
  bad = [n for n in names if n not in EXPERIMENTS]
  if bad or not names:
    p.error(f"--experiments: unknown or none {bad}; choose from {', '.join(EXPERIMENTS)}")
  shared = [a for a in argv if not a.startswith("--experiments")]
  specs = []
  for name in names:   # each script's own defaults for its other flags
    module = importlib.import_module(name)   # the script beside this one (its folder is first
                                             # on the path of a script run as `python x.py`)
    sub_args, _, _ = module.parse_args(shared + ["--time_rounds=0"])
    specs += module.specs_for(sub_args)
  args.model_root = os.path.abspath(args.model_root)
  sweep = experiments.Sweep(args)
  by_seed = sorted(specs, key=lambda s: args.seeds.index(s.seed))
  todo = {sweep.run_dir(s) for s in by_seed if not sweep.done(s)}
  start = time.time()
  sweep.log(f"{len({sweep.run_dir(s) for s in specs})} runs, {len(todo)} to train, "
            f"{args.jobs} at a time")
  sweep.ensure_all(by_seed)
  sweep.log(f"all runs done in {time.time() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
