"""`python -m m6t_tf.generate` on a real (tiny, briefly trained) checkpoint, and its parts.

* image files are decoded and resized exactly as tools/make_dataset.py built the records;
* the in-graph detokeniser equals `Tokenizer.decode`;
* --split rows follow the captions contract, references are every caption of the image;
* --images on PNG files of the validation pixels gives the captions of --split;
* the exported SavedModel, in a process without m6t_tf, serves the same captions, and answers
  bad requests (empty, random bytes, a truncated JPEG, an 8000×8000 PNG) with an error each,
  grey and RGBA images with a caption, without changing the captions of the good ones;
* 2 ranks under horovodrun (experts sharded, 4 of 8 per rank; an odd number of images so one
  rank decodes a filler row in lockstep) give the rows of 1 process.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.models import decoding
from m6t_tf.run import captioning
from m6t_tf.run import generation
from m6t_tf.errors import ConfigError
from m6t_tf.data import detokenizer as detokenizer_lib
from m6t_tf.data import images as images_lib
from m6t_tf.data import records
from m6t_tf.data import tokenizer as tokenizer_lib
from tests import jobs
from tests import support
from tests.support import DEMO, HOROVODRUN, REPO

VALIDATION = os.path.join(DEMO, "validation-*.tfrecord")
ROW_KEYS = {"key", "image", "caption", "log_prob", "score", "num_tokens", "candidates",
            "references"}

make_dataset = support.load_tool("tools/make_dataset.py")


def train_tiny(model_dir: str) -> None:
  """Two trainer steps of demo.gin shrunk by tiny.gin (init_std 0.2: decisive random logits)."""
  args = [sys.executable, "-m", "m6t_tf.train", "--gin_file=gin/demo.gin",
          "--gin_file=gin/tiny.gin", f"--model_dir={model_dir}",
          "--gin_bindings=train.num_steps=2", "--gin_bindings=INIT_STD = 0.2",
          "--gin_bindings=DROPOUT = 0.0"]
  proc = subprocess.run(args, cwd=REPO, env=jobs.worker_env(), capture_output=True, text=True,
                        timeout=300)
  if proc.returncode:
    raise RuntimeError(f"training failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def _is_cjk(ch):
  return tokenizer_lib._is_cjk(ch)  # pylint: disable=protected-access


class ImagesAndDetokenizerTest(tf.test.TestCase):

  def test_decode_image_matches_dataset_builder(self):
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    rng = np.random.default_rng(0)
    cases = {
        "rgb.png": rng.integers(0, 256, [50, 70, 3], dtype=np.uint8),
        "rgba.png": rng.integers(0, 256, [64, 64, 4], dtype=np.uint8),   # same size: no resize
        "grey.png": rng.integers(0, 256, [33, 20, 1], dtype=np.uint8),
        "grey_alpha.png": rng.integers(0, 256, [40, 40, 2], dtype=np.uint8),
        "photo.jpg": rng.integers(0, 256, [90, 60, 3], dtype=np.uint8),
        "photo.bmp": rng.integers(0, 256, [20, 30, 3], dtype=np.uint8),
    }
    for name, pixels in cases.items():
      path = os.path.join(tmp, name)
      if name.endswith(".png"):
        data = tf.io.encode_png(pixels)
      elif name.endswith(".jpg"):
        data = tf.io.encode_jpeg(pixels, quality=90)
      else:
        data = _bmp(pixels)
      tf.io.write_file(path, data)
      with self.subTest(name):
        want = make_dataset.resize(make_dataset.load_rgb(path), 64)
        got = images_lib.decode_image(tf.io.read_file(path), 64).numpy()
        self.assertAllEqual(got, want)
    got = captioning.read_image_files([os.path.join(tmp, "rgb.png")], 64)[0].features
    self.assertAllEqual(got, make_dataset.resize(make_dataset.load_rgb(
        os.path.join(tmp, "rgb.png")), 64))
    bad = os.path.join(tmp, "notes.png")
    with open(bad, "w") as f:
      f.write("not an image")
    with self.assertRaisesRegex(ConfigError, "notes.png: undecodable image"):
      captioning.read_image_files([bad], 64)
    with self.assertRaisesRegex(ConfigError, "nothing-here"):
      captioning.list_image_files(os.path.join(tmp, "nothing-here/*.jpg"))

  def test_decode_requests_answers_each_request(self):
    """Every served format decodes as `decode_image`; a header is read before any pixel, so an
    oversized image is refused undecoded; a bad request never fails the batch."""
    import base64
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, [30, 20, 3], dtype=np.uint8)
    png = tf.io.encode_png(pixels).numpy()
    jpeg = tf.io.encode_jpeg(pixels).numpy()
    gif = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
    webp_lossless = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")
    webp_lossy = base64.b64decode(
        "UklGRiIAAABXRUJQVlA4IBYAAAAwAQCdASoBAAEADsD+JaQAA3AAAAAA")
    # Headers only, declaring 10000 × 5000 (BMP top-down, WebP extended) or 65535 × 65535 (GIF).
    bmp_header = (b"BM" + b"\0" * 16 + (10000).to_bytes(4, "little")
                  + (2**32 - 5000).to_bytes(4, "little") + b"\0" * 30)
    webp_header = (b"RIFF\0\0\0\0WEBPVP8X" + b"\0" * 8 + (9999).to_bytes(3, "little")
                   + (4999).to_bytes(3, "little"))
    gif_header = b"GIF89a\xff\xff\xff\xff" + b"\0" * 20
    requests = {
        "png": (png, ""), "jpeg": (jpeg, ""), "bmp": (_bmp(pixels), ""), "gif": (gif, ""),
        "webp_lossless": (webp_lossless, ""), "webp_lossy": (webp_lossy, ""),
        "empty": (b"", "empty request: no image bytes"),
        "text": (b"not an image", "not a PNG, JPEG, GIF, BMP or WebP file (12 bytes)"),
        "jpeg_xl": (b"\xff\x0a" + b"\0" * 40, "not a PNG, JPEG, GIF, BMP or WebP file (42 bytes)"),
        "truncated_png": (png[:60], "corrupt or truncated PNG file (60 bytes): it does not decode"),
        "bmp_header": (bmp_header, "BMP of 10000x5000 = 50000000 pixels: above this server's "
                                   "limit of 40000000 pixels; send it smaller"),
        "webp_header": (webp_header, "WebP of 10000x5000 = 50000000 pixels: above this "
                                     "server's limit of 40000000 pixels; send it smaller"),
        "gif_header": (gif_header, "GIF of 65535x65535 = 4294836225 pixels: above this "
                                   "server's limit of 40000000 pixels; send it smaller"),
    }
    decode = tf.function(lambda d: images_lib.decode_requests(d, 16, 40_000_000),
                         input_signature=[tf.TensorSpec([None], tf.string)])  # as served
    got, errors = decode(tf.constant([r for r, _ in requests.values()]))
    for i, (name, (data, error)) in enumerate(requests.items()):
      with self.subTest(name):
        self.assertEqual(errors[i].numpy().decode(), error)
        want = (images_lib.decode_image(tf.constant(data), 16).numpy() if not error
                else np.zeros([16, 16, 3], np.uint8))
        self.assertAllEqual(got[i], want)
    got, errors = decode(tf.constant([b""]))                 # nothing decodes in the batch
    self.assertEqual(errors.numpy().tolist(), [b"empty request: no image bytes"])
    got, errors = decode(tf.constant([], tf.string))
    self.assertEqual(got.shape, [0, 16, 16, 3])

  def test_detokenizer_matches_tokenizer_decode(self):
    tok = tokenizer_lib.Tokenizer()
    detok = detokenizer_lib.Detokenizer(tok._tokens)  # pylint: disable=protected-access
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tok.vocab_size, [3000, 7]).astype(np.int32)
    ids[:, 0] = tokenizer_lib.CLS_ID
    ids[::4, 4] = tokenizer_lib.SEP_ID
    ids[::5, 5:] = tokenizer_lib.PAD_ID
    texts = ["一只猫坐在窗台上", "new york 的 猫", "ｈｅｌｌｏ world！", "emoji 表情 2024 年",
             "playing 足球"]
    encoded = [[tokenizer_lib.CLS_ID] + i + [tokenizer_lib.SEP_ID] for i in tok.encode(texts)]
    width = max(map(len, encoded))
    encoded = np.array([e + [0] * (width - len(e)) for e in encoded], np.int32)
    for batch in (ids, encoded):
      got = [t.decode("utf-8") for t in detok(tf.constant(batch)).numpy()]
      self.assertEqual(got, [tok.decode(row) for row in batch])
    pieces = [tok.id_to_token(int(i)) for i in encoded.ravel()]
    self.assertTrue(any(p.startswith("##") for p in pieces), pieces)  # glued pieces exercised
    self.assertIn("new york", tok.decode(encoded[1]))                 # a space put back
    self.assertEqual(tok.decode(encoded[0]), "一只猫坐在窗台上")


def _bmp(pixels):
  """A 24-bit BMP file of <uint8>[H, W, 3] (TensorFlow has no BMP encoder)."""
  h, w, _ = pixels.shape
  row = (w * 3 + 3) // 4 * 4
  body = b"".join(pixels[y, :, ::-1].tobytes().ljust(row, b"\0") for y in range(h - 1, -1, -1))
  header = (b"BM" + (54 + len(body)).to_bytes(4, "little") + b"\0" * 4 +
            (54).to_bytes(4, "little") + (40).to_bytes(4, "little") + w.to_bytes(4, "little") +
            h.to_bytes(4, "little") + (1).to_bytes(2, "little") + (24).to_bytes(2, "little") +
            b"\0" * 24)
  return header + body


@pytest.mark.multiprocess
class GenerateTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    support.require_demo()
    cls.tmp = os.path.join(REPO, "runs", "test_generate")
    shutil.rmtree(cls.tmp, ignore_errors=True)
    os.makedirs(cls.tmp)
    cls.model_dir = os.path.join(cls.tmp, "model")
    train_tiny(cls.model_dir)
    cls.out = os.path.join(cls.tmp, "split.jsonl")
    cls.result = generation.generate(cls.model_dir, split="validation", num_images=5,
                                     options=decoding.DecodeOptions(method="greedy", max_len=0),
                                     batch_size=4, out=cls.out, log=lambda *a: None)
    cls.rows = cls.result["rows"]

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_split_rows_follow_the_contract(self):
    with open(self.out, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual(rows, json.loads(json.dumps(self.rows)))
    self.assertLen(rows, 5)
    refs = {}
    for ex in records.read_serialized(VALIDATION):
      parsed = tf.train.Example.FromString(ex).features.feature
      refs.setdefault(parsed["key"].bytes_list.value[0].decode(), []).append(
          parsed["caption"].bytes_list.value[0].decode())
    self.assertEqual([r["key"] for r in rows], list(refs)[:5])
    for r in rows:
      self.assertEqual(set(r), ROW_KEYS)
      self.assertEqual(r["references"], refs[r["key"]])
      self.assertIsNone(r["image"])
      self.assertTrue(r["caption"])
      self.assertNotIn("##", r["caption"])
      for a, b in zip(r["caption"], r["caption"][1:]):
        self.assertFalse(a == " " and _is_cjk(b), r["caption"])
      self.assertEqual(r["score"], r["log_prob"])
      self.assertLess(r["log_prob"], 0)
      self.assertEqual(r["candidates"][0]["caption"], r["caption"])
      # num_tokens counts the generated tokens and [SEP]: at least 2, at most max_len - 1.
      self.assertBetween(r["num_tokens"], 2, 11)

  def test_images_give_the_captions_of_their_records(self):
    items = captioning.read_split_items(VALIDATION, image_mode="pixels", max_len=12)[:5]
    folder = os.path.join(self.tmp, "photos")
    os.makedirs(folder, exist_ok=True)
    for i, item in enumerate(items):
      tf.io.write_file(os.path.join(folder, f"{i}.png"), tf.io.encode_png(item.features))
    result = generation.generate(self.model_dir, images=os.path.join(folder, "*.png"),
                                 options=decoding.DecodeOptions(max_len=0), batch_size=3,
                                 out=os.path.join(self.tmp, "images.jsonl"),
                                 log=lambda *a: None)
    rows = result["rows"]
    self.assertEqual([r["image"] for r in rows],
                     [os.path.join(folder, f"{i}.png") for i in range(5)])
    self.assertEqual([r["caption"] for r in rows], [r["caption"] for r in self.rows])
    self.assertEqual([r["references"] for r in rows], [[]] * 5)

  def test_bad_arguments(self):
    for kwargs, needle in ((dict(), "exactly one of"),
                           (dict(split="test"), "split='test'"),
                           (dict(split="validation", batch_size=0), "batch_size=0")):
      with self.subTest(needle), self.assertRaisesRegex(ConfigError, needle):
        generation.generate(self.model_dir, options=decoding.DecodeOptions(), **kwargs)
    with self.assertRaisesRegex(ConfigError, "max_len=40"):
      generation.generate(self.model_dir, split="validation",
                          options=decoding.DecodeOptions(max_len=40), log=lambda *a: None)
    with self.assertRaisesRegex(ConfigError, "config.gin not found"):
      generation.generate(self.tmp, split="validation", options=decoding.DecodeOptions())

  def test_exported_saved_model_needs_only_tensorflow(self):
    """A process that never imports m6t_tf (nor tensorflow_text) serves the captions of generate."""
    served = self._served()
    self.assertEqual(served["modules"], [])
    good = served["good"]
    self.assertEqual(good["captions"], [r["caption"] for r in self.rows])
    self.assertEqual(good["errors"], [""] * 5)
    self.assertAllClose(good["log_probs"], [r["log_prob"] for r in self.rows], atol=1e-4)
    self.assertAllClose(good["scores"], good["log_probs"])

  def test_served_model_survives_bad_requests(self):
    """Each bad request gets its own error (or, grey and RGBA, a caption), alone or among good
    ones, and the good requests before, among and after them get the same captions."""
    served = self._served()
    captions = served["good"]["captions"]
    want = {"empty": re.escape("empty request: no image bytes"),
            "random": re.escape("not a PNG, JPEG, GIF, BMP or WebP file (1000 bytes)"),
            "truncated_jpeg": r"corrupt or truncated JPEG file \(\d+ bytes\): it does not decode",
            "huge_png": re.escape("PNG of 8000x8000 = 64000000 pixels: above this server's "
                                  "limit of 25000000 pixels; send it smaller"),
            "grey": "", "rgba": ""}
    self.assertEqual(list(served["alone"]), list(want))
    for name, pattern in want.items():
      with self.subTest(name):
        alone, after = served["alone"][name], served["after"][name]
        if pattern:
          self.assertRegex(alone["errors"][0], "^" + pattern + "$")
          self.assertEqual(alone["captions"], [""])
          self.assertEqual(alone["num_tokens"], [0])
          self.assertTrue(np.isnan(alone["log_probs"][0]) and np.isnan(alone["scores"][0]))
        else:
          self.assertEqual(alone["errors"], [""])
          self.assertTrue(alone["captions"][0])
          self.assertTrue(np.isfinite(alone["log_probs"][0]))
        self.assertEqual(after["captions"], captions[:1])    # the next good request
    mixed = served["mixed"]                                  # bad and good in one batch
    names = list(want) + ["good0", "good1"]
    for i, name in enumerate(names):
      if name.startswith("good"):
        self.assertEqual(mixed["captions"][i], captions[int(name[-1])])
        self.assertEqual(mixed["errors"][i], "")
      else:
        self.assertEqual(mixed["errors"][i], served["alone"][name]["errors"][0])
        self.assertEqual(mixed["captions"][i], served["alone"][name]["captions"][0])
    self.assertEqual(served["good_again"]["captions"], captions)

  _SERVED = None

  def _served(self):
    """Exports the model once and runs every request in one process without m6t_tf."""
    if GenerateTest._SERVED is not None:
      return GenerateTest._SERVED
    from m6t_tf.run import serving as export_lib
    export_dir = os.path.join(self.tmp, "export")
    export_lib.export_model(self.model_dir, export_dir, options=decoding.DecodeOptions(),
                            serving_batch=2)
    with self.assertRaisesRegex(ValueError, "not empty"):
      export_lib.export_model(self.model_dir, export_dir, options=decoding.DecodeOptions())
    items = captioning.read_split_items(VALIDATION, image_mode="pixels", max_len=12)[:5]
    files = []
    for i, item in enumerate(items):  # PNG: lossless, so pixels are exact
      files.append(os.path.join(self.tmp, f"serve{i}.png"))
      tf.io.write_file(files[-1], tf.io.encode_png(item.features))
    pixels = items[0].features
    jpeg = tf.io.encode_jpeg(pixels).numpy()
    alpha = np.full(pixels.shape[:2] + (1,), 200, np.uint8)
    bad = {"empty": b"", "random": np.random.default_rng(0).bytes(1000),
           "truncated_jpeg": jpeg[:len(jpeg) // 2],
           "huge_png": tf.io.encode_png(tf.zeros([8000, 8000, 3], tf.uint8)).numpy(),
           "grey": tf.io.encode_png(pixels[..., :1]).numpy(),
           "rgba": tf.io.encode_png(np.concatenate([pixels, alpha], -1)).numpy()}
    bad_files = {}
    for name, data in bad.items():
      bad_files[name] = os.path.join(self.tmp, f"bad_{name}")
      with open(bad_files[name], "wb") as f:
        f.write(data)
    client = (
        "import json, sys\n"
        "import numpy as np\n"
        "import tensorflow as tf\n"
        f"serve = tf.saved_model.load({export_dir!r}).signatures['serving_default']\n"
        f"good = [open(f, 'rb').read() for f in {files!r}]\n"
        f"bad = {{k: open(f, 'rb').read() for k, f in {bad_files!r}.items()}}\n"
        "def call(data):\n"
        "  out = serve(images=tf.constant(data, tf.string))\n"
        "  return {'captions': [c.decode('utf-8') for c in out['captions'].numpy()],\n"
        "          'errors': [e.decode('utf-8') for e in out['errors'].numpy()],\n"
        "          'num_tokens': out['num_tokens'].numpy().tolist(),\n"
        "          'log_probs': out['log_probs'].numpy().tolist(),\n"
        "          'scores': out['scores'].numpy().tolist()}\n"
        "result = {'good': call(good), 'alone': {}, 'after': {}}\n"
        "for name, data in bad.items():\n"
        "  result['alone'][name] = call([data])\n"
        "  result['after'][name] = call(good[:1])\n"
        "result['mixed'] = call(list(bad.values()) + good[:2])\n"
        "result['good_again'] = call(good)\n"
        "result['modules'] = [m for m in sys.modules\n"
        "                     if m.startswith(('m6t_tf', 'tensorflow_text'))]\n"
        "print(json.dumps(result))\n")
    env = jobs.worker_env()
    env.pop("PYTHONPATH")
    proc = subprocess.run([sys.executable, "-c", client], cwd=self.tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    GenerateTest._SERVED = json.loads(proc.stdout.strip().splitlines()[-1])
    return GenerateTest._SERVED

  def test_two_ranks_equal_one_process(self):
    support.require_horovodrun()
    out = os.path.join(self.tmp, "two.jsonl")
    args = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
            "m6t_tf.generate", f"--model_dir={self.model_dir}", "--split=validation",
            "--num_images=5", "--batch_size=4", f"--out={out}"]
    proc = subprocess.run(args, cwd=REPO, env=jobs.worker_env(), capture_output=True, text=True,
                          timeout=400)
    self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] + proc.stderr[-3000:])
    self.assertIn("on 2 worker(s)", proc.stdout)
    with open(out, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual([r["caption"] for r in rows], [r["caption"] for r in self.rows])
    self.assertEqual([r["key"] for r in rows], [r["key"] for r in self.rows])
    self.assertAllClose([r["log_prob"] for r in rows], [r["log_prob"] for r in self.rows],
                        atol=1e-5)


if __name__ == "__main__":
  tf.test.main()
