"""What the tests that start real worker processes share: their environment, and watching a
job that must end by itself."""

import os
import signal
import subprocess
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env(*, drop=("M6T_FAULT_INJECT",), **extra) -> dict:
  """The test process's environment for a worker job: quiet TensorFlow, one thread per op, the
  checkout on the path, no GPU; `drop` removes variables a test must not inherit."""
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env.update(TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1", PYTHONPATH=REPO,
             CUDA_VISIBLE_DEVICES="", **extra)
  return env


def start_job(args, **extra_env) -> subprocess.Popen:
  """Starts `args` in its own session (so `watch` can kill the whole job), output merged."""
  return subprocess.Popen(args, cwd=REPO, env=worker_env(**extra_env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)


def watch(proc: subprocess.Popen, marker: str, *, guard_s: float = 240):
  """Reads the job's output as it comes until it ends; a job still running after `guard_s`
  is killed (its return code is then -SIGKILL: it did not end by itself).

  Returns:
    (output, time the last line containing `marker` was read or None, time the job ended).
  """
  hang_guard = threading.Timer(guard_s, lambda: os.killpg(proc.pid, signal.SIGKILL))
  hang_guard.start()
  lines, marker_at = [], None
  try:
    for line in proc.stdout:
      lines.append(line)
      if marker in line:
        marker_at = time.time()
    proc.wait(timeout=30)
    ended_at = time.time()
  finally:
    hang_guard.cancel()
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  return "".join(lines), marker_at, ended_at
