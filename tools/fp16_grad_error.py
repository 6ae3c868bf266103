r"""Per-element error of FP16 gradient communication against a float32 reduction (2 ranks).

  python tools/fp16_grad_error.py                        # base shrunk and demo, a table
  python tools/fp16_grad_error.py --format=json --out=runs/fp16_grad_error.json
  python tools/fp16_grad_error.py --configs=demo --batches=4

Method, for each config (each one `horovodrun -np 2 --gloo` launch of this file with --worker):
  1. Build the gin config's model as the trainer does, on each rank's real batch of its shard of
     `train.train_data` (`training.train_stream`), with the same initial dense weights on both
     ranks (`broadcast_state`), mesh (data=1, expert=2): the paper's layout, whose dense
     gradients travel and whose expert gradients stay on their rank.
       * `base_shrunk`: gin/base.gin + gin/tiny.gin's sizes, keeping base's mixed_float16
         (tiny.gin turns it off; the paper's base run had it on with FP16 communication);
       * `demo`: gin/demo.gin as it is (float32 compute).
  2. Run `Trainer.compute_gradients` (the trainer's own step) with a context that records each
     rank's local loss-scaled gradients, starting from the trainer's initial loss scale 2^15 and
     halving while the FP16 reduction overflows (as the dynamic scale would, skipping steps).
  3. Reduce the recorded gradients three ways, all through `HorovodContext`:
       * `float32`: the reference (`gradient_compression="none"`);
       * `before`: the code before this change: unscaled, then cast to float16 for the
         allreduce (`allreduce_gradients(compression="fp16")` of the unscaled gradients);
       * `after`: the trainer's FP16 path now: the scaled gradients summed in float16,
         unscaled in float32 (`reduce_gradients` with `gradient_compression="fp16"`).
  4. Over every element that travels (dense gradients; expert ones too when a replica group has
     more than one rank) whose float32 reduction is non-zero: the fraction flushed to 0, the
     largest |ref| among those, the median and 99th percentile of |x − ref| / |ref|, and
     ‖x − ref‖ / ‖ref‖ over the whole gradient; also the fraction of reference elements below
     float16's smallest normal (6.1e-5) unscaled, and scaled. A zero where float32 is not can
     also be a sum that cancels: |g_0 + g_1| below float16's rounding of g_0 and g_1.

JSON (--format=json), schema_version 1:
  {"schema_version", "tool", "argv", "machine": {...}, "ranks", "batches",
   "configs": {name: {"gin_files", "gin_bindings", "mixed_precision", "loss_scale",
                      "elements", "subnormal_fraction_unscaled", "subnormal_fraction_scaled",
                      "paths": {"before": {"flushed_fraction", "largest_flushed",
                                           "median_rel_error",
                                           "p99_rel_error", "norm_rel_error"},
                                "after": {...}}}}}
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from m6t_tf import cli

if __name__ == "__main__":
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

# pylint: disable=g-import-not-at-top
import keras
import numpy as np
import tensorflow as tf

from m6t_tf.run import configurables
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.run import inputs
from m6t_tf.bench import processes
from m6t_tf.bench import report as report_lib
from m6t_tf.bench import timing
from m6t_tf.parallel import context as context_lib
# pylint: enable=g-import-not-at-top

# The gin files are the checkout's, named relative to it, from any folder.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCHEMA_VERSION = 1
TOOL = "tools/fp16_grad_error.py"
CONFIGS = {
    "base_shrunk": (["gin/base.gin", "gin/tiny.gin"], ["train.mixed_precision = True"]),
    "demo": (["gin/demo.gin"], []),
}
LAYOUT = ["make_context.mesh_data = 1", "make_context.mesh_expert = 2",
          "make_context.allreduce_compression = 'fp16'"]
FP16_NORMAL = 2.0 ** -14
INITIAL_SCALE = 2.0 ** 15


def parse_args(argv):
  p = cli.ArgumentParser(description=__doc__.split("\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default=",".join(CONFIGS),
                 help=f"comma-separated, from {sorted(CONFIGS)}")
  p.add_argument("--batches", type=int, default=2, help="batches (steps at the initial "
                 "weights) per config; their elements are pooled")
  p.add_argument("--ranks", type=int, default=2)
  p.add_argument("--format", choices=("table", "json"), default="table")
  p.add_argument("--out", default=None, help="also write the JSON here")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--config", default=None, help=argparse.SUPPRESS)
  p.add_argument("--result", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  names = [c for c in args.configs.split(",") if c]
  unknown = [c for c in names if c not in CONFIGS]
  if unknown or not names:
    p.error(f"--configs={args.configs!r}: unknown {unknown}; choose from {sorted(CONFIGS)}")
  if args.batches < 1 or args.ranks < 2:
    p.error("--batches must be >= 1 and --ranks >= 2 (FP16 communication needs two ranks)")
  args.names = names
  return args


class RecordingContext:
  """Wraps a HorovodContext: `reduce_gradients` records the local (loss-scaled) gradients it is
  given and returns the float32 reduction; everything else is the wrapped context's."""

  def __init__(self, inner):
    self.inner = inner
    self.recorded = None

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def reduce_gradients(self, grads, variables, loss_scale=None):
    self.recorded = (list(grads), loss_scale)
    self.inner.gradient_compression = "none"
    return self.inner.reduce_gradients(grads, variables, loss_scale=loss_scale)


def worker(args) -> None:
  """One rank: records, reduces three ways, writes the travelling elements to an .npz."""
  gin_files, bindings = CONFIGS[args.config]
  configurables.parse(gin_files, [*bindings, *LAYOUT], [REPO])
  q = configurables.query
  ctx = configurables.make_context_configured()
  mixed = bool(q("train.mixed_precision"))
  trainer_lib.set_seeds(q("train.seed", 0), False, rank=ctx.rank)  # as the trainer seeds
  stream = inputs.train_stream(q("train.train_data"), ctx=ctx, seed=q("train.seed", 0),
                                 batch_size=q("train.batch_size_per_worker"),
                                 max_len=q("train.max_len"), image_mode=q("train.image_mode"),
                                 shuffle_buffer=q("train.shuffle_buffer", 2048))
  batches = [dict(b) for b in stream.take(args.batches)]
  network = configurables.network_fn()(name="m6")
  model = trainer_lib.build_model(batch=batches[0], mixed_precision=mixed, network=network)
  ctx.broadcast_state([v for v in model.variables if not context_lib.is_rng_state(v)])
  recording = RecordingContext(ctx)
  trainer = trainer_lib.Trainer(model, keras.optimizers.SGD(0.0), ctx=recording,
                             mixed_precision=mixed)
  travels = [ctx.size > 1 if not ctx.is_expert(v) else ctx.replica_process_set is not None
             for v in trainer.variables]
  owner = ctx.rank == 0
  rows = {"float32": [], "before": [], "after": []}
  scale = INITIAL_SCALE
  for step, batch in enumerate(batches):
    trainer.reseed(q("train.seed", 0), step + 1)
    while True:
      trainer.loss_scale.scale.assign(scale)
      trainer.compute_gradients(batch)
      grads, loss_scale = recording.recorded
      ctx.gradient_compression = "fp16"
      after = ctx.reduce_gradients(grads, trainer.variables, loss_scale=loss_scale)
      ok = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in after if g is not None])
      if bool(ctx.all_finite(ok)) or scale <= 1.0:
        break
      scale /= 2.0  # what the dynamic loss scale does: skip the step, halve
    ctx.gradient_compression = "none"
    reference = ctx.reduce_gradients(grads, trainer.variables, loss_scale=loss_scale)
    unscaled = [None if g is None else g * (1.0 / loss_scale) for g in grads]
    before = [g for g, _ in ctx.allreduce_gradients(zip(unscaled, trainer.variables),
                                                    ctx.is_expert, compression="fp16")]
    for i, v in enumerate(trainer.variables):
      if grads[i] is None or not travels[i]:
        continue
      # Dense results are the same on every rank: rank 0 reports them; an expert's replica
      # group reports it from its data_index-0 rank.
      if (ctx.is_expert(v) and ctx.data_index == 0) or (not ctx.is_expert(v) and owner):
        for name, values in (("float32", reference), ("before", before), ("after", after)):
          rows[name].append(np.asarray(values[i], np.float32).ravel())
  np.savez(f"{args.result}.rank{ctx.rank}.npz",
           **{k: np.concatenate(v) if v else np.zeros([0], np.float32) for k, v in rows.items()},
           scale=np.array(scale), mixed=np.array(mixed))
  ctx.shutdown()


def statistics_of(reference, values) -> dict:
  nz = reference != 0
  ref, got = reference[nz].astype(np.float64), values[nz].astype(np.float64)
  rel = np.abs(got - ref) / np.abs(ref)
  flushed = got == 0
  return {"flushed_fraction": float(np.mean(flushed)),
          "largest_flushed": float(np.abs(ref[flushed]).max()) if flushed.any() else 0.0,
          "median_rel_error": float(np.median(rel)),
          "p99_rel_error": float(np.percentile(rel, 99)),
          "norm_rel_error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}


def measure(name: str, args, tmp: str) -> dict:
  result = os.path.join(tmp, name)
  cmd = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(args.ranks),
         "-H", f"localhost:{args.ranks}", "--gloo", sys.executable, os.path.abspath(__file__),
         "--worker", f"--config={name}", f"--batches={args.batches}", f"--result={result}"]
  env = processes.child_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{name}: the {args.ranks}-rank run failed:\n{proc.stdout[-3000:]}\n"
                     f"{proc.stderr[-3000:]}")
  parts = [dict(np.load(f"{result}.rank{r}.npz")) for r in range(args.ranks)]
  pooled = {k: np.concatenate([p[k] for p in parts]) for k in ("float32", "before", "after")}
  ref = pooled["float32"]
  scale = float(parts[0]["scale"])
  nonzero = np.abs(ref[ref != 0].astype(np.float64))
  gin_files, bindings = CONFIGS[name]
  return {"gin_files": gin_files, "gin_bindings": [*bindings, *LAYOUT],
          "mixed_precision": bool(parts[0]["mixed"]), "loss_scale": scale,
          "elements": int(nonzero.size),
          "subnormal_fraction_unscaled": float(np.mean(nonzero < FP16_NORMAL)),
          "subnormal_fraction_scaled": float(np.mean(nonzero * scale < FP16_NORMAL)),
          "paths": {p: statistics_of(ref, pooled[p]) for p in ("before", "after")}}


def table(report: dict) -> str:
  lines = [f"FP16 gradient allreduce vs float32, {report['ranks']} ranks, "
           f"{report['batches']} batches at the initial weights",
           f"{'config':<12} {'path':<7} {'scale':>7} {'elements':>9} {'<6.1e-5':>8} "
           f"{'flushed':>9} {'median':>9} {'p99':>9} {'‖Δ‖/‖g‖':>9}"]
  for name, c in report["configs"].items():
    for path in ("before", "after"):
      s = c["paths"][path]
      below = (c["subnormal_fraction_unscaled"] if path == "before"
               else c["subnormal_fraction_scaled"])
      lines.append(f"{name:<12} {path:<7} {c['loss_scale'] if path == 'after' else 1.0:>7g} "
                   f"{c['elements']:>9,} {below:>8.1%} {s['flushed_fraction']:>9.2%} "
                   f"{s['median_rel_error']:>9.2e} {s['p99_rel_error']:>9.2e} "
                   f"{s['norm_rel_error']:>9.2e}")
  lines.append("before: unscaled, then cast to float16 (the old trainer); after: loss-scaled "
               "gradients summed in float16, unscaled in float32. <6.1e-5: share of the values "
               "sent that are float16 subnormals.")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.worker:
    worker(args)
    return 0
  tmp = tempfile.mkdtemp(prefix="fp16_grad_error-")
  try:
    configs = {name: measure(name, args, tmp) for name in args.names}
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  result = {"schema_version": SCHEMA_VERSION, "tool": TOOL, "argv": sys.argv[1:],
            "machine": timing.machine_info(), "ranks": args.ranks, "batches": args.batches,
            "configs": configs}
  report_lib.emit(result, format=args.format, table=table, out=args.out, indent=2,
                  sort_keys=True)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
