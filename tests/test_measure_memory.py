"""tools/measure_memory.py runs a config in a fresh process and reports every memory component.

Structural: the JSON keys, positive measurements, the planner's parameter count equal to the
model's. Numeric: on the shrunk base config the planner's weights, gradients, optimizer state
and activations are within ±25% of the measured ones, as docs/memory.md promises (its table of
the shrunk configs).
"""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf
from tests.support import REPO

pytestmark = pytest.mark.multiprocess

TOOL = os.path.join(REPO, "tools", "measure_memory.py")
KEYS = ("weights", "optimizer_state", "gradients", "activations")


class MeasureMemoryTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # One invocation for both properties: with --remat the tool measures the config with and
    # without recomputation (one fresh child each), and reports both.
    # Two measuring children: the time two invocations had before.
    cls.proc = cls.run_tool("--config=base", "--remat=block", "--format=json", timeout=1200)

  @staticmethod
  def run_tool(*args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, TOOL, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)

  def config(self):
    self.assertEqual(self.proc.returncode, 0, self.proc.stderr[-3000:])
    report = json.loads(self.proc.stdout)
    self.assertEqual(report["schema_version"], 1)
    self.assertLen(report["configs"], 1)
    return report["configs"][0]

  def test_shrunk_base_within_25_percent(self):
    c = self.config()
    for key in ("name", "gin_files", "gin_bindings", "remat", "measured", "planned", "ratio"):
      self.assertIn(key, c)
    # The run with recomputation and the one without, each complete.
    for part in (c, c["without_remat"]):
      for key in KEYS:
        self.assertGreater(part["measured"][key], 0, key)
        self.assertGreater(part["planned"][key], 0, key)
        self.assertAllClose(part["ratio"][key], part["planned"][key] / part["measured"][key])
      for key in ("activations_eager_tape", "step_peak", "rss_step_peak"):
        self.assertGreater(part["measured"][key], 0, key)
      self.assertEqual(part["measured"]["params"], part["planned"]["params"])
    # docs/memory.md's promise is for the configs as they train by default: no recomputation.
    for key in KEYS:
      self.assertBetween(c["without_remat"]["ratio"][key], 0.75, 1.25, key)

  def test_remat_block_reports_a_saving(self):
    c = self.config()
    self.assertEqual(c["remat"], "block")
    saving = c["saving"]
    self.assertGreater(saving["planned"], 0)
    self.assertGreater(saving["measured"], 0)
    self.assertAllClose(saving["ratio"], saving["planned"] / saving["measured"])
    self.assertAllClose(saving["measured"], c["without_remat"]["measured"]["activations"]
                        - c["measured"]["activations"])

  def test_bad_remat_is_one_error(self):
    proc = self.run_tool("--config=demo", "--remat=blocks")
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertIn("--remat='blocks'; allowed", proc.stderr)


if __name__ == "__main__":
  tf.test.main()
