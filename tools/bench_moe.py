r"""Forward+backward benchmark of one M6-T MoE FFN layer, against its floor, a dense FFN and peers.

  python tools/bench_moe.py                        # full run (~25 min on 2 cores), table
  python tools/bench_moe.py --format=json --out=runs/bench_moe.json
  python tools/bench_moe.py --smoke --format=json  # tiny shapes, a few seconds (tests)
  python tools/bench_moe.py --tokens=2048,8192 --repeats=7 --sections=routing,peers
  python tools/bench_moe.py --profile              # which ops the MoE adds to its expert matmuls

What is timed: one `tf.function` step = forward + backward (gradients w.r.t. the input and every
trainable weight) of one layer, training=True, float32, dropout 0; tracing and one warm-up call
excluded. Machines here are shared, so no absolute time is a claim: every shape's candidates are
built in one process and timed *interleaved* (round r times every candidate once, in an order
rotated each round), and each ratio is the median over rounds of (candidate / baseline) measured
in the same round. `median_s` is reported to show scale only.

Shapes (dimension letters of SPEC §1):
  * "worker": one worker of the paper's base model (E = 32 experts over D = 8 workers, so e = 4
    local experts; M = 1024, I = 4096, γ = 1.25) with T = 4096 tokens (B = 32 × L = 128, 4× the
    paper's 8 sequences per GPU so that top-1 takes about a second here). The all-to-all is a
    loopback (identity): the worker computes exactly its real [D, e, C, M] share; the network
    is not measured.
  * "T=<n>" for each --tokens value: the issue's target shapes, one process holding all experts
    (D = 1): E = 8, M = 512, I = 2048, γ = 1.25.
  * scaling: T = 1k…16k at the issue's E, M, I, top-1, both dispatches, with peak memory.

Groups (the `name` of a result) and their baselines (`ratio_to_baseline` = median over rounds of
median_s / baseline's, so < 1 is faster; for peers it is peer time / ours = our tokens/s ÷ theirs):
  routing   top1, top2, top4, 2xtop1, 4xtop1 (expert prototyping) × capacity k× and 1×, index
            dispatch, baseline top1 (capacity k× = 1× for top-1; both are measured, an A/A check)
  dispatch  einsum vs index for top1 and top2 (capacity k×); baseline the same routing, index
  floor     the whole MoE layer (index, einsum) vs the bare `Experts` layer on [e, D·C, M] inputs
            of the same size; baseline the floor
  dense     MoE top-k (capacity k×) vs a dense FFN of intermediate k·I (same activated FLOPs; the
            MoE also computes the γ = 1.25 capacity padding): one `Experts` expert on all T
            tokens (see `_dense`); baseline the dense FFN
  peer      Model Garden `MoeLayer` (experts-choose routing, capacity factor k·γ, so the same
            E·C slots) vs ours (GeLU); Keras-Hub `MixtralSparseMoeBlock` (SwiGLU, top-k, computes
            all E experts on every token) vs ours with SwiGLU; baseline ours at the same k
  scaling   time and peak memory vs T; baseline the smallest T of the same dispatch

JSON (--format=json), schema_version 1:
  {"schema_version": 1, "tool": "tools/bench_moe.py", "argv": [...], "smoke": bool,
   "repeats": int, "isolated": bool (one process per shape and for the scaling),
   "machine": {"nproc", "cpu_model", "loadavg_start", "loadavg_end", "tensorflow", "keras", ...},
   "shape": {"worker": {"E", "D", "e", "M", "I", "T", "B", "L", "gamma"}, "T=2048": {...}, ...},
   "peers": {"model_garden": {"available": bool, "version", "how", "reason"}, "keras_hub": {...}},
   "results": [{"name", "variant", "shape", "tokens", "median_s", "ratio_to_baseline",
                "baseline", "is_baseline", "tokens_per_s", "repeats", "times_s", and for scaling
                "peak_bytes", "largest_intermediate_bytes", "largest_intermediate"}],
   "skipped": [{"name", "variant", "shape", "reason"}],
   "scaling_fit": {"index": {"slope", "slope_last_doubling", "slope_abs_medians", "tokens"},
                   "einsum": {...}},
   "targets": [{"name", "threshold", "comparison" ("<=" or ">="), "measured" (float or null),
                "evaluated": bool, "holds": bool, "note"}]}
A target that could not be measured (e.g. a peer is not installed) has evaluated=false and
holds=false. The exit status is 0 whether or not targets hold (they are benchmarks, not tests).

Suite dropless (--suite=dropless; sections balanced, skewed, groups, alltoall; ~5 min):
  python tools/bench_moe.py --suite=dropless --out=runs/bench_dropless.json
  python tools/bench_moe.py --suite=dropless --profile   # dropless vs bare vs capacity, by op
Top-1 at the issue's shapes (E = 8, M = 512, I = 2048, one process, T = each --tokens). The
router's logits get a fixed margin (`pin_router`) so that routing is deterministic:
  balanced  token t to expert t mod E. dropless vs capacity 1.25 (target <= 0.90: it computes
            T rows instead of γ·T slots), vs the bare `Experts` on [E, T/E, M] (<= 1.10), and
            the bare expert matmuls on per-expert row blocks (`_bare_rows`)
  skewed    60% of the tokens to expert 0, the rest evenly over the others: dropless vs the
            bare matmuls on the same per-expert rows (<= 1.15); capacity 1.25's dropped fraction
  groups    capacity 1.25 with O = 1, 2, 4, 8 outer groups, the model's own router (natural)
            and skewed: time ratio to O = 1, dropped fraction
  what-if   rows "experts' weights unstacked once": the dropless layer with `Experts`'
            grouped call reading its weights once (`unstacked_rows`). The layer now does this
            itself, so these rows are the same computation: a control of run-to-run noise;
            formerly a benchmark-only variant
  alltoall  `horovodrun -np 2 --gloo` (mesh data 1 × expert 2, T per rank = first --tokens,
            one intra-op thread per rank): layer steps of capacity 1.25 (fixed all-to-all),
            dropless with variable splits, and dropless padded to the expert group's maximum
            count with the fixed all-to-all (`padded_dropless_class`), balanced and skewed;
            each one's all-to-alls alone (`exchanges`), so share = exchanges / layer step
JSON as above plus "suite": "dropless" and
  "alltoall": {routing: {"step_padded_over_variable", "step_capacity_over_variable",
               "alone_padded_over_variable", "share_capacity", "share_variable",
               "share_padded", "padded_max_rel_difference",
               "bytes": {variant: {"bytes", "remote_bytes", ..., "per_rank": [...]}}}};
result rows carry "dropped_fraction", "load_cv", "rows_computed" (slots or real rows).
Bytes are those handed to the all-to-all per step, forward and backward, float32.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time

from m6t_tf import cli
from m6t_tf.machine import machine_info

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SCHEMA_VERSION = 1
ROUTINGS = (  # (variant name, MoE routing, k); the paper's Tables 1–2 rows
    ("top1", "top_k", 1), ("top2", "top_k", 2), ("top4", "top_k", 4),
    ("2xtop1", "prototype", 2), ("4xtop1", "prototype", 4))
CAPACITY_MODES = ("k", "1")
SECTIONS = ("routing", "dispatch", "floor", "dense", "peers", "scaling")
SUITES = ("layer", "dropless")
DROPLESS_SECTIONS = ("balanced", "skewed", "groups", "alltoall")
GROUPS = (1, 2, 4, 8)          # O, outer-batch groups
SKEW = 0.6                     # share of the tokens the skewed router sends to expert 0
# Targets of the dropless suite (time ratios, <=).
DROPLESS_TARGETS = {"vs_capacity": 0.90, "vs_bare": 1.10, "skewed_vs_bare": 1.15}
GAMMA = 1.25
# Model Garden's tokens/s targets by T (the issue's); other T get no target.
MG_TARGETS = {2048: 1.5, 8192: 3.5}
KH_TARGET = 5.0
# einsum dispatch is skipped when one [T, E, C] float32 tensor would exceed this (it makes several).
EINSUM_TEC_LIMIT_BYTES = 2 << 30


def _parse_ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv):
  p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--format", choices=("table", "json"), default="table")
  p.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds (tests)")
  p.add_argument("--tokens", type=_parse_ints, default=None,
                 help="T of the issue's target shapes, comma-separated (default 2048,8192)")
  p.add_argument("--scaling_tokens", type=_parse_ints, default=None,
                 help="T of the scaling section (default 1024,2048,4096,8192,16384)")
  p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; smoke 3)")
  p.add_argument("--suite", choices=SUITES, default="layer",
                 help="layer: the sections above (default); dropless: dropless experts, "
                      "outer groups and the 2-rank all-to-all (see 'Suite dropless' above)")
  p.add_argument("--sections", default=None,
                 help=f"comma-separated subset of the suite's sections (layer: "
                      f"{','.join(SECTIONS)}; dropless: {','.join(DROPLESS_SECTIONS)})")
  p.add_argument("--no_worker", action="store_true", help="skip the per-worker shape")
  p.add_argument("--no_peers", action="store_true", help="do not import the peers")
  p.add_argument("--profile", action="store_true",
                 help="instead of timing: per-op profile of MoE (top-1; index and einsum) vs its "
                      "floor at the worker shape, or with --no_worker the first --tokens shape "
                      "(inter-op parallelism 1, so op times add up)")
  p.add_argument("--out", default=None,
                 help="also write the JSON report to this file (rewritten after every task)")
  p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                 help="run each shape and the scaling in its own process (auto: yes unless "
                      "--smoke); TF's CPU allocator keeps the memory a large einsum grew")
  p.add_argument("--task", default=None, help=argparse.SUPPRESS)  # internal: one child task
  p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # internal: 2-rank output
  args = p.parse_args(argv)
  allowed = SECTIONS if args.suite == "layer" else DROPLESS_SECTIONS
  if args.sections is None:
    args.sections = ",".join(allowed)
  unknown = set(args.sections.split(",")) - set(allowed)
  if unknown:
    p.error(f"unknown --sections {sorted(unknown)} for --suite={args.suite}; allowed: {allowed}")
  args.sections = tuple(s for s in allowed if s in args.sections.split(","))
  if args.repeats is None:
    args.repeats = 3 if args.smoke else 7
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  if args.tokens is None:
    args.tokens = [64] if args.smoke else [2048, 8192]
  if args.scaling_tokens is None:
    args.scaling_tokens = [32, 64, 128] if args.smoke else [1024, 2048, 4096, 8192, 16384]
  return args


# --------------------------------------------------------------------------------------------
# Machine and peers




def _version(dist: str):
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def import_peers(enabled: bool) -> tuple[dict, dict]:
  """Returns ({peer: status}, {peer: module}); a peer that does not import is reported, not fatal."""
  status, modules = {}, {}
  if not enabled:
    for name in ("model_garden", "keras_hub"):
      status[name] = {"available": False, "version": None, "how": None,
                      "reason": "--no_peers"}
    return status, modules
  # Keras-Hub: the Mixtral sparse MoE block (a Keras 3 layer).
  try:
    mod = importlib.import_module("keras_hub.src.models.mixtral.mixtral_decoder")
    getattr(mod, "MixtralSparseMoeBlock")
    modules["keras_hub"] = mod
    status["keras_hub"] = {"available": True, "version": _version("keras-hub"),
                           "how": "keras_hub.src.models.mixtral.mixtral_decoder"
                                  ".MixtralSparseMoeBlock", "reason": None}
  except Exception as e:  # ImportError, or any error their package __init__ raises
    status["keras_hub"] = {"available": False, "version": _version("keras-hub"), "how": None,
                           "reason": f"{type(e).__name__}: {e} (make bench-setup installs it)"}
  # Model Garden: official/nlp/modeling/layers/moe.py (a tf-keras layer).
  try:
    try:
      mod = importlib.import_module("official.nlp.modeling.layers.moe")
      how = "official.nlp.modeling.layers.moe"
    except ImportError as package_error:
      # official/nlp/modeling/__init__ imports every layer (mixing.py needs scipy, others more);
      # moe.py itself needs only tf-keras and official.modeling.tf_utils, so it is loaded alone
      # from the installed package.
      import official  # noqa: F401  (raises if tf-models-official is not installed)
      path = os.path.join(official.__path__[0], "nlp", "modeling", "layers", "moe.py")
      spec = importlib.util.spec_from_file_location("_model_garden_moe", path)
      mod = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mod)
      how = (f"official/nlp/modeling/layers/moe.py loaded by file (the package import fails: "
             f"{type(package_error).__name__}: {package_error})")
    for cls in ("MoeLayer", "FeedForwardExperts", "ExpertsChooseMaskedRouter"):
      getattr(mod, cls)
    modules["model_garden"] = mod
    status["model_garden"] = {"available": True, "version": _version("tf-models-official"),
                              "tf_keras": _version("tf-keras"), "how": how, "reason": None}
  except Exception as e:
    status["model_garden"] = {"available": False, "version": _version("tf-models-official"),
                              "how": None,
                              "reason": f"{type(e).__name__}: {e} (make bench-setup installs it)"}
  return status, modules


# --------------------------------------------------------------------------------------------
# Candidates: a layer, its input, and a compiled forward+backward step


class Candidate:
  """One thing to time. `build()` makes the layer and traces the step; `run()` runs one step.

  `input_shape` is one shape, or a list of shapes (the layer then takes a list of inputs and
  may return a list, e.g. the bare experts on per-expert row blocks).
  """

  def __init__(self, key: str, make, input_shape, tokens: int):
    self.key, self._make, self.tokens = key, make, tokens
    self.many = isinstance(input_shape, list)
    self.input_shape = ([tuple(s) for s in input_shape] if self.many else tuple(input_shape))
    self.step = None
    self.error = None

  def build(self):
    import tensorflow as tf
    layer, call = self._make()
    if self.many:
      x = [tf.random.stateless_normal(s, [1, 2 + i]) for i, s in enumerate(self.input_shape)]
    else:
      x = tf.random.stateless_normal(self.input_shape, [1, 2])
    y = call(layer, x)                               # eager: builds the weights
    probe = tf.nest.map_structure(
        lambda t: tf.random.stateless_normal(t.shape, [3, 4], dtype=t.dtype), y)
    variables = layer.trainable_variables
    many = self.many

    # The loss is returned too: with gradients alone, TF prunes every forward op whose value no
    # gradient needs (the experts' second matmul, unless a router gradient reads its output).
    @tf.function
    def step(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.add_n([tf.reduce_sum(a * b) for a, b in zip(
            tf.nest.flatten(call(layer, x)), tf.nest.flatten(probe))])
      return loss, tape.gradient(loss, (list(x) if many else [x]) + list(variables))

    self.layer, self.x = layer, x
    step(x)                                          # trace + warm-up, excluded
    self.step = step

  def run(self) -> float:
    start = time.perf_counter()
    self.step(self.x)                                # synchronous on CPU
    return time.perf_counter() - start

  def release(self):
    self.step = self.layer = self.x = None


def loopback_communicator(group_size: int):
  """Stands for one worker of a D-worker expert group; its all-to-all is the identity.

  The worker then computes exactly its real share ([D, e, C, M] buffers, e = E/D local experts)
  as if every peer had sent it the same buffer it sends; the communication is not measured.
  """
  from m6t_tf.parallel import communicator as comm_lib

  class Loopback(comm_lib.Communicator):
    expert_group_size = group_size
    expert_rank = 0

    def all_to_all(self, x):
      return x

  return Loopback()


def _ours(shape, *, routing="top_k", k=1, mode="k", dispatch="index", activation="gelu"):
  def make():
    from m6t_tf.layers import moe as moe_lib
    comm = loopback_communicator(shape["D"]) if shape["D"] > 1 else None
    layer = moe_lib.MoE(shape["E"], shape["I"], routing=routing, k=k, capacity_mode=mode,
                        capacity_factor=shape["gamma"], dispatch=dispatch,
                        activation=activation, communicator=comm)
    return layer, lambda l, x: l(x, training=True)
  return make


def _floor(shape):
  """The bare expert matmuls: `Experts` on [e, D·C, M], the buffer a top-1 MoE gives them."""
  def make():
    from m6t_tf.layers import experts as experts_lib
    layer = experts_lib.Experts(shape["E"] // shape["D"], shape["M"], shape["I"])
    return layer, lambda l, x: l(x, training=True)
  return make


def _dense(shape, k):
  """A dense FFN of intermediate k·I over all T tokens: one `Experts` expert on [1, T, M].

  The same function as `m6t_tf.layers.feedforward.FeedForward` (no biases, tanh-GeLU), built
  from the expert layer so that dense and MoE run the same matmul kernels. (`FeedForward` once
  used `tf.einsum("...M,MI->...I")`, whose weight gradient TF materialises as [T, M, I]:
  8 GiB and ResourceExhaustedError at T = 2048, M = 512, I = 2048.)
  """
  def make():
    from m6t_tf.layers import experts as experts_lib
    layer = experts_lib.Experts(1, shape["M"], k * shape["I"])
    return layer, lambda l, x: l(x, training=True)
  return make


def _model_garden(mod, shape, k):
  def make():
    experts = mod.FeedForwardExperts(shape["E"], shape["I"])
    router = mod.ExpertsChooseMaskedRouter(shape["E"], export_metrics=False)
    # Experts choose their top C = round(k·γ·T/E) tokens: the same E·C slots as our top-k.
    layer = mod.MoeLayer(experts, router, train_capacity_factor=k * shape["gamma"],
                         examples_per_group=1.0)
    return layer, lambda l, x: l(x, training=True)
  return make


def _keras_hub(mod, shape, k):
  def make():
    layer = mod.MixtralSparseMoeBlock(shape["M"], shape["I"], shape["E"], top_k=k,
                                      router_aux_loss_coef=0.0)
    return layer, lambda l, x: l(x, training=True)[0]
  return make


# --------------------------------------------------------------------------------------------
# Timing


def time_interleaved(candidates: list[Candidate], repeats: int, log) -> dict:
  """Builds every candidate, then `repeats` rounds timing each once; returns {key: [s, ...]}."""
  ready = []
  for c in candidates:
    try:
      c.build()
      ready.append(c)
    except Exception as e:  # e.g. a peer that cannot run on this stack: reported, not fatal
      c.error = _error_text(e)
      c.release()
      log(f"  {c.key}: cannot run ({c.error})")
  times = {c.key: [] for c in ready}
  for r in range(repeats):
    shift = r % max(len(ready), 1)
    for c in ready[shift:] + ready[:shift]:
      if c.error:
        continue
      try:
        times[c.key].append(c.run())
      except Exception as e:
        c.error = _error_text(e)
        log(f"  {c.key}: failed in round {r + 1} ({c.error})")
    log(f"  round {r + 1}/{repeats} done")
  return {k: v for k, v in times.items() if len(v) == repeats}


def _error_text(e: Exception) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  oom = [l for l in lines if l.startswith("OOM when allocating")]
  if oom:
    text = oom[0].split(" on /job")[0]
  elif lines and lines[0] == "in user code:":     # a traced function's error: its last line
    text = lines[-1]
  else:
    text = lines[0] if lines else ""
  return f"{type(e).__name__}: {text}"[:300]


def _ratio(times, key, base):
  return statistics.median(a / b for a, b in zip(times[key], times[base]))


def _row(name, variant, shape_name, cand, times, base_key, baseline_label, **extra):
  t = times[cand.key]
  med = statistics.median(t)
  return {"name": name, "variant": variant, "shape": shape_name, "tokens": cand.tokens,
          "median_s": med, "ratio_to_baseline": _ratio(times, cand.key, base_key),
          "baseline": baseline_label, "is_baseline": cand.key == base_key,
          "tokens_per_s": cand.tokens / med, "repeats": len(t), "times_s": t, **extra}


# --------------------------------------------------------------------------------------------
# Sections


def shapes_for(args) -> dict:
  if args.smoke:
    worker = {"E": 8, "D": 2, "M": 16, "I": 32, "B": 4, "L": 16, "gamma": GAMMA}
    issue = {"E": 8, "D": 1, "M": 16, "I": 32, "gamma": GAMMA}
  else:
    worker = {"E": 32, "D": 8, "M": 1024, "I": 4096, "B": 32, "L": 128, "gamma": GAMMA}
    issue = {"E": 8, "D": 1, "M": 512, "I": 2048, "gamma": GAMMA}
  shapes = {}
  if not args.no_worker:
    worker.update(T=worker["B"] * worker["L"], e=worker["E"] // worker["D"])
    shapes["worker"] = worker
  for t in args.tokens:
    shapes[f"T={t}"] = dict(issue, T=t, B=1, L=t, e=issue["E"])
  return shapes


def _capacity(shape, k=1):
  from m6t_tf.layers import routing as routing_lib
  return routing_lib.capacity(shape["T"], shape["E"], k=k, capacity_factor=shape["gamma"])


def measure_shape(shape_name, shape, args, peers, results, skipped, log):
  """Times every candidate of one shape interleaved and appends result rows."""
  t, m, sections = shape["T"], shape["M"], args.sections
  x_shape = (shape["B"], shape["L"], m)
  cands = {}

  def add(key, make, input_shape=x_shape):
    cands[key] = Candidate(key, make, input_shape, t)

  if "routing" in sections:
    for variant, routing, k in ROUTINGS:
      for mode in CAPACITY_MODES:
        add(f"{variant}/cap{mode}", _ours(shape, routing=routing, k=k, mode=mode))
  add("top1/capk", _ours(shape))
  if "dispatch" in sections or "floor" in sections:
    for k in (1, 2) if "dispatch" in sections else (1,):
      tec = t * shape["E"] * _capacity(shape, k) * 4
      if tec > EINSUM_TEC_LIMIT_BYTES:
        skipped.append({"name": "dispatch", "variant": f"top{k}/einsum", "shape": shape_name,
                        "reason": f"one [T, E, C] float32 tensor would take {tec / 2**30:.1f} GiB"})
        continue
      add(f"top{k}/capk/einsum", _ours(shape, k=k, dispatch="einsum"))
      if k == 2:
        add("top2/capk", _ours(shape, k=2))
  if "floor" in sections:
    c = _capacity(shape)
    add("floor", _floor(shape), (shape["E"] // shape["D"], shape["D"] * c, m))
  if "dense" in sections:
    for k in (1, 2, 4):
      add(f"dense{k}", _dense(shape, k), (1, t, m))
      add(f"top{k}/capk", _ours(shape, k=k))
  peer_rows = []
  if "peers" in sections and shape["D"] == 1:
    for k in (1, 2):
      add(f"top{k}/capk", _ours(shape, k=k))
      if "model_garden" in peers:
        add(f"model_garden{k}", _model_garden(peers["model_garden"], shape, k))
        peer_rows.append(("model_garden", k, f"top{k}/capk", "ours, GeLU"))
      if "keras_hub" in peers:
        add(f"top{k}/capk/swiglu", _ours(shape, k=k, activation="swiglu"))
        add(f"keras_hub{k}", _keras_hub(peers["keras_hub"], shape, k))
        peer_rows.append(("keras_hub", k, f"top{k}/capk/swiglu", "ours, SwiGLU"))
  elif "peers" in sections:
    skipped.append({"name": "peer", "variant": "*", "shape": shape_name,
                    "reason": "peers hold all experts on one device; compared at the D = 1 shapes"})

  log(f"[{shape_name}] {len(cands)} candidates, {args.repeats} rounds")
  times = time_interleaved(list(cands.values()), args.repeats, log)
  for key, c in cands.items():
    if key not in times:
      skipped.append({"name": "peer" if key.startswith(("model_garden", "keras_hub")) else "run",
                      "variant": key, "shape": shape_name, "reason": c.error})
  ok = lambda *keys: all(k in times for k in keys)

  if "routing" in sections:
    for variant, routing, k in ROUTINGS:
      for mode in CAPACITY_MODES:
        key = f"{variant}/cap{mode}"
        if ok(key, "top1/capk"):
          results.append(_row("routing", f"{variant} capacity {mode}x", shape_name, cands[key],
                              times, "top1/capk", "top1 capacity kx (index)",
                              routing=routing, k=k, capacity_mode=mode, dispatch="index"))
  if "dispatch" in sections:
    for k in (1, 2):
      for d in ("index", "einsum"):
        key = f"top{k}/capk" + ("/einsum" if d == "einsum" else "")
        if ok(key, f"top{k}/capk"):
          results.append(_row("dispatch", f"top{k} {d}", shape_name, cands[key], times,
                              f"top{k}/capk", f"top{k} index", k=k, dispatch=d))
  if "floor" in sections:
    for key, variant in (("floor", "Experts alone [e, D*C, M]"), ("top1/capk", "MoE top1 index"),
                         ("top1/capk/einsum", "MoE top1 einsum")):
      if ok(key, "floor"):
        results.append(_row("floor", variant, shape_name, cands[key], times, "floor",
                            "Experts alone"))
  if "dense" in sections:
    for k in (1, 2, 4):
      for key, variant in ((f"dense{k}", f"dense FFN I'={k}*I"), (f"top{k}/capk", f"MoE top{k}")):
        if ok(key, f"dense{k}"):
          results.append(_row("dense", variant, shape_name, cands[key], times, f"dense{k}",
                              f"dense FFN I'={k}*I", k=k))
  for peer, k, ours, label in peer_rows:
    for key, variant in ((f"{peer}{k}", f"{peer} k={k}"), (ours, f"{label} k={k}")):
      if ok(key, ours):
        results.append(_row("peer", variant, shape_name, cands[key], times, ours,
                            f"{label} top{k} index", k=k, peer=peer))
  for c in cands.values():
    c.release()
  del cands
  gc.collect()


def measure_scaling(args, results, skipped, fit, log):
  import tensorflow as tf
  base = shapes_for(argparse.Namespace(smoke=args.smoke, no_worker=True, tokens=[1]))["T=1"]
  cands, info = {}, {}
  for t in args.scaling_tokens:
    shape = dict(base, T=t, L=t)
    c = _capacity(shape)
    for d in ("index", "einsum"):
      tec = t * shape["E"] * c * 4
      if d == "einsum" and tec > EINSUM_TEC_LIMIT_BYTES:
        skipped.append({"name": "scaling", "variant": d, "shape": f"T={t}",
                        "reason": f"one [T, E, C] float32 tensor would take {tec / 2**30:.1f} GiB"})
        continue
      key = f"{d}/T={t}"
      cands[key] = Candidate(key, _ours(shape, dispatch=d), (1, t, shape["M"]), t)
      hidden = shape["E"] * c * shape["I"] * 4
      largest = (("[T, E, C] float32 (one-hot dispatch/combine)", tec) if d == "einsum" and
                 tec > hidden else ("[E, C, I] float32 (expert hidden)", hidden))
      info[key] = (d, t, largest)
  log(f"[scaling] {len(cands)} candidates, {args.repeats} rounds")
  times = time_interleaved(list(cands.values()), args.repeats, log)
  # Peak memory of one step, each candidate alone (TF's CPU allocator statistics).
  peaks = {}
  for key, c in cands.items():
    if key not in times:
      continue
    try:
      tf.config.experimental.reset_memory_stats("CPU:0")
      before = tf.config.experimental.get_memory_info("CPU:0")["current"]
      c.run()
      peaks[key] = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    except (ValueError, RuntimeError) as e:  # not supported on this build: analytic sizes only
      peaks[key] = None
      log(f"  memory info unavailable: {e}")
  for d in ("index", "einsum"):
    keys = [k for k in cands if info[k][0] == d and k in times]
    if not keys:
      continue
    base_key = keys[0]
    for key in keys:
      _, t, (what, size) = info[key]
      results.append(_row("scaling", f"top1 {d}", f"T={t}", cands[key], times, base_key,
                          f"top1 {d} T={info[base_key][1]}", dispatch=d,
                          peak_bytes=peaks.get(key), largest_intermediate=what,
                          largest_intermediate_bytes=size))
    if len(keys) >= 2:
      # Fitted on the interleaved per-round ratios to the smallest T (not on absolute medians),
      # so that a change of the machine's load during the run does not bend the line.
      xs = [math.log(info[k][1]) for k in keys]
      ys = [math.log(_ratio(times, k, base_key)) for k in keys]
      mx, my = statistics.fmean(xs), statistics.fmean(ys)
      slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
      last = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
      # The same fit on absolute medians: a second view (a load change biases it differently).
      ya = [math.log(statistics.median(times[k])) for k in keys]
      ma = statistics.fmean(ya)
      slope_abs = sum((a - mx) * (b - ma) for a, b in zip(xs, ya)) / sum((a - mx) ** 2 for a in xs)
      fit[d] = {"slope": slope, "slope_last_doubling": last, "slope_abs_medians": slope_abs,
                "tokens": [info[k][1] for k in keys]}
  for c in cands.values():
    c.release()
  gc.collect()


# --------------------------------------------------------------------------------------------
# Suite dropless: dropless experts, outer groups, the 2-rank all-to-all


def pinned_experts(num_tokens: int, num_experts: int, skew=None):
  """<int>[T] expert of each token, deterministic.

  skew=None: balanced, token t to expert t mod E (each expert exactly T/E tokens when E | T).
  skew=s: round(s·T) tokens, drawn by a fixed permutation, to expert 0; the others in turn to
  experts 1 … E-1 (the rest uniform).
  """
  import numpy as np
  if skew is None:
    return np.arange(num_tokens) % num_experts
  hot = round(skew * num_tokens)
  order = np.random.default_rng(0).permutation(num_tokens)
  out = np.empty(num_tokens, np.int64)
  out[order[:hot]] = 0
  out[order[hot:]] = 1 + np.arange(num_tokens - hot) % (num_experts - 1)
  return out


def pin_router(layer, assign, margin: float = 10.0):
  """Adds margin·onehot(assign) <float32>[T, E] to the built MoE's router logits.

  The router's matmul and its gradient stay in the step (they are part of the layer's cost);
  the margin only decides the argmax (router logits of the benchmark's inputs are O(1)), so the
  routing is the one asked for, and the gates are ≈ 1.
  """
  import numpy as np
  import tensorflow as tf
  bias = tf.constant(margin * np.eye(layer.num_experts, dtype=np.float32)[assign])
  dense = layer.router
  call = dense.call
  dense.call = lambda inputs, *a, **kw: call(inputs, *a, **kw) + bias


def _moe(shape, *, mode="k", assign=None, num_groups=1, communicator=None, cls=None,
         unstacked=False):
  """Our top-1 MoE (index dispatch, GeLU); `assign` pins the routing (`pinned_experts`);
  `unstacked`: its experts read their weights once per call (`unstacked_experts_class`)."""
  def make():
    import keras
    from m6t_tf.layers import moe as moe_lib
    keras.utils.set_random_seed(7)         # same router and experts in every variant
    layer = (cls or moe_lib.MoE)(shape["E"], shape["I"], k=1, capacity_mode=mode,
                                 capacity_factor=shape["gamma"], num_groups=num_groups,
                                 communicator=communicator)
    layer.build((shape["B"], shape["L"], shape["M"]))
    if assign is not None:
      pin_router(layer, assign)
    if unstacked:
      layer.experts.__class__ = unstacked_experts_class()   # same weights, other grouped call
    return layer, lambda l, x: l(x, training=True)
  return make


def _bare_rows(shape, counts):
  """The bare expert FFN matmuls on per-expert row blocks of static sizes `counts` (no routing,
  no split or concat: each expert's rows are their own input). The stacked weights are
  unstacked once (`unstacked_rows`), so their gradient is one stack, not e dense slice
  gradients."""
  def make():
    from m6t_tf.layers import experts as experts_lib
    layer = experts_lib.Experts(len(counts), shape["M"], shape["I"])
    layer.build(None)

    def call(l, xs):
      fn = unstacked_rows(l)
      return [fn(j, x, True) for j, x in enumerate(xs)]
    return layer, call
  return make


def unstacked_rows(experts):
  """`Experts._expert_rows` with the [e, M, I] / [e, I, M] weights unstacked once per call.

  `_expert_rows` reads `w[j]` per expert; the gradient of each read is a dense [e, M, I]
  StridedSliceGrad, and the e of them are summed by an AddN. `tf.unstack` has one stack as
  its gradient. (GeLU/ReLU experts, no dropout: what this benchmark builds.)
  """
  import tensorflow as tf
  from m6t_tf.layers import experts as experts_lib
  act = experts_lib.activation_fn(experts.activation)
  wi, wo = tf.unstack(experts.wi), tf.unstack(experts.wo)
  return lambda j, x, training: tf.matmul(act(tf.matmul(x, wi[j])), wo[j])


def unstacked_experts_class():
  """Experts whose grouped (dropless) call reads its weights with `unstacked_rows`: a what-if
  of the layer's `Experts._expert_rows`, benchmark only."""
  from m6t_tf.layers import experts as experts_lib

  class UnstackedExperts(experts_lib.Experts):

    def call(self, x, training=None, group_sizes=None):
      if group_sizes is None:
        return super().call(x, training=training)
      return experts_lib.grouped_apply(x, group_sizes, self.num_local_experts,
                                       unstacked_rows(self), self.hidden_size, training)

  return UnstackedExperts


def _stat(layer, name):
  return float(layer.stats[name].numpy())


def measure_dropless(shape_name, shape, args, results, skipped, log):
  """Balanced and skewed routing (dropless vs capacity 1.25 vs bare matmuls) and O groups."""
  import numpy as np
  t, m, e_total, sections = shape["T"], shape["M"], shape["E"], args.sections
  x_shape = (shape["B"], shape["L"], m)
  cands, routed = {}, {}

  def add(key, make, input_shape=x_shape):
    cands[key] = Candidate(key, make, input_shape, t)

  assigns = {"balanced": pinned_experts(t, e_total), "skewed": pinned_experts(t, e_total, SKEW)}
  for r in ("balanced", "skewed"):
    if r not in sections:
      continue
    counts = np.bincount(assigns[r], minlength=e_total)
    add(f"{r}/dropless", _moe(shape, mode="dropless", assign=assigns[r]))
    add(f"{r}/unstacked", _moe(shape, mode="dropless", assign=assigns[r], unstacked=True))
    add(f"{r}/capacity", _moe(shape, assign=assigns[r]))
    add(f"{r}/bare_rows", _bare_rows(shape, counts), [(int(n), m) for n in counts])
    routed[r] = counts
    if r == "balanced" and t % e_total == 0:
      add("balanced/bare", _floor(shape), (e_total, t // e_total, m))
  if "groups" in sections:
    for r, assign in (("natural", None), ("skewed", assigns["skewed"])):
      for o in GROUPS:
        if t % o:
          skipped.append({"name": "groups", "variant": f"O={o}", "shape": shape_name,
                          "reason": f"O={o} does not divide T={t}"})
          continue
        add(f"groups-{r}/O={o}", _moe(shape, assign=assign, num_groups=o))
  log(f"[dropless {shape_name}] {len(cands)} candidates, {args.repeats} rounds")
  times = time_interleaved(list(cands.values()), args.repeats, log)
  for key, c in cands.items():
    if key not in times:
      skipped.append({"name": "run", "variant": key, "shape": shape_name, "reason": c.error})
  ok = lambda *keys: all(k in times for k in keys)

  def stats(key):
    layer = cands[key].layer
    return {"dropped_fraction": _stat(layer, "dropped_fraction"),
            "load_cv": _stat(layer, "load_cv")}

  cap = lambda o=1: o * _capacity(dict(shape, T=t // o))   # O·C slots per expert
  for r, counts in routed.items():
    name = f"dropless-{r}"
    rows = {"dropless": ("dropless top1", {"rows_computed": t, **stats(f"{r}/dropless")}),
            "unstacked": ("dropless top1, experts' weights unstacked once (what-if)",
                          {"rows_computed": t, **stats(f"{r}/unstacked")}),
            "capacity": (f"capacity {shape['gamma']} top1",
                         {"rows_computed": e_total * cap(), **stats(f"{r}/capacity")}),
            "bare_rows": ("bare expert matmuls, per-expert rows", {"rows_computed": t}),
            "bare": ("bare expert matmuls [E, T/E, M]", {"rows_computed": t})}
    pairs = [("capacity", ("dropless", "unstacked", "capacity"))]
    if r == "balanced" and "balanced/bare" in cands:
      pairs.append(("bare", ("dropless", "unstacked", "bare_rows", "bare")))
    else:
      pairs.append(("bare_rows", ("dropless", "unstacked", "bare_rows")))
    for base, members in pairs:
      for mkey in members:
        key, base_key = f"{r}/{mkey}", f"{r}/{base}"
        if ok(key, base_key):
          variant, info = rows[mkey]
          results.append(_row(name, variant, shape_name, cands[key], times, base_key,
                              rows[base][0], routing=r,
                              tokens_per_expert=[int(n) for n in counts], **info))
  if "groups" in sections:
    for r in ("natural", "skewed"):
      base_key = f"groups-{r}/O=1"
      for o in GROUPS:
        key = f"groups-{r}/O={o}"
        if ok(key, base_key):
          results.append(_row(f"groups-{r}", f"O={o} capacity {shape['gamma']} top1",
                              shape_name, cands[key], times, base_key,
                              f"O=1 capacity {shape['gamma']} top1", routing=r, num_groups=o,
                              rows_computed=e_total * cap(o), **stats(key)))
  for c in cands.values():
    c.release()
  del cands
  gc.collect()


def dropless_shapes(args) -> dict:
  issue = ({"E": 8, "D": 1, "M": 16, "I": 32, "gamma": GAMMA} if args.smoke else
           {"E": 8, "D": 1, "M": 512, "I": 2048, "gamma": GAMMA})
  shapes = {f"T={t}": dict(issue, T=t, B=1, L=t, e=issue["E"]) for t in args.tokens}
  if "alltoall" in args.sections:
    t = args.tokens[0]
    shapes[A2A_SHAPE] = dict(issue, D=A2A_RANKS, e=issue["E"] // A2A_RANKS, T=t, B=1, L=t)
  return shapes


A2A_RANKS = 2
A2A_SHAPE = f"{A2A_RANKS} ranks"
# A padded / variable step ratio within 1 ± this is not called faster or slower: at 2 ranks on
# a shared machine the same comparison moves by about that much between runs.
A2A_CLEAR = 0.05


def padded_dropless_class():
  """MoE whose dropless exchange pads every worker's rows to the expert group's maximum count
  and uses the fixed-size all-to-all (the alternative to variable splits; benchmark only).

  Choice (k, t) goes to slot offset e·Cmax + its slot, Cmax = max over the group (MAX
  allreduce) of any worker's rows for any one expert: the capacity path's index dispatch and
  combine with a run-time C = Cmax. The receiver computes the real rows only (unpadded into
  the grouped layout, `experts.grouped_apply`) and pads the results back for the return trip.
  """
  import dataclasses
  import tensorflow as tf
  import horovod.tensorflow as hvd
  from m6t_tf.layers import moe as moe_lib

  def moved(x, src, inv):
    """x[src] (src injective) with a dense gradient: d_x = pad(d)[inv]."""
    @tf.custom_gradient
    def f(x):
      return tf.gather(x, src), lambda d: tf.gather(moe_lib._pad_row(d), inv)
    return f(x)

  class PaddedDroplessMoE(moe_lib.MoE):

    def _dropless(self, x, r, training):
      comm = self.communicator
      d, e = comm.expert_group_size, self.num_local_experts
      counts = r.tokens_per_expert                                        # [E]
      cmax = hvd.allreduce(tf.reduce_max(counts), op=hvd.Max,
                           process_set=comm.process_set)                  # Cmax over the group
      rp = dataclasses.replace(r, capacity=cmax)
      buffer = tf.reshape(moe_lib.dispatch_index(x, rp, self.num_experts),
                          [d, e, cmax, x.shape[-1]])                      # [D, e, Cmax, M]
      received = comm.all_to_all(buffer)                                  # [D, e, Cmax, M]
      received_counts = comm.all_to_all(tf.reshape(counts, [d, e]))      # [D, e]
      # Expert-major [e, D, Cmax]: the real rows of expert j are contiguous once unpadded.
      real = tf.reshape(tf.range(cmax)[None, None] < tf.transpose(received_counts)[..., None],
                        [-1])                                             # [e·D·Cmax]
      src = tf.cast(tf.where(real)[:, 0], tf.int32)                       # [R]
      inv = tf.where(real, tf.cumsum(tf.cast(real, tf.int32)) - 1, tf.size(src))
      flat = tf.reshape(tf.transpose(received, [1, 0, 2, 3]), [-1, x.shape[-1]])
      y = self._run_experts(moved(flat, src, inv), training,
                            tf.reduce_sum(received_counts, axis=0))       # [R, N]
      n = y.shape[-1]
      y_pad = moved(moe_lib._pad_row(y), inv, tf.concat([src, [tf.size(real)]], 0))  # [e·D·Cmax, N]
      y_pad = tf.transpose(tf.reshape(y_pad, [e, d, cmax, n]), [1, 0, 2, 3])
      returned = comm.all_to_all(y_pad)                                   # [D, e, Cmax, N]
      out = moe_lib.combine_index(returned, rp, self.num_experts)         # [T, N]
      return tf.ensure_shape(out, [x.shape[0], n])

  return PaddedDroplessMoE


class ExchangeCandidate(Candidate):
  """The all-to-alls of one layer step alone (forward and backward), on payloads of the sizes
  the layer sends: `fn` is traced once and timed like a layer step."""

  def __init__(self, key: str, fn, args, tokens: int):
    super().__init__(key, None, (), tokens)
    self._fn, self._args = fn, args

  def build(self):
    import tensorflow as tf
    self.step = tf.function(self._fn)
    self.step(*self._args)

  def run(self) -> float:
    start = time.perf_counter()
    self.step(*self._args)
    return time.perf_counter() - start

  def release(self):
    self.step = self._args = None


def exchanges(comm, shape, counts) -> dict:
  """{variant: (fn, args)}: the all-to-alls one layer step makes (forward then backward),
  alone, on payloads of the sizes the layer sends, given the (identical) per-expert counts of
  each rank. Payloads and counts are arguments: made inside the function they would be
  constants, and Grappler's constant folding would run the chain once at trace time."""
  import numpy as np
  import tensorflow as tf
  import horovod.tensorflow as hvd
  d, e, m = shape["D"], shape["e"], shape["M"]
  c = _capacity(shape)
  counts_de = np.asarray(counts, np.int32).reshape(d, e)
  send = counts_de.sum(axis=1)                          # rows to worker d
  cmax = int(counts_de.max())
  normal = lambda *s: tf.random.stateless_normal(s, [5, 6])

  def capacity(y):
    for _ in range(4):                                  # forward x, y; backward dy, dx
      y = comm.all_to_all(y)
    return y

  def variable(y, counts, send):
    got, _ = comm.all_to_all_v(tf.reshape(counts, [-1]), tf.fill([d], e))  # counts
    for _ in range(2):                                  # forward x, y; backward dy, dx
      y, back = comm.all_to_all_v(y, send)
      y, _ = comm.all_to_all_v(y, back)
    return y, got

  def padded(y, counts):
    cm = hvd.allreduce(tf.reduce_max(counts), op=hvd.Max,
                       process_set=comm.process_set)   # Cmax over the group
    got = comm.all_to_all(counts)
    y = y[:, :, :cm]
    for _ in range(4):
      y = comm.all_to_all(y)
    return y, got

  return {"capacity": (capacity, (normal(d, e, c, m),)),
          "variable": (variable, (normal(int(send.sum()), m), tf.constant(counts_de),
                                  tf.constant(send))),
          "padded": (padded, (normal(d, e, cmax, m), tf.constant(counts_de)))}


def measure_alltoall(args, shape, log) -> dict:
  """One rank of the 2-rank run (`horovodrun -np 2 --gloo`, mesh data=1 × expert=2).

  Per routing (balanced, skewed): the layer step of capacity 1.25 (fixed [D, e, C, M]
  all-to-all), dropless with variable splits (`Communicator.all_to_all_v`) and dropless padded
  to the group's maximum (`padded_dropless_class`), each with its exchanges timed alone.
  """
  import numpy as np
  import tensorflow as tf
  tf.config.threading.set_intra_op_parallelism_threads(1)   # 2 ranks share the 2 cores
  from m6t_tf.parallel import horovod as hvd_lib
  ctx = hvd_lib.init_horovod(expert=A2A_RANKS, num_experts=shape["E"], set_default=False)
  comm = ctx.communicator
  d, e, big_e, m, t = shape["D"], shape["e"], shape["E"], shape["M"], shape["T"]
  c = _capacity(shape)
  padded_cls = padded_dropless_class()
  x_shape = (shape["B"], shape["L"], m)
  cands, info = {}, {}
  for r in ("balanced", "skewed"):
    assign = pinned_experts(t, big_e, None if r == "balanced" else SKEW)
    counts = np.bincount(assign, minlength=big_e)                        # same on every rank
    counts_de = counts.reshape(d, e)
    send = counts_de.sum(axis=1)                                         # rows to worker d
    recv = d * counts_de[ctx.expert_index]                               # rows from each worker
    cmax = int(counts.max())
    f32 = 4
    info[r] = {
        "capacity": {"bytes": 4 * big_e * c * m * f32,
                     "remote_bytes": 4 * (d - 1) * e * c * m * f32, "slots": big_e * c},
        "variable": {"bytes": 2 * (int(send.sum()) + int(recv.sum())) * m * f32 + big_e * 4,
                     "remote_bytes": 2 * (int(send.sum() - send[ctx.expert_index])
                                          + int(recv.sum()) // d * (d - 1)) * m * f32,
                     "rows_received": int(recv.sum())},
        "padded": {"bytes": 4 * big_e * cmax * m * f32 + big_e * 4,
                   "remote_bytes": 4 * (d - 1) * e * cmax * m * f32, "cmax": cmax,
                   "rows_received": int(recv.sum())}}
    for variant, make in (("capacity", _moe(shape, assign=assign, communicator=comm)),
                          ("variable", _moe(shape, mode="dropless", assign=assign,
                                            communicator=comm)),
                          ("padded", _moe(shape, mode="dropless", assign=assign,
                                          communicator=comm, cls=padded_cls))):
      cands[f"{r}/{variant}"] = Candidate(f"{r}/{variant}", make, x_shape, t)

    for variant, (fn, fn_args) in exchanges(comm, shape, counts).items():
      cands[f"{r}/a2a/{variant}"] = ExchangeCandidate(f"{r}/a2a/{variant}", fn, fn_args, t)
  log(f"[{A2A_SHAPE} rank {ctx.rank}] {len(cands)} candidates, {args.repeats} rounds")
  times = time_interleaved(list(cands.values()), args.repeats,
                           log if ctx.rank == 0 else (lambda msg: None))
  results, skipped = [], []
  labels = {"capacity": f"capacity {shape['gamma']}, fixed all-to-all",
            "variable": "dropless, variable-split all-to-all",
            "padded": "dropless, padded to the group max, fixed all-to-all"}
  for key, cand in cands.items():
    if key not in times:
      skipped.append({"name": "alltoall", "variant": key, "shape": A2A_SHAPE, "reason": cand.error})
  summary = {}
  for r in ("balanced", "skewed"):
    sname = f"{A2A_SHAPE} {r}"
    base = f"{r}/variable"
    for variant in ("capacity", "variable", "padded"):
      key = f"{r}/{variant}"
      if key in times and base in times:
        stats = {"dropped_fraction": _stat(cands[key].layer, "dropped_fraction")}
        results.append(_row("alltoall-step", labels[variant], sname, cands[key], times, base,
                            labels["variable"], routing=r, exchange=variant, **stats,
                            **info[r][variant]))
    for variant in ("capacity", "variable", "padded"):
      key, a2a = f"{r}/{variant}", f"{r}/a2a/{variant}"
      if key in times and a2a in times:
        name = f"alltoall-share-{variant}"
        results.append(_row(name, f"layer step, {labels[variant]}", sname, cands[key], times,
                            key, "its layer step", routing=r, exchange=variant))
        results.append(_row(name, "its all-to-alls alone", sname, cands[a2a], times, key,
                            "its layer step", routing=r, exchange=variant, **info[r][variant]))
    a2a_base = f"{r}/a2a/variable"
    for variant in ("variable", "padded"):
      key = f"{r}/a2a/{variant}"
      if key in times and a2a_base in times:
        results.append(_row("alltoall-alone", f"all-to-alls of {labels[variant]}", sname,
                            cands[key], times, a2a_base, "variable-split all-to-alls",
                            routing=r, exchange=variant, **info[r][variant]))
    got = lambda k, b: _ratio(times, k, b) if k in times and b in times else None
    # The padded variant is the same function: same weights (seeded) and inputs, so its loss
    # and gradients must match the variable-split layer's.
    mismatch = None
    if base in times and f"{r}/padded" in times:
      (lv, gv), (lp, gp) = (cands[k].step(cands[k].x) for k in (base, f"{r}/padded"))
      mismatch = max(float(tf.reduce_max(tf.abs(a - b)) / (tf.reduce_max(tf.abs(a)) + 1e-30))
                     for a, b in zip([lv] + gv, [lp] + gp))
    summary[r] = {
        "padded_max_rel_difference": mismatch,
        "step_padded_over_variable": got(f"{r}/padded", base),
        "step_capacity_over_variable": got(f"{r}/capacity", base),
        "alone_padded_over_variable": got(f"{r}/a2a/padded", a2a_base),
        **{f"share_{v}": got(f"{r}/a2a/{v}", f"{r}/{v}") for v in ("capacity", "variable",
                                                                  "padded")},
        "bytes": {v: info[r][v] for v in ("capacity", "variable", "padded")}}
  for cand in cands.values():
    cand.release()
  out = {"rank": ctx.rank, "results": results, "skipped": skipped, "alltoall": summary}
  ctx.shutdown()
  return out


def run_alltoall(args, log) -> dict:
  """Launches this file's 2-rank task under `horovodrun --gloo`; returns rank 0's part with
  every rank's byte counts."""
  import shutil
  import tempfile
  tmp = tempfile.mkdtemp(prefix="bench_moe_a2a-")
  try:
    result = os.path.join(tmp, "part")
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    cmd = [horovodrun, "-np", str(A2A_RANKS), "-H", f"localhost:{A2A_RANKS}", "--gloo",
           sys.executable, os.path.abspath(__file__), *_child_argv(args, "alltoall"),
           f"--result={result}"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    log(f"[{A2A_SHAPE}] horovodrun -np {A2A_RANKS} --gloo")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    parts = []
    for rank in range(A2A_RANKS):
      path = f"{result}.rank{rank}.json"
      if os.path.exists(path):
        with open(path) as f:
          parts.append(json.load(f))
    if proc.returncode or len(parts) != A2A_RANKS:
      tail = (proc.stderr or proc.stdout or "")[-600:].strip().replace("\n", " | ")
      return {"results": [], "scaling_fit": {}, "alltoall": {},
              "skipped": [{"name": "alltoall", "variant": "*", "shape": A2A_SHAPE,
                           "reason": f"horovodrun exited with status {proc.returncode}: {tail}"}]}
    first = parts[0]
    for r, s in first["alltoall"].items():
      for v, b in s["bytes"].items():
        b["per_rank"] = [dict(p["alltoall"][r]["bytes"][v]) for p in parts]
    return {"results": first["results"], "skipped": first["skipped"], "scaling_fit": {},
            "alltoall": first["alltoall"]}
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def evaluate_dropless_targets(results, shapes, sections) -> list[dict]:
  by = {(r["name"], r["variant"], r["shape"], r["baseline"]): r["ratio_to_baseline"]
        for r in results}
  targets = []

  def target(name, threshold, measured, note):
    evaluated = measured is not None
    targets.append({"name": name, "threshold": threshold, "comparison": "<=",
                    "measured": measured, "evaluated": evaluated,
                    "holds": bool(evaluated and measured <= threshold),
                    "note": note if evaluated else "not measured (see skipped)"})

  whatif = "dropless top1, experts' weights unstacked once (what-if)"
  for s, shape in shapes.items():
    if shape["D"] != 1:
      continue
    cap = f"capacity {shape['gamma']} top1"
    bare = "bare expert matmuls [E, T/E, M]"
    if "balanced" in sections:
      target(f"dropless vs {cap}, balanced [{s}]", DROPLESS_TARGETS["vs_capacity"],
             by.get(("dropless-balanced", "dropless top1", s, cap)),
             f"time ratio; dropless computes T rows, capacity E*C = {shape['gamma']}*T slots")
      target(f"dropless vs bare expert matmuls [E, T/E, M], balanced [{s}]",
             DROPLESS_TARGETS["vs_bare"],
             by.get(("dropless-balanced", "dropless top1", s, "bare expert matmuls [E, T/E, M]")),
             "time ratio; bare = the expert FFN on the same real rows, no routing")
    if "skewed" in sections:
      target(f"dropless vs bare expert matmuls (same per-expert rows), skewed [{s}]",
             DROPLESS_TARGETS["skewed_vs_bare"],
             by.get(("dropless-skewed", "dropless top1", s,
                     "bare expert matmuls, per-expert rows")),
             f"time ratio; {SKEW:.0%} of the tokens to expert 0")
    # The same targets for the what-if layer (not the layer as it is; see `unstacked_rows`).
    for group, base, key in (("balanced", cap, "vs_capacity"), ("balanced", bare, "vs_bare"),
                             ("skewed", "bare expert matmuls, per-expert rows",
                              "skewed_vs_bare")):
      if group in sections:
        target(f"what-if unstacked expert weights: dropless vs {base}, {group} [{s}]",
               DROPLESS_TARGETS[key], by.get((f"dropless-{group}", whatif, s, base)),
               "time ratio; experts read their weights once per call (benchmark-only variant)")
  return targets


def dropless_table(report) -> str:
  out = [table(report), ""]
  seen = set()
  out += ["| group | variant | shape | rows computed | dropped fraction | load cv |",
          "|---|---|---|---:|---:|---:|"]
  for r in report["results"]:
    key = (r["name"], r["variant"], r["shape"])
    if "dropped_fraction" not in r or key in seen:
      continue
    seen.add(key)
    out.append(f"| {r['name']} | {r['variant']} | {r['shape']} | {r.get('rows_computed', '')} | "
               f"{r['dropped_fraction']:.4f} | "
               f"{'' if r.get('load_cv') is None else format(r['load_cv'], '.3f')} |")
  for routing, s in report.get("alltoall", {}).items():
    b = s["bytes"]
    fmt = lambda v: "—" if v is None else f"{v:.3f}"
    out += ["", f"2-rank all-to-all, {routing} routing (ratios: median over rounds, rank 0):",
            f"  all-to-all share of the layer step: capacity {fmt(s['share_capacity'])}, "
            f"dropless variable {fmt(s['share_variable'])}, dropless padded "
            f"{fmt(s['share_padded'])}",
            f"  layer step / dropless variable: capacity {fmt(s['step_capacity_over_variable'])}, "
            f"padded {fmt(s['step_padded_over_variable'])}; all-to-alls alone, padded / "
            f"variable {fmt(s['alone_padded_over_variable'])}"]
    for v in ("capacity", "variable", "padded"):
      per_rank = ", ".join(f"{p['bytes'] / 2**20:.1f}" for p in b[v].get("per_rank", [b[v]]))
      remote = ", ".join(f"{p['remote_bytes'] / 2**20:.1f}"
                         for p in b[v].get("per_rank", [b[v]]))
      out.append(f"  {v}: MiB handed to all-to-all per step (forward+backward) by rank: "
                 f"{per_rank}; to the other rank: {remote}"
                 + (f"; Cmax {b[v]['cmax']}" if "cmax" in b[v] else ""))
    ratio = s["step_padded_over_variable"]
    if ratio is not None:
      verdict = ("FASTER than" if ratio < 1 - A2A_CLEAR else "slower than" if ratio > 1 + A2A_CLEAR
                 else f"within ±{A2A_CLEAR:.0%} of")
      out.append(f"  => layer step, padded fixed-size all-to-all {verdict} variable splits "
                 f"({ratio:.3f}x)")
  out.append("")
  for t in report["targets"]:
    verdict = ("PASS" if t["holds"] else "MISS") if t["evaluated"] else "N/A "
    m = "not measured" if t["measured"] is None else f"{t['measured']:.3f}"
    out.append(f"{verdict} {t['name']}: {m} {t['comparison']} {t['threshold']}")
  return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Targets


def evaluate_targets(results, fit, shapes, peer_status, sections) -> list[dict]:
  by = {(r["name"], r["variant"], r["shape"]): r["ratio_to_baseline"] for r in results}
  targets = []

  def target(name, comparison, threshold, measured, note="", reason=None):
    evaluated = measured is not None
    holds = evaluated and (measured <= threshold if comparison == "<=" else measured >= threshold)
    targets.append({"name": name, "threshold": threshold, "comparison": comparison,
                    "measured": measured, "evaluated": evaluated, "holds": bool(holds),
                    "note": note if evaluated else (reason or "not measured")})

  for s, shape in shapes.items():
    if "routing" in sections:
      for variant, threshold in (("2xtop1", 1.03), ("4xtop1", 1.03), ("top4", 1.10)):
        target(f"{variant} vs top1, capacity 1x [{s}]", "<=", threshold,
               by.get(("routing", f"{variant} capacity 1x", s)), "time ratio")
    if "floor" in sections:
      target(f"MoE (index) vs bare expert matmuls [{s}]", "<=", 1.10,
             by.get(("floor", "MoE top1 index", s)), "time ratio, top1")
    if "peers" in sections and shape["D"] == 1:
      mg = peer_status.get("model_garden", {})
      if shape["T"] in MG_TARGETS:
        target(f"tokens/s vs Model Garden MoeLayer, k=1 [{s}]", ">=", MG_TARGETS[shape["T"]],
               by.get(("peer", "model_garden k=1", s)),
               "MG time / ours (GeLU, top1, same E*C slots)",
               mg.get("reason") or "Model Garden did not run (see skipped)")
      kh = peer_status.get("keras_hub", {})
      for k in (1, 2):
        bound = shape["E"] / (k * shape["gamma"])
        target(f"tokens/s vs Keras-Hub MixtralSparseMoeBlock, k={k} [{s}]", ">=", KH_TARGET,
               by.get(("peer", f"keras_hub k={k}", s)),
               f"KH time / ours (SwiGLU); FLOP bound E/(k*gamma) = {bound:.1f}x",
               kh.get("reason") or "Keras-Hub did not run (see skipped)")
  if "scaling" in sections:
    f = fit.get("index")
    target("index dispatch time linear in T (log-log slope of time ratio vs T)", "<=", 1.10,
           f["slope"] if f else None,
           f"least squares over T={f['tokens']}" if f else "", "fewer than 2 scaling points")
  return targets


# --------------------------------------------------------------------------------------------
# Profile mode


def profile(args, log) -> dict:
  """Per-op device time of MoE (top1, index) and its floor: what the MoE adds, op by op."""
  import collections
  import glob
  import re
  import tempfile
  import tensorflow as tf
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  if args.suite == "dropless":
    shape_name, shape = next(iter(dropless_shapes(args).items()))
    x_shape = (shape["B"], shape["L"], shape["M"])
    balanced = pinned_experts(shape["T"], shape["E"])
    # (MoE, its floor, a third column): dropless and capacity top-1 at balanced routing.
    specs = (("dropless", _moe(shape, mode="dropless", assign=balanced), x_shape),
             ("bare", _floor(shape), (shape["E"], shape["T"] // shape["E"], shape["M"])),
             ("capacity", _moe(shape, assign=balanced), x_shape))
  else:
    shape_name, shape = next(iter(shapes_for(args).items()))
    x_shape = (shape["B"], shape["L"], shape["M"])
    specs = (("moe_index", _ours(shape), x_shape),
             ("floor", _floor(shape),
              (shape["E"] // shape["D"], shape["D"] * _capacity(shape), shape["M"])),
             ("moe_einsum", _ours(shape, dispatch="einsum"), x_shape))
  out = {"shape": shape_name, "steps": 3, "ops": {}}
  # The first profiler session of a process runs its ops markedly slower: warm it up first.
  tf.profiler.experimental.start(tempfile.mkdtemp(prefix="bench_moe_profile_"))
  tf.reduce_sum(tf.matmul(tf.ones([512, 512]), tf.ones([512, 512]))).numpy()
  tf.profiler.experimental.stop()
  for key, make, in_shape in specs:
    c = Candidate(key, make, in_shape, shape["T"])
    c.build()
    c.run()
    logdir = tempfile.mkdtemp(prefix="bench_moe_profile_")
    tf.profiler.experimental.start(logdir)
    for _ in range(out["steps"]):
      c.run()
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
      space.ParseFromString(f.read())
    ops = collections.Counter()
    for plane in space.planes:
      for line in plane.lines:
        if not line.name.startswith("tf_Compute"):
          continue
        for ev in line.events:
          name = plane.event_metadata[ev.metadata_id].name
          if name in ("ExecutorState::Process", "ParallelFor"):
            continue
          name = re.sub(r"(mo_e|experts|router)(_\d+)*/", "", name)
          ops[name] += ev.duration_ps / 1e9 / out["steps"]           # ms per step
    out["ops"][key] = dict(ops)
    c.release()
    log(f"  profiled {key}: {sum(ops.values()):.1f} ms of op time per step")
  return out


def profile_table(prof, top=12) -> str:
  cands = tuple(prof["ops"])                    # (MoE, its floor, a third MoE), as profiled
  first, floor, third = cands
  by_type = {c: {} for c in cands}
  for c in cands:
    for name, ms in prof["ops"][c].items():
      kind = name.rsplit(":", 1)[-1]
      by_type[c][kind] = by_type[c].get(kind, 0.0) + ms
  a, b, e = (by_type[c] for c in cands)
  lines = [f"Op time by op type, ms per step, shape {prof['shape']} (inter-op parallelism 1)", "",
           f"| op type | {first} | {floor} | {first} - {floor} | {third} |",
           "|---|---:|---:|---:|---:|"]
  for k in sorted(set(a) | set(b) | set(e), key=lambda k: -max(a.get(k, 0), e.get(k, 0)))[:top]:
    lines.append(f"| {k} | {a.get(k, 0):.2f} | {b.get(k, 0):.2f} | "
                 f"{a.get(k, 0) - b.get(k, 0):+.2f} | {e.get(k, 0):.2f} |")
  total = {c: sum(prof["ops"][c].values()) for c in cands}
  lines.append(f"| **all ops** | {total[first]:.1f} | {total[floor]:.1f} | "
               f"{total[first] - total[floor]:+.1f} | {total[third]:.1f} |")
  for c in (first, third):
    ops = sorted(((ms, n) for n, ms in prof["ops"][c].items()
                  if "MatMul" not in n and "Einsum" not in n.split(":")[-1]), reverse=True)[:top]
    lines += ["", f"{c}: largest ops other than matmuls (ms per step)", ""]
    lines += [f"- {n}: {ms:.2f}" for ms, n in ops]
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Output


def _fmt_ratio(v):
  return "—" if v is None else f"{v:.3f}"


def table(report) -> str:
  m = report["machine"]
  out = [f"MoE layer benchmark: forward+backward, float32, tf.function; ratios = median over "
         f"{report['repeats']} interleaved rounds of (time / baseline time) in one process.",
         f"Machine: {m['nproc']} x {m['cpu_model']}; load average at start "
         f"{m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}; "
         f"TF {m['tensorflow']}, Keras {m['keras']}.", ""]
  for name, s in report["shape"].items():
    out.append(f"Shape {name}: E={s['E']} (D={s['D']}, e={s['e']}), M={s['M']}, I={s['I']}, "
               f"T={s['T']} (B={s['B']} x L={s['L']}), gamma={s['gamma']}")
  out.append("")
  for peer, st in report["peers"].items():
    out.append(f"Peer {peer}: " + (f"{st['version']} via {st['how']}" if st["available"]
                                   else f"NOT AVAILABLE — {st['reason']}"))
  out += ["", "| group | variant | shape | T | median ms | ratio | baseline | tokens/s | peak MiB |",
          "|---|---|---|---:|---:|---:|---|---:|---:|"]
  for r in report["results"]:
    peak = r.get("peak_bytes")
    out.append(f"| {r['name']} | {r['variant']} | {r['shape']} | {r['tokens']} | "
               f"{r['median_s'] * 1e3:.1f} | {r['ratio_to_baseline']:.3f} | {r['baseline']} | "
               f"{r['tokens_per_s']:.0f} | {'' if peak is None else f'{peak / 2**20:.0f}'} |")
  if report["scaling_fit"]:
    out.append("")
    for d, f in report["scaling_fit"].items():
      out.append(f"Scaling {d}: log-log slope of time ratio vs T = {f['slope']:.3f} over "
                 f"T={f['tokens']} (last doubling {f['slope_last_doubling']:.3f}; on absolute "
                 f"medians {f['slope_abs_medians']:.3f})")
  if report["skipped"]:
    out.append("")
    for s in report["skipped"]:
      out.append(f"Skipped {s['name']} {s['variant']} [{s['shape']}]: {s['reason']}")
  out += ["", "| target | measured | threshold | holds |", "|---|---:|---:|---|"]
  for t in report["targets"]:
    holds = ("yes" if t["holds"] else "NO") if t["evaluated"] else f"n/a ({t['note']})"
    out.append(f"| {t['name']} | {_fmt_ratio(t['measured'])} | {t['comparison']} "
               f"{t['threshold']} | {holds} |")
  return "\n".join(out)


def run_task(task: str, args, shapes, peers, log) -> dict:
  results, skipped, fit = [], [], {}
  if args.suite == "dropless":
    measure_dropless(task, shapes[task], args, results, skipped, log)
  elif task == "scaling":
    measure_scaling(args, results, skipped, fit, log)
  else:
    measure_shape(task, shapes[task], args, peers, results, skipped, log)
  return {"results": results, "skipped": skipped, "scaling_fit": fit}


def _child_argv(args, task: str) -> list[str]:
  argv = [f"--tokens={','.join(map(str, args.tokens))}",
          f"--scaling_tokens={','.join(map(str, args.scaling_tokens))}",
          f"--repeats={args.repeats}", f"--sections={','.join(args.sections)}", f"--task={task}",
          f"--suite={args.suite}"]
  return argv + [flag for flag, on in (("--smoke", args.smoke), ("--no_peers", args.no_peers),
                                       ("--no_worker", args.no_worker)) if on]


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  import tensorflow as tf
  tf.get_logger().setLevel("ERROR")  # one tf.function per candidate is the design, not a retrace
  if args.profile:
    tf.config.threading.set_inter_op_parallelism_threads(1)
    prof = profile(args, log)
    print(json.dumps(prof, indent=1) if args.format == "json" else profile_table(prof))
    return 0
  dropless = args.suite == "dropless"
  shapes = dropless_shapes(args) if dropless else shapes_for(args)
  peer_status, peers = (({}, {}) if dropless else
                        import_peers(not args.no_peers and "peers" in args.sections))
  if args.task == "alltoall":                       # one rank of the 2-rank run
    part = measure_alltoall(args, shapes[A2A_SHAPE], log)
    with open(f"{args.result}.rank{part['rank']}.json", "w") as f:
      json.dump(part, f)
    return 0
  if args.task:
    print(json.dumps(run_task(args.task, args, shapes, peers, log)))
    return 0
  machine = machine_info()
  isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.smoke)
  if dropless:
    tasks = [s for s in shapes if s != A2A_SHAPE] if {"balanced", "skewed", "groups"} & set(
        args.sections) else []
    tasks += ["alltoall"] if "alltoall" in args.sections else []
  else:
    tasks = list(shapes) + (["scaling"] if "scaling" in args.sections else [])
  report = {"schema_version": SCHEMA_VERSION, "tool": "tools/bench_moe.py", "argv": argv,
            "suite": args.suite, "smoke": args.smoke, "repeats": args.repeats,
            "isolated": isolate, "machine": machine, "shape": shapes, "peers": peer_status,
            "results": [], "skipped": [], "scaling_fit": {}, "targets": []}
  if dropless:
    report["alltoall"] = {}

  def evaluate():
    if dropless:
      return evaluate_dropless_targets(report["results"], shapes, args.sections)
    return evaluate_targets(report["results"], report["scaling_fit"], shapes, peer_status,
                            args.sections)

  for task in tasks:
    if task == "alltoall":
      part = run_alltoall(args, log)
    elif isolate:
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), *_child_argv(args, task)],
                            stdout=subprocess.PIPE, text=True)
      if proc.returncode != 0:
        report["skipped"].append({"name": task, "variant": "*", "shape": task,
                                  "reason": f"its process exited with status {proc.returncode}"})
        continue
      part = json.loads(proc.stdout)
    else:
      part = run_task(task, args, shapes, peers, log)
    report["results"] += part["results"]
    report["skipped"] += part["skipped"]
    report["scaling_fit"].update(part["scaling_fit"])
    if dropless:
      report["alltoall"].update(part.get("alltoall", {}))
    machine["loadavg_end"] = list(os.getloadavg())
    report["targets"] = evaluate()
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
  machine["loadavg_end"] = list(os.getloadavg())
  report["targets"] = evaluate()
  print(json.dumps(report, indent=1) if args.format == "json" else
        dropless_table(report) if dropless else table(report))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
