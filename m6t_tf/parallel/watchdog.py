"""A stalled rank ends the job instead of hanging it; a hung filesystem ends the run.

A rank that is alive but stops making progress hangs every other rank at their next all-to-all,
allreduce or barrier, with nothing in the logs; a process reading from, or writing to, a hung
filesystem (NFS, an object store, an input pipeline spinning without output) hangs on its own.
Two guards, each with a sane default:

  * `StallWatchdog`, ours: a thread per process that knows which *phase* its process is in and
    what that phase may wait on. When a phase makes no progress for its limit, it prints one
    line naming the rank, the phase, the last completed step and the checkpoint a restart
    resumes from, and exits (`EXIT_STALLED`); under a launcher (`horovodrun`, `mpirun`) the
    launcher then ends the other ranks.
  * Horovod's stall inspector (`STALL_ENV_DEFAULTS`, set before `hvd.init` unless the
    environment sets them): documented to log, after `HOROVOD_STALL_CHECK_TIME_SECONDS`, the
    ranks that did not submit a pending collective ("Missing ranks"), and to shut Horovod down
    after `HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`. It is set as a second line only: with Horovod
    0.28.1 over Gloo, 2 ranks, one sleeping before its all-to-all, it neither warned nor shut
    down within 300 s (check 10 s, shutdown 20 s, with and without the response cache). The
    watchdog is what ends such a job.

What a phase may wait on (its kind) decides its limit:

  * `STORAGE`: reading or writing files (the input records, checkpoints, logs). Limited in
    every run, one process included: `limit_s`, plus, for a phase that moves many bytes (a
    checkpoint), the time to move them at `STORAGE_FLOOR_BYTES_PER_S` (`allowance_for_bytes`).
  * `LOCAL`: host code outside the collectives. Limited under several ranks only (one process
    that is merely slow hangs nobody).
  * `COLLECTIVES`: the rank may be waiting for the others (a step, its metrics, a barrier, the
    decoding lockstep). Limited under several ranks only, with `grace_s` more, so that the
    stalled rank reports itself first.
  * Between phases (idle) nothing is limited: tracing and compiling a step, building the model
    (local computation whose length grows with the model, and which cannot wait on anything).

The trainer names its phases ("step 5", "checkpoint save at step 4", "checkpoint restore of
ckpt-3", "evaluation at step 4", "caption decoding at step 4", "start-up"), marks progress
inside the long ones (each evaluation batch), and switches kinds inside a phase where its
waits change (a checkpoint save writes its shard, then waits at a barrier). The watchdog
itself touches no file: a hung filesystem cannot stop it from reporting.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from typing import Callable, Iterator, Optional

#: Horovod's stall inspector: warn (naming the missing ranks) after 60 s, shut down after 10 min
#: (far above any legitimate wait: it would bound checkpoints and evaluation too). A second line
#: only, see the module docstring; the watchdog's own limits cover every phase.
STALL_ENV_DEFAULTS = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "60",
                      "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "600"}
#: Exit status of a process that the watchdog ends.
EXIT_STALLED = 3

STORAGE = "storage"          # reading or writing files: limited in every run
LOCAL = "local"              # host code outside the collectives: limited under several ranks
COLLECTIVES = "collectives"  # may wait for the other ranks: limited under several ranks
KINDS = (STORAGE, LOCAL, COLLECTIVES)

#: The slowest storage a phase that moves many bytes is granted, per process: 4 MiB/s. Far
#: below a local disk or a parallel filesystem, so that a healthy save is never cut short (a
#: 1T-scale worker's ~9 GB checkpoint share is granted 36 min beyond the limit); a hung one
#: is still reported.
STORAGE_FLOOR_BYTES_PER_S = 4 * 2**20

_WAITING_ON = {STORAGE: "reading or writing storage (a hung filesystem or input pipeline)",
               LOCAL: "outside the collectives (input pipeline or host code)"}


def set_stall_env_defaults(environ=None) -> dict:
  """Sets `STALL_ENV_DEFAULTS` where `environ` (default `os.environ`) leaves them unset.

  Returns:
    The values in effect, by name.
  """
  environ = os.environ if environ is None else environ
  for name, value in STALL_ENV_DEFAULTS.items():
    environ.setdefault(name, value)
  return {name: environ[name] for name in STALL_ENV_DEFAULTS}


def allowance_for_bytes(nbytes: int) -> float:
  """Seconds granted beyond the limit to a phase that reads or writes `nbytes`."""
  return max(0, int(nbytes)) / STORAGE_FLOOR_BYTES_PER_S


class StallWatchdog:
  """Ends this process when its current phase stops making progress.

  Args:
    rank: this process's rank (named in the message).
    limit_s: seconds without progress after which a phase is stalled; 0 turns the watchdog off
      (every method is then a cheap no-op).
    multi_rank: other ranks depend on this one; False (one process) limits `STORAGE` phases
      only.
    grace_s: extra seconds a rank waiting inside the collectives allows the stalled rank to
      report itself (default: min(30, limit_s / 2)).
    poll_s: how often the thread looks.
    on_stall: called with the message instead of printing it and exiting with `EXIT_STALLED`
      (tests). When it returns, the thread keeps watching (the same phase is reported once).
  """

  def __init__(self, rank: int, limit_s: float, *, multi_rank: bool = True,
               grace_s: Optional[float] = None, poll_s: float = 1.0,
               on_stall: Optional[Callable[[str], None]] = None):
    if not (isinstance(limit_s, (int, float)) and not isinstance(limit_s, bool)
            and limit_s >= 0):
      raise ValueError(f"stall limit_s={limit_s!r} must be a number of seconds >= 0 (0 = off)")
    self.rank = rank
    self.limit_s = float(limit_s)
    self.multi_rank = multi_rank
    self.grace_s = min(30.0, self.limit_s / 2) if grace_s is None else float(grace_s)
    self.poll_s = poll_s
    self.on_stall = on_stall or self._exit
    self._lock = threading.Lock()
    self._since = time.monotonic()
    self._name = None        # the phase; None = idle (not watched)
    self._kind = LOCAL
    self._allowance = 0.0
    self._reported = False
    self._done = None        # last completed step; None until one is
    self._checkpoint = None  # what a restart resumes from (the trainer says; never read here)
    self._stop = threading.Event()
    # The thread holds the watchdog weakly: a run that raised leaves no thread watching it.
    self._thread = threading.Thread(target=_watch, args=(weakref.ref(self), self._stop, poll_s),
                                    name="m6t-stall-watchdog", daemon=True)

  @property
  def on(self) -> bool:
    return self.limit_s > 0

  # -- what the trainer tells it ------------------------------------------------------------

  def start(self) -> "StallWatchdog":
    if self.on:
      self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    if self._thread.is_alive() and self._thread is not threading.current_thread():
      self._thread.join()

  def enter(self, kind: str, name: Optional[str] = None, *,
            allowance_s: Optional[float] = None) -> None:
    """This process now runs phase `name` (None: the current one), waiting on `kind`; the
    clock restarts. `allowance_s`: seconds granted beyond the limit (None: keep)."""
    if kind not in KINDS:
      raise ValueError(f"kind={kind!r}; allowed: {KINDS}")
    if not self.on:
      return
    with self._lock:
      if name is not None:
        self._name = name
      if self._name is None:
        raise ValueError(f"enter({kind!r}) without a name needs a current phase")
      if allowance_s is not None:
        self._allowance = float(allowance_s)
      self._kind, self._since, self._reported = kind, time.monotonic(), False

  @contextlib.contextmanager
  def phase(self, name: str, kind: str, *, allowance_s: float = 0.0) -> Iterator[None]:
    """Watches the block as phase `name` (see `enter`). After it, the enclosing phase resumes
    (its clock restarted), or idle; idle too when the block raises, so that a failed run
    leaves nothing to report."""
    if not self.on:
      if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {KINDS}")
      yield
      return
    with self._lock:
      outer = (self._name, self._kind, self._allowance)
    self.enter(kind, name, allowance_s=allowance_s)
    try:
      yield
    except BaseException:
      self.idle()
      raise
    if outer[0] is None:
      self.idle()
    else:
      self.enter(outer[1], outer[0], allowance_s=outer[2])

  def progress(self) -> None:
    """The current phase made progress (an evaluation batch): its clock restarts."""
    with self._lock:
      self._since, self._reported = time.monotonic(), False

  def idle(self) -> None:
    """Between phases: nothing is limited (tracing, building)."""
    with self._lock:
      self._name, self._allowance = None, 0.0

  def step_done(self, step: int) -> None:
    """Step `step` completed (or was restored); the process is idle until the next phase."""
    with self._lock:
      self._done, self._name, self._allowance = step, None, 0.0

  def set_last_checkpoint(self, prefix: Optional[str]) -> None:
    """The checkpoint a restart resumes from, for the message (never read from storage here:
    a hung filesystem must not stop the report)."""
    with self._lock:
      self._checkpoint = prefix

  # -- the thread ---------------------------------------------------------------------------

  def limit_of(self, kind: str) -> Optional[float]:
    """Seconds without progress allowed in a phase of `kind` now; None = not limited."""
    if not self.on or (kind != STORAGE and not self.multi_rank):
      return None
    limit = self.limit_s + self._allowance
    return limit + self.grace_s if kind == COLLECTIVES else limit

  def check(self, now: Optional[float] = None) -> Optional[str]:
    """The stall message if the current phase is past its limit now, else None."""
    now = time.monotonic() if now is None else now
    with self._lock:
      if self._name is None or self._reported:
        return None
      limit = self.limit_of(self._kind)
      waited = now - self._since
      if limit is None or waited <= limit:
        return None
      name, kind, done, checkpoint = self._name, self._kind, self._done, self._checkpoint
    after = (f"after completing step {done}" if done is not None
             else "before completing any step")
    resume = (f"Last checkpoint: {checkpoint} (a restart resumes from it)." if checkpoint
              else "No checkpoint yet (a restart starts from the beginning).")
    resume += f" If {name} is legitimately this slow, raise train.stall_timeout_s."
    if kind == COLLECTIVES:
      return (f"rank {self.rank} waited {_seconds(waited)} s (limit {_seconds(limit)} s) in "
              f"the collectives of {name} ({after}): another rank stopped calling them (its "
              f"own message names it, unless it hung where Python cannot run); ending the "
              f"job. {resume}")
    ending = ("ending the job so that the other ranks do not hang" if self.multi_rank
              else "ending the run instead of hanging")
    return (f"rank {self.rank} stalled in {name}: no progress for {_seconds(waited)} s (limit "
            f"{_seconds(limit)} s) {_WAITING_ON[kind]}, {after}; {ending}. {resume}")

  def _report_if_stalled(self) -> None:
    message = self.check()
    if message:
      with self._lock:
        self._reported = True
      self.on_stall(message)

  @staticmethod
  def _exit(message: str) -> None:
    print(f"ERROR: {message}", file=sys.stderr, flush=True)
    # os._exit: the main thread is blocked (in a collective, a file operation, or hung); no
    # clean-up can run.
    os._exit(EXIT_STALLED)


def _seconds(x: float) -> str:
  return f"{x:.1f}".removesuffix(".0")


def _watch(ref, stop: threading.Event, poll_s: float) -> None:
  while not stop.wait(poll_s):
    watchdog = ref()
    if watchdog is None:
      return
    watchdog._report_if_stalled()  # pylint: disable=protected-access
    del watchdog


#: A watchdog that is off: the default of library code that marks phases (`Checkpointer`).
OFF = StallWatchdog(0, 0)
