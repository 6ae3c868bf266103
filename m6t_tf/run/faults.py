"""Fault injection for the failure tests: kills and stalls at chosen steps of a real run.

Set only by tests, through the environment (`M6T_FAULT_INJECT`), never in real runs.
"""

from __future__ import annotations

import os
import signal
import time

import tensorflow as tf

class FaultInjection:
  """Test hook: `M6T_FAULT_INJECT="kind:step[:rank]"`, comma-separated, never set in real runs.

  kinds: `kill_in_save` (SIGKILL after this worker wrote its checkpoint shard, before the merge
  that would publish it), `kill_before_prune` (SIGKILL after `latest` names the new checkpoint,
  before older ones are pruned), `kill_after_step` (SIGKILL after the step), `nan_weight` (set the
  first expert weight to NaN before the step, to exercise the non-finite path), `stall` (sleep
  `M6T_FAULT_STALL_SECONDS`, default 3600, before the step's collectives: a rank that stalls),
  and `stall_in:<phase>:step[:rank]`, the same sleep where a phase of that step waits on
  storage: `input` (reading the step's batch), `save` (after writing this worker's checkpoint
  shard), `restore` (before reading the checkpoint of that step), `eval` (the evaluation at that
  step), `captions` (writing the caption samples decoded at that step).
  """

  KINDS = ("kill_in_save", "kill_before_prune", "kill_after_step", "nan_weight", "stall")
  STALL_PHASES = ("input", "save", "restore", "eval", "captions")

  def __init__(self, spec: str):
    self.faults = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
      parts = item.split(":")
      if parts[0] == "stall_in" and len(parts) > 1 and parts[1] in self.STALL_PHASES:
        parts = [f"stall_in:{parts[1]}"] + parts[2:]
      elif parts[0] not in self.KINDS:
        parts = []
      if len(parts) not in (2, 3):
        raise ValueError(f"M6T_FAULT_INJECT item {item!r}: expected kind:step[:rank] (kinds "
                         f"{self.KINDS}) or stall_in:<phase>:step[:rank] (phases "
                         f"{self.STALL_PHASES})")
      self.faults.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None))
    self.rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))

  @classmethod
  def from_env(cls) -> "FaultInjection":
    return cls(os.environ.get("M6T_FAULT_INJECT", ""))

  def _due(self, kind: str, step: int) -> bool:
    return any(k == kind and s == step and r in (None, self.rank) for k, s, r in self.faults)

  def maybe_kill(self, kind: str, step: int) -> None:
    if self._due(kind, step):
      os.kill(os.getpid(), signal.SIGKILL)

  def maybe_stall(self, step: int) -> None:
    if self._due("stall", step):
      self._sleep(float(os.environ.get("M6T_FAULT_STALL_SECONDS", "3600")))

  def maybe_stall_in(self, phase: str, step: int) -> None:
    if self._due(f"stall_in:{phase}", step):
      self._sleep(float(os.environ.get("M6T_FAULT_STALL_SECONDS", "3600")))

  #: How a stall waits (tests may end it once the watchdog reported it).
  _sleep = staticmethod(time.sleep)

  def maybe_corrupt(self, step: int, model) -> None:
    if self._due("nan_weight", step):
      for layer in model.moe_layers:
        layer.experts.wi.assign(tf.fill(layer.experts.wi.shape, float("nan")))
        return
