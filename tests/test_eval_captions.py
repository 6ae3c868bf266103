"""The trainer's evaluation writes generated captions beside their references to TensorBoard.

Three steps with an evaluation at step 2 and the final one at step 3: two `eval/captions` text
summaries, each a Markdown table of the first validation images with their greedy caption and
every reference found; the final table's captions are the ones `m6t_tf.generate` decodes
from the final checkpoint. The MoE layers route in 3 outer groups (`MoEConfig.num_groups`):
decoding 4 images is a prefix of 4 × 17 = 68 positions, which 3 does not divide (such a run
used to train, save, and then exit 1 in its first evaluation).
"""

import glob
import os
import tempfile

import gin
import pytest
import tensorflow as tf

from m6t_tf.run import configurables
from m6t_tf.models import decoding
from m6t_tf.run import generation
from tests import support
from tests.support import DEMO, REPO



def _text_summaries(model_dir):
  """{step: text} of the eval/captions summaries."""
  out = {}
  for path in glob.glob(os.path.join(model_dir, "train", "events*")):
    for raw in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(raw.numpy())
      for value in event.summary.value:
        if value.tag == "eval/captions":
          out[event.step] = tf.make_ndarray(value.tensor).item().decode("utf-8")
  return out


@pytest.mark.slow
class EvalCaptionsTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    support.require_demo()

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def test_eval_writes_the_models_captions_beside_references(self):
    gin.clear_config()
    configurables.parse([os.path.join(REPO, "gin", f) for f in ("demo.gin", "tiny.gin")], [
        f"train.train_data='{DEMO}/train-*.tfrecord'",
        f"train.eval_data='{DEMO}/validation-*.tfrecord'", "train.num_steps=3",
        "train.eval_every=2", "train.eval_captions=4", "MoEConfig.num_groups=3"], [REPO])
    model_dir = tempfile.mkdtemp(prefix="m6t_captions_")
    summary = configurables.run_train(model_dir=model_dir)
    texts = _text_summaries(model_dir)
    self.assertEqual(sorted(texts), [2, 3])
    final = summary["eval"]["captions"]
    self.assertLen(final, 4)
    generated = generation.generate(
        model_dir, split="validation", num_images=4, log=lambda *a: None,
        options=decoding.DecodeOptions(method="greedy"))["rows"]
    self.assertEqual([r["key"] for r in final], [r["key"] for r in generated])
    self.assertEqual([r["caption"] for r in final], [r["caption"] for r in generated])
    lines = texts[3].splitlines()
    self.assertEqual(lines[0], "| image | generated (log-prob) | references |")
    self.assertLen(lines, 2 + 4)
    for line, row in zip(lines[2:], final):
      self.assertTrue(line.startswith(f"| {row['key']} | {row['caption']} ("), line)
      self.assertTrue(row["references"])
      for reference in row["references"]:
        self.assertIn(reference, line)


if __name__ == "__main__":
  tf.test.main()
