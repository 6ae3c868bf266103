"""The paper's experiments at demo scale: runs of the demo model, their curves and tables.

A run is a list of gin files (`gin/demo.gin` variants in `tools/experiments/gin/`, plus
`gin/tiny.gin` with `--tiny`) and the sweep's bindings (steps, schedule, logging). It trains
in this process with the trainer itself (`configurables.run_train`), exactly what
`python -m m6t_tf.train` runs for the same files and bindings (the command is recorded), into

    <model_root>/<gin names joined by +>[+tiny]-steps<N>-seed<S>/

so the scripts (`tools/experiments/*.py`) share runs: the top-1 run of the routing sweep is the
"aux loss off" run of the auxiliary-loss experiment and the baseline of the MoE-attention one.
A directory whose
`experiment.json` records the same files and bindings and whose `train_summary.json` reached
the step count is reused; one with other settings is replaced; an interrupted one resumes from
its last checkpoint (the trainer's own resume).

Curves come from what the trainer writes: `losses.jsonl` (the training loss of every step) and
the TensorBoard events under `model_dir/train` ("eval/log_perplexity", "moe/<layer>/load_cv",
"moe/<layer>/dropped_fraction", ... every `log_every` steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from typing import Optional

import gin
import keras
import tensorflow as tf

from m6t_tf import cli
from m6t_tf.run import configurables
from m6t_tf.run import logs
from m6t_tf.bench import models
from m6t_tf.bench import processes
from m6t_tf.bench import report
from m6t_tf.bench import stats
from m6t_tf.bench import timing
from m6t_tf.layers import moe as moe_lib
from m6t_tf.parallel import context as context_lib

# The checkout this package lives in: the experiments' gin files name data and includes
# relative to it (`tools/experiments/gin/`, `gin/`, `.data/`).
ROOT = processes.PACKAGE_ROOT
GIN_DIR = "tools/experiments/gin"            # relative to ROOT, as the gin files include paths
TINY_GIN = "gin/tiny.gin"
DEFAULT_STEPS = 300
DEFAULT_SEEDS = "0,1,2"
# (gin file of GIN_DIR, routing label, capacity label): the paper's Table 3 rows, as the routing
# sweep and the FLOP table run them.
ROUTING_VARIANTS = (
    ("top1", "top-1", "k× = 1×"),
    ("top2_cap_k", "top-2", "k×"), ("top2_cap_1", "top-2", "1×"),
    ("top4_cap_k", "top-4", "k×"), ("top4_cap_1", "top-4", "1×"),
    ("2top1_cap_k", "2 top-1", "k×"), ("2top1_cap_1", "2 top-1", "1×"),
    ("4top1_cap_k", "4 top-1", "k×"), ("4top1_cap_1", "4 top-1", "1×"))


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run: `gins` are names of files in tools/experiments/gin/ (without .gin)."""
  label: str
  gins: tuple
  seed: int = 0


def add_common_flags(p: argparse.ArgumentParser, default_name: str) -> None:
  p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                 help=f"training steps of every run (default {DEFAULT_STEPS}; cosine schedule "
                      f"over them, 10%% warm-up)")
  p.add_argument("--model_root", default="runs/experiments",
                 help="run directories go here (default runs/experiments); shared by the "
                      "three scripts so common runs are trained once")
  p.add_argument("--out_dir", default="docs/results",
                 help=f"where {default_name}.png / .md / .json are written (default docs/results)")
  p.add_argument("--eval_points", type=int, default=4,
                 help="validation evaluations per run, the last at the end (default 4)")
  p.add_argument("--log_every", type=int, default=10,
                 help="steps between logged routing statistics (default 10)")
  p.add_argument("--tiny", action="store_true",
                 help="overlay gin/tiny.gin (seconds per run; the tests' smoke runs)")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help="extra bindings for every run (they change the run directories' match)")
  p.add_argument("--seeds", default=DEFAULT_SEEDS,
                 help=f"comma-separated seeds of every arm (default {DEFAULT_SEEDS}: tables give "
                      f"mean ± sd and 95%% intervals over them)")
  p.add_argument("--jobs", type=int, default=2,
                 help="runs trained at once, each in its own process (default 2: on 2 cores two "
                      "runs side by side finish ~1.5× sooner than one after the other)")


def check_common_flags(p: argparse.ArgumentParser, args) -> None:
  if args.steps < 2:
    p.error("--steps must be >= 2 (the cosine schedule needs steps > warm-up steps)")
  if args.eval_points < 1 or args.log_every < 1:
    p.error("--eval_points and --log_every must be >= 1")
  if args.jobs < 1:
    p.error(f"--jobs={args.jobs}: must be >= 1")
  try:
    args.seeds = [int(x) for x in str(args.seeds).split(",") if x.strip()]
  except ValueError:
    p.error(f"--seeds={args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
  if not args.seeds or len(set(args.seeds)) != len(args.seeds):
    p.error(f"--seeds={args.seeds}: give one or more distinct seeds")


def rel(path: str) -> str:
  """`path` relative to the repository when inside it (commands and tables name no host path)."""
  path = os.path.abspath(path)
  return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) or path == ROOT else path


class Sweep:
  """Trains (or reuses) runs with the shared settings of one experiment invocation."""

  def __init__(self, args, log=None):
    self.args = args
    self.model_root = os.path.abspath(args.model_root)
    self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

  def files(self, spec: RunSpec) -> list[str]:
    """The routing file, then (with --tiny) gin/tiny.gin, then the overlays: tiny shrinks the
    demo model but an overlay such as experts16.gin still changes what it names."""
    files = [f"{GIN_DIR}/{g}.gin" for g in spec.gins]
    return files[:1] + ([TINY_GIN] if self.args.tiny else []) + files[1:]

  def bindings(self, spec: RunSpec) -> list[str]:
    steps = self.args.steps
    every = steps // self.args.eval_points if self.args.eval_points > 1 else 0
    return [f"train.num_steps = {steps}",
            f"train.warmup_steps = {max(1, steps // 10)}",   # demo.gin: 100 of 1000
            f"train.eval_every = {every if 0 < every < steps else 0}",
            f"train.log_every = {self.args.log_every}",
            f"train.checkpoint_every = {steps}",
            "train.keep_checkpoints = 1",
            f"train.seed = {spec.seed}", *self.args.gin_bindings]

  def run_dir(self, spec: RunSpec) -> str:
    name = "+".join(spec.gins) + ("+tiny" if self.args.tiny else "")
    return os.path.join(self.model_root, f"{name}-steps{self.args.steps}-seed{spec.seed}")

  def command(self, spec: RunSpec, multiline: bool = False) -> str:
    parts = ["python -m m6t_tf.train"]
    parts += [shlex.quote(f"--gin_file={f}") for f in self.files(spec)]
    parts += [shlex.quote(f"--gin_bindings={b}") for b in self.bindings(spec)]
    parts.append(shlex.quote(f"--model_dir={rel(self.run_dir(spec))}"))
    if not multiline:
      return " ".join(parts)
    # Files and model_dir on the first lines, the bindings two to a line.
    head = [" ".join(parts[:1 + len(self.files(spec))])]
    binds = parts[1 + len(self.files(spec)):-1]
    head += ["    " + " ".join(binds[i:i + 2]) for i in range(0, len(binds), 2)]
    head.append("    " + parts[-1])
    return " \\\n".join(head)

  def manifest(self, spec: RunSpec) -> dict:
    return {"gin_files": self.files(spec), "gin_bindings": self.bindings(spec)}

  def done(self, spec: RunSpec) -> bool:
    """True if the run exists, finished, with the same files and bindings."""
    run_dir = self.run_dir(spec)
    try:
      with open(os.path.join(run_dir, "experiment.json")) as f:
        old = json.load(f)
    except (OSError, ValueError):
      return False
    manifest = self.manifest(spec)
    return ({k: old.get(k) for k in manifest} == manifest and old.get("status") == "done"
            and _finished(run_dir, self.args.steps))

  def ensure_all(self, specs: list) -> dict:
    """`ensure` of every spec, the missing runs trained `args.jobs` at a time in processes of
    their own (each one `python -m m6t_tf.bench.experiments --train_one=...`, which calls
    `ensure` there); returns {spec: load_run}. A failed run raises after the others finished,
    naming its log."""
    unique = {}
    for spec in specs:
      unique.setdefault(self.run_dir(spec), spec)
    todo = [s for s in unique.values() if not self.done(s)]
    jobs = getattr(self.args, "jobs", 1)
    if jobs > 1 and len(todo) > 1:
      self._train_in_processes(todo, jobs)
    return {spec: self.ensure(spec) for spec in specs}

  def _train_in_processes(self, todo: list, jobs: int) -> None:
    os.makedirs(self.model_root, exist_ok=True)
    tasks = []
    for spec in todo:
      payload = {"args": {k: getattr(self.args, k) for k in _WORKER_ARGS},
                 "label": spec.label, "gins": list(spec.gins), "seed": spec.seed}
      tasks.append((f"training {spec.label} (seed {spec.seed})",
                    [sys.executable, "-m", "m6t_tf.bench.experiments",
                     "--train_one=" + json.dumps(payload)], self.run_dir(spec) + ".log"))
    processes.run_processes(tasks, jobs, self.log, cwd=ROOT, rel=rel)

  def ensure(self, spec: RunSpec) -> dict:
    """Trains the run unless a finished one with the same settings exists; returns `load_run`."""
    run_dir = self.run_dir(spec)
    manifest = self.manifest(spec)
    path = os.path.join(run_dir, "experiment.json")
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      same = {k: old.get(k) for k in manifest} == manifest
      if same and old.get("status") == "done" and _finished(run_dir, self.args.steps):
        self.log(f"reusing {rel(run_dir)}")
        return load_run(run_dir)
      if not same:
        self.log(f"replacing {rel(run_dir)} (other settings)")
        shutil.rmtree(run_dir)
    elif os.path.isdir(run_dir) and os.listdir(run_dir):
      raise ValueError(f"{run_dir} exists but was not made by tools/experiments (no "
                       f"experiment.json); choose another --model_root")
    os.makedirs(run_dir, exist_ok=True)
    _write_json(path, {**manifest, "status": "running", "command": self.command(spec)})
    self.log(f"training {spec.label}: {self.command(spec)}")
    cwd = os.getcwd()
    os.chdir(ROOT)   # the gin files name data and includes relative to the repository
    try:
      gin.clear_config()
      keras.backend.clear_session()
      keras.mixed_precision.set_global_policy("float32")
      configurables.parse(manifest["gin_files"], manifest["gin_bindings"], [ROOT])
      derived = derived_config()
      start = time.time()
      configurables.run_train(model_dir=run_dir, ctx=context_lib.LocalContext())
      wall = time.time() - start
    finally:
      gin.clear_config()
      os.chdir(cwd)
    _write_json(path, {**manifest, "status": "done", "command": self.command(spec),
                       "derived": derived, "wall_s": wall, "loadavg_end": list(os.getloadavg())})
    return load_run(run_dir)


def caption_metrics(runs: dict, jobs: int, log) -> dict:
  """{spec: {"BLEU-4", "CIDEr-D", ...}} of each run's final model: greedy captions of the
  validation split (`python -m m6t_tf.generate --split=validation`, which writes
  model_dir/caption_metrics.json); reused when that file is newer than the run's end."""
  tasks, paths = [], {}
  for spec, run in runs.items():
    path = os.path.join(run["dir"], "caption_metrics.json")
    if path in paths.values():     # a run shared by two arms is captioned once
      paths[spec] = path
      continue
    paths[spec] = path
    summary = os.path.join(run["dir"], "train_summary.json")
    if os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(summary):
      continue
    tasks.append((f"captioning {rel(run['dir'])}",
                  [sys.executable, "-m", "m6t_tf.generate", f"--model_dir={run['dir']}",
                   "--split=validation"], run["dir"] + ".captions.log"))
  processes.run_processes(tasks, jobs, log, cwd=ROOT, rel=rel)
  out = {}
  for spec, path in paths.items():
    with open(path) as f:
      out[spec] = json.load(f)["model"]
  return out


# What a worker process needs of the parent's flags to make the same run directory and bindings.
_WORKER_ARGS = ("steps", "model_root", "eval_points", "log_every", "tiny", "gin_bindings")


def _train_one(payload: str) -> int:
  """A worker of `Sweep.ensure_all`: trains (or reuses) one run."""
  d = json.loads(payload)
  quiet_retracing()
  sweep = Sweep(argparse.Namespace(**d["args"], jobs=1))
  sweep.ensure(RunSpec(d["label"], tuple(d["gins"]), d["seed"]))
  return 0


def derived_config() -> dict:
  """Routing values of the parsed gin config, and the training capacity C they give (None for
  dropless routing, which has no capacity)."""
  q = configurables.query
  batch, max_len = q("train.batch_size_per_worker", 8), q("train.max_len", 64)
  tokens = batch * (16 + max_len - 1)
  out = {"tokens_per_step": tokens, "num_experts": q("MoEConfig.num_experts"),
         "routing": q("MoEConfig.routing"), "k": q("MoEConfig.k"),
         "capacity_mode": q("MoEConfig.capacity_mode"),
         "capacity_factor": q("MoEConfig.capacity_factor"),
         "capacity_token_fraction": q("MoEConfig.capacity_token_fraction", None),
         "second_expert_policy": q("MoEConfig.second_expert_policy", "all"),
         "drop_policy": q("MoEConfig.drop_policy", "position"),
         "aux_loss_weight": q("MoEConfig.aux_loss_weight"),
         "moe_attention": q("M6Transformer.moe_attention", False)}
  layer = moe_lib.MoE(out["num_experts"], 8, routing=out["routing"], k=out["k"],
                      capacity_factor=out["capacity_factor"], capacity_mode=out["capacity_mode"],
                      capacity_token_fraction=out["capacity_token_fraction"])
  out["capacity"] = (None if out["capacity_mode"] == "dropless"
                     else layer.capacity_for(tokens, training=True))
  return out


def _write_json(path: str, payload) -> None:
  report.write_json(path, payload, indent=1, sort_keys=True)


def _finished(run_dir: str, steps: int) -> bool:
  try:
    with open(os.path.join(run_dir, "train_summary.json")) as f:
      return json.load(f).get("step") == steps
  except (OSError, ValueError):
    return False


# --------------------------------------------------------------------------------------------
# Reading a run


def read_scalars(run_dir: str) -> dict:
  """{tag: {step: value}} from the TensorBoard events of `run_dir/train`; a step logged twice
  (an interrupted run resumed) keeps the later value."""
  rows = []
  for path in glob.glob(os.path.join(run_dir, "train", "events.out.tfevents.*")):
    for event in _events(path):
      for v in event.summary.value:
        kind = v.WhichOneof("value")
        if kind == "tensor":
          if v.tensor.dtype == tf.string.as_datatype_enum:
            continue   # text summaries (eval/captions)
          value = float(tf.make_ndarray(v.tensor))
        elif kind == "simple_value":
          value = float(v.simple_value)
        else:
          continue
        rows.append((event.wall_time, v.tag, int(event.step), value))
  out: dict = {}
  for _, tag, step, value in sorted(rows):
    out.setdefault(tag, {})[step] = value
  return out


def _events(path: str):
  """The `Event` protos of one events file; a torn last record (a killed run) ends the file."""
  try:
    for record in tf.data.TFRecordDataset(path):
      yield tf.compat.v1.Event.FromString(record.numpy())
  except tf.errors.DataLossError:
    return


def load_run(run_dir: str) -> dict:
  with open(os.path.join(run_dir, "train_summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(run_dir, "experiment.json")) as f:
    experiment = json.load(f)
  return {"dir": run_dir, "summary": summary, "experiment": experiment,
          "losses": logs.read_loss_log(os.path.join(run_dir, "losses.jsonl")),
          "scalars": read_scalars(run_dir)}


def moe_layer_names(run: dict) -> list[str]:
  """Layer paths with routing statistics, in network order ("m6/block_0/moe", ...)."""
  names = {m.group(1) for tag in run["scalars"]
           for m in [re.fullmatch(r"moe/(.+)/load_cv", tag)] if m}
  return sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def short_layer(name: str) -> str:
  """"m6/block_0/moe" -> "layer 0"; "m6/block_1/attention/query" -> "layer 1 query"."""
  m = re.fullmatch(r"(?:m6/)?block_(\d+)/(.+)", name)
  if not m:
    return name
  rest = m.group(2)
  return f"layer {m.group(1)}" + ("" if rest == "moe" else f" {rest.split('/')[-1]}")


def series(run: dict, tag: str) -> tuple[list, list]:
  d = run["scalars"].get(tag, {})
  steps = sorted(d)
  return steps, [d[s] for s in steps]


def late_mean(run: dict, tag: str, fraction: float = 0.5) -> Optional[float]:
  """Mean of a logged scalar over the last `fraction` of training (None if never logged)."""
  steps, values = series(run, tag)
  if not steps:
    return None
  cut = steps[-1] * (1 - fraction)
  late = [v for s, v in zip(steps, values) if s >= cut] or values[-1:]
  return sum(late) / len(late)


def final_eval(run: dict) -> dict:
  e = run["summary"].get("eval") or {}
  return {"perplexity": e.get("perplexity", math.nan),
          "log_perplexity": e.get("log_perplexity", math.nan)}


def final_train_loss(run: dict, fraction: float = 0.1) -> float:
  """Mean training loss over the last `fraction` of the steps (one step's loss is noisy)."""
  steps = sorted(run["losses"])
  if not steps:
    return math.nan
  tail = steps[-max(1, int(len(steps) * fraction)):]
  return sum(run["losses"][s] for s in tail) / len(tail)


def loss_curve(run: dict, window: Optional[int] = None) -> tuple[list, list]:
  steps = sorted(run["losses"])
  values = [run["losses"][s] for s in steps]
  window = window or max(1, len(steps) // 20)
  return steps, stats.smooth(values, window)


def eval_curve(run: dict) -> tuple[list, list]:
  return series(run, "eval/log_perplexity")


def by_seed(runs: dict, specs: list, value) -> dict:
  """{seed: value(run)} over `specs` (one arm's runs, one per seed)."""
  return {spec.seed: value(runs[spec]) for spec in specs}


def final_log_ppl(run: dict) -> float:
  return final_eval(run)["log_perplexity"]


def layer_mean(run: dict, stat: str, where=lambda layer: True) -> Optional[float]:
  """Mean over the MoE layers (those `where` accepts) of `late_mean(moe/<layer>/<stat>)`."""
  vals = [late_mean(run, f"moe/{l}/{stat}") for l in moe_layer_names(run) if where(l)]
  return sum(vals) / len(vals) if vals and None not in vals else None


def group_arms(specs: list) -> dict:
  """{gins: [specs, by seed]} in first-seen order: the seeds of each arm."""
  out: dict = {}
  for spec in specs:   # a baseline shared by two comparisons is listed twice: keep one per seed
    group = out.setdefault(spec.gins, [])
    if all(s.seed != spec.seed for s in group):
      group.append(spec)
  return out


def header_block(title: str, args, sweep: Sweep, specs: list[RunSpec], machine: dict,
                 argv: list[str], script: str) -> str:
  """Title, machine, the exact command of the script and of every training run."""
  cmd = " ".join(shlex.quote(a) for a in ["python", script, *argv])
  lines = [f"# {title}", "",
           f"Machine: {machine['nproc']} cores ({machine['cpu_model']}), shared with other jobs "
           f"(load average {machine['loadavg_start'][0]:.2f} at the start, "
           f"{machine.get('loadavg_end', [math.nan])[0]:.2f} at the end); "
           f"TensorFlow {machine['tensorflow']}, Keras {machine['keras']}, Python "
           f"{machine['python']}.", "",
           f"Produced by (from the repository root, `.venv/bin/python` with "
           f"`TF_CPP_MIN_LOG_LEVEL=2`):", "", "```bash", cmd, "```", "",
           "which trains (or reuses, if already trained with the same settings) these runs; "
           "each equals:", "", "```bash"]
  seen = set()
  for spec in specs:
    c = sweep.command(spec, multiline=True)
    if c not in seen:
      seen.add(c)
      lines.append(c)
  lines += ["```", "", ""]
  return "\n".join(lines)


def write_outputs(out_dir: str, name: str, markdown: str, payload: dict, fig) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  paths = {"png": os.path.join(out_dir, f"{name}.png"),
           "md": os.path.join(out_dir, f"{name}.md"),
           "json": os.path.join(out_dir, f"{name}.json")}
  fig.savefig(paths["png"], bbox_inches="tight")
  with open(paths["md"], "w") as f:
    f.write(markdown.rstrip() + "\n")
  _write_json(paths["json"], payload)
  return paths


def finish(args, name: str, markdown: str, table: str, payload: dict, fig) -> dict:
  """Writes the experiment's PNG, markdown and JSON, prints its table and what it wrote."""
  paths = write_outputs(args.out_dir, name, markdown, payload, fig)
  print(table)
  print("wrote " + ", ".join(rel(p) for p in paths.values()))
  return paths


def run_record(run: dict) -> dict:
  """What the JSON outputs keep of a run (curves included, so plots can be redrawn)."""
  steps, values = series(run, "eval/log_perplexity")
  return {"dir": rel(run["dir"]), "command": run["experiment"].get("command"),
          "wall_s": run["experiment"].get("wall_s"), "eval": run["summary"].get("eval"),
          "final_train_loss": final_train_loss(run),
          # Curves rounded to 4 decimals: enough to redraw the plots, a third of the size.
          "train_loss": {str(s): round(v, 4) for s, v in sorted(run["losses"].items())},
          "eval_log_perplexity": dict(zip(map(str, steps), values)),
          "grad_norm": {str(s): round(v, 4) for s, v in sorted(
              run["scalars"].get("grad_norm", {}).items())},
          "moe": {layer: {stat: {str(s): round(v, 4) for s, v in sorted(run["scalars"].get(
              f"moe/{layer}/{stat}", {}).items())} for stat in ("load_cv", "dropped_fraction")}
                  for layer in moe_layer_names(run)}}


def time_step_ratios(sweep: Sweep, specs: list[RunSpec], baseline: RunSpec, *, rounds: int,
                     warmup: int = 2, dense_twin: bool = False) -> dict:
  """Step time of each run's model relative to `baseline`'s, measured in this process.

  The method of `tools/compare_dense.py`: every model is built from its gin files, then
  `rounds` rounds each time one `Trainer.train_step` of every model in a rotated order (after
  `warmup` untimed steps of each); a model's ratio is the
  median over rounds of its time / the baseline's time in the same round. With `dense_twin`,
  the baseline's dense twin (`moe_placement = 'none'`) is timed too, under the key "dense".

  Returns:
    {label: {"ratio": float, "median_s": float, "times_s": [...]}}.
  """
  todo = [baseline] + [s for s in specs if s != baseline]
  cands = [models.GinModel(s.label, sweep.files(s), list(sweep.args.gin_bindings), False,
                           [ROOT]) for s in todo]
  if dense_twin:
    cands.append(models.GinModel(
        "dense", sweep.files(baseline),
        list(sweep.args.gin_bindings) + [models.DENSE_BINDING], True, [ROOT]))
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    for c in cands:
      sweep.log(f"building {c.name} for timing")
      c.build()
    models.time_interleaved(cands, rounds, warmup, sweep.log)
  finally:
    os.chdir(cwd)
  base = cands[0].times
  out = {c.name: {"ratio": timing.paired_ratio(c.times, base),
                  "median_s": statistics.median(c.times), "times_s": c.times}
         for c in cands}
  del cands
  gc.collect()
  return out


def cli_parser(doc: str, name: str) -> argparse.ArgumentParser:
  """A parser with the flags every experiment shares (`add_common_flags`)."""
  p = cli.ArgumentParser(description=doc.split("\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
  add_common_flags(p, name)
  return p


def time_arms(sweep: Sweep, arms: dict, rounds: int, base_gins: Optional[tuple] = None,
              dense_twin: bool = False) -> dict:
  """`time_step_ratios` of one model per arm (`group_arms`' first spec) against the arm
  `base_gins` (default: the first arm); {} when `rounds` is 0."""
  if not rounds:
    return {}
  firsts = [group[0] for group in arms.values()]
  base = arms[base_gins][0] if base_gins else firsts[0]
  return time_step_ratios(sweep, firsts, base, rounds=rounds, dense_twin=dense_twin)


def make_parser(doc: str, name: str) -> argparse.ArgumentParser:
  p = cli_parser(doc, name)
  p.add_argument("--time_rounds", type=int, default=10,
                 help="interleaved step-time rounds of the models (0 = skip; default 10)")
  return p


def start(p: argparse.ArgumentParser, argv) -> tuple:
  """Parses flags, makes the output paths absolute and returns (args, sweep, machine).

  Raises:
    ConfigError: a flag is wrong, or this package is not inside a checkout (the experiments'
      gin files and data are the checkout's).
  """
  if not os.path.isdir(os.path.join(ROOT, GIN_DIR)):
    raise cli.ConfigError(f"the experiments need the checkout holding this package, but {ROOT} "
                          f"has no {GIN_DIR}: install it from the checkout with "
                          f"`pip install -e .`")
  args = p.parse_args(argv)
  check_common_flags(p, args)
  if args.time_rounds < 0:
    p.error("--time_rounds must be >= 0")
  args.model_root = os.path.abspath(args.model_root)
  args.out_dir = os.path.abspath(args.out_dir)
  quiet_retracing()
  return args, Sweep(args), timing.machine_info()


def quiet_retracing() -> None:
  """Every run and timed model has its own `Trainer` (own tf.functions), which TF reports as
  "retracing"; that warning is expected here, not a problem to chase."""
  tf.get_logger().setLevel("ERROR")


if __name__ == "__main__":
  if len(sys.argv) == 2 and sys.argv[1].startswith("--train_one="):
    sys.exit(_train_one(sys.argv[1][len("--train_one="):]))
  sys.exit("m6t_tf.bench.experiments is a library; its only command line is the "
           "--train_one=<json> of Sweep.ensure_all's worker processes")
