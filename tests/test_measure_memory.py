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

  def run_tool(self, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, TOOL, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)

  def test_shrunk_base_within_25_percent(self):
    proc = self.run_tool("--config=base", "--format=json")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    report = json.loads(proc.stdout)
    self.assertEqual(report["schema_version"], 1)
    self.assertLen(report["configs"], 1)
    c = report["configs"][0]
    for key in ("name", "gin_files", "gin_bindings", "remat", "measured", "planned", "ratio"):
      self.assertIn(key, c)
    for key in KEYS:
      self.assertGreater(c["measured"][key], 0, key)
      self.assertGreater(c["planned"][key], 0, key)
      self.assertAllClose(c["ratio"][key], c["planned"][key] / c["measured"][key])
    for key in ("activations_eager_tape", "step_peak", "rss_step_peak"):
      self.assertGreater(c["measured"][key], 0, key)
    self.assertEqual(c["measured"]["params"], c["planned"]["params"])
    for key in KEYS:
      self.assertBetween(c["ratio"][key], 0.75, 1.25, key)

  def test_remat_block_reports_a_saving(self):
    proc = self.run_tool("--gin_file=gin/demo.gin", "--gin_file=gin/tiny.gin",
                         "--gin_bindings=MAX_LEN=12", "--remat=block", "--format=json")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    c = json.loads(proc.stdout)["configs"][0]
    self.assertEqual(c["remat"], "block")
    saving = c["saving"]
    self.assertGreater(saving["planned"], 0)
    self.assertGreater(saving["measured"], 0)
    self.assertAllClose(saving["ratio"], saving["planned"] / saving["measured"])

  def test_bad_remat_is_one_error(self):
    proc = self.run_tool("--config=demo", "--remat=blocks")
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertIn("--remat='blocks'; allowed", proc.stderr)


if __name__ == "__main__":
  tf.test.main()
