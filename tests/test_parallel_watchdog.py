"""Tests of m6t_tf.parallel.watchdog in one process (the 2-rank stall is in
tests/test_reliability.py, `StallTest`)."""

import threading
import time

import tensorflow as tf

from m6t_tf.parallel import watchdog as watchdog_lib


class StallWatchdogTest(tf.test.TestCase):

  def _armed(self, **kwargs):
    w = watchdog_lib.StallWatchdog(1, 10.0, last_checkpoint=lambda: "ckpt/ckpt-6", **kwargs)
    w.begin_step()
    w.enter(watchdog_lib.COLLECTIVES)
    w.step_done(7)
    w.begin_step()
    return w, time.monotonic()

  def test_not_armed_before_the_first_step(self):
    w = watchdog_lib.StallWatchdog(0, 10.0)
    w.begin_step()
    self.assertIsNone(w.check(time.monotonic() + 1000))   # the first step traces and compiles

  def test_rank_stalled_outside_the_collectives_names_itself(self):
    w, t0 = self._armed()
    self.assertIsNone(w.check(t0 + 9))
    message = w.check(t0 + 11)
    self.assertIn("rank 1 stalled", message)
    self.assertIn("after completing step 7", message)
    self.assertIn("ckpt/ckpt-6", message)

  def test_rank_waiting_in_the_collectives_gives_the_stalled_one_time(self):
    w, _ = self._armed()
    w.enter(watchdog_lib.COLLECTIVES)
    t0 = time.monotonic()
    self.assertEqual(w.grace_s, 5.0)
    self.assertIsNone(w.check(t0 + 11))                 # past the limit, within the grace
    message = w.check(t0 + 16)
    self.assertIn("rank 1 waited", message)
    self.assertIn("collectives of step 8 (last completed step 7)", message)

  def test_sleeps_between_steps(self):
    w, t0 = self._armed()
    w.step_done(8)                                      # saving, evaluating: no limit
    self.assertIsNone(w.check(t0 + 1000))
    w.begin_step()
    self.assertIsNotNone(w.check(time.monotonic() + 11))

  def test_thread_reports_a_stall(self):
    fired = threading.Event()
    messages = []
    w = watchdog_lib.StallWatchdog(2, 0.2, poll_s=0.05,
                                   on_stall=lambda m: (messages.append(m), fired.set()))
    w.start()
    try:
      w.begin_step()
      w.enter(watchdog_lib.COLLECTIVES)
      w.step_done(1)
      w.begin_step()                                    # then nothing: a stall
      self.assertTrue(fired.wait(5.0))
    finally:
      w.stop()
    self.assertIn("rank 2 stalled", messages[0])

  def test_progress_keeps_it_quiet(self):
    fired = []
    w = watchdog_lib.StallWatchdog(0, 0.3, poll_s=0.02, on_stall=fired.append).start()
    try:
      for step in range(1, 15):
        w.begin_step()
        w.enter(watchdog_lib.COLLECTIVES)
        time.sleep(0.05)
        w.step_done(step)
    finally:
      w.stop()
    self.assertEqual(fired, [])

  def test_zero_is_off_and_bad_limits_are_refused(self):
    w = watchdog_lib.StallWatchdog(0, 0).start()
    self.assertFalse(w._thread.is_alive())
    w.stop()
    for bad in (-1, "60", None):
      with self.assertRaisesRegex(ValueError, "must be a number of seconds >= 0"):
        watchdog_lib.StallWatchdog(0, bad)
    with self.assertRaisesRegex(ValueError, "where='io'"):
      watchdog_lib.StallWatchdog(0, 1).enter("io")

  def test_horovod_stall_env_defaults_keep_what_the_user_set(self):
    env = {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "120"}
    got = watchdog_lib.set_stall_env_defaults(env)
    self.assertEqual(got, {"HOROVOD_STALL_CHECK_TIME_SECONDS": "60",
                           "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "120"})
    self.assertEqual(env, got)


if __name__ == "__main__":
  tf.test.main()
