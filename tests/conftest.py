"""What every test shares: the markers' rules and the expensive artefacts built once per
session (pytest.ini puts the checkout first on the path).

Markers (registered in pytest.ini; `make test-fast` runs neither):
  multiprocess  the test starts worker processes (horovodrun, mpirun, a CLI, a trainer run as
                `python -m ...`): it pays TensorFlow's start-up once per process.
  slow          one process, but more than ~5 s (training runs, sweeps, many traced variants, tools).

A test that launches a Python interpreter, horovodrun or mpirun without the `multiprocess`
marker fails: `make test-fast` must mean "no worker processes".
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402  pylint: disable=g-import-not-at-top
import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top

# tf.test.TestCase inherits `test_session`, a deprecated context manager that pytest would
# collect in every test class and report as a skip ("Not a test."): it is not a test.
tf.test.TestCase.test_session.__test__ = False

_LAUNCHERS = ("horovodrun", "mpirun", "mpiexec")


def _is_worker_launch(args) -> bool:
  if isinstance(args, (str, bytes, os.PathLike)):
    args = [args]
  if not args:
    return False
  first = os.path.basename(os.fspath(args[0]))
  return (os.path.realpath(os.fspath(args[0])) == os.path.realpath(sys.executable)
          or first.startswith("python") or first in _LAUNCHERS)


@pytest.fixture(autouse=True)
def _worker_launches_need_the_marker(request, monkeypatch):
  """Fails a test that starts a worker process without `@pytest.mark.multiprocess`."""
  if request.node.get_closest_marker("multiprocess") is not None:
    yield
    return
  real_init = subprocess.Popen.__init__
  name = request.node.nodeid

  def guarded(self, args, *a, **kw):
    if _is_worker_launch(args):
      raise AssertionError(f"{name} starts a worker process ({args[0]}) but is not marked "
                           f"@pytest.mark.multiprocess (tests/conftest.py)")
    real_init(self, args, *a, **kw)

  monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
  yield


def pytest_configure(config):
  """One folder for the session's shared runs (tests/support.py), made by the controlling
  process; pytest-xdist workers inherit it through the environment."""
  if hasattr(config, "workerinput"):
    return
  import tempfile
  os.makedirs(os.path.join(REPO, "runs"), exist_ok=True)
  os.environ["M6T_TEST_SESSION_DIR"] = tempfile.mkdtemp(prefix="session-",
                                                        dir=os.path.join(REPO, "runs"))


def pytest_unconfigure(config):
  if hasattr(config, "workerinput"):
    return
  import shutil
  shutil.rmtree(os.environ.get("M6T_TEST_SESSION_DIR", ""), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Files with worker processes first, then slow ones, then the rest (each file's tests in
  their order): under `pytest -n 2 --dist loadfile` the long files start early and the short
  ones fill the gaps, instead of one long file running alone at the end."""
  del config

  def weight(item):
    if item.get_closest_marker("multiprocess") is not None:
      return 0
    return 1 if item.get_closest_marker("slow") is not None else 2

  rank = {}
  for item in items:
    path = str(item.path)
    rank[path] = min(rank.get(path, 2), weight(item))
  items.sort(key=lambda item: rank[str(item.path)])  # stable: a file's order is kept
