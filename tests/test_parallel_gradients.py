"""W workers == 1 worker where a scale error shows: the gradients the optimiser receives.

Losses over a few AdamW steps with clipping cannot see a uniform gradient scale (Adam divides
it out, clipping caps it), so a wrong loss normalisation would pass `test_parallel_training`.
This test compares, per variable, the reduced gradients `Trainer.compute_gradients` hands the
optimiser on each rank of a real `horovodrun` job against one process on the union batch, at
meshes (data, expert) = (1, 2) and (2, 2) — a rank's expert gradients against its slice
[k·e, (k+1)·e) of the 1-process [E, ...] tensors — and the weights after a few steps of plain
SGD without clipping, where a 2x gradient is a 2x update. The two meshes are the points that
discriminate: (1, 2) has no replica group (expert gradients not reduced), (2, 2) has 4 ranks of
different token counts, expert slices k ≠ rank and e ≠ E / W, and replica groups whose expert
gradients are reduced apart from the dense ones; (1, 4) (4 expert ranks, k = rank, no replica
group) would add none, and its all-to-all over 4 ranks is tests/test_parallel_moe.py's.

Ranks hold different numbers of real target tokens: each global batch has captions of four
different lengths, dealt to the ranks in contiguous blocks, so per-rank means would not equal
the global mean. Exactness needs what `test_parallel_training` lists: no dropout, no auxiliary
or z-loss, capacity large enough that no token is dropped, the same initial weights (one
process writes them; every rank loads its slice).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.data import records
from tests import jobs
from tests import support
from tests.support import DEMO, HOROVODRUN, REPO

pytestmark = pytest.mark.multiprocess

WORKER = os.path.join(REPO, "tests", "distributed", "grad_worker.py")
GLOBAL_BATCH = 4
STEPS = 3
LEARNING_RATE = 0.5
# Caption lengths ([CLS] and [SEP] included, all <= tiny.gin's MAX_LEN = 12) of the examples of
# each global batch, in row order: the ranks' blocks hold different numbers of target tokens.
LENGTHS = ((3, 5, 8, 12), (4, 6, 9, 11), (3, 7, 10, 12))
MESHES = ((1, 2), (2, 2))
RTOL = 1e-5
# Attention key biases get a zero gradient in exact arithmetic (softmax over the keys is
# invariant to q·b_k, the same for every key); what they get is round-off, ~1e-12 of the
# model's gradient norm, so they are checked to be that small rather than relatively.
ZERO_GRADIENT = "attention/key/bias"


def relative_error(x: np.ndarray, reference: np.ndarray) -> float:
  """‖x − ref‖ / ‖ref‖ over one tensor."""
  return float(np.linalg.norm((x - reference).ravel()) / np.linalg.norm(reference.ravel()))


class ParallelGradientsTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    support.require_horovodrun()
    support.require_demo()
    cls.tmp = os.path.join(REPO, "runs", "test_parallel_gradients")
    shutil.rmtree(cls.tmp, ignore_errors=True)
    os.makedirs(cls.tmp)
    by_length = {}
    for s in records.read_serialized(os.path.join(DEMO, "train-*.tfrecord")):
      n = len(tf.train.Example.FromString(s).features.feature["caption_ids"].int64_list.value)
      by_length.setdefault(n, []).append(s)
    chosen = [by_length[n].pop() for batch in LENGTHS for n in batch]
    cls.data = os.path.join(cls.tmp, "lengths.tfrecord")
    records.write_records(cls.data, chosen)
    cls.init = os.path.join(cls.tmp, "init.npz")
    cls.reference = cls.launch("one", 1, 1)["none"][0]
    cls.meshes = {}

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  @classmethod
  def launch(cls, name, data, expert, remat="none"):
    """Runs the worker on a (data, expert) mesh for each option of `remat` (comma-separated)
    in one launch; returns {option: [result of each rank]}."""
    ranks = data * expert
    out = os.path.join(cls.tmp, name)
    args = [sys.executable, WORKER, f"--out={out}", f"--data={cls.data}", f"--init={cls.init}",
            f"--global_batch={GLOBAL_BATCH}", f"--steps={STEPS}",
            f"--learning_rate={LEARNING_RATE}", "--gin_file=gin/demo.gin",
            "--gin_file=gin/tiny.gin", f"--remat={remat}"]
    args += [f"--gin_bindings={b}" for b in (
        "CAPACITY_FACTOR = 8.0", "DROPOUT = 0.0", "AUX_LOSS = 0.0", "Z_LOSS = 0.0",
        "make_context.mesh_data = %d" % data, "make_context.mesh_expert = %d" % expert)]
    if ranks > 1:
      args = [HOROVODRUN, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *args]
    proc = subprocess.run(args, cwd=REPO, env=jobs.worker_env(), capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
      raise AssertionError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    by_option = {}
    for option in remat.split(","):
      results = []
      for r in range(ranks):
        prefix = f"{out}-{option}.rank{r}"
        with open(f"{prefix}.json") as f:
          result = json.load(f)
        result["grads"] = dict(np.load(f"{prefix}.grads.npz"))
        result["weights"] = dict(np.load(f"{prefix}.weights.npz"))
        results.append(result)
      by_option[option] = results
    return by_option

  @classmethod
  def mesh(cls, data, expert):
    """The ranks of a (data, expert) mesh, launched once for every option it is checked with:
    (1, 2) also recomputes ("block": both all-to-alls of every MoE layer again in the
    backward pass, in the same order on each rank, or the job would hang until the timeout;
    "experts": the expert FFNs between them)."""
    if (data, expert) not in cls.meshes:
      remat = "none,block,experts" if (data, expert) == (1, 2) else "none"
      cls.meshes[(data, expert)] = cls.launch(f"mesh{data}x{expert}", data, expert, remat)
    return cls.meshes[(data, expert)]

  def reference_slice(self, tensors, path, rank):
    """The 1-process value of `path` that `rank` holds: all of it, or its experts' rows."""
    value = tensors[path]
    if "/experts/" in path:
      e = rank["experts_per_rank"]
      value = value[rank["expert_index"] * e:(rank["expert_index"] + 1) * e]
    return value

  def check_mesh(self, data, expert, remat="none"):
    """Ranks of a (data, expert) mesh against one process without recomputation."""
    ref = self.reference
    self.assertEqual(ref["no_gradient"], [])
    total = np.sqrt(sum(np.sum(np.square(g)) for g in ref["grads"].values()))
    for path, g in ref["grads"].items():
      if ZERO_GRADIENT in path:
        self.assertLess(np.linalg.norm(g), 1e-9 * total, path)
      else:
        self.assertGreater(np.linalg.norm(g), 1e-6 * total, f"{path}: ~no gradient to compare")
    ranks = self.mesh(data, expert)[remat]
    # The condition that makes the test sensitive to the normalisation: every rank holds a
    # different number of target tokens.
    tokens = [r["num_tokens"] for r in ranks]
    self.assertLen(set(tokens), len(ranks), tokens)
    self.assertEqual(sum(tokens), ref["num_tokens"])
    self.assertAllClose([r["loss"] for r in ranks], [ref["loss"]] * len(ranks), rtol=1e-6)
    for r in ranks:
      self.assertEqual(r["no_gradient"], [])
      self.assertEqual(sorted(r["grads"]), sorted(ref["grads"]))
      self.assertEqual(sorted(r["weights"]), sorted(ref["weights"]))
      for path, g in r["grads"].items():
        want = self.reference_slice(ref["grads"], path, r)
        self.assertEqual(g.shape, want.shape, path)
        if ZERO_GRADIENT in path:
          self.assertLess(np.linalg.norm(g), 1e-9 * total, path)
          continue
        self.assertLess(relative_error(g, want), RTOL,
                        f"mesh ({data}, {expert}) rank {r['rank']}: gradient of {path}")
        self.assertAllClose(g, want, rtol=RTOL, atol=RTOL * np.abs(want).max(),
                            msg=f"mesh ({data}, {expert}) rank {r['rank']}: gradient of {path}")
      for path, w in r["weights"].items():
        if ZERO_GRADIENT in path:
          continue
        want = self.reference_slice(ref["weights"], path, r)
        start = self.reference_slice(dict(np.load(self.init)), path, r)
        # The SGD updates Σ lr·g, compared as updates (the weights themselves dwarf them).
        self.assertLess(relative_error(w - start, want - start), 1e-4,
                        f"mesh ({data}, {expert}) rank {r['rank']}: SGD update of {path}")

  def test_mesh_1x2(self):
    self.check_mesh(1, 2)

  def test_mesh_2x2(self):
    self.check_mesh(2, 2)

  # Recomputation with experts sharded (`mesh`): gradients equal 1 process without it.
  def test_mesh_1x2_remat_block(self):
    self.check_mesh(1, 2, remat="block")

  def test_mesh_1x2_remat_experts(self):
    self.check_mesh(1, 2, remat="experts")


if __name__ == "__main__":
  tf.test.main()
