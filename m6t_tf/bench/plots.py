"""Plots of the experiments: matplotlib set up for files, seed bands, zoomed y-limits."""

from __future__ import annotations

import math
import statistics


def pyplot():
  """matplotlib.pyplot on the Agg backend (files, no display), with the experiments' style."""
  # matplotlib is optional (requirements-plots.txt): only the scripts that draw need it.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.grid": True,
                       "grid.alpha": 0.3, "legend.fontsize": 8})
  return plt


def band(ax, curves: list, color, ls="-", label=None, marker=None, alpha=0.18) -> tuple:
  """Mean of `curves` ([(xs, ys)], one per seed) over their common x, and a ±1 sd band (the
  min–max range with two seeds). Returns the mean curve (for `zoom_to_tail`)."""
  curves = [(list(x), list(y)) for x, y in curves if len(x)]
  if not curves:
    return [], []
  common_x = sorted(set(curves[0][0]).intersection(*[set(x) for x, _ in curves[1:]]))
  cols = [[dict(zip(x, y))[s] for x, y in curves] for s in common_x]
  mean = [sum(c) / len(c) for c in cols]
  ax.plot(common_x, mean, color=color, ls=ls, lw=1.4, label=label, marker=marker,
          ms=4 if marker else None)
  if len(curves) > 1:
    if len(curves) > 2:
      sd = [statistics.stdev(c) for c in cols]
      lo = [m - d for m, d in zip(mean, sd)]
      hi = [m + d for m, d in zip(mean, sd)]
    else:
      lo, hi = [min(c) for c in cols], [max(c) for c in cols]
    ax.fill_between(common_x, lo, hi, color=color, alpha=alpha, lw=0)
  return common_x, mean


def zoom_to_tail(ax, curves: list, skip_fraction: float = 0.15, pad: float = 0.05) -> None:
  """y-limits from the curves after their first `skip_fraction` of steps, so the differences
  late in training are visible instead of the initial drop from log(21128) ≈ 10."""
  lo, hi = math.inf, -math.inf
  for xs, ys in curves:
    if not xs:
      continue
    cut = xs[0] + (xs[-1] - xs[0]) * skip_fraction
    tail = [y for x, y in zip(xs, ys) if x >= cut and math.isfinite(y)] or ys
    lo, hi = min(lo, min(tail)), max(hi, max(tail))
  if math.isfinite(lo) and math.isfinite(hi):
    span = max(hi - lo, 1e-3)
    ax.set_ylim(lo - pad * span, hi + pad * span)
