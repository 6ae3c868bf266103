"""The stall watchdog (m6t_tf.parallel.watchdog): the object, then a real single-process run that
stalls in every phase that waits on storage (the 2-rank stall in the collectives is
tests/test_reliability.py, `StallTest`).

`TrainerPhasesTest` runs the trainer once, in this process, with a stall injected in each phase
(`M6T_FAULT_INJECT=stall_in:<phase>:<step>`); the watchdog's report is recorded instead of
ending the process, and ends the injected stall, so one run shows every phase. The restore
phase needs a second run: a real `python -m m6t_tf.train` that must end itself (status 3).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

import gin
import pytest
import tensorflow as tf

from m6t_tf.run import checkpointing
from m6t_tf.run import configurables
from m6t_tf.run import faults
from m6t_tf.parallel import context as context_lib
from m6t_tf.parallel import watchdog as watchdog_lib
from tests import jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORAGE, LOCAL, COLLECTIVES = watchdog_lib.STORAGE, watchdog_lib.LOCAL, watchdog_lib.COLLECTIVES


class StallWatchdogTest(tf.test.TestCase):

  def _after_step_7(self, multi_rank=True, **kwargs):
    w = watchdog_lib.StallWatchdog(1, 10.0, multi_rank=multi_rank, **kwargs)
    w.set_last_checkpoint("ckpt/ckpt-6")
    w.step_done(7)
    return w

  def test_idle_is_not_watched(self):
    w = watchdog_lib.StallWatchdog(0, 10.0)
    self.assertIsNone(w.check(time.monotonic() + 1000))   # building, tracing: nothing limited
    w.enter(LOCAL, "step 1")
    w.idle()
    self.assertIsNone(w.check(time.monotonic() + 1000))

  def test_armed_before_the_first_step(self):
    w = watchdog_lib.StallWatchdog(0, 10.0)
    w.enter(STORAGE, "step 1 (reading its batch)")
    message = w.check(time.monotonic() + 11)
    self.assertIn("rank 0 stalled in step 1 (reading its batch): no progress for 11 s (limit "
                  "10 s) reading or writing storage", message)
    self.assertIn("before completing any step", message)
    self.assertIn("No checkpoint yet", message)

  def test_outside_the_collectives_names_the_rank_and_phase(self):
    w = self._after_step_7()
    w.enter(LOCAL, "step 8")
    t0 = time.monotonic()
    self.assertIsNone(w.check(t0 + 9))
    message = w.check(t0 + 11)
    self.assertIn("rank 1 stalled in step 8: no progress for 11 s (limit 10 s) outside the "
                  "collectives", message)
    self.assertIn("after completing step 7", message)
    self.assertIn("Last checkpoint: ckpt/ckpt-6 (a restart resumes from it)", message)
    self.assertIn("ending the job so that the other ranks do not hang", message)

  def test_waiting_in_the_collectives_gives_the_stalled_rank_time(self):
    w = self._after_step_7()
    for phase in ("step 8", "evaluation at step 7", "caption decoding at step 7"):
      w.enter(COLLECTIVES, phase)
      t0 = time.monotonic()
      self.assertEqual(w.grace_s, 5.0)
      self.assertIsNone(w.check(t0 + 11))               # past the limit, within the grace
      message = w.check(t0 + 16)
      self.assertIn(f"rank 1 waited 16 s (limit 15 s) in the collectives of {phase} (after "
                    f"completing step 7)", message)

  def test_one_process_watches_storage_only(self):
    w = self._after_step_7(multi_rank=False)
    t0 = time.monotonic()
    for kind in (LOCAL, COLLECTIVES):
      w.enter(kind, "step 8")
      self.assertIsNone(w.check(t0 + 1000))             # nobody else waits on a slow step
    w.enter(STORAGE, "checkpoint save at step 8")
    message = w.check(time.monotonic() + 11)
    self.assertIn("rank 1 stalled in checkpoint save at step 8", message)
    self.assertIn("ending the run instead of hanging", message)

  def test_storage_allowance_grows_with_the_bytes(self):
    w = self._after_step_7()
    allowance = watchdog_lib.allowance_for_bytes(40 * 2**20)
    self.assertEqual(allowance, 10.0)                   # 40 MiB at 4 MiB/s
    w.enter(STORAGE, "checkpoint save at step 8", allowance_s=allowance)
    t0 = time.monotonic()
    self.assertIsNone(w.check(t0 + 19))
    self.assertIn("(limit 20 s)", w.check(t0 + 21))
    w.enter(COLLECTIVES)                                 # its barrier: the same phase, + grace
    t0 = time.monotonic()
    self.assertIsNone(w.check(t0 + 24))
    self.assertIn("in the collectives of checkpoint save at step 8", w.check(t0 + 26))

  def test_phases_nest_and_progress_restarts_the_clock(self):
    w = self._after_step_7()
    with w.phase("evaluation at step 7", STORAGE):
      with w.phase("step 7 (writing logs)", STORAGE):
        self.assertIn("step 7 (writing logs)", w.check(time.monotonic() + 11))
      self.assertIn("stalled in evaluation at step 7", w.check(time.monotonic() + 11))
      t0 = time.monotonic()
      time.sleep(0.05)
      w.progress()
      self.assertIsNone(w.check(t0 + 10.02))
    self.assertIsNone(w.check(time.monotonic() + 1000))  # idle after the outer phase

  def test_a_phase_that_raises_leaves_it_idle(self):
    w = self._after_step_7()
    with self.assertRaises(OSError):
      with w.phase("checkpoint restore of ckpt/ckpt-6", STORAGE):
        raise OSError("disk gone")
    self.assertIsNone(w.check(time.monotonic() + 1000))

  def test_thread_reports_once_per_phase_and_keeps_watching(self):
    messages = []
    w = watchdog_lib.StallWatchdog(2, 0.2, poll_s=0.05, on_stall=messages.append).start()
    try:
      w.enter(STORAGE, "step 1 (reading its batch)")
      time.sleep(0.6)
      w.enter(STORAGE, "checkpoint save at step 1")
      time.sleep(0.6)
    finally:
      w.stop()
    self.assertLen(messages, 2)
    self.assertIn("rank 2 stalled in step 1 (reading its batch)", messages[0])
    self.assertIn("rank 2 stalled in checkpoint save at step 1", messages[1])

  def test_progress_keeps_it_quiet(self):
    fired = []
    w = watchdog_lib.StallWatchdog(0, 0.3, poll_s=0.02, on_stall=fired.append).start()
    try:
      for step in range(1, 15):
        w.enter(STORAGE, f"step {step} (reading its batch)")
        w.enter(COLLECTIVES, f"step {step}")
        time.sleep(0.05)
        w.step_done(step)
    finally:
      w.stop()
    self.assertEqual(fired, [])

  def test_the_thread_ends_with_its_watchdog(self):
    w = watchdog_lib.StallWatchdog(0, 5.0, poll_s=0.02).start()
    thread = w._thread
    del w
    thread.join(2.0)
    self.assertFalse(thread.is_alive())

  def test_zero_is_off_and_bad_values_are_refused(self):
    w = watchdog_lib.StallWatchdog(0, 0).start()
    self.assertFalse(w._thread.is_alive())
    w.enter(STORAGE, "x")
    self.assertIsNone(w.check(time.monotonic() + 1000))
    w.stop()
    for bad in (-1, "60", None, True):
      with self.assertRaisesRegex(ValueError, "must be a number of seconds >= 0"):
        watchdog_lib.StallWatchdog(0, bad)
    with self.assertRaisesRegex(ValueError, "kind='io'"):
      watchdog_lib.StallWatchdog(0, 1).enter("io", "x")
    with self.assertRaisesRegex(ValueError, "without a name needs a current phase"):
      watchdog_lib.StallWatchdog(0, 1).enter(STORAGE)

  def test_horovod_stall_env_defaults_keep_what_the_user_set(self):
    env = {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "120"}
    got = watchdog_lib.set_stall_env_defaults(env)
    self.assertEqual(got, {"HOROVOD_STALL_CHECK_TIME_SECONDS": "60",
                           "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "120"})
    self.assertEqual(env, got)


class CheckpointerWaitsTest(tf.test.TestCase):
  """A save marks its file operations as storage and its barriers as collectives."""

  def test_save_and_restore_name_their_phase_and_waits(self):
    seen = []

    class Recording(watchdog_lib.StallWatchdog):
      def enter(self, kind, name=None, **kwargs):
        super().enter(kind, name, **kwargs)
        seen.append((self._name, kind, self._allowance))

    class Barriers(context_lib.LocalContext):
      def barrier(self):
        seen.append(("barrier",))

    w = Recording(0, 60.0)
    entries = {"model/w": tf.Variable(tf.zeros([256, 1024]))}       # 1 MiB
    directory = tempfile.mkdtemp(dir=self.get_temp_dir())
    ckpt = checkpointing.Checkpointer(directory, entries, ctx=Barriers(), watchdog=w)
    ckpt.save(3)
    allowance = 0.25                                                # 1 MiB at 4 MiB/s
    name = "checkpoint save at step 3"
    self.assertEqual(seen, [
        (name, STORAGE, allowance), (name, COLLECTIVES, allowance), ("barrier",),
        (name, STORAGE, allowance), (name, COLLECTIVES, allowance), ("barrier",),
        (name, STORAGE, allowance), (name, COLLECTIVES, allowance), ("barrier",)])
    self.assertIsNone(w.check(time.monotonic() + 1000))             # idle after the save
    seen.clear()
    ckpt.restore(ckpt.latest())
    self.assertEqual(seen, [(f"checkpoint restore of {directory}/ckpt-3", STORAGE, allowance)])


@pytest.mark.slow
class TrainerPhasesTest(tf.test.TestCase):
  """One single-process run, stalled (storage) in the first step, a checkpoint save, an
  evaluation and caption decoding; then a restart stalled in the restore."""

  LIMIT = 3
  STALLS = "stall_in:input:1,stall_in:save:1,stall_in:eval:1,stall_in:captions:1"
  BINDINGS = ["train.num_steps=3", "train.checkpoint_every=1", "train.eval_every=1",
              "train.eval_captions=1", f"train.stall_timeout_s={LIMIT}"]

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model_dir = tempfile.mkdtemp(prefix="m6t_watchdog_", dir=os.path.join(REPO, "runs"))
    cls.messages, cls.stall_ends = [], []
    reported = threading.Event()

    def on_stall(message):          # instead of printing it and ending the process
      cls.messages.append(message)
      reported.set()

    def stall(seconds):             # a hung phase, until the watchdog reported it
      reported.clear()
      cls.stall_ends.append(reported.wait(min(seconds, 20)))

    os.chdir(REPO)
    gin.clear_config()
    configurables.parse(["gin/demo.gin", "gin/tiny.gin"], cls.BINDINGS, [REPO])
    with mock.patch.dict(os.environ, {"M6T_FAULT_INJECT": cls.STALLS}), \
         mock.patch.object(watchdog_lib.StallWatchdog, "_exit", staticmethod(on_stall)), \
         mock.patch.object(faults.FaultInjection, "_sleep", staticmethod(stall)):
      # Two steps of three: a save at each, an evaluation with caption decoding after step 1.
      cls.summary = configurables.run_train(model_dir=cls.model_dir, stop_after=2)

  @classmethod
  def tearDownClass(cls):
    gin.clear_config()
    shutil.rmtree(cls.model_dir, ignore_errors=True)
    super().tearDownClass()

  def _message(self, phase):
    found = [m for m in self.messages if f"rank 0 stalled in {phase}: " in m]
    self.assertLen(found, 1, self.messages)
    self.assertTrue(re.search(rf"no progress for [\d.]+ s \(limit [\d.]+ s\) reading or "
                              rf"writing storage .*; ending the run instead of hanging\.",
                              found[0]), found[0])
    return found[0]

  def test_every_stall_was_reported_and_the_run_went_on(self):
    self.assertEqual(self.stall_ends, [True] * 4, self.messages)
    self.assertLen(self.messages, 4)
    self.assertEqual(self.summary["step"], 2)

  def test_first_step(self):
    message = self._message("step 1 (reading its batch)")
    self.assertIn("before completing any step", message)
    self.assertIn("No checkpoint yet", message)

  def test_checkpoint_save(self):
    message = self._message("checkpoint save at step 1")
    self.assertIn("after completing step 1", message)
    # The limit plus the time to move this worker's checkpoint bytes at 4 MiB/s.
    limit = float(re.search(r"\(limit ([\d.]+) s\)", message).group(1))
    self.assertGreater(limit, self.LIMIT + 1)

  def test_evaluation(self):
    message = self._message("evaluation at step 1")
    self.assertIn("Last checkpoint: ", message)
    self.assertIn("ckpt-1 (a restart resumes from it)", message)

  def test_caption_decoding(self):
    self._message("caption decoding at step 1")

  @pytest.mark.multiprocess
  def test_checkpoint_restore_ends_a_real_run(self):
    """The restart stalls reading ckpt-2: the process ends itself (status 3) naming it."""
    env = jobs.worker_env(M6T_FAULT_INJECT="stall_in:restore:2")
    args = [sys.executable, "-m", "m6t_tf.train", "--gin_file=gin/demo.gin",
            "--gin_file=gin/tiny.gin", f"--model_dir={self.model_dir}",
            *[f"--gin_bindings={b}" for b in self.BINDINGS]]
    t0 = time.time()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    self.assertEqual(proc.returncode, watchdog_lib.EXIT_STALLED, proc.stderr[-3000:])
    self.assertRegex(proc.stderr, r"ERROR: rank 0 stalled in checkpoint restore of \S*ckpt-2: "
                                  r"no progress for [\d.]+ s .* after completing step 2")
    self.assertNotIn("step 3/3", proc.stdout)
    self.assertLess(time.time() - t0, 200)


if __name__ == "__main__":
  tf.test.main()
