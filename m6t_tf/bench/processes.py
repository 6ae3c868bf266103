"""Child processes of the scripts: they import this same package, and run a few at a time."""

from __future__ import annotations

import os
import subprocess
import time

import m6t_tf

# The folder holding the `m6t_tf` this process imported (a checkout, or site-packages).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(m6t_tf.__file__)))


def child_env(**extra: str) -> dict:
  """This process's environment for a child Python, plus `extra`: PYTHONPATH starts with the
  folder of this process's `m6t_tf`, so a script run as a child (`python tools/x.py`, whose
  own folder is all Python puts on its path) imports the same package as its parent, whichever
  checkout or installation that is."""
  path = [PACKAGE_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  return dict(os.environ, PYTHONPATH=os.pathsep.join(path), **extra)


def run_processes(tasks: list, jobs: int, log, *, cwd: str, rel=lambda path: path) -> None:
  """Runs `tasks` ([(what, argv, log path)]) `jobs` at a time in `cwd`, each writing its output
  to its log; raises after all finished if any failed, naming their logs.

  Args:
    tasks: (description, argv, log file) of each process.
    jobs: processes at once.
    log: prints one progress line.
    cwd: the processes' working directory.
    rel: how a log path is written in the progress lines.

  Raises:
    RuntimeError: a process exited with a non-zero status.
  """
  env = child_env()
  pending, running, failed = list(tasks), [], []
  while pending or running:
    while pending and len(running) < jobs:
      what, argv, log_path = pending.pop(0)
      log(f"{what} in a process of its own; log {rel(log_path)}")
      out = open(log_path, "w")
      proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
      running.append((proc, what, out, log_path))
    time.sleep(1.0)
    for item in list(running):
      proc, what, out, log_path = item
      if proc.poll() is None:
        continue
      running.remove(item)
      out.close()
      if proc.returncode != 0:
        failed.append(f"{what} (exit {proc.returncode}; see {rel(log_path)})")
        log(f"FAILED: {failed[-1]}")
      else:
        log(f"done: {what}; {len(pending)} waiting, {len(running)} running")
  if failed:
    raise RuntimeError("failed: " + "; ".join(failed))
