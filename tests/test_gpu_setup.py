"""The GPU (NCCL) flavour of the set-up, without building it: its wheel-cache key, the CUDA toolkit
it picks, the venv it sticks to, the Makefile lines, and tools/gpu_check.sh's argument handling.

The build itself is `make gpu-build-check` (minutes; not part of `make test`).
"""

import os
import subprocess
import tempfile

import tensorflow as tf
from tests.support import REPO

SETUP = os.path.join(REPO, "tools", "setup_env.sh")
GPU_CHECK = os.path.join(REPO, "tools", "gpu_check.sh")

# Answers the two questions setup_env.sh asks nvcc.
FAKE_NVCC = """#!/bin/sh
case "$1" in
  --version) echo "Cuda compilation tools, release {release}, V{release}.131" ;;
  --list-gpu-code) printf 'sm_70\\nsm_90\\n' ;;
esac
"""


def _fake_toolkit(parent, release):
  """A folder laid out like a CUDA toolkit whose nvcc reports `release`."""
  root = os.path.join(parent, f"cuda-{release}")
  os.makedirs(os.path.join(root, "bin"))
  os.makedirs(os.path.join(root, "include"))
  open(os.path.join(root, "include", "cuda_runtime.h"), "w").close()
  nvcc = os.path.join(root, "bin", "nvcc")
  with open(nvcc, "w") as f:
    f.write(FAKE_NVCC.format(release=release))
  os.chmod(nvcc, 0o755)
  return root


class GpuSetupTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp(dir=self.get_temp_dir())
    self.venv = os.path.join(self.tmp, "venv")   # never created: --print-flavour installs nothing
    self.env = {k: v for k, v in os.environ.items()
                if k not in ("M6T_GPU", "M6T_CUDA_HOME", "CUDA_HOME", "M6T_VENV")}
    self.env["M6T_VENV"] = self.venv

  def _flavour(self, **env):
    proc = subprocess.run(["bash", SETUP, "--print-flavour"], capture_output=True, text=True,
                          timeout=30, env={**self.env, **env})
    return proc.returncode, proc.stdout.strip(), proc.stderr

  def test_gpu_flavour_has_its_own_wheel_key(self):
    rc, cpu, err = self._flavour(M6T_GPU="0")
    self.assertEqual(rc, 0, err)
    self.assertIn(cpu, ("gloo", "gloo-mpi"))
    rc, gpu, err = self._flavour(M6T_GPU="1", M6T_CUDA_HOME=_fake_toolkit(self.tmp, "12.4"))
    self.assertEqual(rc, 0, err)
    self.assertEqual(gpu, f"nccl-cuda12.4-{cpu}")
    self.assertFalse(os.path.exists(self.venv))

  def test_a_12_toolkit_is_preferred(self):
    cuda13 = _fake_toolkit(self.tmp, "13.0")
    cuda12 = _fake_toolkit(self.tmp, "12.4")
    # CUDA_HOME names 13.0, the nvcc on PATH is 12.x's: 12 wins (or a real /usr/local/cuda-12*).
    rc, gpu, err = self._flavour(M6T_GPU="1", CUDA_HOME=cuda13,
                                 PATH=os.path.join(cuda12, "bin") + os.pathsep + os.environ["PATH"])
    self.assertEqual(rc, 0, err)
    self.assertStartsWith(gpu, "nccl-cuda12.")
    # M6T_CUDA_HOME is taken as it is.
    rc, gpu, err = self._flavour(M6T_GPU="1", M6T_CUDA_HOME=cuda13)
    self.assertEqual(rc, 0, err)
    self.assertStartsWith(gpu, "nccl-cuda13.0-")

  def test_no_toolkit_is_an_error(self):
    rc, out, err = self._flavour(M6T_GPU="1", M6T_CUDA_HOME=os.path.join(self.tmp, "none"))
    self.assertEqual(rc, 1)
    self.assertEqual(out, "")
    self.assertIn("no CUDA toolkit with nvcc found", err)

  def test_bad_gpu_value_is_an_error(self):
    rc, _, err = self._flavour(M6T_GPU="yes")
    self.assertEqual(rc, 2)
    self.assertIn("M6T_GPU=yes: use M6T_GPU=1", err)

  def test_a_gpu_venv_stays_gpu(self):
    """`make train` after `make setup GPU=1` runs setup_env.sh without M6T_GPU."""
    os.makedirs(self.venv)
    open(os.path.join(self.venv, ".m6t-gpu"), "w").close()
    toolkit = _fake_toolkit(self.tmp, "12.4")
    rc, gpu, err = self._flavour(M6T_CUDA_HOME=toolkit)
    self.assertEqual(rc, 0, err)
    self.assertStartsWith(gpu, "nccl-cuda12.4-")
    rc, cpu, err = self._flavour(M6T_GPU="0", M6T_CUDA_HOME=toolkit)
    self.assertEqual(rc, 0, err)
    self.assertIn(cpu, ("gloo", "gloo-mpi"))

  def test_makefile_lines(self):
    def dry(*args):
      proc = subprocess.run(["make", "-n", "-C", REPO, "--no-print-directory", *args],
                            capture_output=True, text=True, timeout=30)
      self.assertEqual(proc.returncode, 0, proc.stderr)
      return proc.stdout.strip().splitlines()
    self.assertEqual(dry("setup"), ["bash tools/setup_env.sh"])   # the CPU command, unchanged
    self.assertEqual(dry("setup", "GPU=1"), ["M6T_GPU=1 bash tools/setup_env.sh"])
    self.assertEqual(dry("gpu-build-check"),
                     ["M6T_GPU=1 M6T_VENV=.venv-gpu bash tools/setup_env.sh",
                      "PYTHON=.venv-gpu/bin/python bash tools/gpu_check.sh --build-only"])
    self.assertNotIn("gpu", " ".join(dry("test")))

  def test_gpu_check_parses_and_rejects_bad_arguments(self):
    self.assertEqual(subprocess.run(["bash", "-n", GPU_CHECK]).returncode, 0)
    for arg, message in (("--np=0", "--np=0 is not a positive number of ranks"),
                         ("--steps=x", "--steps=x is not a positive number of steps"),
                         ("--bogus", "unknown argument '--bogus'")):
      proc = subprocess.run(["bash", GPU_CHECK, arg], capture_output=True, text=True, timeout=30)
      self.assertEqual(proc.returncode, 2, arg)
      self.assertIn(message, proc.stderr)


if __name__ == "__main__":
  tf.test.main()
