"""Tests of m6t_tf.run.caption_metrics and the score_captions command.

Scorers pinned on hand-computed cases, Chinese tokenised by character, the two baselines on
real TFRecords, and the page parsed back: every image decodes and every caption is there.
"""

import base64
import contextlib
import html.parser
import io
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from m6t_tf.run import caption_metrics as cm  # pylint: disable=g-import-not-at-top
from m6t_tf import score_captions  # pylint: disable=g-import-not-at-top
from m6t_tf.data import records  # pylint: disable=g-import-not-at-top
from m6t_tf.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

H, W = 5, 7  # distinct sides so a transposed image would show


class TokenizeTest(tf.test.TestCase):

  def test_chinese_by_character_ascii_words_whole(self):
    self.assertEqual(cm.tokenize("OK手势中等肤色"), ["ok", "手", "势", "中", "等", "肤", "色"])
    self.assertEqual(cm.tokenize("按键9"), ["按", "键", "9"])
    self.assertEqual(cm.tokenize("18禁"), ["18", "禁"])
    self.assertEqual(cm.tokenize("new york的 café"), ["new", "york", "的", "café"])

  def test_full_width_case_and_punctuation(self):
    # NFKC folds full-width letters; PTB punctuation (and its Chinese forms) is dropped,
    # symbols that carry meaning ("#") are kept.
    self.assertEqual(cm.tokenize("ＯＫ，科科斯（基林）群岛。"),
                     ["ok", "科", "科", "斯", "基", "林", "群", "岛"])
    self.assertEqual(cm.tokenize("按键#"), ["按", "键", "#"])
    with self.assertRaisesRegex(TypeError, "must be a str"):
      cm.tokenize(None)

  def test_spaces_do_not_matter_for_chinese(self):
    # The model's detokenised output has no spaces between CJK characters; a scorer that
    # split on whitespace would see one "word" per caption.
    a = cm.score_captions({"x": "我爱北京", "y": "猫"}, {"x": ["我爱南京"], "y": ["狗"]})
    b = cm.score_captions({"x": "我 爱 北 京", "y": "猫"}, {"x": ["我 爱南京"], "y": ["狗"]})
    self.assertAllClose([a[m] for m in cm.METRIC_NAMES], [b[m] for m in cm.METRIC_NAMES])
    self.assertAllClose(a["BLEU-1"], 3 / 5, atol=1e-6)  # 我 爱 京 of 4 + 0 of 1, lengths 5 = 5

  def test_agrees_with_the_model_tokenizer_on_decoded_captions(self):
    # What generate writes (Tokenizer.decode: lower-cased, no spaces between CJK) must
    # tokenise like the reference it came from.
    tok = Tokenizer()
    for ref in ["OK手势中等肤色", "T恤", "科科斯(基林)群岛", "按键9", "DVD"]:
      decoded = tok.decode(tok.encode_caption(ref, 64))
      self.assertEqual(cm.tokenize(decoded), cm.tokenize(ref), (ref, decoded))


class ScoreTest(tf.test.TestCase):

  def test_identical_captions_score_one_and_ten(self):
    """Candidate == every reference: all precisions 1, no brevity penalty -> BLEU-n = 1.

    CIDEr-D: the TF-IDF vectors of candidate and reference are equal, so every n-gram
    cosine is 1 and the length penalty exp(0) = 1: 10 * mean_n 1 = 10 for captions of at
    least 4 characters (every n has n-grams) that share no n-gram across images (IDF > 0).
    """
    caps = {"a": "红色的苹果", "b": "蓝天白云下", "c": "一只小花猫"}
    corpus, per_image = cm.score_captions_per_image(caps, {k: [v, v] for k, v in caps.items()})
    for m in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
      self.assertAllClose(corpus[m], 1.0, atol=1e-6)
    self.assertAllClose(corpus["CIDEr-D"], 10.0, atol=1e-6)
    self.assertAllClose([per_image[k]["CIDEr-D"] for k in caps], [10.0] * 3, atol=1e-6)
    self.assertEqual(corpus["num_images"], 3)

  def test_bleu_by_hand(self):
    """Corpus BLEU sums clipped counts over images before the ratio (not a mean of images).

    Image x: candidate 我爱北京 vs 我爱南京: unigrams 3/4 match (我 爱 京), bigrams 1/3 (我爱).
    Image y: candidate 我爱 vs 我爱北京: unigrams 2/2, bigrams 1/1.
    Sums: unigrams 5/6, bigrams 2/4; candidate length 6, reference length 8, so the brevity
    penalty is exp(1 - 8/6) = exp(-1/3).
      BLEU-1 = 5/6 * exp(-1/3) = 0.59711;  BLEU-2 = sqrt(5/6 * 2/4) * exp(-1/3) = 0.46252.
    No trigram of x matches and y has none, so BLEU-3 is ~0 (the scorer's 1e-15 / 1e-9
    smoothing keeps it just above).
    Sentence BLEU of x: BLEU-1 = 3/4 (equal lengths), BLEU-2 = sqrt(3/4 * 1/3) = 1/2.
    """
    corpus, per_image = cm.score_captions_per_image(
        {"x": "我爱北京", "y": "我爱"}, {"x": ["我爱南京"], "y": ["我爱北京"]})
    bp = np.exp(-1 / 3)
    self.assertAllClose(corpus["BLEU-1"], 5 / 6 * bp, atol=1e-6)
    self.assertAllClose(corpus["BLEU-2"], np.sqrt(5 / 6 * 2 / 4) * bp, atol=1e-6)
    self.assertLess(corpus["BLEU-3"], 1e-4)
    self.assertAllClose(per_image["x"]["BLEU-1"], 0.75, atol=1e-6)
    self.assertAllClose(per_image["x"]["BLEU-2"], 0.5, atol=1e-6)

  def test_bleu_brevity_uses_the_closest_reference(self):
    """coco-caption's BLEU takes the reference length closest to the candidate's.

    x: 红色花 (3 characters) against 红 (1) and 红色的大 (4): the closest length is 4 (the
    shortest would be 1 and give no penalty). Unigrams 2/3 match (红 色), bigrams 1/2 (红色).
    y: 猫 against 猫: unigrams 1/1, no bigram. Corpus: unigrams 3/4, bigrams 1/2, candidate
    length 4 against reference length 4 + 1 = 5, so BLEU-2 = sqrt(3/4 * 1/2) * exp(1 - 5/4).
    """
    corpus = cm.score_captions({"x": "红色花", "y": "猫"}, {"x": ["红", "红色的大"], "y": ["猫"]})
    self.assertAllClose(corpus["BLEU-2"], np.sqrt(3 / 4 * 1 / 2) * np.exp(-0.25), atol=1e-6)

  def test_cider_d_by_hand_and_ranking(self):
    """Two images, one reference each, no n-gram shared: every IDF is log(2) - log(1).

    A 2-character candidate equal to its reference: cosine 1 for uni- and bigrams, 0 for
    tri- and 4-grams (none), so CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4 = 5. A candidate sharing
    no n-gram with its reference scores 0.
    """
    _, per_image = cm.score_captions_per_image({"a": "小猫", "b": "大狗"},
                                               {"a": ["小猫"], "b": ["飞机"]})
    self.assertAllClose(per_image["a"]["CIDEr-D"], 5.0, atol=1e-6)
    self.assertAllClose(per_image["b"]["CIDEr-D"], 0.0, atol=1e-6)
    refs = {"a": ["一只小花猫"], "b": ["一只大黄狗"], "c": ["红色的汽车"]}
    exact = cm.score_captions({"a": "一只小花猫", "b": "一只大黄狗", "c": "红色的汽车"}, refs)
    close = cm.score_captions({"a": "一只小猫", "b": "一只大狗", "c": "红色汽车"}, refs)
    wrong = cm.score_captions({"a": "红色的汽车", "b": "一只小花猫", "c": "一只大黄狗"}, refs)
    self.assertGreater(exact["CIDEr-D"], close["CIDEr-D"])
    self.assertGreater(close["CIDEr-D"], wrong["CIDEr-D"])
    # The Gaussian length penalty: the same n-grams plus a repeated tail score lower.
    longer = cm.score_captions({"a": "一只小花猫猫猫猫", "b": "一只大黄狗", "c": "红色的汽车"},
                               refs)
    self.assertLess(longer["CIDEr-D"], exact["CIDEr-D"])

  def test_bad_input_names_the_key(self):
    with self.assertRaisesRegex(ValueError, "no references for caption key '1F600'"):
      cm.score_captions({"1F600": "笑脸", "1F601": "笑"}, {"1F601": ["笑"]})
    with self.assertRaisesRegex(ValueError, "references of key 'k'"):
      cm.score_captions({"k": "猫"}, {"k": []})
    with self.assertRaisesRegex(ValueError, "references of key 'k'"):
      cm.score_captions({"k": "猫"}, {"k": "猫"})
    with self.assertRaisesRegex(ValueError, "caption of key 'k' must be a str"):
      cm.score_captions({"k": None}, {"k": ["猫"]})
    with self.assertRaisesRegex(ValueError, "no captions"):
      cm.score_captions({}, {"k": ["猫"]})


def _image(value: int, rng: np.random.Generator | None = None) -> np.ndarray:
  im = np.full([H, W, 3], value, np.uint8)
  if rng is not None:
    im = np.clip(im.astype(int) + rng.integers(-3, 4, im.shape), 0, 255).astype(np.uint8)
  return im


def _write(path: str, items: list[tuple[str, str, np.ndarray]]) -> None:
  tok = Tokenizer()
  records.write_records(path, [
      records.make_example(key=k, caption=c, caption_ids=tok.encode_caption(c, 32), image=im)
      for k, c, im in items])


TRAIN = [("t0", "红色方块", 10), ("t1", "蓝色方块", 80), ("t2", "绿色圆圈", 150),
         ("t3", "黄色星星", 220), ("t4", "红色圆圈", 80)]  # t4 ties t1: t1 is read first
VALID = [("v0", "红色方块", 12), ("v1", "蓝色的方块", 75), ("v1", "蓝方块", 75),
         ("v2", "黄色的星", 200)]


def _write_splits(d: str) -> tuple[str, str]:
  """TRAIN and VALID as TFRecords in `d`; validation images get a little noise."""
  rng = np.random.default_rng(0)
  _write(os.path.join(d, "train-00000-of-00001.tfrecord"),
         [(k, c, _image(v)) for k, c, v in TRAIN])
  _write(os.path.join(d, "validation-00000-of-00001.tfrecord"),
         [(k, c, _image(v, rng)) for k, c, v in VALID])
  return os.path.join(d, "train-*"), os.path.join(d, "validation-*")


class BaselinesTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.train, self.valid = _write_splits(self.get_temp_dir())

  def test_read_split_and_references(self):
    split = cm.read_split(self.valid)
    self.assertEqual(split.keys, ["v0", "v1", "v1", "v2"])
    self.assertEqual(split.images.shape, (4, H, W, 3))
    self.assertEqual(split.references(), {"v0": ["红色方块"], "v1": ["蓝色的方块", "蓝方块"],
                                          "v2": ["黄色的星"]})

  def test_the_two_baselines(self):
    b = cm.baselines(self.train, self.valid, 32)
    self.assertEqual(set(b), {"most_frequent", "nearest_image"})
    # All five training captions occur once, so the mean training count of their characters
    # decides: 红 (twice) lifts 红色方块 and 红色圆圈 to (2 + 5 + 2 + 2) / 4 = 2.75 against
    # 2.5; between the two the first in code-point order (圆 U+5706 < 方 U+65B9) wins.
    self.assertEqual(b["most_frequent"], {"v0": "红色圆圈", "v1": "红色圆圈", "v2": "红色圆圈"})
    self.assertEqual(b["nearest_image"], {"v0": "红色方块", "v1": "蓝色方块", "v2": "黄色星星"})

  def test_most_frequent_caption_counts_first(self):
    self.assertEqual(cm.most_frequent_caption(["猫", "狗", "狗", "红色的猫"]), "狗")
    # Mean character counts: 蓝猫 (1 + 2) / 2, 红色 (2 + 2) / 2, 红色的猫 (2 + 2 + 1 + 2) / 4.
    self.assertEqual(cm.most_frequent_caption(["蓝猫", "红色", "红色的猫"]), "红色")
    with self.assertRaisesRegex(ValueError, "no captions"):
      cm.most_frequent_caption([])

  def test_nearest_images_is_exact_brute_force(self):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, [37, 4, 6, 3], dtype=np.uint8)
    query = rng.integers(0, 256, [11, 4, 6, 3], dtype=np.uint8)
    query[3] = train[20]  # an exact copy: distance 0
    train[30] = train[20]  # and a later duplicate, which must not win the tie
    d = ((query.reshape(11, 1, -1).astype(np.int64) -
          train.reshape(1, 37, -1).astype(np.int64)) ** 2).sum(-1)
    index, dist = cm.nearest_images(train, query, chunk=8)
    self.assertAllEqual(index, d.argmin(1))
    self.assertAllEqual(dist, d.min(1))
    self.assertEqual(index[3], 20)
    with self.assertRaisesRegex(ValueError, "differ in size"):
      cm.nearest_images(train, query[:, :3])

  def test_unknown_key(self):
    with self.assertRaisesRegex(ValueError, "key 'nope' is not a record"):
      cm.baselines_from_splits(cm.read_split(self.train), cm.read_split(self.valid), ["nope"])


class _Page(html.parser.HTMLParser):
  """Collects the <img> sources and the text of every element by class."""

  def __init__(self):
    super().__init__()
    self.images, self.text, self.charset = [], {}, None
    self._classes = []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "img":
      self.images.append(attrs["src"])
    if tag == "meta" and "charset" in attrs:
      self.charset = attrs["charset"]
    if tag not in ("img", "meta", "br"):
      self._classes.append(attrs.get("class"))

  def handle_endtag(self, tag):
    if tag not in ("img", "meta", "br"):
      self._classes.pop()

  def handle_data(self, data):
    if self._classes and self._classes[-1]:
      self.text.setdefault(self._classes[-1], []).append(data.strip())


def _parse(path: str) -> _Page:
  page = _Page()
  with open(path, encoding="utf-8") as f:
    page.feed(f.read())
  return page


def _decode(src: str) -> np.ndarray:
  head, data = src.split(",", 1)
  assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
  return tf.io.decode_image(base64.b64decode(data, validate=True)).numpy()


class WriteHtmlTest(tf.test.TestCase):

  def test_every_image_and_caption_is_on_the_page(self):
    d = self.get_temp_dir()
    photo = os.path.join(d, "photo.jpg")
    big = np.zeros([600, 300, 3], np.uint8)
    big[:, :150] = 200
    tf.io.write_file(photo, tf.io.encode_jpeg(big))
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, [H, W, 3], dtype=np.uint8) for _ in range(3)]
    rows = [{"key": f"k{i}", "image": None, "caption": f"第{i}个<红色>方块",
             "log_prob": -1.5 - i, "score": -1.5 - i, "image_png": cm.encode_png(pixels[i]),
             "candidates": [{"caption": f"第{i}个<红色>方块", "log_prob": -1.5, "score": -1.5},
                            {"caption": f"候选{i}", "log_prob": -2.0, "score": -2.5}],
             "references": [f"第{i}个红色方块", f"参考{i}"]} for i in range(3)]
    rows.append({"key": photo, "image": photo, "caption": "一张照片", "references": [],
                 "baselines": {"most_frequent": None, "nearest_image": "最近的图"}})
    metrics = {"model": cm.score_captions({r["key"]: r["caption"] for r in rows[:3]},
                                          {r["key"]: r["references"] for r in rows[:3]})}
    path = os.path.join(d, "captions.html")
    cm.write_html(path, rows, title="测试页", metrics=metrics)

    page = _parse(path)
    self.assertEqual(page.charset, "utf-8")
    self.assertLen(page.images, 4)
    for i in range(3):
      self.assertAllEqual(_decode(page.images[i]), pixels[i])  # PNG: lossless
    thumb = _decode(page.images[3])  # a large photo is embedded as a thumbnail
    self.assertEqual(thumb.shape, (384, 192, 3))
    self.assertAllClose(thumb[:, :90].mean(), 200, atol=3)
    self.assertEqual(page.text["caption"], [r["caption"] for r in rows])
    self.assertEqual(page.text["reference"], [x for r in rows for x in r["references"]])
    self.assertEqual(page.text["candidate"], ["候选0", "候选1", "候选2"])
    self.assertEqual(page.text["baseline"], ["最近的图"])  # a baseline without caption is left out
    _, per_image = cm.score_captions_per_image({r["key"]: r["caption"] for r in rows[:3]},
                                               {r["key"]: r["references"] for r in rows[:3]})
    labels = " ".join(page.text["label"])
    for r in rows[:3]:  # per-image scores, computed by write_html over the rows with references
      self.assertIn(f"CIDEr-D {per_image[r['key']]['CIDEr-D']:.3f}", labels)
      self.assertIn(f"log p {r['log_prob']:.3f}", labels)
    with open(path, encoding="utf-8") as f:
      content = f.read()
    self.assertIn("Noto Sans CJK SC", content)  # a CJK font fallback list
    self.assertIn("CIDEr-D", content)

  def test_bad_rows(self):
    path = os.path.join(self.get_temp_dir(), "bad.html")
    with self.assertRaisesRegex(ValueError, r"row 0 \(key 'k'\) has no 'caption'"):
      cm.write_html(path, [{"key": "k"}], title="x")
    with self.assertRaisesRegex(ValueError, "row 'k' has no image"):
      cm.write_html(path, [{"key": "k", "caption": "猫"}], title="x")
    self.assertFalse(os.path.exists(path))


class CommandTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.train, self.valid = _write_splits(self.get_temp_dir())

  def _captions(self, rows):
    path = os.path.join(self.get_temp_dir(), "captions.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path

  def test_end_to_end(self):
    d = self.get_temp_dir()
    caps = self._captions([{"key": "v0", "caption": "红色方块", "log_prob": -1.0, "score": -1.0},
                           {"key": "v1", "caption": "蓝色方块", "log_prob": -2.0, "score": -2.0},
                           {"key": "v2", "caption": "黄色星星", "log_prob": -3.0, "score": -3.0}])
    out, page = os.path.join(d, "m.json"), os.path.join(d, "c.html")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      table = score_captions.score_file(caps, references=self.valid, train_data=self.train,
                                        html=page, out=out)
    # These captions are the nearest-image baseline's: the two rows agree.
    nearest = table["nearest_image"]
    self.assertEqual(table["model"], nearest)
    self.assertGreater(nearest["CIDEr-D"], table["most_frequent"]["CIDEr-D"])
    self.assertIn("nearest training image", printed.getvalue())
    with open(out, encoding="utf-8") as f:
      written = json.load(f)
    self.assertEqual(written["metrics"]["model"], table["model"])
    self.assertEqual(written["most_frequent_training_caption"], "红色圆圈")
    parsed = _parse(page)
    self.assertLen(parsed.images, 3)
    self.assertAllEqual(_decode(parsed.images[1]), cm.read_split(self.valid).images[1])
    self.assertEqual(parsed.text["reference"], ["红色方块", "蓝色的方块", "蓝方块", "黄色的星"])

  def test_references_from_rows_and_errors(self):
    caps = self._captions([{"key": "a", "caption": "红色", "references": ["红色"]},
                           {"key": "b", "caption": "蓝", "references": ["绿色"]}])
    with contextlib.redirect_stdout(io.StringIO()):
      table = score_captions.score_file(caps)
    self.assertEqual(table["model"]["num_images"], 2)
    with self.assertRaisesRegex(ValueError, "caption key 'a' is not in --references"):
      score_captions.score_file(caps, references=self.valid)
    with self.assertRaisesRegex(ValueError, "--train_data needs --references"):
      score_captions.score_file(caps, train_data=self.train)
    with self.assertRaisesRegex(ValueError, "row 'a' has neither an 'image'"):
      score_captions.score_file(caps, html=os.path.join(self.get_temp_dir(), "x.html"))
    no_refs = self._captions([{"key": "a", "caption": "红色"}])
    with self.assertRaisesRegex(ValueError, "row 'a' of .* has no 'references'"):
      score_captions.score_file(no_refs)
    bad = self._captions([{"key": "a"}])
    with self.assertRaisesRegex(ValueError, r"captions.jsonl:1: a row needs a string"):
      score_captions.score_file(bad)


if __name__ == "__main__":
  tf.test.main()
