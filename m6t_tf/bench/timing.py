"""Timing on a shared machine: interleaved rounds, ratios paired by round, the machine's load.

No absolute time measured here is a claim: other jobs share the cores. What holds is a ratio
measured in one process, with the candidates interleaved (round r runs every candidate once,
in an order rotated every round) so that a change of load falls on all of them alike, and
each ratio taken per round before the median (`paired_ratio`).
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Callable, Optional, Sequence, TypeVar

import keras
import tensorflow as tf

T = TypeVar("T")


def machine_info() -> dict:
  """nproc, CPU model, 1/5/15-min load at call time, and Python/TF/Keras versions."""
  cpu = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"nproc": os.cpu_count(), "cpu_model": cpu, "loadavg_start": list(os.getloadavg()),
          "python": sys.version.split()[0], "tensorflow": tf.__version__,
          "keras": keras.__version__}


def rotation(items: Sequence[T], round_index: int) -> list[T]:
  """The order of round `round_index`: `items` rotated left by round_index mod len(items)."""
  shift = round_index % max(len(items), 1)
  return list(items[shift:]) + list(items[:shift])


def interleaved(candidates: Sequence[T], rounds: int, run: Callable[[T], float], *,
                warmup: int = 0, after_round: Optional[Callable[[int], None]] = None,
                on_error: Optional[Callable[[T, int, Exception], None]] = None
                ) -> list[list[float]]:
  """Times `run(c)` of every candidate once per round, `rounds` rounds, order rotated.

  Args:
    candidates: what to time; `run(c)` runs one step of `c` and returns its seconds.
    rounds: timed rounds.
    warmup: untimed calls of each candidate first, one candidate after the other (tracing).
    after_round: called with the number of rounds done, after each round (progress lines).
    on_error: if given, an exception of `run(c)` in a timed round is handed to it with the
      round's index, and `c` is not run again (its list stays short); if not, it propagates.

  Returns:
    The seconds of each candidate's rounds, in the order of `candidates`.
  """
  for c in candidates:
    for _ in range(warmup):
      run(c)
  times: list[list[float]] = [[] for _ in candidates]
  failed: set[int] = set()
  order = list(range(len(candidates)))
  for r in range(rounds):
    for i in rotation(order, r):
      if i in failed:
        continue
      try:
        times[i].append(run(candidates[i]))
      except Exception as e:  # pylint: disable=broad-except
        if on_error is None:
          raise
        failed.add(i)
        on_error(candidates[i], r, e)
    if after_round is not None:
      after_round(r + 1)
  return times


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> float:
  """Median over rounds of time / the baseline's time in the same round."""
  return statistics.median(a / b for a, b in zip(times, base))
