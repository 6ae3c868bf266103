"""Statistics over seeds and runs: mean, sample sd, Student-t intervals, paired differences,
least-squares slopes, running means. Pure Python, no TensorFlow."""

from __future__ import annotations

import math
import statistics
from typing import Optional

# Two-sided 95% quantiles of Student's t by degrees of freedom (n − 1 for n = 2 … 10 values).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262}


def describe(values) -> dict:
  """n, mean, sample sd and the 95% t-interval half-width of `values` (None where undefined:
  sd and interval need two values; the t table goes to 10). None and non-finite values are
  left out."""
  vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  n = len(vals)
  if not n:
    return {"n": 0, "mean": None, "sd": None, "ci95": None, "values": []}
  mean = sum(vals) / n
  sd = statistics.stdev(vals) if n > 1 else None
  half = T95[n - 1] * sd / math.sqrt(n) if n > 1 and n - 1 in T95 else None
  return {"n": n, "mean": mean, "sd": sd, "ci95": half, "values": vals}


def interval(st: dict) -> tuple:
  """(low, high) of a `describe` result's 95% interval; (None, None) when it has none."""
  if st.get("ci95") is None or st.get("mean") is None:
    return None, None
  return st["mean"] - st["ci95"], st["mean"] + st["ci95"]


def paired(a: dict, b: dict) -> dict:
  """`describe` of a[seed] − b[seed] over the seeds both have, and a verdict: "lower" /
  "higher" when the 95% interval excludes 0, else "tie". Pairing by seed removes what the
  seed does to both arms alike (data order, initial embedding), so the interval is that of
  the difference itself, not of two noisy means."""
  seeds = sorted(set(a) & set(b))
  out = describe([a[s] - b[s] for s in seeds])
  out["seeds"] = seeds
  lo, hi = interval(out)
  out["verdict"] = ("lower" if hi is not None and hi < 0 else
                    "higher" if lo is not None and lo > 0 else "tie")
  return out


def slope(xs: list, ys: list) -> dict:
  """Least-squares slope of ys on xs with its 95% t-interval (n − 2 degrees of freedom).

  Returns:
    {"n", "slope", "intercept", "ci95"}; ci95 is None below 3 points or past the t table.

  Raises:
    ValueError: every x is the same (no slope exists).
  """
  n = len(xs)
  mx, my = sum(xs) / n, sum(ys) / n
  sxx = sum((x - mx) ** 2 for x in xs)
  if sxx == 0:
    raise ValueError(f"slope: every x is {xs[0]}; the points must differ in x")
  b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
  a = my - b * mx
  out = {"n": n, "slope": b, "intercept": a, "ci95": None}
  if n > 2 and n - 2 in T95:
    resid = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / (n - 2)
    out["ci95"] = T95[n - 2] * math.sqrt(resid / sxx)
  return out


def smooth(values: list, window: int) -> list:
  """Trailing running mean over `window` points (the first points average what exists)."""
  out, acc = [], 0.0
  for i, v in enumerate(values):
    acc += v
    if i >= window:
      acc -= values[i - window]
    out.append(acc / min(i + 1, window))
  return out


def mean_or_none(values) -> Optional[float]:
  """Mean of `values`, None if there are none or any is None."""
  values = list(values)
  return sum(values) / len(values) if values and None not in values else None
