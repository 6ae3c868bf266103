"""Where the tests find the checkout, its demo data and Horovod's launcher; what they require.

Imported as `from tests import support` (pytest.ini puts the repository root on the path,
whatever folder pytest runs from). A missing demo dataset or `horovodrun` is a
failure that names the set-up step, never a skip: a suite that turns green by skipping what
it could not set up proves nothing (`make test` sets both up first).
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, ".data", "demo")
TRAIN = os.path.join(DEMO, "train-*.tfrecord")
VALIDATION = os.path.join(DEMO, "validation-*.tfrecord")
HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")


def require_demo() -> str:
  """The demo dataset folder; fails the test, naming `make data`, when it is not built."""
  if not (glob.glob(TRAIN) and glob.glob(VALIDATION)):
    pytest.fail(f"the demo dataset is missing from {DEMO}: run `make data` (make test and make "
                f"test-fast build it first)", pytrace=False)
  return DEMO


def require_horovodrun() -> str:
  """`horovodrun` beside this Python; fails the test, naming `make setup`, when it is absent."""
  if not os.path.exists(HOROVODRUN):
    pytest.fail(f"{HOROVODRUN} is missing: run `make setup` (it builds Horovod with TensorFlow "
                f"and Gloo into .venv)", pytrace=False)
  return HOROVODRUN


def checkout_env(**extra: str) -> dict:
  """This environment for a tool or worker started as a script (`python tools/x.py`): the
  checkout first on PYTHONPATH, so that the child imports this checkout's `m6t_tf` (a script's
  own folder is all Python puts on its path), plus `extra`."""
  path = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  return dict(os.environ, PYTHONPATH=os.pathsep.join(path), **extra)


@functools.cache
def load_tool(path: str):
  """The script `path` of the checkout (e.g. "tools/bench_moe.py") as a module, loaded once:
  what a test calls of a command line (`main`, `parse_args`, its tables). Its
  `if __name__ == "__main__"` block does not run. The library a tool uses is imported from
  `m6t_tf.bench` instead."""
  name = "tool_" + os.path.splitext(path)[0].replace(os.sep, "_").replace("/", "_")
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module   # dataclasses and pickling look a module up by its name
  spec.loader.exec_module(module)
  return module


def runs_dir(name: str) -> str:
  """A fresh folder under runs/ for a test's model dirs (runs/ is ignored by git)."""
  import shutil
  path = os.path.join(REPO, "runs", name)
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  return path


# --------------------------------------------------------------------------------------------
# Runs that several test files read, made once per `pytest` session (one worker launch for
# many checks). Under pytest-xdist the workers share them: the first to ask builds the run
# under a file lock, the others wait and read it.

def _session_root() -> str:
  root = os.environ.get("M6T_TEST_SESSION_DIR")
  if not root:  # a test module run on its own, outside pytest's session hooks
    import tempfile
    root = os.environ["M6T_TEST_SESSION_DIR"] = tempfile.mkdtemp(
        prefix="session-", dir=os.path.join(REPO, "runs"))
  return root


def shared_run(name: str, build) -> str:
  """The folder `<session>/<name>`, filled once by `build(folder)` for the whole session.

  A `build` that fails leaves no folder behind: the next test that asks builds it again (and
  fails the same way, with its own message).
  """
  import fcntl
  import shutil
  root = _session_root()
  os.makedirs(root, exist_ok=True)
  folder = os.path.join(root, name)
  with open(os.path.join(root, f"{name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not os.path.exists(os.path.join(root, f"{name}.done")):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        try:
          build(folder)
        except BaseException:
          shutil.rmtree(folder, ignore_errors=True)
          raise
        open(os.path.join(root, f"{name}.done"), "w").close()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return folder


# The straight run that the kill-and-resume (test_reliability), mpirun (test_mpirun) and
# data-order (test_data_order) tests compare with: gin/demo.gin shrunk by gin/tiny.gin,
# deterministic, a checkpoint every 3 steps, each rank's record keys logged.
REFERENCE_STEPS = 10
REFERENCE_BINDINGS = (f"train.num_steps={REFERENCE_STEPS}", "train.checkpoint_every=3",
                      "train.deterministic=True", "train.eval_data=None", "train.log_every=1",
                      "train.keep_checkpoints=2", "train.log_data_keys=True")


def train_command(model_dir: str, ranks: int, extra_bindings=()) -> list:
  """`python -m m6t_tf.train` of the reference config (under horovodrun for ranks > 1)."""
  cmd = [sys.executable, "-m", "m6t_tf.train", "--gin_file=gin/demo.gin",
         "--gin_file=gin/tiny.gin", f"--model_dir={model_dir}"]
  if ranks > 1:
    cmd.append(f"--gin_file=gin/layouts/1x{ranks}.gin")
    cmd = [require_horovodrun(), "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *cmd]
  return cmd + [f"--gin_bindings={b}" for b in (*REFERENCE_BINDINGS, *extra_bindings)]


def reference_run(ranks: int) -> str:
  """The model dir of the reference config trained straight (never killed) on `ranks` ranks."""
  from tests import jobs

  def build(model_dir):
    require_demo()
    proc = jobs.start_job(train_command(model_dir, ranks))
    out, _ = proc.communicate(timeout=600)
    if proc.returncode:
      raise AssertionError(f"the reference run on {ranks} rank(s) failed:\n{out[-3000:]}")

  return shared_run(f"reference-{ranks}", build)


def data_keys(model_dir: str, rank: int) -> dict:
  """{step: [record keys]} of rank `rank`'s `train.log_data_keys` log, later lines overriding
  earlier ones (a resumed run logs the steps after its checkpoint again)."""
  import json
  out = {}
  with open(os.path.join(model_dir, "data_keys", f"rank{rank}.jsonl")) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line torn by a kill
        continue
      out[row["step"]] = row["keys"]
  return out
