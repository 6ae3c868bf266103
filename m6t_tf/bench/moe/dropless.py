"""Suite dropless: dropless experts against capacity and the bare matmuls, and outer groups.

Top-1 at the issue's shapes (E = 8, M = 512, I = 2048, one process, T = each --tokens). The
routing is fixed (`pinned_experts`): the router's kernel maps the first E input features to its
logits with a margin (`pin_router`), and the inputs carry the one-hot of each token's expert
there (`pinned_inputs`), so the argmax is the expert asked for and the gates are ≈ 1; the
router's matmul and its gradient stay in the step.

  balanced  token t to expert t mod E. dropless vs capacity 1.25 (target <= 0.90: it computes
            T rows instead of γ·T slots), vs the bare `Experts` on [E, T/E, M] (<= 1.10), and
            the bare expert matmuls on per-expert row blocks (`bare_rows`)
  skewed    60% of the tokens to expert 0, the rest evenly over the others: dropless vs the
            bare matmuls on the same per-expert rows (<= 1.15); capacity 1.25's dropped fraction
  groups    capacity 1.25 with O = 1, 2, 4, 8 outer groups, the model's own router (natural)
            and skewed: time ratio to O = 1, dropped fraction
  what-if   rows "experts' weights unstacked once": once a benchmark-only variant of the
            experts, which the layer adopted; they are now a second copy of the layer itself, a
            control of run-to-run noise (their ratios should match the dropless rows')
"""

from __future__ import annotations

import gc

import keras
import numpy as np
import tensorflow as tf

from m6t_tf.bench.moe import candidates
from m6t_tf.layers import experts as experts_lib
from m6t_tf.layers import moe as moe_lib

DROPLESS_SECTIONS = ("balanced", "skewed", "groups", "alltoall")
GROUPS = (1, 2, 4, 8)          # O, outer-batch groups
SKEW = 0.6                     # share of the tokens the skewed router sends to expert 0
# Targets of the dropless suite (time ratios, <=).
DROPLESS_TARGETS = {"vs_capacity": 0.90, "vs_bare": 1.10, "skewed_vs_bare": 1.15}
# Router logit of a token's pinned expert (the others get 0): decides the argmax whatever the
# rest of the input, and gives a gate of e^10 / (e^10 + E − 1) ≈ 1.
MARGIN = 10.0
GAMMA = candidates.GAMMA
# The alltoall section's run (`alltoall`): ranks, and its shape's name in the report.
A2A_RANKS = 2
A2A_SHAPE = f"{A2A_RANKS} ranks"
# A padded / variable step ratio within 1 ± this is not called faster or slower: at 2 ranks on
# a shared machine the same comparison moves by about that much between runs.
A2A_CLEAR = 0.05


def pinned_experts(num_tokens: int, num_experts: int, skew=None):
  """<int>[T] expert of each token, deterministic.

  skew=None: balanced, token t to expert t mod E (each expert exactly T/E tokens when E | T).
  skew=s: round(s·T) tokens, drawn by a fixed permutation, to expert 0; the others in turn to
  experts 1 … E-1 (the rest uniform).
  """
  if skew is None:
    return np.arange(num_tokens) % num_experts
  hot = round(skew * num_tokens)
  order = np.random.default_rng(0).permutation(num_tokens)
  out = np.empty(num_tokens, np.int64)
  out[order[:hot]] = 0
  out[order[hot:]] = 1 + np.arange(num_tokens - hot) % (num_experts - 1)
  return out


def pinned_inputs(x_shape, assign, num_experts: int):
  """() -> <float32>[B, L, M]: standard normal inputs (a `Candidate`'s own draw) whose first E
  features are the one-hot of each token's expert `assign` (tokens in [B, L] order)."""
  def make():
    b, l, m = x_shape
    if m < num_experts:
      raise ValueError(f"pinned routing needs M >= E (M={m}, E={num_experts})")
    x = tf.random.stateless_normal(x_shape, [1, 2])
    onehot = tf.reshape(tf.one_hot(assign, num_experts), [b, l, num_experts])
    return tf.concat([onehot, x[..., num_experts:]], axis=-1)
  return make


def pin_router(layer, margin: float = MARGIN) -> None:
  """Sets the built MoE's router kernel to margin · [I_E; 0]: its logits are margin times the
  inputs' first E features, i.e. margin · one-hot(expert) for `pinned_inputs`."""
  kernel = layer.router.kernel
  m, e = kernel.shape
  if m < e:
    raise ValueError(f"pinned routing needs M >= E (M={m}, E={e})")
  kernel.assign(np.eye(m, e, dtype=np.float32) * margin)


def moe(shape, *, mode="k", pinned=False, num_groups=1, communicator=None):
  """Our top-1 MoE (index dispatch, GeLU) at `shape`, seeded alike in every variant; `pinned`:
  routed by its inputs (`pin_router`, `pinned_inputs`)."""
  def make():
    keras.utils.set_random_seed(7)         # same router and experts in every variant
    layer = moe_lib.MoE(shape["E"], shape["I"], k=1, capacity_mode=mode,
                        capacity_factor=shape["gamma"], num_groups=num_groups,
                        communicator=communicator)
    layer.build((shape["B"], shape["L"], shape["M"]))
    if pinned:
      pin_router(layer)
    return layer, lambda l, x: l(x, training=True)
  return make


def bare_rows(shape, counts):
  """The bare expert FFN matmuls on per-expert row blocks of static sizes `counts` (no routing,
  no split or concat: each expert's rows are their own input). The stacked weights are
  unstacked once (`unstacked_rows`), so their gradient is one stack, not e dense slice
  gradients: what the layer's dropless path does too."""
  def make():
    layer = experts_lib.Experts(len(counts), shape["M"], shape["I"])
    layer.build(None)

    def call(l, xs):
      fn = unstacked_rows(l)
      return [fn(j, x, True) for j, x in enumerate(xs)]
    return layer, call
  return make


def unstacked_rows(experts):
  """(j, rows, training) -> expert j's FFN on its rows, the `Experts` layer's [e, M, I] /
  [e, I, M] weights unstacked once per call.

  Reading `w[j]` per expert would give each read a dense [e, M, I] StridedSliceGrad, the e of
  them summed by an AddN; `tf.unstack` has one stack as its gradient. (GeLU/ReLU experts, no
  dropout: what this benchmark builds.)
  """
  act = experts_lib.activation_fn(experts.activation)
  wi, wo = tf.unstack(experts.wi), tf.unstack(experts.wo)
  return lambda j, x, training: tf.matmul(act(tf.matmul(x, wi[j])), wo[j])


def stat(layer, name: str) -> float:
  """A routing statistic of the layer's last call (`MoE.stats`)."""
  return float(layer.stats[name].numpy())


def measure_dropless(shape_name, shape, args, results, skipped, log):
  """Balanced and skewed routing (dropless vs capacity 1.25 vs bare matmuls) and O groups, at
  one D = 1 shape; appends result rows and skips."""
  t, m, e_total, sections = shape["T"], shape["M"], shape["E"], args.sections
  x_shape = (shape["B"], shape["L"], m)
  cands, routed = {}, {}

  def add(key, make, input_shape=x_shape, assign=None):
    inputs = None if assign is None else pinned_inputs(x_shape, assign, e_total)
    cands[key] = candidates.Candidate(key, make, input_shape, t, inputs=inputs)

  assigns = {"balanced": pinned_experts(t, e_total), "skewed": pinned_experts(t, e_total, SKEW)}
  for r in ("balanced", "skewed"):
    if r not in sections:
      continue
    counts = np.bincount(assigns[r], minlength=e_total)
    add(f"{r}/dropless", moe(shape, mode="dropless", pinned=True), assign=assigns[r])
    # The what-if rows: a second copy of the same layer (module docstring).
    add(f"{r}/unstacked", moe(shape, mode="dropless", pinned=True), assign=assigns[r])
    add(f"{r}/capacity", moe(shape, pinned=True), assign=assigns[r])
    add(f"{r}/bare_rows", bare_rows(shape, counts), [(int(n), m) for n in counts])
    routed[r] = counts
    if r == "balanced" and t % e_total == 0:
      add("balanced/bare", candidates.floor(shape), (e_total, t // e_total, m))
  if "groups" in sections:
    for r, assign in (("natural", None), ("skewed", assigns["skewed"])):
      for o in GROUPS:
        if t % o:
          skipped.append({"name": "groups", "variant": f"O={o}", "shape": shape_name,
                          "reason": f"O={o} does not divide T={t}"})
          continue
        add(f"groups-{r}/O={o}", moe(shape, pinned=assign is not None, num_groups=o),
            assign=assign)
  log(f"[dropless {shape_name}] {len(cands)} candidates, {args.repeats} rounds")
  times = candidates.time_candidates(list(cands.values()), args.repeats, log)
  for key, c in cands.items():
    if key not in times:
      skipped.append({"name": "run", "variant": key, "shape": shape_name, "reason": c.error})
  ok = lambda *keys: all(k in times for k in keys)

  def stats(key):
    layer = cands[key].layer
    return {"dropped_fraction": stat(layer, "dropped_fraction"),
            "load_cv": stat(layer, "load_cv")}

  cap = lambda o=1: o * candidates.capacity(dict(shape, T=t // o))   # O·C slots per expert
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
          results.append(candidates.row(name, variant, shape_name, cands[key], times, base_key,
                                        rows[base][0], routing=r,
                                        tokens_per_expert=[int(n) for n in counts], **info))
  if "groups" in sections:
    for r in ("natural", "skewed"):
      base_key = f"groups-{r}/O=1"
      for o in GROUPS:
        key = f"groups-{r}/O={o}"
        if ok(key, base_key):
          results.append(candidates.row(
              f"groups-{r}", f"O={o} capacity {shape['gamma']} top1", shape_name, cands[key],
              times, base_key, f"O=1 capacity {shape['gamma']} top1", routing=r, num_groups=o,
              rows_computed=e_total * cap(o), **stats(key)))
  for c in cands.values():
    c.release()
  del cands
  gc.collect()


def dropless_shapes(args) -> dict:
  """The T=<n> shapes of --tokens (D = 1), and with the alltoall section its 2-rank shape."""
  issue = ({"E": 8, "D": 1, "M": 16, "I": 32, "gamma": GAMMA} if args.smoke else
           {"E": 8, "D": 1, "M": 512, "I": 2048, "gamma": GAMMA})
  shapes = {f"T={t}": dict(issue, T=t, B=1, L=t, e=issue["E"]) for t in args.tokens}
  if "alltoall" in args.sections:
    t = args.tokens[0]
    shapes[A2A_SHAPE] = dict(issue, D=A2A_RANKS, e=issue["E"] // A2A_RANKS, T=t, B=1, L=t)
  return shapes


def evaluate_dropless_targets(results, shapes, sections) -> list[dict]:
  """The dropless suite's targets (time ratios, <=), in the layer suite's form."""
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
    # The same targets for the what-if rows (a second copy of the layer: module docstring).
    for group, base, key in (("balanced", cap, "vs_capacity"), ("balanced", bare, "vs_bare"),
                             ("skewed", "bare expert matmuls, per-expert rows",
                              "skewed_vs_bare")):
      if group in sections:
        target(f"what-if unstacked expert weights: dropless vs {base}, {group} [{s}]",
               DROPLESS_TARGETS[key], by.get((f"dropless-{group}", whatif, s, base)),
               "time ratio; a second copy of the layer, whose experts read their weights once "
               "per call as this variant once did alone")
  return targets
