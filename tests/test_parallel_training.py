"""The trainer under Horovod (Gloo on this CPU): D workers == 1 worker, resume, resharding.

Same data, same seed, same initial weights: a few steps of `tiny.gin` under 2 ranks (mesh
(1, 2)) and 4 ranks (mesh (2, 2)) give the losses of one process holding every expert on the
same global batch. Exactness needs what makes the two computations the same function:
  * one process's batch of W·B examples is the union of the W workers' batches (one input
    file, no shuffling, records dealt round-robin to the workers);
  * no token is dropped (capacity factor 8: C ≥ T), since capacity is per worker;
  * no dropout and no auxiliary loss (both depend on how tokens are grouped);
  * the same initial weights: a step-0 checkpoint written by the 4 ranks is restored by every
    run, which also exercises restoring onto another worker count.
The 2-rank run is itself split into two launches (1 step, then resume for 2), so it also checks
that a distributed run resumes exactly. Finally a checkpoint written by 4 ranks is continued by
1 process, whose checkpoint is evaluated by 1 and by 2 processes (4 → 1 → 2).

Four launches make all of that (`tests/distributed/train_worker.py` runs several trainer runs
in one process, each built afresh and restored from the checkpoint files): the 4 ranks write
the step-0 checkpoint and train; one process trains, continues the 4-rank checkpoint and
evaluates both checkpoints; the resumed 2-rank launch evaluates them after training. Runs whose
end-of-run evaluation nothing reads train without evaluation data.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from m6t_tf.data import records
from tests import jobs
from tests import support
from tests.support import DEMO, HOROVODRUN, REPO

WORKER = os.path.join(REPO, "tests", "distributed", "train_worker.py")
GLOBAL_BATCH = 4
STEPS = 3
EVAL_DATA = os.path.join(DEMO, "validation-*.tfrecord")
# For runs whose end-of-run evaluation nothing reads.
NO_EVAL = ["train.eval_data = None"]


@pytest.mark.multiprocess
class ParallelTrainingTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    support.require_horovodrun()
    support.require_demo()
    cls.tmp = os.path.join(REPO, "runs", "test_parallel_training")
    shutil.rmtree(cls.tmp, ignore_errors=True)
    os.makedirs(cls.tmp)
    # One file, so that records (not files) are dealt round-robin to the workers.
    data = records.read_serialized(os.path.join(DEMO, "train-00000-of-*.tfrecord"))[:64]
    cls.data = os.path.join(cls.tmp, "one-file.tfrecord")
    records.write_records(cls.data, data)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def bindings(self, batch):
    return ["CAPACITY_FACTOR = 8.0", "DROPOUT = 0.0", "AUX_LOSS = 0.0", "Z_LOSS = 0.0",
            f"train.train_data = '{self.data}'",
            f"train.eval_data = '{EVAL_DATA}'",
            f"train.num_steps = {STEPS}", f"train.batch_size_per_worker = {batch}",
            "train.shuffle_buffer = 1", "train.deterministic = True", "train.eval_batches = 3",
            "train.learning_rate = 1e-2", "train.warmup_steps = 1"]

  def launch(self, name, *, ranks, layout=None, batch=GLOBAL_BATCH, stop_after=None,
             model_dir=None, init=True, init_dir=None, continue_dir=None, continue_steps=None,
             eval_dirs=(), extra=(), timeout=420):
    model_dir = model_dir or os.path.join(self.tmp, name)
    if init and not os.path.exists(model_dir):
      shutil.copytree(os.path.join(self.tmp, "init", "checkpoints"),
                      os.path.join(model_dir, "checkpoints"))
    out = os.path.join(self.tmp, f"{name}-result")
    args = [sys.executable, WORKER, f"--out={out}", f"--model_dir={model_dir}",
            "--gin_file=gin/demo.gin", "--gin_file=gin/tiny.gin"]
    if layout:
      args.append(f"--gin_file=gin/layouts/{layout}.gin")
    args += [f"--gin_bindings={b}" for b in [*self.bindings(batch), *extra]]
    if stop_after is not None:
      args.append(f"--stop_after={stop_after}")
    if init_dir:
      args.append(f"--init_dir={init_dir}")
    if continue_dir:
      args += [f"--continue_dir={continue_dir}", f"--continue_steps={continue_steps}"]
    if eval_dirs:
      args += [f"--eval_dirs={','.join(eval_dirs)}", f"--eval_data={EVAL_DATA}"]
    if ranks > 1:
      args = [HOROVODRUN, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *args]
    proc = subprocess.run(args, cwd=REPO, env=jobs.worker_env(), capture_output=True, text=True,
                          timeout=timeout)
    self.assertEqual(proc.returncode, 0, f"{name} failed:\n{proc.stdout[-3000:]}\n"
                                         f"{proc.stderr[-5000:]}")
    results = []
    for r in range(ranks):
      with open(f"{out}.rank{r}.json") as f:
        results.append(json.load(f))
    return results

  def test_distributed_training_equals_one_process(self):
    # 4 ranks as (data=2) × (expert=2): experts replicated across the data axis. They first
    # write the step-0 checkpoint that every run starts from.
    four = self.launch("four", ranks=4, layout="2x2", batch=GLOBAL_BATCH // 4, init=False,
                       init_dir=os.path.join(self.tmp, "init"), extra=NO_EVAL)
    self.assertLen({r["dense_fingerprint"] for r in four}, 1)
    for r in four:
      replica = [q for q in four if q["expert_index"] == r["expert_index"]]
      self.assertLen({q["expert_fingerprint"] for q in replica}, 1)
    # Different expert blocks really are different weights.
    self.assertLen({r["expert_fingerprint"] for r in four}, 2)

    # One process; then 4 → 1: it continues the 4-rank checkpoint for a step and writes its
    # own, and evaluates both checkpoints (4 → 1, 1 → 1).
    resharded = os.path.join(self.tmp, "resharded")
    shutil.copytree(os.path.join(self.tmp, "four"), resharded)
    both = [os.path.join(self.tmp, "four"), resharded]
    one = self.launch("one", ranks=1, continue_dir=resharded, continue_steps=STEPS + 1,
                      eval_dirs=both, extra=["train.eval_captions = 3"])[0]
    reference = one["losses"]
    self.assertLen(reference, STEPS)
    self.assertAllClose(four[0]["losses"], reference, rtol=2e-5, atol=2e-5)
    self.assertEqual(one["continued"]["step"], STEPS + 1)
    self.assertLen(one["continued"]["losses"], 1)
    one_eval = one["evals"]

    # 2 ranks, expert axis 2, resumed after one step; the resumed launch then evaluates both
    # checkpoints on its 2 workers (4 → 2, 1 → 2).
    first = self.launch("two", ranks=2, layout="1x2", batch=GLOBAL_BATCH // 2, stop_after=1,
                        extra=NO_EVAL)
    second = self.launch("two", ranks=2, layout="1x2", batch=GLOBAL_BATCH // 2,
                         eval_dirs=both, extra=["train.eval_captions = 3"])
    two = first[0]["losses"] + second[0]["losses"]
    self.assertAllClose(two, reference, rtol=2e-5, atol=2e-5)
    # The evaluation's TensorBoard captions: the 2 ranks decode in lockstep (each decode step
    # runs the all-to-alls) and the chief reports the same captions as one process.
    self.assertLen(one["eval_captions"], 3)
    self.assertEqual(second[0]["eval_captions"], one["eval_captions"])
    for r in second:
      self.assertEqual(r["losses"], second[0]["losses"])  # every rank logs the global loss
      self.assertEqual(r["dense_fingerprint"], second[0]["dense_fingerprint"])

    two_eval = second[0]["evals"]
    self.assertEqual(sorted(one_eval), sorted(both))
    for model_dir in both:
      self.assertAllClose(one_eval[model_dir]["log_perplexity"],
                          two_eval[model_dir]["log_perplexity"], rtol=1e-6)
      self.assertEqual(one_eval[model_dir]["tokens"], two_eval[model_dir]["tokens"])


if __name__ == "__main__":
  tf.test.main()
