"""m6t_tf.data.metadata: dataset facts from metadata.json or the records, checked against a config;
and `MAX_LEN = None` resolved from them by `configurables.parse`."""

import json
import os

import gin
import numpy as np
import tensorflow as tf

from m6t_tf.run import configurables
from m6t_tf.errors import ConfigError
from m6t_tf.data import metadata
from m6t_tf.data import records
from tests.support import REPO



def _write(folder, lengths, *, size=(8, 12), features=None, meta=None):
  """Records with captions of `lengths` ids ([CLS]/[SEP] included); metadata.json if `meta`."""
  os.makedirs(folder, exist_ok=True)
  examples = []
  for i, n in enumerate(lengths):
    ids = [101] + [670 + j for j in range(n - 2)] + [102]
    kw = ({"patch_features": np.ones([16, features], np.float32)} if features else
          {"image": np.full([*size, 3], i, np.uint8)})
    examples.append(records.make_example(key=f"k{i}", caption="图" * (n - 2),
                                         caption_ids=ids, **kw))
  records.write_records(os.path.join(folder, "train-00000-of-00001.tfrecord"), examples)
  if meta is not None:
    with open(os.path.join(folder, "metadata.json"), "w") as f:
      json.dump(meta, f)
  return os.path.join(folder, "train-*.tfrecord")


class MetadataTest(tf.test.TestCase):

  def test_metadata_json_is_read(self):
    pattern = _write(self.get_temp_dir() + "/a", [5, 9], meta={
        "image_mode": "pixels", "image_size": [8, 12], "max_caption_tokens": 9})
    facts = metadata.read(pattern, binding="train.train_data")
    self.assertEqual((facts.image_modes, facts.image_size, facts.max_caption_tokens),
                     (("pixels",), (8, 12), 9))
    self.assertTrue(facts.source.endswith("metadata.json"))

  def test_hand_made_records_without_metadata(self):
    pattern = _write(self.get_temp_dir() + "/b", [4, 11, 6], size=(16, 20))
    facts = metadata.read(pattern, binding="train.train_data")
    self.assertEqual((facts.image_modes, facts.image_size), (("pixels",), (16, 20)))
    self.assertIsNone(facts.max_caption_tokens)  # not scanned unless the length must follow
    self.assertIn("first record", facts.source)
    facts = metadata.read(pattern, binding="train.train_data", need_length=True)
    self.assertEqual(facts.max_caption_tokens, 11)
    feats = metadata.read(_write(self.get_temp_dir() + "/c", [4], features=7), binding="x")
    self.assertEqual((feats.image_modes, feats.feature_dim), (("features",), 7))

  def test_no_file_names_the_binding(self):
    with self.assertRaisesRegex(ConfigError, r"train.eval_data='/nope/v-\*' matches no file; "
                                             r"the folder '/nope' does not exist"):
      metadata.read("/nope/v-*", binding="train.eval_data")

  def test_config_checks_name_the_fix(self):
    pattern = _write(self.get_temp_dir() + "/d", [5, 26], size=(8, 12))
    facts = metadata.read(pattern, binding="train.train_data", need_length=True)
    with self.assertRaisesRegex(ConfigError, r"captions of up to 26 tokens .* more than "
                                             r"train.max_len=20: set --gin_bindings=MAX_LEN=26"):
      metadata.check_config(facts, image_mode="pixels", max_len=20, truncate_captions=False)
    metadata.check_config(facts, image_mode="pixels", max_len=20, truncate_captions=True)
    metadata.check_config(facts, image_mode="pixels", max_len=26, truncate_captions=False)
    with self.assertRaisesRegex(ConfigError, r"train.image_mode='features', but the records .* "
                                             r"carry pixels .*train.image_mode='pixels'"):
      metadata.check_config(facts, image_mode="features", max_len=26, truncate_captions=False)
    odd = metadata.read(_write(self.get_temp_dir() + "/e", [5], size=(10, 12)), binding="x")
    with self.assertRaisesRegex(ConfigError, r"10x12 .* 4x4 patch grid.*--image_size=8"):
      metadata.check_config(odd, image_mode="pixels", max_len=26, truncate_captions=False)
    with self.assertRaisesRegex(ConfigError, r"are 10x12 but those of .* are 8x12"):
      metadata.check_same_images(facts, odd, "pixels")


class MaxLenFollowsDataTest(tf.test.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def _parse(self, bindings):
    gin.clear_config()
    configurables.parse([os.path.join(REPO, "gin", "demo.gin")], bindings, [REPO])

  def test_none_follows_the_longest_of_train_and_eval_data(self):
    train = _write(self.get_temp_dir() + "/t", [5, 9], meta={"max_caption_tokens": 9})
    val = _write(self.get_temp_dir() + "/v", [5, 13], meta={"max_caption_tokens": 13})
    self._parse([f"train.train_data='{train}'", f"train.eval_data='{val}'"])
    self.assertEqual(gin.query_parameter("%MAX_LEN"), 13)
    self.assertEqual(configurables.query("M6Transformer.max_text_length"), 13)
    self.assertIn("MAX_LEN = 13\n", gin.config_str())  # what config.gin records
    self._parse([f"train.train_data='{train}'", f"train.eval_data='{val}'", "MAX_LEN = 40"])
    self.assertEqual(gin.query_parameter("%MAX_LEN"), 40)  # pinned: left alone

  def test_unreadable_data_leaves_it_to_the_trainer(self):
    self._parse(["train.train_data='/nope/t-*'", "train.eval_data=None"])
    self.assertIsNone(gin.query_parameter("%MAX_LEN"))


if __name__ == "__main__":
  tf.test.main()
