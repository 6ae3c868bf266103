"""Real `mpirun` jobs (Open MPI, Horovod's MPI controller), started as `m6t_tf.launch` builds them.

  * tiny.gin on 2 ranks (layout 1x2) stopped after 2 steps and resumed to 4 logs the losses and
    ends with the weights of a straight 4-step run under mpirun (Gloo and MPI reduce the
    embedding's sparse gradient in different orders: the straight run is MPI too);
  * `python -m m6t_tf.launch --backend=mpi` starts the job it prints; a rank SIGKILLed after step 3
    ends the whole job within 60 s, non-zero, with mpirun's own report of the dead rank, and the
    launcher passes the failure on as its exit status.
Each run's log names the controller (`HorovodContext.describe`): these are MPI jobs, not Gloo.
"""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import tensorflow as tf

from m6t_tf import launch as run
from m6t_tf.run import logs
from tests import jobs
from tests import support
from tests.support import DEMO, REPO

WORKER = os.path.join(REPO, "tests", "distributed", "train_worker.py")
GIN = ["gin/demo.gin", "gin/tiny.gin", "gin/layouts/1x2.gin"]
# A Gloo controller left in the environment would make mpirun's ranks wait for a rendezvous.
MPI_DROP = ("M6T_FAULT_INJECT", "HOROVOD_CONTROLLER", "HOROVOD_CPU_OPERATIONS")
BINDINGS = [f"train.train_data='{DEMO}/train-*.tfrecord'", "train.eval_data=None",
            "train.deterministic=True", "train.checkpoint_every=1000", "train.log_every=1"]


@pytest.mark.multiprocess
class MpirunTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if not shutil.which("mpirun"):
      raise RuntimeError("mpirun missing: `make setup` installs Open MPI (tools/setup_env.sh)")
    support.require_demo()
    cls.tmp = os.path.join(REPO, "runs", "test_mpirun")
    shutil.rmtree(cls.tmp, ignore_errors=True)
    os.makedirs(cls.tmp)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _mpirun_worker(self, name, *, num_steps, stop_after=None):
    """tests/distributed/train_worker.py on 2 ranks, behind the launcher's own mpirun flags."""
    model_dir = os.path.join(self.tmp, name)
    bindings = [*BINDINGS, f"train.num_steps={num_steps}"]
    cmd = run.build_command(gin_files=GIN, gin_bindings=bindings, num_workers=2, backend="mpi",
                            model_dir=model_dir, python=sys.executable)
    self.assertEqual(cmd[0], "mpirun")
    mpirun = cmd[:cmd.index(sys.executable)]
    worker = [sys.executable, WORKER, f"--out={model_dir}-out", f"--model_dir={model_dir}",
              *[f"--gin_file={f}" for f in GIN], *[f"--gin_bindings={b}" for b in bindings]]
    if stop_after is not None:
      worker.append(f"--stop_after={stop_after}")
    proc = subprocess.run([*mpirun, *worker], cwd=REPO, env=jobs.worker_env(drop=MPI_DROP),
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, f"{name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    self.assertIn("2 Horovod ranks (MPI controller)", proc.stdout)
    return model_dir

  def test_stop_and_resume_under_mpirun_equals_straight_run(self):
    straight = self._mpirun_worker("straight", num_steps=4)
    self._mpirun_worker("resumed", num_steps=4, stop_after=2)
    resumed = self._mpirun_worker("resumed", num_steps=4)
    want = logs.read_loss_log(os.path.join(straight, "losses.jsonl"))
    self.assertLen(want, 4)
    self.assertEqual(logs.read_loss_log(os.path.join(resumed, "losses.jsonl")), want)
    a = tf.train.load_checkpoint(os.path.join(straight, "checkpoints", "ckpt-4"))
    b = tf.train.load_checkpoint(os.path.join(resumed, "checkpoints", "ckpt-4"))
    for k in a.get_variable_to_shape_map():
      if k.startswith(("model/", "optimizer/")):
        self.assertAllEqual(a.get_tensor(k), b.get_tensor(k), msg=k)

  def test_launcher_starts_mpi_job_and_a_killed_rank_ends_it(self):
    model_dir = os.path.join(self.tmp, "killed")
    cmd = [sys.executable, "-m", "m6t_tf.launch", *[f"--gin_file={f}" for f in GIN],
           *[f"--gin_bindings={b}" for b in [*BINDINGS, "train.num_steps=100000"]],
           "--num_workers=2", "--backend=mpi", f"--model_dir={model_dir}"]
    proc = jobs.start_job(cmd, drop=MPI_DROP, M6T_FAULT_INJECT="kill_after_step:3:1")
    # Rank 0 logs step 2; it never logs step 3, whose logged metrics need rank 1.
    out, step_2_at, ended_at = jobs.watch(proc, "step 2/")
    self.assertNotEqual(proc.returncode, -signal.SIGKILL, "the job hung: " + out[-3000:])
    self.assertNotEqual(proc.returncode, 0, out[-3000:])
    self.assertTrue(re.search(r"^mpirun (--allow-run-as-root )?-np 2 ", out, re.M), out[:3000])
    self.assertIn("2 Horovod ranks (MPI controller)", out)
    self.assertIsNotNone(step_2_at, out[-3000:])
    self.assertLess(ended_at - step_2_at, 60, out[-3000:])
    # Open MPI's report names the rank and the signal.
    self.assertTrue(re.search(r"process rank 1 with PID \d+ on node \S+ exited on signal 9 "
                              r"\(Killed\)", out), out[-3000:])


if __name__ == "__main__":
  tf.test.main()
