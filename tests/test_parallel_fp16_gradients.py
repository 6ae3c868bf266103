"""FP16 gradient communication keeps small gradients: scaled on the wire, unscaled in float32.

Two real Horovod ranks (mesh (2, 1): dense and expert gradients both travel) reduce crafted
gradients spanning 1e-9 … 1e2 (`tests/distributed/fp16_reduce_worker.py`). Against the float32
reduction, the trainer's FP16 path (`HorovodContext.reduce_gradients` with
`gradient_compression="fp16"` and a loss scale S) must be within float16's rounding of each
rank's scaled value and of their sum, for every element, and flush no element whose scaled
value S·g is in float16's normal range. The old path (unscale, then cast) fails that bound:
checked too, so the bound is known to tell the two apart. With a scale that overflows, every
rank's reduction is non-finite, and a `Trainer` (whose loss scale FP16 communication turns on,
even for float32 compute) skips that step on every rank, halves the scale, then applies the
next finite one identically on both.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tests import support
from tests.support import HOROVODRUN, REPO

pytestmark = pytest.mark.multiprocess

WORKER = os.path.join(REPO, "tests", "distributed", "fp16_reduce_worker.py")
RANKS = 2
FP16_NORMAL = 2.0 ** -14     # smallest normal float16
HALF_ULP = 2.0 ** -11        # float16 rounding, relative, normal range
HALF_SUBNORMAL = 2.0 ** -25  # float16 rounding, absolute, subnormal range


def fp16_bound(inputs, scale):
  """Largest |FP16 reduction − float32 reduction| float16 rounding allows, per element.

  Each rank's S·g_r is rounded once to float16 and their sum once more; the mean is then
  Σ / (W·S) in float32 (one more float32 rounding of the result, 2^-23 relative).
  """
  scaled = [np.abs(x.astype(np.float64)) * scale for x in inputs]
  total = sum(scaled)
  per_value = sum(np.maximum(HALF_ULP * x, HALF_SUBNORMAL) for x in scaled)
  rounding = per_value + np.maximum(HALF_ULP * total, HALF_SUBNORMAL)
  return rounding / (len(inputs) * scale) + 2.0 ** -22 * total / (len(inputs) * scale)


class Fp16GradientReductionTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    support.require_horovodrun()
    cls.tmp = os.path.join(REPO, "runs", "test_parallel_fp16_gradients")
    shutil.rmtree(cls.tmp, ignore_errors=True)
    os.makedirs(cls.tmp)
    out = os.path.join(cls.tmp, "reduce")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1", PYTHONPATH=REPO,
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([HOROVODRUN, "-np", str(RANKS), "-H", f"localhost:{RANKS}", "--gloo",
                           sys.executable, WORKER, f"--out={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    if proc.returncode:
      raise AssertionError(f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    cls.ranks = [dict(np.load(f"{out}.rank{r}.npz")) for r in range(RANKS)]

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def violations(self, path: str, kind: str):
    """(elements beyond the float16 bound, normal-range elements flushed to zero, count of
    normal-range elements, nonzero elements flushed to zero)."""
    inputs = [r[f"inputs_{kind}"] for r in self.ranks]
    scale = float(self.ranks[0]["scale"])
    want = self.ranks[0][f"float32_{kind}"]
    got = self.ranks[0][f"{path}_{kind}"]
    np.testing.assert_allclose(want, np.mean(inputs, axis=0), rtol=1e-6)
    beyond = np.abs(got.astype(np.float64) - want) > fp16_bound(inputs, scale)
    normal = np.min([np.abs(x) for x in inputs], axis=0) * scale >= FP16_NORMAL
    zeroed = (got == 0) & (want != 0)
    return (int(beyond.sum()), int((normal & zeroed).sum()), int(normal.sum()),
            int(zeroed.sum()))

  def test_inputs_span_the_range(self):
    for kind in ("dense", "expert"):
      magnitudes = np.abs(self.ranks[0][f"inputs_{kind}"])
      self.assertLess(magnitudes.min(), 2e-9)
      self.assertGreater(magnitudes.max(), 50.0)

  def test_every_rank_holds_the_same_reduction(self):
    for kind in ("dense", "expert"):
      for r in self.ranks[1:]:
        self.assertAllEqual(r[f"fp16_{kind}"], self.ranks[0][f"fp16_{kind}"])

  def test_scaled_fp16_reduction_is_within_float16_rounding(self):
    for kind in ("dense", "expert"):
      beyond, flushed, normal, _ = self.violations("fp16", kind)
      self.assertGreater(normal, 0)
      self.assertEqual(beyond, 0, f"{kind}: {beyond} elements beyond float16 rounding")
      self.assertEqual(flushed, 0, f"{kind}: {flushed} of {normal} normal elements flushed")

  def test_casting_after_unscaling_breaks_the_bound(self):
    # The bound above is not loose enough to pass the old path: unscaled gradients below
    # ~6e-8 become 0 and those below 6.1e-5 lose most of their bits.
    for kind in ("dense", "expert"):
      beyond, _, _, zeroed = self.violations("unscaled", kind)
      self.assertGreater(beyond, 0)
      self.assertGreater(zeroed, 0)

  def test_overflow_is_non_finite_on_every_rank(self):
    for r in self.ranks:
      self.assertAllEqual(r["overflow_local_finite"], [False, False])

  def test_trainer_skips_the_overflowed_step_on_every_rank(self):
    for r in self.ranks:
      # float32 compute: the scale is on because the gradients travel in float16.
      self.assertTrue(r["trainer_scale_enabled"])
      self.assertTrue(r["trainer_skips_nonfinite"])
      self.assertFalse(r["step_overflow_finite"])
      self.assertAllEqual(r["step_overflow_weights"], r["step_start_weights"])
      self.assertEqual(r["step_overflow_scale_after"], 2.0 ** 14)
      self.assertTrue(r["step_finite_finite"])
      self.assertNotAllClose(r["step_finite_weights"], r["step_start_weights"])
      self.assertEqual(r["skipped"], 1)
    self.assertAllEqual(self.ranks[1]["step_finite_weights"], self.ranks[0]["step_finite_weights"])


if __name__ == "__main__":
  tf.test.main()
