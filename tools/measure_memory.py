r"""Measured memory of a training step against the planner's prediction (`m6t_tf.run.planning`).

  python tools/measure_memory.py                       # shrunk base, 10B, 1T and the demo
  python tools/measure_memory.py --config=demo --format=json
  python tools/measure_memory.py --remat=block        # with recomputation, and the saving

Every config runs in a fresh Python process (no allocation of an earlier model is still
around), on one worker, float32, with a synthetic batch of the pipeline's shapes (64×64 images,
captions filling all max_len tokens). The child reads TensorFlow's CPU allocator,
`tf.config.experimental.get_memory_info("CPU:0")`, with `TF_CPU_ALLOCATOR_USE_BFC=true`: TF
2.21's default CPU allocator reports only its large allocations there (100 tensors of
[188, 64] float32 read as 0 bytes), the BFC allocator counts every tensor (rounded to 256-byte
bins). In order:

    weights          current after building the model (one forward pass creates the weights)
                     minus current before
    gradients        the trainer's `compute_gradients`, compiled: current while its returned
                     gradients are held minus current before
    activations      the same forward pass and a backward pass down to the first layer (the
                     patch projection's bias), compiled: allocator peak minus current before.
                     The function prunes every weight gradient, so this is what the forward
                     pass kept for the backward pass plus the backward pass's transients at its
                     start — the planner's activation model
    activations_all_grads    the same with every weight gradient computed (each summed to a
                     scalar, not held): adds the weight gradients' transients, for comparison
    optimizer_state  resident after two training steps minus weights (Adafactor and Keras
                     create some slots at the first update)
    step_peak        the trainer's compiled `train_step` (forward, backward, clipping, update):
                     allocator peak during the call minus current before it
    activations_eager_tape   an eager forward pass under a `tf.GradientTape` (current with
                     the tape alive minus before): for comparison only, the eager tape keeps
                     every tensor an op's gradient may read, ~2.5-3× the compiled step's
    rss_step_peak    peak RSS (VmHWM after the steps minus VmRSS before them): includes the TF
                     runtime's own growth (tracing, thread pools), for scale

The shrunk configs keep each size's structure (routing, k, placement, norm, activation,
optimizer, the real 21128-entry vocabulary) and cut widths, depth, experts and batch so that a
step runs in seconds on 2 CPU cores (`SHRUNK` below lists the bindings). `ratio` is planner /
measured; the target is the activation ratio within [0.75, 1.25].

Recomputation: `--remat=<value>` (default "none") hands `remat=<value>` to `training.Trainer`
in the child (the trainer's `train.remat`) and compares the measurement with the planner's
`activations_recompute`; each config is then also measured without recomputation, and the
saving (activations without − with) is reported planned and measured, with its ratio (target:
within [0.75, 1.25]). The planner models "block" recomputation.

JSON (--format=json): {"schema_version": 1, "tool", "argv", "machine", "method",
  "configs": [{"name", "gin_files", "gin_bindings", "shrunk", "remat",
               "measured": {weights, optimizer_state, gradients, activations,
                            activations_all_grads, activations_eager_tape, step_peak, rss_step_peak, params},
               "planned": {weights, optimizer_state, gradients, activations, params},
               "ratio": {weights, optimizer_state, gradients, activations},
               "saving": {planned, measured, ratio} (with --remat only),
               "without_remat": {measured, planned, ratio} (with --remat only: the same
                                 config measured without recomputation)}]}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from m6t_tf import cli

if __name__ == "__main__":
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

# pylint: disable=g-import-not-at-top
import gin
import keras
import numpy as np
import tensorflow as tf

from m6t_tf.run import configurables
from m6t_tf import optimizers
from m6t_tf.run import planning
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.bench import processes
from m6t_tf.bench import timing
# pylint: enable=g-import-not-at-top

# The gin files are the checkout's, named relative to it, from any folder.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SMALL = ["HIDDEN=64", "NUM_HEADS=4", "HEAD_SIZE=16", "MAX_LEN=32",
          "train.batch_size_per_worker=4", "train.mixed_precision=False"]
#: name -> (gin files, bindings that shrink it). Widths, depth, experts and batch are cut; the
#: vocabulary, routing, k, capacity, placement, norm, activation and optimiser are the config's.
REMATS = ("none", "block", "attention", "experts")  # train.remat (M6Transformer.set_remat)
SHRUNK = {
    "base": (["gin/base.gin"], _SMALL + ["INTERMEDIATE=256"]),                # 5 layers, 32 E
    "10B": (["gin/10B.gin"], _SMALL + ["INTERMEDIATE=256", "NUM_LAYERS=4", "NUM_EXPERTS=16"]),
    # 1T keeps I/M = 21248/1024 = 20.75 and Adafactor.
    "1T": (["gin/1T.gin"], _SMALL + ["INTERMEDIATE=1328", "NUM_LAYERS=4", "NUM_EXPERTS=24"]),
    # The demo as it trains (B = 32, M = 128, prototype routing 2 × top-1); MAX_LEN pinned to
    # the emoji names' 20 tokens so that no data needs to be read.
    "demo": (["gin/demo.gin"], ["MAX_LEN=20"]),
}
MEMORY_KEYS = ("weights", "optimizer_state", "gradients", "activations")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", action="append", choices=sorted(SHRUNK),
                 help="a shrunk config (repeatable); default: all")
  p.add_argument("--gin_file", action="append", default=[],
                 help="measure this config instead (repeatable, with --gin_bindings)")
  p.add_argument("--gin_bindings", action="append", default=[])
  p.add_argument("--remat", default="none",
                 help="train.remat for the step (needs the trainer's recomputation)")
  p.add_argument("--format", choices=("table", "json"), default="table")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# The child: one config, one fresh process


def _rss(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return 0


def _synthetic_batch(batch_size: int, max_len: int, vocab_size: int = 21128):
  """A full batch of the pipeline's shapes: uint8 64×64 images, captions of max_len tokens."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(103, min(vocab_size, 8000), (batch_size, max_len)).astype(np.int32)
  tokens[:, 0], tokens[:, -1] = 101, 102                         # [CLS] ... [SEP]
  return {"tokens": tf.constant(tokens),
          "image": tf.constant(rng.integers(0, 256, (batch_size, 64, 64, 3), dtype=np.uint8))}


def measure(gin_files, gin_bindings, remat: str = "none") -> dict:
  """Builds the config's model and optimiser and measures each component (module docstring)."""
  configurables.parse(gin_files, gin_bindings, [ROOT, "."])
  bindings = list(gin_bindings)
  batch_size = configurables.query("train.batch_size_per_worker", 8)
  max_len = configurables.query("train.max_len", 64)
  mixed = bool(configurables.query("train.mixed_precision", False))
  opt_name = configurables.query("train.optimizer", "adamw")
  clip_norm = configurables.query("train.clip_norm", 1.0)
  trainer_kwargs = {"remat": remat}
  del bindings
  info = lambda: tf.config.experimental.get_memory_info("CPU:0")  # noqa: E731
  batch = _synthetic_batch(batch_size, max_len,
                           configurables.query("M6Transformer.vocab_size", 21128))
  network = configurables.network_fn()(name="m6")
  m0 = info()["current"]
  model = trainer_lib.build_model(batch=batch, mixed_precision=mixed, network=network)
  m1 = info()["current"]
  schedule = optimizers.WarmupSchedule(1e-4, 10)
  opt = optimizers.make_optimizer(opt_name, schedule)
  trainer = trainer_lib.Trainer(model, opt, clip_norm=clip_norm, mixed_precision=mixed,
                             **trainer_kwargs)
  m2 = info()["current"]
  gin.clear_config()

  # Gradients: the trainer's compute_gradients compiled (one warm-up call traces it); the
  # gradients it returns stay held.
  compute = tf.function(tf.autograph.experimental.do_not_convert(trainer.compute_gradients))
  compute(batch)
  g0 = info()["current"]
  grads, metrics = compute(batch)
  gradients = info()["current"] - g0
  del grads, metrics

  # Activations: the same forward pass and a backward pass down to the first layer's input
  # (the patch projection's bias), compiled. No weight gradient is computed (the function
  # prunes them), so the peak above the resident memory is what the forward pass kept for the
  # backward pass plus the backward pass's own transients at its start (the [B, L, V]
  # cross-entropy gradient, which the planner counts).
  bottom = [v for v in trainer.variables if v.path.endswith("patch_embedding/proj/bias")]

  @tf.function(autograph=False)
  def backward_to_input(batch):
    with tf.GradientTape() as tape:
      _, metrics = model.losses_and_metrics(batch, training=True)
      loss = metrics["nll_sum"] / metrics["num_tokens"] + metrics["moe_loss"]
    return tape.gradient(loss, bottom)

  backward_to_input(batch)
  tf.config.experimental.reset_memory_stats("CPU:0")
  a0 = info()["current"]
  backward_to_input(batch)
  activations = info()["peak"] - a0

  @tf.function(autograph=False)
  def backward_all(batch):
    with tf.GradientTape() as tape:
      _, metrics = model.losses_and_metrics(batch, training=True)
      loss = metrics["nll_sum"] / metrics["num_tokens"] + metrics["moe_loss"]
    grads = tape.gradient(loss, trainer.variables)
    return tf.add_n([tf.reduce_sum(g.values if isinstance(g, tf.IndexedSlices) else g)
                     for g in grads if g is not None])

  backward_all(batch)
  tf.config.experimental.reset_memory_stats("CPU:0")
  a0 = info()["current"]
  backward_all(batch)
  activations_all = info()["peak"] - a0

  # An eager forward under a tape, for comparison: the tape holds every tensor an op's
  # gradient reads, with no graph-level freeing (the eager model is not what trains).
  tf.config.experimental.reset_memory_stats("CPU:0")
  c0 = info()["current"]
  with tf.GradientTape() as tape:
    _, metrics = model.losses_and_metrics(batch, training=True)
  eager = info()["current"] - c0
  del tape, metrics

  # The trainer's compiled step, after warm-up (tracing, the optimiser's first update).
  rss_before = _rss("VmRSS")
  for _ in range(2):
    float(trainer.train_step(batch)["loss"])
  # The optimiser state, lazily created slots included (Adafactor's): resident after steps.
  optimizer_state = info()["current"] - m1
  tf.config.experimental.reset_memory_stats("CPU:0")
  s0 = info()["current"]
  float(trainer.train_step(batch)["loss"])
  step_peak = info()["peak"] - s0
  rss_peak = _rss("VmHWM") - rss_before
  keras.backend.clear_session()
  del m2
  return {"weights": m1 - m0, "optimizer_state": optimizer_state, "gradients": gradients,
          "activations": activations, "activations_all_grads": activations_all,
          "activations_eager_tape": eager, "step_peak": step_peak,
          "rss_step_peak": rss_peak,
          "params": int(sum(v.numpy().size for v in trainer.variables))}


# --------------------------------------------------------------------------------------------
# The parent: planner, subprocesses, report


def planned(gin_files, gin_bindings, remat: str) -> dict:
  p = planning.plan_from_gin(gin_files, gin_bindings, num_workers=1, search_paths=[ROOT, "."])
  mem = p["memory_bytes"]
  return {"weights": mem["weights"] + mem["weight_casts"],
          "optimizer_state": mem["optimizer_state"], "gradients": mem["gradients"],
          "activations": mem["activations"] if remat == "none" else mem["activations_recompute"],
          "params": p["params_per_worker"]}


def run_child(gin_files, gin_bindings, remat: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--remat={remat}"]
  cmd += [f"--gin_file={f}" for f in gin_files] + [f"--gin_bindings={b}" for b in gin_bindings]
  # The BFC allocator on CPU: TF 2.21's default CPU allocator counts only large allocations in
  # get_memory_info (100 tensors of [188, 64] read as 0 bytes); BFC counts every tensor.
  env = processes.child_env(TF_CPP_MIN_LOG_LEVEL="3", TF_CPU_ALLOCATOR_USE_BFC="true")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"measuring {gin_files} {gin_bindings} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(x: float) -> str:
  return f"{x / 2 ** 20:.2f}"


def table(report: dict) -> str:
  lines = ["| config | params | " + " | ".join(f"{k} MiB: plan / measured (ratio)"
                                               for k in MEMORY_KEYS)
           + " | step peak MiB (plan act.+grad.) | RSS step peak MiB |",
           "|---|---|" + "---|" * (len(MEMORY_KEYS) + 2)]
  for c in report["configs"]:
    m, p, r = c["measured"], c["planned"], c["ratio"]
    cells = [f"{_mib(p[k])} / {_mib(m[k])} ({r[k]:.2f})" for k in MEMORY_KEYS]
    name = c["name"] + (f" (remat {c['remat']})" if c["remat"] != "none" else "")
    lines.append(f"| {name} | {m['params']:,} | " + " | ".join(cells) +
                 f" | {_mib(m['step_peak'])} ({_mib(p['activations'] + p['gradients'])}) | "
                 f"{_mib(m['rss_step_peak'])} |")
  savings = [c for c in report["configs"] if "saving" in c]
  if savings:
    lines += ["", f"| config | activations saved by remat {savings[0]['remat']} MiB: plan / "
                  f"measured (ratio) |", "|---|---|"]
    for c in savings:
      v = c["saving"]
      lines.append(f"| {c['name']} | {_mib(v['planned'])} / {_mib(v['measured'])} "
                   f"({v['ratio']:.2f}) |")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.child:
    print(json.dumps(measure(args.gin_file, args.gin_bindings, args.remat)), flush=True)
    return 0
  if args.gin_file:
    runs = [(" + ".join(os.path.basename(f) for f in args.gin_file), args.gin_file,
             args.gin_bindings)]
  else:
    runs = [(name, SHRUNK[name][0], SHRUNK[name][1] + args.gin_bindings)
            for name in (args.config or list(SHRUNK))]
  if args.remat not in REMATS:
    raise cli.ConfigError(f"--remat={args.remat!r}; allowed: {REMATS}")
  configs = []
  for name, files, bindings in runs:
    try:
      plan = planned(files, bindings, args.remat)
    except ValueError as e:
      raise cli.ConfigError(cli.one_line(e)) from e
    measured = run_child(files, bindings, args.remat)
    ratio = {k: plan[k] / measured[k] if measured[k] else float("nan") for k in MEMORY_KEYS}
    config = {"name": name, "gin_files": files, "gin_bindings": bindings,
              "shrunk": not args.gin_file, "remat": args.remat, "measured": measured,
              "planned": plan, "ratio": ratio}
    if args.remat != "none":
      plan_none = planned(files, bindings, "none")
      measured_none = run_child(files, bindings, "none")
      # The run without recomputation is measured anyway (for the saving): report all of it,
      # so one invocation also gives the plain config's comparison.
      config["without_remat"] = {
          "measured": measured_none, "planned": plan_none,
          "ratio": {k: plan_none[k] / measured_none[k] if measured_none[k] else float("nan")
                    for k in MEMORY_KEYS}}
      saving = {"planned": plan_none["activations"] - plan["activations"],
                "measured": measured_none["activations"] - measured["activations"]}
      saving["ratio"] = (saving["planned"] / saving["measured"] if saving["measured"] > 0
                         else float("nan"))
      config["saving"] = saving
    configs.append(config)
  report = {"schema_version": 1, "tool": "tools/measure_memory.py", "argv": sys.argv[1:],
            "machine": timing.machine_info(),
            "method": {"allocator": "tf.config.experimental.get_memory_info('CPU:0')",
                       "env": {"TF_CPU_ALLOCATOR_USE_BFC": "true"},
                       "activations": "compiled forward + backward to the first layer, peak",
                       "process": "one fresh process per config", "workers": 1},
            "configs": configs}
  if args.format == "json":
    print(json.dumps(report, indent=2))
  else:
    print(table(report))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
