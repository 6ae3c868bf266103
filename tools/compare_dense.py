r"""MoE vs dense at the same wall-clock budget, the method of Du et al. 2024 (arXiv 2405.15052).

  python tools/compare_dense.py --dense_gin=gin/demo.gin --moe_gin=gin/demo.gin
  python tools/compare_dense.py --dense_gin=gin/demo.gin \
      --moe_gin=tools/experiments/gin/top1.gin --moe_gin=tools/experiments/gin/top2_cap_k.gin
  python tools/compare_dense.py --dense_gin=gin/revisit_moe.gin,gin/tiny.gin \
      --moe_gin=gin/revisit_moe.gin,gin/tiny.gin --steps_to_time=5 --format=json
  python tools/compare_dense.py --dense_gin=gin/demo.gin --upcycle_moe_gin=gin/demo.gin \
      --upcycle_at=150 --upcycle_budget_steps=300 --upcycle_dir=runs/upcycle_demo

A model is one `--dense_gin` / `--moe_gin` value: a gin file, or several joined by commas
(later ones override earlier ones, e.g. a size file and `gin/tiny.gin`). `--gin_bindings` apply
to every model. The dense model is its config's *dense twin*: `--dense_gin` plus
`M6Transformer.moe_placement = 'none'` (same backbone, a dense FFN of intermediate size I in
every layer), so `--dense_gin` is normally the MoE's own file.

Method:
  1. Build every model from its gin config with the trainer's pieces (`training.build_model`,
     `optimizers.make_optimizer` with the config's `train.*` values, `training.Trainer`), on a
     real training batch of the config's `train.train_data` (a synthetic batch of the same shape
     if the files are missing; the JSON says which).
  2. Step time: `Trainer.train_step` (the trainer's compiled `tf.function`: forward, backward,
     clipping, optimizer update). `--warmup_steps` calls per model are excluded (the first
     traces and compiles). Then `--steps_to_time` rounds; each round runs one step of every
     model, in an order rotated every round, so load from other jobs on a shared machine falls
     on all models alike. The dense step time is the median of its rounds; an MoE's ratio to
     dense is the median over rounds of (MoE step / dense step of the same round), and its
     step time is dense × ratio (so the budget arithmetic below is exactly consistent).
     `median_step_time_s` is each model's own median, for scale only.
  3. Budget (Chinchilla, Hoffmann et al. 2022: ~20 training tokens per parameter):
        budget_tokens = tokens_per_param × N_dense
        dense_steps   = budget_tokens / dense tokens_per_step
        budget_s      = dense_steps × dense step time
        moe_steps     = budget_s / MoE step time;  moe_tokens = moe_steps × MoE tokens_per_step
     N_dense is the dense twin's *total* trainable parameter count by default, embeddings
     included: that is what Chinchilla counted (Kaplan et al. 2020 counted non-embedding
     parameters; Pearce & Song 2024 trace most of the two laws' disagreement to that choice).
     `--param_count=non_embedding` uses the count without the token table, positions, patch
     projection and output bias (`m6t_tf.run.planning`'s "embeddings" component). With a
     21128-entry vocabulary and a small M the two differ by ~7× (the demo), so both are printed.
     A token is one position the model computes on: tokens_per_step = B × (16 patches +
     max_len − 1 caption inputs) × workers, the trainer's own `tokens_per_s` definition
     (padding positions included; scored caption tokens are fewer).

Scope: one process (D = 1), so the measured step contains no all-to-all; under expert
parallelism the MoE's step also pays two all-to-alls per MoE layer (Du et al.'s reason for
timing steps instead of counting FLOPs), which this single-process measurement cannot see.
The reference result: their dense→MoE step-time increase stays under ~20% (85M/32E: +6%,
1.2B/256E: +17.4%); `within_20pct` flags that.

Upcycling run (`--upcycle_moe_gin=<MoE spec> --upcycle_at=N [--upcycle_budget_steps=S]`): the
dense twin trained N steps, upcycled into the MoE and continued, against the dense twin continued
and the MoE trained from scratch, at one wall-clock budget. The MoE is timed with the dense twin
in the rounds of step 2 (it gets its row in the table above) and its paired ratio r sets the
steps. Budget: S dense steps at the measured dense step time (default S = 2N). Rule: *fixed
step counts*, each arm the whole steps that fit (floor), not runs stopped by a clock (on a
shared machine a clock would measure the neighbours' load):
    dense        S dense steps: one `m6t_tf.train` run with horizon S, stopped at N (its
                 step-N checkpoint is the upcycling point) and resumed to S;
    upcycled     the same N dense steps, then `m6t_tf.bench.upcycle.upcycle()` of that
                 checkpoint (experts = copies of the FFN, fresh routers and optimiser state,
                 step 0) and floor((S − N) / r) MoE steps: a new run with its own schedule over
                 those steps (the config's warmup and decay), its data stream from the start;
    moe_scratch  floor(S / r) MoE steps from the MoE's own initialisation.
The conversion, model builds, tracing, checkpoints and evaluations are not charged to any arm
(`upcycle_s` and each arm's `train_wall_s`, everything included, are reported). The arms run in
this process under `--upcycle_dir` (dense/, upcycled/, moe_scratch/; it must be empty), with
`--gin_bindings`, periodic evaluation off (`train.eval_every = 0`) and caption decoding off.
Reported per arm: validation log-perplexity at the end of its budget (the trainer's final
evaluation: `train.eval_data`, `train.eval_batches`), the training loss at an equal step count
(the fewest steps any arm ran: mean of a window ending there; dropout on, and the upcycled arm
re-reads the stream from its start, so only a rough guide), the final training loss, and the
start point: the validation log-perplexity of the dense step-N checkpoint and of the upcycled
checkpoint before its first step (equal when the MoE computes the dense function: top-k with
renormalised gates and no drops; prototype or un-renormalised gates and capacity drops move it).

JSON (--format=json), schema_version 1:
  {"schema_version", "tool", "argv", "machine": {"nproc", "cpu_model", "loadavg_start",
   "loadavg_end", "python", "tensorflow", "keras"},
   "method": {"tokens_per_param", "param_count", "warmup_steps", "steps_to_time", "workers",
              "tokens_definition", "step_time_definition"},
   "dense": {"name", "gin_files", "gin_bindings", "batch_source", "params_total",
             "params_non_embedding", "params_embedding", "params_activated", "budget_params",
             "tokens_per_step", "step_time_s", "median_step_time_s", "times_s",
             "budget_tokens", "steps", "budget_s"},
   "moe": [{"name", "gin_files", "gin_bindings", "batch_source", "params_total",
            "params_non_embedding", "params_embedding", "params_activated", "moe_layers",
            "num_experts", "routing", "k", "capacity_mode", "tokens_per_step",
            "step_time_ratio", "step_time_s", "median_step_time_s", "times_s",
            "step_time_increase_pct", "within_20pct", "steps", "tokens",
            "tokens_vs_dense", "steps_vs_dense"}],
   "upcycle" (with --upcycle_moe_gin only):
     {"moe_gin_files", "moe_name", "upcycle_at", "budget_dense_steps", "budget_s",
      "dense_step_time_s", "moe_step_time_s", "step_time_ratio", "noise_std", "upcycle_s",
      "upcycled_experts", "upcycled_moe_layers", "rule",
      "start": {"dense_val_log_perplexity_at_upcycle", "upcycled_val_log_perplexity_at_0",
                "dense_checkpoint", "dense_loss_at_upcycle", "dense_loss_next_step",
                "upcycled_first_loss"},
      "equal_steps": {"step", "window", "definition"},
      "arms": [{"arm": "dense" | "upcycled" | "moe_scratch", "name", "model_dir",
                "dense_steps", "moe_steps", "steps", "budget_used_s", "budget_fraction",
                "tokens", "train_wall_s", "final_loss", "train_loss_at_equal_steps",
                "val_log_perplexity", "val_perplexity", "losses"}]}}
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys

from m6t_tf import cli

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

# pylint: disable=g-import-not-at-top
import tensorflow as tf

from m6t_tf.bench import dense as dense_lib
from m6t_tf.bench import models
from m6t_tf.bench import report as report_lib
from m6t_tf.bench import timing
# pylint: enable=g-import-not-at-top

SCHEMA_VERSION = 1
TOOL = "tools/compare_dense.py"


def parse_args(argv):
  p = cli.ArgumentParser(description=__doc__.split("\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dense_gin", required=True,
                 help="the dense twin's gin file(s), comma-separated; moe_placement='none' is "
                      "added")
  p.add_argument("--moe_gin", action="append", default=[],
                 help="an MoE model's gin file(s), comma-separated; repeat for several MoEs")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help="bindings applied to every model, e.g. \"train.batch_size_per_worker=8\"")
  p.add_argument("--gin_search_paths", action="append", default=None,
                 help="folders searched for gin includes (default: .)")
  p.add_argument("--steps_to_time", type=int, default=20,
                 help="timed rounds; each times one step of every model (default 20)")
  p.add_argument("--warmup_steps", type=int, default=3,
                 help="untimed steps per model first (tracing, compilation; default 3)")
  p.add_argument("--tokens_per_param", type=float, default=20.0,
                 help="Chinchilla's rule: training tokens per dense parameter (default 20)")
  p.add_argument("--param_count", choices=("total", "non_embedding"), default="total",
                 help="which dense parameter count the budget uses (default total, as "
                      "Chinchilla counted)")
  g = p.add_argument_group("upcycling run (dense N steps → upcycled MoE, against dense "
                           "continued and MoE from scratch, at one wall-clock budget)")
  g.add_argument("--upcycle_moe_gin", default=None,
                 help="the MoE config (gin files, comma-separated) that --dense_gin's dense "
                      "twin is upcycled into and that trains from scratch; same backbone")
  g.add_argument("--upcycle_at", type=int, default=None,
                 help="dense steps N before upcycling (required with --upcycle_moe_gin)")
  g.add_argument("--upcycle_budget_steps", type=int, default=None,
                 help="the wall-clock budget, in dense steps at the measured dense step time "
                      "(default 2 × --upcycle_at)")
  g.add_argument("--upcycle_dir", default=os.path.join("runs", "upcycle_compare"),
                 help="the arms' model_dirs go under it (dense/, upcycled/, moe_scratch/); "
                      "they must not exist yet (default runs/upcycle_compare)")
  g.add_argument("--upcycle_noise_std", type=float, default=0.0,
                 help="tools/upcycle.py's --noise_std for the expert copies (default 0)")
  p.add_argument("--format", choices=("json", "table"), default="table")
  p.add_argument("--out", default=None, help="also write the JSON report to this path")
  args = p.parse_args(argv)
  if args.steps_to_time < 1:
    p.error("--steps_to_time must be >= 1")
  if args.warmup_steps < 1:
    p.error("--warmup_steps must be >= 1 (the first call traces the step)")
  if not args.tokens_per_param > 0:
    p.error("--tokens_per_param must be > 0")
  if not args.moe_gin and not args.upcycle_moe_gin:
    p.error("give an MoE to compare: --moe_gin (one or more) and/or --upcycle_moe_gin")
  if args.upcycle_moe_gin:
    if args.upcycle_at is None:
      p.error("--upcycle_moe_gin needs --upcycle_at=N (dense steps before upcycling)")
    if args.upcycle_at < 1:
      p.error(f"--upcycle_at={args.upcycle_at} must be >= 1")
    if args.upcycle_budget_steps is None:
      args.upcycle_budget_steps = 2 * args.upcycle_at
    if args.upcycle_budget_steps <= args.upcycle_at:
      p.error(f"--upcycle_budget_steps={args.upcycle_budget_steps} must exceed --upcycle_at="
              f"{args.upcycle_at}")
    if not args.upcycle_noise_std >= 0:
      p.error(f"--upcycle_noise_std={args.upcycle_noise_std} must be >= 0")
    if os.path.exists(args.upcycle_dir) and os.listdir(args.upcycle_dir):
      p.error(f"--upcycle_dir={args.upcycle_dir} is not empty: the arms would resume old runs; "
              f"delete it or choose another")
  elif any(v is not None for v in (args.upcycle_at, args.upcycle_budget_steps)):
    p.error("--upcycle_at and --upcycle_budget_steps need --upcycle_moe_gin")
  args.gin_search_paths = args.gin_search_paths or ["."]
  return args


def report(args, dense: models.GinModel, moes: list, machine: dict, argv) -> dict:
  def common(c: models.GinModel) -> dict:
    return {"name": c.name, "gin_files": c.files, "gin_bindings": c.bindings,
            "batch_source": c.batch_source, **c.params, "tokens_per_step": c.tokens_per_step,
            "median_step_time_s": statistics.median(c.times), "times_s": c.times}

  dense_time = statistics.median(dense.times)
  n = dense.params["params_total" if args.param_count == "total" else "params_non_embedding"]
  b = dense_lib.budget(dense_params=n, tokens_per_param=args.tokens_per_param,
                       dense_tokens_per_step=dense.tokens_per_step, dense_step_time_s=dense_time)
  dense_row = {**common(dense), "step_time_s": dense_time, **b}
  rows = []
  for c in moes:
    rows.append({**common(c), **c.moe, **dense_lib.moe_at_budget(
        budget_s=b["budget_s"], dense_steps=b["steps"], dense_tokens=b["budget_tokens"],
        dense_step_time_s=dense_time, ratio=timing.paired_ratio(c.times, dense.times),
        tokens_per_step=c.tokens_per_step)})
  return {
      "schema_version": SCHEMA_VERSION, "tool": TOOL, "argv": list(argv), "machine": machine,
      "method": {
          "tokens_per_param": args.tokens_per_param, "param_count": args.param_count,
          "warmup_steps": args.warmup_steps, "steps_to_time": args.steps_to_time,
          "workers": 1,
          "tokens_definition": "positions computed per step: B × (16 patches + max_len − 1) × "
                               "workers (padding included), as the trainer's tokens_per_s",
          "step_time_definition": "Trainer.train_step, warm-up excluded; dense: median over "
                                  "rounds; MoE: dense × median over rounds of the paired "
                                  "ratio (models interleaved, order rotated each round)"},
      "dense": dense_row, "moe": rows}


def upcycle_table(u: dict) -> list[str]:
  s, e = u["start"], u["equal_steps"]
  lines = [
      "", f"Upcycling at the same wall-clock budget: {u['budget_dense_steps']} dense steps × "
      f"{u['dense_step_time_s'] * 1e3:.1f} ms = {u['budget_s']:.1f} s; the MoE "
      f"({u['moe_name']}) step is {u['step_time_ratio']:.3f}× the dense one "
      f"({u['moe_step_time_s'] * 1e3:.1f} ms). Rule: each arm runs the whole steps that fit "
      f"the budget at the measured step times (not stopped by a clock); the conversion "
      f"({u['upcycle_s']:.1f} s), builds and evaluations are not charged. Upcycled at dense "
      f"step {u['upcycle_at']}: validation log-ppl {s['dense_val_log_perplexity_at_upcycle']:.4f}"
      f" (dense) → {s['upcycled_val_log_perplexity_at_0']:.4f} (upcycled, before its first "
      f"step); its first training loss {s['upcycled_first_loss']:.4f} vs the dense arm's "
      f"{s['dense_loss_next_step']:.4f} at step {u['upcycle_at'] + 1} (another batch).", "",
      f"| arm | dense + MoE steps | budget used | train wall s | train loss @ step "
      f"{e['step']} (mean of {e['window']}) | final train loss | val log-ppl | val ppl |",
      "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for a in u["arms"]:
    lines.append(
        f"| {a['arm']} ({a['name']}) | {a['dense_steps']} + {a['moe_steps']} | "
        f"{a['budget_fraction'] * 100:.1f}% | {a['train_wall_s']:.1f} | "
        f"{a['train_loss_at_equal_steps']:.4f} | {a['final_loss']:.4f} | "
        f"{a['val_log_perplexity']:.4f} | {a['val_perplexity']:.2f} |")
  return lines


def table(r: dict) -> str:
  d, m = r["dense"], r["method"]
  si = report_lib.si
  lines = [
      f"`python {r['tool']} {' '.join(shlex.quote(a) for a in r['argv'])}`", "",
      f"Dense twin {d['name']}: {d['params_total']:,} parameters "
      f"({d['params_non_embedding']:,} non-embedding); the budget uses "
      f"{m['param_count']} = {d['budget_params']:,} × {m['tokens_per_param']:g} tokens/param "
      f"= {si(d['budget_tokens'])} tokens = {d['steps']:,.0f} dense steps of "
      f"{d['tokens_per_step']:,} tokens × {d['step_time_s'] * 1e3:.1f} ms = "
      f"{d['budget_s'] / 3600:,.2f} h on this machine.",
      f"Step times: Trainer.train_step, {m['steps_to_time']} interleaved rounds after "
      f"{m['warmup_steps']} warm-up steps; MoE time = dense median × median paired ratio. "
      f"One process (no all-to-all). Machine: {r['machine']['nproc']} × "
      f"{r['machine']['cpu_model']}, load {r['machine']['loadavg_start'][0]:.2f}.",
      "",
      "| model | params | activated | ms/step | vs dense | steps in budget | tokens in budget "
      "| tokens vs dense |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
      f"| {d['name']} | {si(d['params_total'])} | {si(d['params_activated'])} | "
      f"{d['step_time_s'] * 1e3:.1f} | — | {d['steps']:,.0f} | {si(d['budget_tokens'])} "
      f"| 1.00 |"]
  for row in r["moe"]:
    flag = "" if row["within_20pct"] else " (> 20%)"
    lines.append(
        f"| {row['name']} | {si(row['params_total'])} | {si(row['params_activated'])} | "
        f"{row['step_time_s'] * 1e3:.1f} | {row['step_time_increase_pct']:+.1f}%{flag} | "
        f"{row['steps']:,.0f} | {si(row['tokens'])} | {row['tokens_vs_dense']:.2f} |")
  if "upcycle" in r:
    lines += upcycle_table(r["upcycle"])
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  # Each model has its own Trainer and tf.functions; TF would call that "retracing".
  tf.get_logger().setLevel("ERROR")
  try:
    dense_files = models.split_files(args.dense_gin)
    dense = models.GinModel(models.model_name(dense_files, True), dense_files,
                            list(args.gin_bindings) + [models.DENSE_BINDING], True,
                            args.gin_search_paths)
    moes = []
    for spec in args.moe_gin:
      files = models.split_files(spec)
      moes.append(models.GinModel(models.model_name(files, False), files,
                                  list(args.gin_bindings), False, args.gin_search_paths))
    target = None
    if args.upcycle_moe_gin:
      # The upcycling target is timed with the others (and so gets its own row below).
      files = models.split_files(args.upcycle_moe_gin)
      target = next((c for c in moes if c.files == files), None)
      if target is None:
        target = models.GinModel(models.model_name(files, False), files,
                                 list(args.gin_bindings), False, args.gin_search_paths)
        moes.append(target)
    machine = timing.machine_info()
    for c in [dense] + moes:
      log(f"building {c.name}")
      c.build()
      if not c.dense and not c.moe["moe_layers"]:
        raise ValueError(f"--moe_gin={','.join(c.files)} builds no MoE layer "
                         f"(M6Transformer.moe_placement is 'none'?)")
  except (ValueError, OSError) as e:
    # Building the models from their gin configs: an error here is the configs'.
    raise cli.ConfigError(cli.one_line(e)) from e
  log(f"timing {1 + len(moes)} models: {args.warmup_steps} warm-up + {args.steps_to_time} rounds")
  models.time_interleaved([dense] + moes, args.steps_to_time, args.warmup_steps, log)
  for c in [dense] + moes:
    c.trainer = c.batch = None                     # the arms build their own
  upcycle_result = None
  if target is not None:
    try:
      upcycle_result = dense_lib.run_upcycle(
          dense=dense, target=target, upcycle_at=args.upcycle_at,
          budget_steps=args.upcycle_budget_steps, upcycle_dir=args.upcycle_dir,
          noise_std=args.upcycle_noise_std, gin_bindings=args.gin_bindings,
          search_paths=args.gin_search_paths, log=log)
    except ValueError as e:
      raise cli.ConfigError(cli.one_line(e)) from e
  machine["loadavg_end"] = list(os.getloadavg())
  result = report(args, dense, moes, machine, argv)
  if upcycle_result is not None:
    result["upcycle"] = upcycle_result
  report_lib.emit(result, format=args.format, table=table, out=args.out)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
