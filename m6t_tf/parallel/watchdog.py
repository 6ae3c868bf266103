"""A stalled rank ends the job instead of hanging it.

A rank that is alive but stops calling collectives (stuck input I/O, a deadlock, a slow node)
hangs every other rank at the next all-to-all or allreduce, with nothing in the logs. Two
guards, each with a sane default:

  * `StallWatchdog`, ours: a thread per rank that knows where its own rank is. A rank that
    makes no progress for `limit_s` *outside* the collectives (fetching input, or hung before
    its step) names itself, the last completed step and the checkpoint a restart resumes from,
    and exits; the launcher (`horovodrun`, `mpirun`) then ends the other ranks. A rank waiting
    *inside* the step's collectives gives the stalled one `grace_s` more to report first, then
    says it waited and exits too.
  * Horovod's stall inspector (`STALL_ENV_DEFAULTS`, set before `hvd.init` unless the
    environment sets them): documented to log, after `HOROVOD_STALL_CHECK_TIME_SECONDS`, the
    ranks that did not submit a pending collective ("Missing ranks"), and to shut Horovod down
    after `HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`. It is set as a second line only: with Horovod
    0.28.1 over Gloo, 2 ranks, one sleeping before its all-to-all, it neither warned nor shut
    down within 300 s (check 10 s, shutdown 20 s, with and without the response cache). The
    watchdog is what ends such a job.

The trainer marks each step: `begin_step()` (LOCAL: fetching its batch), `enter(COLLECTIVES)`
(the step and its metrics), `step_done(step)`. The watchdog arms after the first completed step
of a run (whose first call traces and compiles), and sleeps between `step_done` and the next
`begin_step`, while the trainer saves or evaluates (legitimately long; Horovod's shutdown time
bounds those waits instead).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Optional

#: Horovod's stall inspector: warn (naming the missing ranks) after 60 s, shut down after 10 min
#: (far above any legitimate wait: it would bound checkpoints and evaluation too). A second line
#: only, see the module docstring; the watchdog's own limit covers the training steps.
STALL_ENV_DEFAULTS = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "60",
                      "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "600"}
#: Exit status of a rank that the watchdog ends.
EXIT_STALLED = 3

LOCAL = "local"              # this rank works alone (input pipeline, host code)
COLLECTIVES = "collectives"  # this rank may be waiting for the others (the step, its metrics)


def set_stall_env_defaults(environ=None) -> dict:
  """Sets `STALL_ENV_DEFAULTS` where `environ` (default `os.environ`) leaves them unset.

  Returns:
    The values in effect, by name.
  """
  environ = os.environ if environ is None else environ
  for name, value in STALL_ENV_DEFAULTS.items():
    environ.setdefault(name, value)
  return {name: environ[name] for name in STALL_ENV_DEFAULTS}


class StallWatchdog:
  """Ends this rank's process when its training stops making progress.

  Args:
    rank: this process's rank (named in the message).
    limit_s: seconds without progress after which a rank outside the collectives is stalled;
      0 turns the watchdog off (every method is then a cheap no-op).
    grace_s: extra seconds a rank waiting inside the collectives allows the stalled rank to
      report itself (default: min(30, limit_s / 2)).
    last_checkpoint: returns the checkpoint a restart resumes from (for the message).
    poll_s: how often the thread looks.
    on_stall: called with the message instead of printing it and `os._exit(EXIT_STALLED)`
      (tests).
  """

  def __init__(self, rank: int, limit_s: float, *, grace_s: Optional[float] = None,
               last_checkpoint: Callable[[], Optional[str]] = lambda: None,
               poll_s: float = 1.0, on_stall: Optional[Callable[[str], None]] = None):
    if not (isinstance(limit_s, (int, float)) and limit_s >= 0):
      raise ValueError(f"stall limit_s={limit_s!r} must be a number of seconds >= 0 (0 = off)")
    self.rank = rank
    self.limit_s = float(limit_s)
    self.grace_s = min(30.0, self.limit_s / 2) if grace_s is None else float(grace_s)
    self.last_checkpoint = last_checkpoint
    self.poll_s = poll_s
    self.on_stall = on_stall or self._exit
    self._lock = threading.Lock()
    self._since = time.monotonic()
    self._where = LOCAL
    self._done = None        # last completed step; None until the first one (not armed)
    self._active = False     # between begin_step and step_done
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="m6t-stall-watchdog", daemon=True)

  # -- what the trainer tells it ------------------------------------------------------------

  def start(self) -> "StallWatchdog":
    if self.limit_s > 0:
      self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join()

  def begin_step(self) -> None:
    """A step begins: this rank works alone (its input) until `enter(COLLECTIVES)`."""
    with self._lock:
      self._active, self._where, self._since = True, LOCAL, time.monotonic()

  def enter(self, where: str) -> None:
    """This rank now runs `where` (LOCAL or COLLECTIVES); the clock restarts."""
    if where not in (LOCAL, COLLECTIVES):
      raise ValueError(f"where={where!r}; allowed: {LOCAL!r}, {COLLECTIVES!r}")
    with self._lock:
      self._where, self._since = where, time.monotonic()

  def step_done(self, step: int) -> None:
    """Step `step` completed on this rank: arms the watchdog, which then sleeps (checkpoints,
    evaluation) until the next `begin_step`."""
    with self._lock:
      self._done, self._active = step, False

  # -- the thread ---------------------------------------------------------------------------

  def check(self, now: Optional[float] = None) -> Optional[str]:
    """The stall message if this rank is past its limit now, else None."""
    now = time.monotonic() if now is None else now
    with self._lock:
      if not self._active or self._done is None:
        return None
      waited, where, done = now - self._since, self._where, self._done
    if where == LOCAL and waited > self.limit_s:
      return (f"rank {self.rank} stalled: no progress for {waited:.0f} s (limit {self.limit_s:g} "
              f"s) outside the collectives (input pipeline or host code) after completing step "
              f"{done}; ending the job so that the other ranks do not hang. Last checkpoint: "
              f"{self.last_checkpoint() or 'none'} (a restart resumes from it).")
    if where == COLLECTIVES and waited > self.limit_s + self.grace_s:
      return (f"rank {self.rank} waited {waited:.0f} s in the collectives of step {done + 1} "
              f"(last completed step {done}): another rank stopped calling them (its own "
              f"message names it, unless it hung where Python cannot run); ending the job. Last "
              f"checkpoint: {self.last_checkpoint() or 'none'} (a restart resumes from it).")
    return None

  def _run(self) -> None:
    while not self._stop.wait(self.poll_s):
      message = self.check()
      if message:
        self.on_stall(message)
        return

  @staticmethod
  def _exit(message: str) -> None:
    print(f"ERROR: {message}", file=sys.stderr, flush=True)
    # os._exit: the main thread is blocked (in a collective, or hung); no clean-up can run.
    os._exit(EXIT_STALLED)
