"""Scaling: forward+backward time and peak memory of top-1 against T, both dispatches.

At the D = 1 shape of the layer suite (E = 8, M = 512, I = 2048), T = each --scaling_tokens
value. The log-log slope of time against T is fitted on the interleaved per-round ratios to the
smallest T (a change of load during the run does not bend it), and on absolute medians as a
second view.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics

import tensorflow as tf

from m6t_tf.bench import stats
from m6t_tf.bench.moe import candidates
from m6t_tf.bench.moe import routing


def measure_scaling(args, results, skipped, fit, log):
  """Times the scaling candidates; appends result rows and skips, and fills `fit`."""
  base = routing.shapes_for(
      argparse.Namespace(smoke=args.smoke, no_worker=True, tokens=[1]))["T=1"]
  cands, info = {}, {}
  for t in args.scaling_tokens:
    shape = dict(base, T=t, L=t)
    c = candidates.capacity(shape)
    for d in ("index", "einsum"):
      tec = t * shape["E"] * c * 4
      if d == "einsum" and tec > routing.EINSUM_TEC_LIMIT_BYTES:
        skipped.append({"name": "scaling", "variant": d, "shape": f"T={t}",
                        "reason": f"one [T, E, C] float32 tensor would take {tec / 2**30:.1f} GiB"})
        continue
      key = f"{d}/T={t}"
      cands[key] = candidates.Candidate(key, candidates.ours(shape, dispatch=d),
                                        (1, t, shape["M"]), t)
      hidden = shape["E"] * c * shape["I"] * 4
      largest = (("[T, E, C] float32 (one-hot dispatch/combine)", tec) if d == "einsum" and
                 tec > hidden else ("[E, C, I] float32 (expert hidden)", hidden))
      info[key] = (d, t, largest)
  log(f"[scaling] {len(cands)} candidates, {args.repeats} rounds")
  times = candidates.time_candidates(list(cands.values()), args.repeats, log)
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
      results.append(candidates.row(
          "scaling", f"top1 {d}", f"T={t}", cands[key], times, base_key,
          f"top1 {d} T={info[base_key][1]}", dispatch=d, peak_bytes=peaks.get(key),
          largest_intermediate=what, largest_intermediate_bytes=size))
    if len(keys) >= 2:
      # Fitted on the interleaved per-round ratios to the smallest T (not on absolute medians),
      # so that a change of the machine's load during the run does not bend the line.
      xs = [math.log(info[k][1]) for k in keys]
      ys = [math.log(candidates.ratio(times, k, base_key)) for k in keys]
      last = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
      # The same fit on absolute medians: a second view (a load change biases it differently).
      ya = [math.log(statistics.median(times[k])) for k in keys]
      fit[d] = {"slope": stats.slope(xs, ys)["slope"], "slope_last_doubling": last,
                "slope_abs_medians": stats.slope(xs, ya)["slope"],
                "tokens": [info[k][1] for k in keys]}
  for c in cands.values():
    c.release()
  gc.collect()
