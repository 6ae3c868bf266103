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
import glob
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _scalars(model_dir: str) -> dict:
  import tensorflow as tf
  out = {}
  for path in glob.glob(os.path.join(model_dir, "train", "events*")):
    for raw in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(raw.numpy())
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def run(fraction: str, steps: int) -> dict:
  import gin
  from m6t_tf.run import configurables
  gin.clear_config()
  configurables.parse([os.path.join(ROOT, "gin", "demo.gin")], [
      f"train.num_steps = {steps}", f"train.log_every = {steps // 2}", "train.eval_data = None",
      f"REAL_TOKEN_FRACTION = {fraction}"], [ROOT])
  model_dir = tempfile.mkdtemp(prefix="m6t_bench_capacity_")
  summary = configurables.run_train(model_dir=model_dir)
  scalars = _scalars(model_dir)
  layer = summary["model"].moe_layers[0]
  dropped = [v for k, v in scalars.items() if k.endswith("/dropped_fraction")]
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
