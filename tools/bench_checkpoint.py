r"""Cost of durable checkpoints: a save that fsyncs (m6t_tf.checkpointing) against one that
does not, on a real model's checkpoint, in one process.

  python tools/bench_checkpoint.py                                   # the demo model, a table
  python tools/bench_checkpoint.py --repeats=10 --format=json --out=runs/bench_checkpoint.json
  python tools/bench_checkpoint.py --gin_file=gin/demo.gin --gin_file=gin/tiny.gin --repeats=2

Method:
  1. Build the model of the gin config as the trainer does (`m6t_tf.bench.models.GinModel`: its
     network, optimizer and `Trainer` on a real batch of `train.train_data`), run one training
     step so that the optimizer's slots exist, and collect the trainer's checkpoint entries
     (`training.variables_by_path` plus the `train/*` counters).
  2. Save it with two `Checkpointer`s, one directory each under `--dir` (default `runs/`, where
     a `model_dir` lives: the same filesystem), `max_to_keep` as the trainer's default (3), so
     that steady-state saves also prune:
       * `before`: the save of the code before durable publishing: only the `latest` pointer
         was fsynced, nothing else (no shard, merged file or directory flush);
       * `durable`: `LocalFileOps()`, the trainer's default: shards, merged checkpoint and
         directory flushed before `latest` is published, the directory flushed after.
     One untimed save each first, then `--repeats` rounds; each round times one save of each,
     in an order alternated every round, so other load on a shared machine falls on both alike.
  3. Report each variant's median save time, and the durable/before ratio as the median of the
     per-round ratios (paired, as `compare_dense.py` does).

A save's time here is `Checkpointer.save` (SaveV2 of the shard, MergeV2Checkpoints, publish,
prune) in one process; fsync's cost depends on the storage (disk, its cache, the filesystem),
which the JSON names (`filesystem`).

JSON (--format=json), schema_version 1:
  {"schema_version", "tool", "argv", "machine": {...machine_info(), "loadavg_end"},
   "config": {"gin_files", "gin_bindings", "batch_source", "entries", "checkpoint_bytes"},
   "dir", "filesystem", "repeats",
   "variants": {"before": {"median_s", "times_s", "fsyncs_per_save"}, "durable": {...}},
   "ratio_durable_to_before", "extra_ms_per_save"}
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from m6t_tf import cli

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

# pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

from m6t_tf.run import checkpointing
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.bench import models
from m6t_tf.bench import report as report_lib
from m6t_tf.bench import timing
from m6t_tf.data import records
from m6t_tf.parallel import context as context_lib
# pylint: enable=g-import-not-at-top

SCHEMA_VERSION = 1
TOOL = "tools/bench_checkpoint.py"
VARIANTS = ("before", "durable")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=None,
                 help="gin file(s) of the model (default gin/demo.gin)")
  p.add_argument("--gin_bindings", action="append", default=[])
  p.add_argument("--gin_search_paths", action="append", default=None,
                 help="folders searched for gin includes (default: .)")
  p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
  p.add_argument("--dir", default="runs",
                 help="parent folder of the benchmark's checkpoint folders (default runs/, "
                      "removed afterwards)")
  p.add_argument("--format", choices=("json", "table"), default="table")
  p.add_argument("--out", default=None, help="also write the JSON report to this path")
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error(f"--repeats={args.repeats} must be >= 1")
  args.gin_file = args.gin_file or ["gin/demo.gin"]
  args.gin_search_paths = args.gin_search_paths or ["."]
  return args


def file_ops(variant: str):
  """The `LocalFileOps` of a variant, counting its fsyncs in `.fsyncs`."""

  class Counting(checkpointing.LocalFileOps):
    def __init__(self, only_latest: bool):
      super().__init__(flush=True)
      self.only_latest = only_latest
      self.fsyncs = 0

    def flush_file(self, path):
      if not self.only_latest or os.path.basename(path).startswith(checkpointing.LATEST):
        self.fsyncs += 1
        super().flush_file(path)

    def flush_dir(self, path):
      if not self.only_latest:
        self.fsyncs += 1
        super().flush_dir(path)

  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}; allowed: {VARIANTS}")
  return Counting(only_latest=variant == "before")


def checkpoint_entries(files, bindings, search_paths):
  """(the trainer's checkpoint entries of the config's model, the batch's source)."""
  c = models.GinModel("model", files, bindings, False, search_paths)
  c.build()
  c.step()                                   # creates the optimizer's slots
  trainer = c.trainer
  entries = trainer_lib.variables_by_path(trainer.model, trainer.optimizer)
  entries.update({"train/step": tf.Variable(1, dtype=tf.int64),
                  "train/loss_scale": trainer.loss_scale.scale,
                  "train/good_steps": trainer.loss_scale.good_steps,
                  "train/skipped_steps": trainer.loss_scale.skipped,
                  "train/bad_records": tf.Variable(np.zeros([len(records.REASON_NAMES)],
                                                            np.int64))})
  num_experts = trainer.model.moe_layers[0].num_experts if trainer.model.moe_layers else 0
  return entries, num_experts, c.batch_source


def filesystem_of(path: str) -> str:
  """`type (device)` of the mount holding `path`, from /proc/mounts ("unknown" elsewhere)."""
  path = os.path.realpath(path)
  best = ("", "unknown")
  try:
    with open("/proc/mounts") as f:
      for line in f:
        dev, mount, fstype = line.split()[:3]
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best[0]):
          best = (mount, f"{fstype} ({dev} on {mount})")
  except OSError:
    pass
  return best[1]


def run(args, log) -> dict:
  tf.get_logger().setLevel("ERROR")
  machine = timing.machine_info()
  log(f"building {'+'.join(args.gin_file)}")
  entries, num_experts, batch_source = checkpoint_entries(args.gin_file, args.gin_bindings,
                                                          args.gin_search_paths)
  size = sum(int(v.numpy().nbytes) for v in entries.values())
  os.makedirs(args.dir, exist_ok=True)
  root = tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir)
  try:
    ckpts, ops = {}, {}
    for variant in VARIANTS:
      ops[variant] = file_ops(variant)
      ckpts[variant] = checkpointing.Checkpointer(
          os.path.join(root, variant), entries, ctx=context_lib.LocalContext(),
          num_experts=num_experts, file_ops=ops[variant])
    times = {v: [] for v in VARIANTS}
    fsyncs = {}
    step = 1
    for variant in VARIANTS:                # untimed: first calls of the raw ops
      ckpts[variant].save(step)
    for r in range(args.repeats):
      step += 1
      for variant in timing.rotation(VARIANTS, r):
        before = ops[variant].fsyncs
        start = time.perf_counter()
        ckpts[variant].save(step)
        times[variant].append(time.perf_counter() - start)
        fsyncs[variant] = ops[variant].fsyncs - before
      log(f"round {r + 1}/{args.repeats}: " + ", ".join(
          f"{v} {times[v][-1] * 1e3:.1f} ms" for v in VARIANTS))
    filesystem = filesystem_of(root)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  machine["loadavg_end"] = list(os.getloadavg())
  return {
      "schema_version": SCHEMA_VERSION, "tool": TOOL, "argv": sys.argv[1:],
      "machine": machine,
      "config": {"gin_files": args.gin_file, "gin_bindings": args.gin_bindings,
                 "batch_source": batch_source, "entries": len(entries),
                 "checkpoint_bytes": size},
      "dir": args.dir, "filesystem": filesystem, "repeats": args.repeats,
      "variants": {v: {"median_s": statistics.median(times[v]), "times_s": times[v],
                       "fsyncs_per_save": fsyncs[v]} for v in VARIANTS},
      "ratio_durable_to_before": timing.paired_ratio(times["durable"], times["before"]),
      "extra_ms_per_save": statistics.median(
          [(d - b) * 1e3 for d, b in zip(times["durable"], times["before"])]),
  }


def table(result: dict) -> str:
  cfg, var = result["config"], result["variants"]
  lines = [f"Checkpoint save of {'+'.join(cfg['gin_files'])}: {cfg['entries']} entries, "
           f"{cfg['checkpoint_bytes'] / 2**20:.1f} MiB; {result['repeats']} rounds on "
           f"{result['filesystem']}",
           "",
           "| variant | fsyncs per save | median save (ms) |",
           "|---|---|---|"]
  for v in VARIANTS:
    lines.append(f"| {v} | {var[v]['fsyncs_per_save']} | {var[v]['median_s'] * 1e3:.1f} |")
  lines += ["", f"durable / before: {result['ratio_durable_to_before']:.2f}× "
                f"(median of per-round ratios), +{result['extra_ms_per_save']:.1f} ms per save"]
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  try:
    result = run(args, log)
  except (ValueError, IOError) as e:
    print(f"bench_checkpoint.py: {e}", file=sys.stderr)
    return 2
  report_lib.emit(result, format=args.format, table=table, out=args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
