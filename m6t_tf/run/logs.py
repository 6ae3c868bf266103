"""What a run writes as it goes: per-step logs, the console progress line, TensorBoard scalars.

`losses.jsonl` (chief) and `data_keys/rank<R>.jsonl` (`train.log_data_keys`) get one line per
step, buffered on remote storage (`StepLog`); `read_loss_log` reads a log back the way a run
that was never interrupted would have written it.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from m6t_tf import storage

class _StepLog:
  """Lines appended to `path` once per step, buffered on remote storage.

  An append to an object store rewrites the whole object (quadratic bytes over a run, and a
  blocking write every step), so on a remote path (`storage.is_local` false) lines wait for
  `flush()`, which the trainer calls at logging cadence, before every checkpoint save and at
  the end. A run killed between two flushes loses only lines of steps after its last
  checkpoint, which the resumed run trains and logs again. A local append is cheap and
  survives a kill, so a local path gets each line at once.
  """

  def __init__(self, path: str, *, buffered: Optional[bool] = None):
    self.path = path
    self.buffered = not storage.is_local(path) if buffered is None else buffered
    self._lines = []

  def _append(self, line: str) -> None:
    if self.buffered:
      self._lines.append(line)
    else:
      storage.append_text(self.path, line)

  def flush(self) -> None:
    """Writes the buffered lines, in one append."""
    if self._lines:
      storage.append_text(self.path, "".join(self._lines))
      self._lines = []


class LossLog(_StepLog):
  """Appends `{"step", "loss"}` lines to `losses.jsonl`; a restarted run appends again.

  The last line of a step wins, so the log of a run killed and resumed reads like the log of a
  run that was never interrupted (`read_loss_log`). Buffered on remote storage (`_StepLog`).
  """

  def write(self, step: int, loss: float) -> None:
    self._append(json.dumps({"step": step, "loss": loss}) + "\n")


class DataKeyLog(_StepLog):
  """Appends `{"step", "keys"}` lines to `data_keys/rank<R>.jsonl`: the records each step of
  this worker trained on (`train.log_data_keys`), to audit sharding and resumption. Buffered
  on remote storage (`_StepLog`)."""

  def __init__(self, model_dir: str, rank: int, *, buffered: Optional[bool] = None):
    folder = os.path.join(model_dir, "data_keys")
    storage.makedirs(folder)
    super().__init__(os.path.join(folder, f"rank{rank}.jsonl"), buffered=buffered)

  def write(self, step: int, keys) -> None:
    self._append(json.dumps({"step": step, "keys": [k.decode("utf-8") for k in keys]}) + "\n")


def read_loss_log(path: str) -> dict:
  """{step: loss} from `losses.jsonl`, later lines overriding earlier ones; a torn last line
  (the process was killed while writing it) is ignored."""
  out = {}
  if not storage.exists(path):
    return out
  with tf.io.gfile.GFile(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      out[int(row["step"])] = float(row["loss"])
  return out


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """One console line per `every` steps: step, loss, perplexity, lr, tokens/s, ETA."""

  def __init__(self, total: int, start: int, every: int, enabled: bool):
    self.total, self.every, self.enabled = total, every, enabled
    self.t0 = time.time()
    self.start = start

  def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
    if not self.enabled or (step % self.every and step != self.total):
      return
    done = step - self.start
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else 0.0
    bar_len = 20
    filled = int(bar_len * step / max(self.total, 1))
    line = (f"[{'#' * filled}{'.' * (bar_len - filled)}] step {step}/{self.total} | "
            f"loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.1f} | lr {lr:.2e} | "
            f"{tokens_per_s:,.0f} tok/s | ETA {format_duration(eta)}")
    print(line, flush=True)


def write_json(path: str, payload: dict) -> None:
  """Atomic JSON write (`storage.write_whole`): a crash never leaves half a file."""
  storage.write_whole(path, json.dumps(payload, indent=2, sort_keys=True))


def summary_scalars(writer, step: int, scalars: dict) -> None:
  if writer is None:
    return
  with writer.as_default(step=step):
    for k, v in scalars.items():
      tf.summary.scalar(k, v)


def numpy_metrics(metrics: dict) -> dict:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}
