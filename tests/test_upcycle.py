"""Dense → MoE upcycling (tools/upcycle.py): same function at step 0, restores on 1 and 2 ranks.

A dense `tiny.gin` model (moe_placement 'none') trains 2 steps; it is upcycled into top-2 MoE
layers with renormalised gates (they sum to 1, so identical experts give the dense FFN's output
whatever the router picks) and a capacity that drops nothing. Then:
  * the upcycled model's loss on the first training batch equals the dense model's (1e-5);
  * `m6t_tf.train` resumes it at step 0 on 1 process and on 2 ranks (experts split 4 + 4), both
    train on, the first logged loss is the dense loss on that batch, and the two runs agree;
  * bad inputs (an MoE checkpoint given as the dense one, another hidden size, a dense MoE
    config) fail with one ConfigError before anything is written.
"""

import json
import os
import shutil
import subprocess
import sys

import gin
import pytest
import tensorflow as tf

from m6t_tf.run import checkpointing
from m6t_tf import cli
from m6t_tf.run import configurables
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.run import inputs
from m6t_tf.bench import upcycle
from m6t_tf.data import records
from m6t_tf.parallel import context as context_lib
from tests import jobs

from tests import support
from tests.support import DEMO, HOROVODRUN, REPO

pytestmark = pytest.mark.multiprocess

WORKER = os.path.join(REPO, "tests", "distributed", "train_worker.py")
FILES = ["gin/demo.gin", "gin/tiny.gin"]
BATCH = 4


class UpcycleTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    support.require_demo()
    cls.tmp = os.path.join(REPO, "runs", "test_upcycle")
    shutil.rmtree(cls.tmp, ignore_errors=True)
    os.makedirs(cls.tmp)
    # One file, so that records are dealt round-robin to the workers (as in
    # tests/test_parallel_training.py): 2 ranks × 2 examples = the 1-process batch of 4.
    data = records.read_serialized(os.path.join(DEMO, "train-00000-of-*.tfrecord"))[:64]
    cls.data = os.path.join(cls.tmp, "one-file.tfrecord")
    records.write_records(cls.data, data)
    cls.dense_dir = os.path.join(cls.tmp, "dense")
    gin.clear_config()
    configurables.parse(FILES, cls.common() + ["M6Transformer.moe_placement = 'none'"], [REPO])
    configurables.run_train(model_dir=cls.dense_dir)
    gin.clear_config()

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  @classmethod
  def common(cls):
    return ["DROPOUT = 0.0", "AUX_LOSS = 0.0", "Z_LOSS = 0.0", f"train.train_data = '{cls.data}'",
            "train.eval_data = None", f"train.batch_size_per_worker = {BATCH}",
            "train.shuffle_buffer = 1", "train.deterministic = True", "train.num_steps = 2",
            "train.learning_rate = 1e-2", "train.warmup_steps = 1"]

  def moe_bindings(self):
    # top-2 over 8 experts with renormalised gates; C = 8·2·T/8 = 2T >= T: nothing drops.
    return self.common() + ["ROUTING = 'top_k'", "K = 2", "CAPACITY_FACTOR = 8.0",
                            "MoEConfig.normalization = 'renormalize'"]

  def first_batch_loss(self, model_dir, bindings):
    """The loss of `model_dir`'s latest checkpoint on the run's first training batch."""
    gin.clear_config()
    configurables.parse(FILES, bindings, [REPO])
    ctx = context_lib.LocalContext()
    batch = dict(next(iter(inputs.train_stream(
        self.data, ctx=ctx, seed=0, batch_size=BATCH, max_len=configurables.query("train.max_len"),
        image_mode="pixels", shuffle_buffer=1))))
    model = trainer_lib.build_model(batch=batch, network=configurables.network_fn()(name="m6"))
    gin.clear_config()
    entries = {k: v for k, v in trainer_lib.variables_by_path(model).items()}
    num_experts = model.moe_layers[0].num_experts if model.moe_layers else 0
    ckpt = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"), entries, ctx=ctx,
                                      num_experts=num_experts)
    ckpt.restore(ckpt.latest())
    _, metrics = model.losses_and_metrics(batch, training=True)
    return float(metrics["nll_sum"] / metrics["num_tokens"]), model

  def launch(self, name, model_dir, ranks):
    out = os.path.join(self.tmp, name)
    args = [sys.executable, WORKER, f"--out={out}", f"--model_dir={model_dir}",
            f"--gin_file={os.path.join(model_dir, 'config.gin')}"]
    if ranks > 1:
      args += ["--gin_file=gin/layouts/1x2.gin",
               f"--gin_bindings=train.batch_size_per_worker = {BATCH // ranks}"]
      args = [HOROVODRUN, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *args]
    proc = subprocess.run(args, cwd=REPO, env=jobs.worker_env(), capture_output=True, text=True,
                          timeout=600)
    self.assertEqual(proc.returncode, 0, f"{name} failed:\n{proc.stdout[-3000:]}\n"
                                         f"{proc.stderr[-5000:]}")
    with open(f"{out}.rank0.json") as f:
      return json.load(f)

  def test_upcycled_equals_dense_and_trains_on_1_and_2_ranks(self):
    moe_dir = os.path.join(self.tmp, "moe")
    out = upcycle.upcycle(dense_model_dir=self.dense_dir, moe_gin=[",".join(FILES)],
                          gin_bindings=self.moe_bindings(), model_dir=moe_dir,
                          search_paths=[REPO])
    self.assertEqual(out["num_experts"], 8)
    self.assertEqual(out["moe_layers"], 2)
    dense_loss, _ = self.first_batch_loss(self.dense_dir,
                                              self.common() + ["M6Transformer.moe_placement = "
                                                               "'none'"])
    moe_loss, moe = self.first_batch_loss(moe_dir, self.moe_bindings())
    self.assertLen(moe.moe_layers, 2)
    self.assertNear(moe_loss, dense_loss, 1e-5)
    # Every expert is the dense FFN; the router is not zero (module docstring of the tool).
    for layer in moe.moe_layers:
      self.assertGreater(float(tf.reduce_max(tf.abs(layer.router.kernel))), 0.0)
      wi = layer.experts.wi.numpy()
      for e in range(1, wi.shape[0]):
        self.assertAllEqual(wi[e], wi[0])

    one_dir, two_dir = (os.path.join(self.tmp, n) for n in ("one", "two"))
    shutil.copytree(moe_dir, one_dir)
    shutil.copytree(moe_dir, two_dir)
    one = self.launch("one", one_dir, ranks=1)
    self.assertEqual(one["step"], 2)
    self.assertNear(one["losses"][0], dense_loss, 1e-5)
    support.require_horovodrun()
    two = self.launch("two", two_dir, ranks=2)
    self.assertEqual(two["step"], 2)
    self.assertAllClose(two["losses"], one["losses"], rtol=2e-5, atol=2e-5)

  def test_noise_makes_experts_differ(self):
    moe_dir = os.path.join(self.tmp, "noisy")
    upcycle.upcycle(dense_model_dir=self.dense_dir, moe_gin=FILES,
                    gin_bindings=self.moe_bindings(), model_dir=moe_dir, noise_std=1e-3,
                    search_paths=[REPO])
    reader = tf.train.load_checkpoint(os.path.join(moe_dir, "checkpoints", "ckpt-0"))
    dense = tf.train.load_checkpoint(os.path.join(self.dense_dir, "checkpoints",
                                                  "ckpt-2"))
    key = "model/m6_captioner/m6/block_0/moe/experts/wi"
    wi = reader.get_tensor(key)
    ffn = dense.get_tensor(upcycle.dense_key(key))
    self.assertEqual(wi.shape, (8,) + ffn.shape)
    noise = wi - ffn[None]
    self.assertGreater(abs(noise).max(), 1e-5)
    self.assertLess(abs(noise).max(), 1e-2)
    self.assertNotAllClose(wi[0], wi[1])
    self.assertNear(float(noise.std()), 1e-3, 2e-4)

  def test_bad_inputs_fail_before_writing(self):
    moe_dir = os.path.join(self.tmp, "made")
    upcycle.upcycle(dense_model_dir=self.dense_dir, moe_gin=FILES,
                    gin_bindings=self.moe_bindings(), model_dir=moe_dir, search_paths=[REPO])
    cases = {
        "not a dense checkpoint": dict(dense_model_dir=moe_dir),
        "shape mismatch": dict(gin_bindings=self.moe_bindings() + ["HIDDEN = 48"]),
        "is a dense config": dict(gin_bindings=self.moe_bindings() + [
            "M6Transformer.moe_placement = 'none'"]),
        "has no checkpoint": dict(dense_model_dir=os.path.join(self.tmp, "nothing")),
        "do not split": dict(num_workers=3),
    }
    for i, (message, kwargs) in enumerate(cases.items()):
      target = os.path.join(self.tmp, f"bad{i}")
      args = dict(dense_model_dir=self.dense_dir, moe_gin=FILES,
                  gin_bindings=self.moe_bindings(), model_dir=target, search_paths=[REPO])
      args.update(kwargs)
      with self.assertRaisesRegex(cli.ConfigError, message):
        upcycle.upcycle(**args)
      self.assertFalse(os.path.exists(target), message)


if __name__ == "__main__":
  tf.test.main()
