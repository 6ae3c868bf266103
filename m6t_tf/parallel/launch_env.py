"""What the launcher told this process, read from the environment before Horovod starts."""

from __future__ import annotations

import os
from typing import Mapping, Optional

#: Set to the number of processes by horovodrun (Gloo), Open MPI, MPICH and PMIx launchers.
WORLD_SIZE_ENV = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
#: This process's rank among the processes of its node: horovodrun, Open MPI, MPICH (Hydra).
LOCAL_RANK_ENV = ("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
#: The number of processes on this node, from the same launchers.
LOCAL_SIZE_ENV = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def _first_int(names, environ: Optional[Mapping[str, str]]) -> Optional[int]:
  environ = os.environ if environ is None else environ
  for name in names:
    value = environ.get(name)
    if value and value.isdigit():
      return int(value)
  return None


def world_size_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
  """Number of processes the launcher started, or None when no launcher said so."""
  return _first_int(WORLD_SIZE_ENV, environ)


def world_size(environ: Optional[Mapping[str, str]] = None) -> int:
  """`world_size_from_env()`, 1 for a process started without a launcher."""
  return world_size_from_env(environ) or 1


def local_rank_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
  """This process's rank on its node, or None when the launcher did not say."""
  return _first_int(LOCAL_RANK_ENV, environ)


def local_size_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
  """The number of processes on this node, or None when the launcher did not say."""
  return _first_int(LOCAL_SIZE_ENV, environ)
