"""The layer suite at one shape: routing variants × capacity, dispatch, floor, dense, peers.

Shapes (dimension letters of the MoE layer's docstring, arXiv 2105.15082 appendix A.3):
  * "worker": one worker of the paper's base model (E = 32 experts over D = 8 workers, so e = 4
    local experts; M = 1024, I = 4096, γ = 1.25) with T = 4096 tokens. The all-to-all is a
    loopback (identity): the worker computes exactly its real [D, e, C, M] share.
  * "T=<n>" for each --tokens value: one process holding all experts (D = 1): E = 8, M = 512,
    I = 2048, γ = 1.25.
Every candidate of a shape is timed in the same interleaved rounds (`candidates`).
"""

from __future__ import annotations

import gc

from m6t_tf.bench.moe import candidates
from m6t_tf.bench.moe import peers
from m6t_tf.layers import experts as experts_lib

ROUTINGS = (  # (variant name, MoE routing, k); the paper's Tables 1–2 rows
    ("top1", "top_k", 1), ("top2", "top_k", 2), ("top4", "top_k", 4),
    ("2xtop1", "prototype", 2), ("4xtop1", "prototype", 4))
CAPACITY_MODES = ("k", "1")
SECTIONS = ("routing", "dispatch", "floor", "dense", "peers", "scaling")
# einsum dispatch is skipped when one [T, E, C] float32 tensor would exceed this (it makes several).
EINSUM_TEC_LIMIT_BYTES = 2 << 30
GAMMA = candidates.GAMMA


def shapes_for(args) -> dict:
  """{shape name: {E, D, e, M, I, T, B, L, gamma}} of the layer suite (module docstring)."""
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


def dense_ffn(shape, k):
  """A dense FFN of intermediate k·I over all T tokens: one `Experts` expert on [1, T, M].

  The same function as `m6t_tf.layers.feedforward.FeedForward` (no biases, tanh-GeLU), built
  from the expert layer so that dense and MoE run the same matmul kernels. (`FeedForward` once
  used `tf.einsum("...M,MI->...I")`, whose weight gradient TF materialises as [T, M, I]:
  8 GiB and ResourceExhaustedError at T = 2048, M = 512, I = 2048.)
  """
  def make():
    layer = experts_lib.Experts(1, shape["M"], k * shape["I"])
    return layer, lambda l, x: l(x, training=True)
  return make


def measure_shape(shape_name, shape, args, peer_modules, results, skipped, log):
  """Times every candidate of one shape interleaved; appends result rows and skips.

  Args:
    shape_name: its name in the report ("worker", "T=2048", ...).
    shape: its dimensions (`shapes_for`).
    args: the command line's options (sections, repeats).
    peer_modules: {peer: module} of the peers that imported (`peers.import_peers`).
    results: result rows are appended here.
    skipped: {name, variant, shape, reason} of what did not run is appended here.
    log: prints one progress line.
  """
  t, m, sections = shape["T"], shape["M"], args.sections
  x_shape = (shape["B"], shape["L"], m)
  cands = {}

  def add(key, make, input_shape=x_shape):
    cands[key] = candidates.Candidate(key, make, input_shape, t)

  if "routing" in sections:
    for variant, routing, k in ROUTINGS:
      for mode in CAPACITY_MODES:
        add(f"{variant}/cap{mode}", candidates.ours(shape, routing=routing, k=k, mode=mode))
  add("top1/capk", candidates.ours(shape))
  if "dispatch" in sections or "floor" in sections:
    for k in (1, 2) if "dispatch" in sections else (1,):
      tec = t * shape["E"] * candidates.capacity(shape, k) * 4
      if tec > EINSUM_TEC_LIMIT_BYTES:
        skipped.append({"name": "dispatch", "variant": f"top{k}/einsum", "shape": shape_name,
                        "reason": f"one [T, E, C] float32 tensor would take {tec / 2**30:.1f} GiB"})
        continue
      add(f"top{k}/capk/einsum", candidates.ours(shape, k=k, dispatch="einsum"))
      if k == 2:
        add("top2/capk", candidates.ours(shape, k=2))
  if "floor" in sections:
    c = candidates.capacity(shape)
    add("floor", candidates.floor(shape), (shape["E"] // shape["D"], shape["D"] * c, m))
  if "dense" in sections:
    for k in (1, 2, 4):
      add(f"dense{k}", dense_ffn(shape, k), (1, t, m))
      add(f"top{k}/capk", candidates.ours(shape, k=k))
  peer_rows = []
  if "peers" in sections and shape["D"] == 1:
    for k in (1, 2):
      add(f"top{k}/capk", candidates.ours(shape, k=k))
      if "model_garden" in peer_modules:
        add(f"model_garden{k}", peers.model_garden(peer_modules["model_garden"], shape, k))
        peer_rows.append(("model_garden", k, f"top{k}/capk", "ours, GeLU"))
      if "keras_hub" in peer_modules:
        add(f"top{k}/capk/swiglu", candidates.ours(shape, k=k, activation="swiglu"))
        add(f"keras_hub{k}", peers.keras_hub(peer_modules["keras_hub"], shape, k))
        peer_rows.append(("keras_hub", k, f"top{k}/capk/swiglu", "ours, SwiGLU"))
  elif "peers" in sections:
    skipped.append({"name": "peer", "variant": "*", "shape": shape_name,
                    "reason": "peers hold all experts on one device; compared at the D = 1 shapes"})

  log(f"[{shape_name}] {len(cands)} candidates, {args.repeats} rounds")
  times = candidates.time_candidates(list(cands.values()), args.repeats, log)
  for key, c in cands.items():
    if key not in times:
      skipped.append({"name": "peer" if key.startswith(("model_garden", "keras_hub")) else "run",
                      "variant": key, "shape": shape_name, "reason": c.error})
  ok = lambda *keys: all(k in times for k in keys)
  row = candidates.row

  if "routing" in sections:
    for variant, routing, k in ROUTINGS:
      for mode in CAPACITY_MODES:
        key = f"{variant}/cap{mode}"
        if ok(key, "top1/capk"):
          results.append(row("routing", f"{variant} capacity {mode}x", shape_name, cands[key],
                             times, "top1/capk", "top1 capacity kx (index)",
                             routing=routing, k=k, capacity_mode=mode, dispatch="index"))
  if "dispatch" in sections:
    for k in (1, 2):
      for d in ("index", "einsum"):
        key = f"top{k}/capk" + ("/einsum" if d == "einsum" else "")
        if ok(key, f"top{k}/capk"):
          results.append(row("dispatch", f"top{k} {d}", shape_name, cands[key], times,
                             f"top{k}/capk", f"top{k} index", k=k, dispatch=d))
  if "floor" in sections:
    for key, variant in (("floor", "Experts alone [e, D*C, M]"), ("top1/capk", "MoE top1 index"),
                         ("top1/capk/einsum", "MoE top1 einsum")):
      if ok(key, "floor"):
        results.append(row("floor", variant, shape_name, cands[key], times, "floor",
                           "Experts alone"))
  if "dense" in sections:
    for k in (1, 2, 4):
      for key, variant in ((f"dense{k}", f"dense FFN I'={k}*I"), (f"top{k}/capk", f"MoE top{k}")):
        if ok(key, f"dense{k}"):
          results.append(row("dense", variant, shape_name, cands[key], times, f"dense{k}",
                             f"dense FFN I'={k}*I", k=k))
  for peer, k, ours, label in peer_rows:
    for key, variant in ((f"{peer}{k}", f"{peer} k={k}"), (ours, f"{label} k={k}")):
      if ok(key, ours):
        results.append(row("peer", variant, shape_name, cands[key], times, ours,
                           f"{label} top{k} index", k=k, peer=peer))
  for c in cands.values():
    c.release()
  del cands
  gc.collect()


def evaluate_targets(results, fit, shapes, peer_status, sections) -> list[dict]:
  """The layer suite's targets: [{name, threshold, comparison, measured, evaluated, holds,
  note}]; one that could not be measured has evaluated=False and holds=False."""
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
      if shape["T"] in peers.MG_TARGETS:
        target(f"tokens/s vs Model Garden MoeLayer, k=1 [{s}]", ">=",
               peers.MG_TARGETS[shape["T"]],
               by.get(("peer", "model_garden k=1", s)),
               "MG time / ours (GeLU, top1, same E*C slots)",
               mg.get("reason") or "Model Garden did not run (see skipped)")
      kh = peer_status.get("keras_hub", {})
      for k in (1, 2):
        bound = shape["E"] / (k * shape["gamma"])
        target(f"tokens/s vs Keras-Hub MixtralSparseMoeBlock, k={k} [{s}]", ">=",
               peers.KH_TARGET,
               by.get(("peer", f"keras_hub k={k}", s)),
               f"KH time / ours (SwiGLU); FLOP bound E/(k*gamma) = {bound:.1f}x",
               kh.get("reason") or "Keras-Hub did not run (see skipped)")
  if "scaling" in sections:
    f = fit.get("index")
    target("index dispatch time linear in T (log-log slope of time ratio vs T)", "<=", 1.10,
           f["slope"] if f else None,
           f"least squares over T={f['tokens']}" if f else "", "fewer than 2 scaling points")
  return targets
