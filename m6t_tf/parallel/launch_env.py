"""What the launcher told this process, read from the environment before Horovod starts."""

from __future__ import annotations

import os

# horovodrun (Gloo) sets HOROVOD_SIZE; mpirun sets OMPI_COMM_WORLD_SIZE / PMI_SIZE.
_SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def world_size() -> int:
  for name in _SIZE_VARS:
    if os.environ.get(name):
      return int(os.environ[name])
  return 1
