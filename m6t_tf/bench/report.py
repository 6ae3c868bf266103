"""Output of the benchmark and experiment scripts: JSON files, markdown tables, number formats."""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional

from m6t_tf.bench import stats as stats_lib


def write_json(path: str, payload, *, indent: int = 1, sort_keys: bool = False,
               default=None) -> None:
  """Writes `payload` to `path` (parent folders made), replacing it whole: a reader never sees a
  half-written file, even while a long benchmark rewrites it after every task."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=indent, sort_keys=sort_keys, default=default)
  os.replace(tmp, path)


def emit(result: dict, *, format: str, table: Callable[[dict], str], out: Optional[str] = None,
         indent: int = 1, sort_keys: bool = False) -> None:
  """Writes the JSON report to `out` (if given) and prints it, or its table (`format`)."""
  if out:
    write_json(out, result, indent=indent, sort_keys=sort_keys)
  print(json.dumps(result, indent=indent, sort_keys=sort_keys) if format == "json"
        else table(result))


def markdown_table(header: list[str], rows: list[list], align: Optional[str] = None) -> str:
  """A GitHub markdown table; `align` is one letter per column, "l" or "r" (default: the first
  column left, the others right)."""
  align = align or "l" + "r" * (len(header) - 1)
  sep = ["---:" if a == "r" else "---" for a in align]
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def fmt(x, digits: int = 2, pct: bool = False) -> str:
  """`x` with `digits` decimals (as a percentage with `pct`); "—" for None or non-finite."""
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "—"
  return f"{100 * x:.{digits}f}%" if pct else f"{x:.{digits}f}"


def fmt_sd(st: dict, digits: int = 3, pct: bool = False) -> str:
  """"2.245 ± 0.012" (mean ± sample sd of a `stats.describe`), "2.245" with one value, "—"
  with none."""
  if not st or st.get("mean") is None:
    return "—"
  scale, unit = (100.0, "%") if pct else (1.0, "")
  mean = f"{scale * st['mean']:.{digits}f}"
  if st.get("sd") is None:
    return mean + unit
  return f"{mean} ± {scale * st['sd']:.{digits}f}{unit}"


def fmt_ci(st: dict, digits: int = 3) -> str:
  """"−0.047 [−0.080, −0.014]" (mean and 95% interval of a `stats.describe`), signed."""
  if not st or st.get("mean") is None:
    return "—"
  lo, hi = stats_lib.interval(st)
  mean = f"{st['mean']:+.{digits}f}"
  return mean if lo is None else f"{mean} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def si(x: float) -> str:
  """12,345,678 -> "12.35M" (k, M, G, T; no suffix below 1000)."""
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.2f}{unit}"
  return f"{x:.0f}"
