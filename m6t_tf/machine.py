"""The context any timing needs: cores, CPU model, load and library versions."""

from __future__ import annotations

import os
import sys


def machine_info() -> dict:
  """nproc, CPU model, 1/5/15-min load at call time, and Python/TF/Keras versions."""
  import keras
  import tensorflow as tf
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
