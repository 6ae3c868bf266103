"""Tests of tools/make_dataset.py: JSON lines + images -> TFRecords, bad-record handling."""

import io
import json
import os
import contextlib
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from m6t_tf.data import pipeline, records  # pylint: disable=g-import-not-at-top
from tests import support  # pylint: disable=g-import-not-at-top

make_dataset = support.load_tool("tools/make_dataset.py")

GOOD = [  # (file, caption)
    ("red.png", "一个红色的方块"),
    ("sub/gray.png", "灰色的图"),
    ("alpha.png", "透明的绿色"),
    ("photo.jpg", "一张照片"),
    ("big.png", "大图片缩小"),
    # U+2028 is legal inside a JSON string; str.splitlines() would cut the line there.
    ("line.png", "灰色\u2028方块"),
]


class MakeDatasetTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    root = Path(self.get_temp_dir())
    self.image_dir = root / "images"
    (self.image_dir / "sub").mkdir(parents=True, exist_ok=True)
    rgb = np.zeros([8, 8, 3], np.uint8)
    rgb[..., 0] = 200
    self._png("red.png", rgb)
    self._png("sub/gray.png", np.full([8, 8, 1], 90, np.uint8))
    rgba = np.zeros([8, 8, 4], np.uint8)
    rgba[..., 1] = 255
    rgba[:4, :, 3] = 255  # top half opaque green, bottom half transparent -> white
    self._png("alpha.png", rgba)
    (self.image_dir / "photo.jpg").write_bytes(
        tf.io.encode_jpeg(np.full([8, 8, 3], 128, np.uint8)).numpy())
    self._png("big.png", np.full([32, 24, 3], 40, np.uint8))
    self._png("line.png", np.full([8, 8, 3], 60, np.uint8))
    (self.image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    lines = [json.dumps({"image": f, "caption": c}, ensure_ascii=False) for f, c in GOOD]
    lines[2:2] = [
        json.dumps({"image": "broken.png", "caption": "坏图"}, ensure_ascii=False),  # line 3
        "",  # blank: ignored, not bad
        json.dumps({"image": "missing.png", "caption": "不存在"}, ensure_ascii=False),
        json.dumps({"image": "red.png", "caption": "  "}),
        '{"image": "red.png", "caption": ',  # truncated JSON
    ]
    self.input = root / "captions.jsonl"
    self.input.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(self.input, "ab") as f:
      f.write(b'{"image": "red.png", "caption": "\xe7\xba\xa2\xff"}\n')  # line 12: not UTF-8
      f.write(b'{"image": "red.png", "caption": "\\ud800"}\n')  # line 13: a lone surrogate
    self.out = root / "out"

  def _png(self, name, array):
    (self.image_dir / name).write_bytes(tf.io.encode_png(array).numpy())

  def _convert(self, **kwargs):
    kwargs.setdefault("validation_fraction", 0.0)
    return make_dataset.convert(self.input, image_dir=self.image_dir, output_dir=self.out,
                                image_size=8, max_len=6, num_train_shards=2,
                                log=lambda _: None, **kwargs)

  def test_skip_counts_bad_lines_and_writes_good_ones(self):
    meta = self._convert()
    self.assertEqual(meta["num_records"], 6)
    self.assertEqual(meta["num_skipped"], 6)
    reasons = "\n".join(meta["skipped_examples"])
    for lineno, what in ((3, "undecodable image"), (5, "image file not found"),
                         (6, "empty caption"), (7, "invalid JSON"),
                         (12, r"not UTF-8: byte 36 is b'\\xff'"), (13, "lone surrogate")):
      self.assertRegex(reasons, f"captions.jsonl:{lineno}: .*{what}")
    # 7, 5, 5 and 5 ids (U+2028 is a token of its own) > max_len - 2 = 4.
    self.assertEqual(meta["num_truncated_captions"], 4)
    self.assertEqual(meta["max_caption_tokens"], 6)

    files = sorted(p.name for p in self.out.iterdir())
    self.assertEqual(files, ["metadata.json", "train-00000-of-00002.tfrecord",
                             "train-00001-of-00002.tfrecord",
                             "validation-00000-of-00001.tfrecord"])
    got = {}
    for s in records.read_serialized(str(self.out / "train-*.tfrecord")):
      ex = records.parse_example(s, image_size=(8, 8))
      got[ex["key"].numpy().decode()] = ex
    self.assertEqual(sorted(got), sorted(f for f, _ in GOOD))
    self.assertAllEqual(got["red.png"]["image"][0, 0], [200, 0, 0])
    self.assertAllEqual(got["sub/gray.png"]["image"][0, 0], [90, 90, 90])
    self.assertAllEqual(got["alpha.png"]["image"][0, 0], [0, 255, 0])
    self.assertAllEqual(got["alpha.png"]["image"][7, 7], [255, 255, 255])
    self.assertAllClose(got["photo.jpg"]["image"], np.full([8, 8, 3], 128), atol=3)
    self.assertAllEqual(got["big.png"]["image"], np.full([8, 8, 3], 40))
    self.assertEqual(got["red.png"]["caption"].numpy().decode(), "一个红色的方块")
    self.assertEqual(got["line.png"]["caption"].numpy().decode(), "灰色\u2028方块")
    ids = got["red.png"]["caption_ids"].numpy().tolist()
    self.assertLen(ids, 6)  # [CLS] 一 个 红 色 [SEP]: truncated, [SEP] kept
    self.assertEqual((ids[0], ids[-1]), (101, 102))

    ds = pipeline.make_dataset(str(self.out / "train-*.tfrecord"), batch_size=5, max_len=6,
                               training=False)
    self.assertEqual(next(iter(ds))["image"].shape, (5, 8, 8, 3))

  def _many(self, captions_per_image):
    """A clean input: image i.png with captions_per_image[i] captions."""
    lines = []
    for i, n in enumerate(captions_per_image):
      self._png(f"{i}.png", np.full([8, 8, 3], i, np.uint8))
      lines += [json.dumps({"image": f"{i}.png", "caption": f"第{i}张图的说明{j}"},
                           ensure_ascii=False) for j in range(n)]
    self.input.write_text("\n".join(lines) + "\n", encoding="utf-8")

  def _held_out(self):
    return {records.parse_example(s)["key"].numpy().decode()
            for s in records.read_serialized(str(self.out / "validation-*.tfrecord"))}

  @pytest.mark.slow
  def test_validation_fraction_gives_the_split(self):
    self._many([1] * 20)
    for fraction, expected in ((0.1, 2), (0.25, 5), (0.5, 10), (0.0, 0)):
      meta = self._convert(validation_fraction=fraction)
      self.assertEqual(meta["splits"]["validation"]["num_records"], expected, fraction)
      self.assertEqual(meta["splits"]["train"]["num_records"], 20 - expected, fraction)
    # The held-out images of a smaller fraction stay held out at a larger one (hash order).
    small = (self._convert(validation_fraction=0.1), self._held_out())[1]
    large = (self._convert(validation_fraction=0.5), self._held_out())[1]
    self.assertLen(small, 2)
    self.assertTrue(small < large)

  def test_captions_of_an_image_stay_together(self):
    # The user walk of the README: 12 pictures, 16 captions (four pictures have two).
    self._many([2, 1, 2, 1, 1, 2, 1, 1, 2, 1, 1, 1])
    meta = self._convert(validation_fraction=0.25)
    n_val = meta["splits"]["validation"]["num_records"]
    self.assertIn(n_val, (4, 5))  # round(0.25 × 16) = 4, one more if a 2-caption image crosses
    train_keys = {records.parse_example(s)["key"].numpy().decode()
                  for s in records.read_serialized(str(self.out / "train-*.tfrecord"))}
    self.assertFalse(train_keys & self._held_out())

  def test_few_validation_captions_warn(self):
    self._many([1] * 20)
    logged = []
    make_dataset.convert(self.input, image_dir=self.image_dir, output_dir=self.out,
                         image_size=8, validation_fraction=0.1, log=logged.append)
    warning = [m for m in logged if m.startswith("warning:")]
    self.assertLen(warning, 1)
    self.assertIn("validation holds 2 captions (fewer than 20)", warning[0])
    logged.clear()
    make_dataset.convert(self.input, image_dir=self.image_dir, output_dir=self.out,
                         image_size=8, validation_fraction=0.0, log=logged.append)
    self.assertIn("validation holds 0 captions", "\n".join(logged))

  def test_missing_caption_key_is_named_with_its_line(self):
    self.input.write_text(
        json.dumps({"image": "red.png", "caption": "红色"}, ensure_ascii=False) + "\n"
        + json.dumps({"image": "red.png", "text": "红色"}, ensure_ascii=False) + "\n"
        + json.dumps({"caption": "没有图"}, ensure_ascii=False) + "\n"
        + json.dumps({"image": "red.png", "caption": 7}) + "\n", encoding="utf-8")
    meta = self._convert()
    reasons = "\n".join(meta["skipped_examples"])
    self.assertRegex(reasons, r'captions\.jsonl:2: missing key "caption" \(the line\'s keys: '
                              r'"image", "text"\)')
    self.assertRegex(reasons, r'captions\.jsonl:3: missing key "image"')
    self.assertRegex(reasons, r'captions\.jsonl:4: "caption" must be a string, got 7')
    self.assertNotIn("empty caption", reasons)

  def test_no_line_converted_is_an_error_and_writes_nothing(self):
    self.input.write_text(json.dumps({"image": "red.png", "text": "红色"}) + "\n",
                          encoding="utf-8")
    with self.assertRaisesRegex(make_dataset.errors.ConfigError,
                                r'no line of .*captions\.jsonl could be converted .*'
                                r'missing key "caption"'):
      self._convert()
    self.assertEqual(list(self.out.iterdir()), [])

  def test_fail_stops_at_the_line_and_writes_nothing(self):
    with self.assertRaisesRegex(make_dataset.BadRecordError,
                                r"captions\.jsonl:3: .*broken\.png.*undecodable image"):
      self._convert(on_bad_record="fail")
    self.assertEqual(list(self.out.iterdir()), [])  # no shard, no temporary file

  def test_cli_exit_code(self):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
      code = make_dataset.cli.run_argparse(make_dataset.main, [
          f"--input={self.input}", f"--image_dir={self.image_dir}", f"--output_dir={self.out}",
          "--on_bad_record=fail", "--image_size=8"])
    self.assertEqual(code, 2)
    self.assertIn("captions.jsonl:3:", stderr.getvalue())
    self.assertLen(stderr.getvalue().strip().splitlines(), 1, stderr.getvalue())
    with contextlib.redirect_stderr(io.StringIO()):
      self.assertEqual(make_dataset.main([f"--input={self.input}",
                                          f"--image_dir={self.image_dir}",
                                          f"--output_dir={self.out}", "--image_size=8",
                                          "--num_train_shards=1"]), 0)
    meta = json.loads((self.out / "metadata.json").read_text(encoding="utf-8"))
    self.assertEqual((meta["num_records"], meta["num_skipped"]), (6, 6))
    # A rerun with another shard count removes the old shards.
    self._convert()
    self.assertFalse((self.out / "train-00000-of-00001.tfrecord").exists())
    self.assertTrue((self.out / "train-00001-of-00002.tfrecord").exists())


if __name__ == "__main__":
  tf.test.main()
