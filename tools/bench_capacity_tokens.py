r"""Real tokens per second of the demo training, with C from every position vs from the real tokens.

  python tools/bench_capacity_tokens.py [--steps=60] [--repeats=2] [--format=table|json]

Trains gin/demo.gin (`make train`'s config) for --steps steps in this process, alternating
REAL_TOKEN_FRACTION = 1.0 (C from all 1,120 positions of a step, padding included: the rule
before) and None (C from the real tokens' share, the default now), --repeats times each. Every
run reads the trainer's own TensorBoard scalars over its second half (the first half holds the
trace): `tokens_per_s` (real tokens), `moe/effective_capacity_factor` (γ over the tokens
routed) and the dropped fraction of the first MoE layer. Prints medians, and the ratio
after / before measured in this one process (absolute figures on a shared machine are noise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from m6t_tf import cli

if __name__ == "__main__":
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

# pylint: disable=g-import-not-at-top
import gin

from m6t_tf.run import configurables
from m6t_tf.bench import experiments
# pylint: enable=g-import-not-at-top

# gin/demo.gin of the checkout holding this script, from any folder.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(fraction: str, steps: int) -> dict:
  gin.clear_config()
  configurables.parse([os.path.join(ROOT, "gin", "demo.gin")], [
      f"train.num_steps = {steps}", f"train.log_every = {steps // 2}", "train.eval_data = None",
      f"REAL_TOKEN_FRACTION = {fraction}"], [ROOT])
  model_dir = tempfile.mkdtemp(prefix="m6t_bench_capacity_")
  summary = configurables.run_train(model_dir=model_dir)
  scalars = experiments.read_scalars(model_dir)
  layer = summary["model"].moe_layers[0]
  first = experiments.moe_layer_names({"scalars": scalars})[:1]    # in network order
  dropped = [scalars[f"moe/{name}/dropped_fraction"] for name in first]
  return {"fraction": layer.capacity_token_fraction or 1.0, "capacity": layer.last_capacity,
          "tokens_per_s": scalars["tokens_per_s"][steps],
          "effective_capacity_factor": scalars["moe/effective_capacity_factor"][steps],
          "padded_fraction": scalars["data/padded_fraction"][steps],
          "dropped_fraction_first_layer": dropped[0][steps] if dropped else None}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--format", choices=("table", "json"), default="table")
  args = p.parse_args(argv)
  if args.steps < 4 or args.steps % 2:
    p.error(f"--steps={args.steps} must be an even number >= 4")
  runs = {"before": [], "after": []}
  for _ in range(args.repeats):
    runs["before"].append(run("1.0", args.steps))
    runs["after"].append(run("None", args.steps))
  med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if rs[0][k] is not None}
         for name, rs in runs.items()}
  report = {"tool": "tools/bench_capacity_tokens.py", "argv": sys.argv[1:], "runs": runs,
            "median": med,
            "tokens_per_s_ratio": med["after"]["tokens_per_s"] / med["before"]["tokens_per_s"]}
  if args.format == "json":
    print(json.dumps(report, indent=2))
    return 0
  print("| C from | share | C | effective γ | dropped (layer 0) | real tokens/s (median) |")
  print("|---|---|---|---|---|---|")
  for name, label in (("before", "every position"), ("after", "the real tokens")):
    m = med[name]
    print(f"| {label} | {m['fraction']:.3f} | {m['capacity']:.0f} | "
          f"{m['effective_capacity_factor']:.2f} | "
          f"{m.get('dropped_fraction_first_layer', float('nan')):.3f} | {m['tokens_per_s']:,.0f} |")
  print(f"\nreal tokens/s, after / before: {report['tokens_per_s_ratio']:.2f}× "
        f"({args.repeats} runs each of {args.steps} steps, interleaved, medians)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
