"""m6t_tf/launch.py: the horovodrun / mpirun commands it builds, and the layout checks it makes."""

import os
import subprocess
import sys

import gin
import pytest
import tensorflow as tf

from m6t_tf import launch as run
from m6t_tf.errors import ConfigError
from m6t_tf.parallel import watchdog
from tests.support import REPO



class LaunchTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    os.chdir(REPO)

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  @pytest.mark.multiprocess
  def test_dry_run_480_worker_1t_config(self):
    proc = subprocess.run(
        [sys.executable, "-m", "m6t_tf.launch", "--gin_file=gin/1T.gin",
         "--gin_file=gin/layouts/1x480.gin", "--num_workers=480", "--hostfile=hosts",
         "--backend=mpi", "--model_dir=/ckpt/1T", "--dry_run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    line = proc.stdout.strip().splitlines()[-1]
    self.assertIn("mpirun", line)
    self.assertIn("-np 480", line)
    self.assertIn("--hostfile hosts", line)
    self.assertIn("-bind-to none -map-by slot", line)
    self.assertIn("-m m6t_tf.train --gin_file=gin/1T.gin --gin_file=gin/layouts/1x480.gin", line)
    self.assertIn("--model_dir=/ckpt/1T", line)
    # Horovod's stall inspector is set (to defaults unless the environment sets it) and
    # forwarded to every rank.
    for name in watchdog.STALL_ENV_DEFAULTS:
      self.assertIn(f"{name}=", proc.stdout)
      self.assertIn(f"-x {name}", line)

  def test_gloo_command(self):
    cmd = run.build_command(gin_files=["gin/demo.gin", "gin/layouts/1x2.gin"], gin_bindings=[],
                            num_workers=2, backend="gloo", python="python")
    self.assertEqual(cmd[1:6], ["-np", "2", "-H", "localhost:2", "--gloo"])
    self.assertTrue(cmd[0].endswith("horovodrun"))
    self.assertEqual(cmd[6:9], ["python", "-m", "m6t_tf.train"])

  def test_layout_must_match_worker_count(self):
    with self.assertRaisesRegex(ConfigError, r"= 128 workers, but --num_workers=480"):
      run.check_layout(["gin/1T.gin", "gin/layouts/1x128.gin"], [], 480)

  def test_experts_must_divide_over_expert_axis(self):
    with self.assertRaisesRegex(ConfigError, "num_experts=32 is not divisible"):
      run.check_layout(["gin/base.gin"], [], 3)

  def test_paper_layouts_are_valid(self):
    for size, workers in (("base", 8), ("10B", 16), ("100B", 128), ("1T", 480)):
      self.assertEqual(run.check_layout([f"gin/{size}.gin", f"gin/layouts/1x{workers}.gin"], [],
                                        workers), (1, workers))

  def test_hosts_and_hostfile_are_exclusive(self):
    with self.assertRaisesRegex(ConfigError, "not both"):
      run.build_command(gin_files=["gin/demo.gin"], gin_bindings=[], num_workers=2,
                        hosts="a:2", hostfile="h")


if __name__ == "__main__":
  tf.test.main()
