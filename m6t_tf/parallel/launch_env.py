"""What the launcher told this process, read from the environment before Horovod starts."""

from __future__ import annotations

import os
from typing import Optional

#: Set to the number of processes by horovodrun (Gloo), Open MPI, MPICH and PMIx launchers.
WORLD_SIZE_ENV = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def world_size_from_env() -> Optional[int]:
  """Number of processes the launcher started, or None when no launcher said so."""
  for name in WORLD_SIZE_ENV:
    value = os.environ.get(name)
    if value and value.isdigit():
      return int(value)
  return None


def world_size() -> int:
  """`world_size_from_env()`, 1 for a process started without a launcher."""
  return world_size_from_env() or 1
