"""The capacity a user sets is the one routing gets: C from the real tokens, not the padding.

Padding is not routed, so C computed from every position of a padded batch makes the
effective γ = γ / (real share): ~1.78 on the demo for a configured 1.25. With
`REAL_TOKEN_FRACTION = None` (gin/demo.gin) the share is read from the data's metadata.json,
C shrinks by it, and the γ the trainer measures over the tokens actually routed
(`moe/effective_capacity_factor`) is the configured one. The value lands in config.gin, so
evaluation rebuilds the same capacity.
"""

import glob
import json
import os
import tempfile

import gin
import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.run import configurables
from m6t_tf.run import planning
from tests import support
from tests.support import DEMO, REPO



def _scalars(model_dir, tag):
  out = {}
  for path in glob.glob(os.path.join(model_dir, "train", "events*")):
    for raw in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(raw.numpy())
      for value in event.summary.value:
        if value.tag == tag:
          out[event.step] = float(tf.make_ndarray(value.tensor))
  return out


class RealTokenFractionTest(tf.test.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def test_share_of_real_positions(self):
    # 16 patches + min(n, L − 1) caption inputs of 16 + L − 1 positions.
    self.assertAlmostEqual(configurables.real_token_fraction(8.641, 20), 0.704)
    self.assertAlmostEqual(configurables.real_token_fraction(19.0, 20), 1.0)
    self.assertAlmostEqual(configurables.real_token_fraction(30.0, 12), 1.0)  # truncated
    self.assertAlmostEqual(configurables.real_token_fraction(2.0, 12), round(18 / 27, 4))

  def test_demo_config_follows_the_data(self):
    support.require_demo()
    with open(os.path.join(DEMO, "metadata.json")) as f:
      mean = json.load(f)["mean_caption_tokens"]
    gin.clear_config()
    configurables.parse([os.path.join(REPO, "gin", "demo.gin")], [], [REPO])
    max_len = configurables.query("train.max_len")
    fraction = configurables.query("%REAL_TOKEN_FRACTION")
    self.assertEqual(fraction, configurables.real_token_fraction(mean, max_len))
    plan = planning.plan_from_gin([os.path.join(REPO, "gin", "demo.gin")], num_workers=1,
                                  search_paths=[REPO])["config"]
    t = plan["tokens_per_worker"]
    self.assertEqual(plan["capacity"], int(np.ceil(2 * np.ceil(fraction * t) / 8 * 1.25)))
    pinned = planning.plan_from_gin([os.path.join(REPO, "gin", "demo.gin")],
                                    ["REAL_TOKEN_FRACTION = 1.0"], num_workers=1,
                                    search_paths=[REPO])["config"]
    self.assertEqual(pinned["capacity"], int(np.ceil(2 * t / 8 * 1.25)))

  @pytest.mark.slow
  def test_trainer_measures_the_configured_gamma(self):
    support.require_demo()
    measured = {}
    for name, binding in (("real", []), ("all", ["REAL_TOKEN_FRACTION = 1.0"])):
      gin.clear_config()
      configurables.parse([os.path.join(REPO, "gin", "demo.gin")], [
          "train.num_steps = 4", "train.log_every = 2", "train.eval_data = None",
          "NUM_LAYERS = 1", "HIDDEN = 32", "INTERMEDIATE = 32", *binding], [REPO])
      model_dir = tempfile.mkdtemp(prefix="m6t_capacity_")
      summary = configurables.run_train(model_dir=model_dir)
      gamma = _scalars(model_dir, "moe/effective_capacity_factor")
      padded = _scalars(model_dir, "data/padded_fraction")
      self.assertEqual(sorted(gamma), [2, 4])
      measured[name] = np.mean(list(gamma.values()))
      with open(os.path.join(model_dir, "config.gin")) as f:
        config = f.read()
      layer = summary["model"].moe_layers[0]
      if name == "real":
        # The share of each batch varies around the data's mean: γ within 10% of 1.25.
        self.assertBetween(measured[name], 1.25 * 0.9, 1.25 * 1.1)
        self.assertBetween(np.mean(list(padded.values())), 0.2, 0.4)
        self.assertIn(f"REAL_TOKEN_FRACTION = {layer.capacity_token_fraction}", config)
        self.assertLess(layer.capacity_token_fraction, 1.0)
    # Without the fix the routed tokens get ~1.25 / 0.7 ≈ 1.8.
    self.assertGreater(measured["all"], 1.6)


if __name__ == "__main__":
  tf.test.main()
