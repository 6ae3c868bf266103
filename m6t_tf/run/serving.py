"""A SavedModel that captions encoded images with TensorFlow alone (TF Serving's convention).

`CaptionServer` puts the whole path from file bytes to text in one graph:

    <string>[N] PNG/JPEG/GIF/BMP/WebP bytes
      → decode, alpha over white, RGB, antialiased resize      (`m6t_tf.data.images`)
      → chunks of `serving_batch` images (the last one padded with filler rows)
      → greedy or beam decoding with the KV cache               (`m6t_tf.models.decoding`)
      → detokenisation by vocabulary tables and string ops      (`m6t_tf.data.detokenizer`)
      → {"captions": <string>[N], "scores": <float32>[N], "log_probs": <float32>[N],
         "num_tokens": <int32>[N], "errors": <string>[N]}

The contract for bad requests: every request of a batch gets its own answer, and a bad one
never fails the batch nor changes the other captions. `errors[i]` is "" for a captioned image;
otherwise it says what is wrong with request i, and `captions[i]` is "", `num_tokens[i]` 0,
`scores[i]` and `log_probs[i]` NaN (nothing was scored):

  * empty bytes: "empty request: no image bytes";
  * bytes that are not PNG, JPEG, GIF, BMP or WebP (by their leading bytes; JPEG XL, which
    `tf.io.decode_image` also reads, is refused: its size is not checked before decoding):
    "not a PNG, JPEG, GIF, BMP or WebP file (N bytes)";
  * an image whose header declares more than `max_pixels` pixels (default 25 million, e.g.
    5000×5000; `m6t_tf.export --max_pixels`): refused before its pixels are decoded, so that
    one request cannot exhaust the server's memory: "PNG of 8000x8000 = 64000000 pixels: above
    this server's limit of 25000000 pixels; send it smaller";
  * a file that does not decode (truncated, corrupt): "corrupt or truncated JPEG file (N
    bytes): it does not decode".

Any other size is resized to the training images' side as the dataset builder did; grayscale
is replicated to RGB, an alpha channel composited over white. Rows of bad requests are decoded
as filler rows (not routed by the MoE layers), so the captions of the good ones are those they
get alone.

Decoding needs static shapes (MoE capacity is C = T of the decode call), so a request of any
size is cut into fixed chunks; since every MoE layer routes with C = T, an image's caption does
not depend on the chunk it lands in, and equals what `m6t_tf.generate` writes for the same file.
The graph uses only core TensorFlow ops (no tensorflow_text): a client loads it with
`tf.saved_model.load` and nothing else.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from m6t_tf import storage
from m6t_tf.data import detokenizer as detokenizer_lib
from m6t_tf.data import images as images_lib
from m6t_tf.data import tokenizer as tokenizer_lib
from m6t_tf.errors import ConfigError
from m6t_tf.models import decoding
from m6t_tf.parallel import launch_env
from m6t_tf.run import generation

SIGNATURE_KEY = "serving_default"
#: Images with more pixels are refused (module docstring): 25 million, e.g. 5000×5000, whose
#: decoding and resizing take about 0.5 GB.
MAX_PIXELS = 25_000_000


class CaptionServer(tf.Module):
  """Captions encoded images; `serve` is the serving signature.

  Args:
    network: an `M6Transformer` with its weights (all experts in this process).
    vocab: the 21128 vocabulary tokens.
    options: greedy or beam `DecodeOptions` (max_len set).
    image_size: side of the square training images.
    serving_batch: images decoded together (static chunk size).
    max_pixels: larger images are refused with an error (module docstring).
  """

  def __init__(self, network, vocab: list[str], options: decoding.DecodeOptions, *,
               image_size: int, serving_batch: int = 8, max_pixels: int = MAX_PIXELS):
    super().__init__(name="caption_server")
    if options.method not in ("greedy", "beam"):
      raise ConfigError(f"export decodes with 'greedy' or 'beam', not {options.method!r} (a "
                       f"served caption should not change between two identical requests)")
    if serving_batch < 1:
      raise ConfigError(f"serving_batch={serving_batch} must be >= 1")
    if max_pixels < image_size * image_size:
      raise ConfigError(f"max_pixels={max_pixels} must be at least the training images' "
                        f"{image_size}x{image_size} = {image_size * image_size} pixels")
    options.check(network.max_text_length, network.vocab_size)
    self.network = network
    # Keras 3 layers are not tf.Module children: list the variables so the SavedModel saves
    # (and the loaded graph captures) every weight.
    self.weights = [getattr(v, "value", v) for v in network.variables]
    self.detokenizer = detokenizer_lib.Detokenizer(vocab)
    self.first_banned = tf.constant(decoding.continuations(vocab))
    self.options = options
    self.image_size = image_size
    self.serving_batch = serving_batch
    self.max_pixels = int(max_pixels)
    self.serve = tf.function(self._serve, input_signature=[
        tf.TensorSpec([None], tf.string, name="images")])

  def _serve(self, images):
    """<string>[N] encoded images -> captions, scores, log_probs, num_tokens, errors, each [N]."""
    size, chunk = self.image_size, self.serving_batch
    pixels, errors = images_lib.decode_requests(images, size, self.max_pixels)  # [N, S, S, 3]
    ok = tf.equal(errors, "")
    n = tf.shape(pixels)[0]
    num_chunks = (n + chunk - 1) // chunk
    pad = num_chunks * chunk - n
    pixels = tf.concat([pixels, tf.zeros([pad, size, size, 3], tf.uint8)], 0)
    row_mask = tf.concat([ok, tf.zeros([pad], tf.bool)], 0)
    pixels = tf.reshape(pixels, [num_chunks, chunk, size, size, 3])
    row_mask = tf.reshape(row_mask, [num_chunks, chunk])

    def one_chunk(args):
      image, mask = args
      image = tf.ensure_shape(image, [chunk, size, size, 3])
      out = decoding.decode(self.network, {"image": image}, self.options,
                            row_mask=tf.ensure_shape(mask, [chunk]),
                            first_banned=self.first_banned)
      return out["tokens"][:, 0], out["score"][:, 0], out["log_prob"][:, 0], out["length"][:, 0]

    max_len = self.options.max_len
    tokens, scores, log_probs, lengths = tf.map_fn(
        one_chunk, (pixels, row_mask), fn_output_signature=(
            tf.TensorSpec([chunk, max_len], tf.int32), tf.TensorSpec([chunk], tf.float32),
            tf.TensorSpec([chunk], tf.float32), tf.TensorSpec([chunk], tf.int32)))
    flat = lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))[:n]
    tokens = flat(tokens)
    nan = tf.fill([n], float("nan"))
    return {"captions": tf.where(ok, self.detokenizer(tokens), ""),
            "scores": tf.where(ok, flat(scores), nan),
            "log_probs": tf.where(ok, flat(log_probs), nan),
            "num_tokens": tf.where(ok, flat(lengths), 0), "errors": errors}


def export(server: CaptionServer, export_dir: str) -> None:
  """Writes the SavedModel with the `serving_default` signature, on any TensorFlow filesystem
  (`tf.saved_model.save` writes through `tf.io.gfile`: no local staging)."""
  tf.saved_model.save(server, export_dir,
                      signatures={SIGNATURE_KEY: server.serve.get_concrete_function()})


def export_model(model_dir: str, export_dir: str, *, options, serving_batch: int = 8,
                 checkpoint=None, max_pixels: int = MAX_PIXELS) -> dict:
  """Restores `model_dir` and writes the SavedModel (`python -m m6t_tf.export`); returns what
  was exported."""
  if launch_env.world_size() > 1:
    raise ConfigError("export runs in one process (it holds every expert): run it without "
                      "horovodrun")
  if storage.isdir(export_dir) and storage.listdir(export_dir):
    raise ConfigError(f"--export_dir={export_dir!r} exists and is not empty; choose a new "
                      f"directory or remove it")
  restored = generation.restore(model_dir, checkpoint=checkpoint)
  if restored.image_mode != "pixels":
    raise ConfigError(f"{model_dir} was trained on patch features; the SavedModel takes "
                      f"image files and needs a model trained on pixels")
  options = dataclasses.replace(options, max_len=options.max_len or restored.max_len)
  vocab = tokenizer_lib.load_vocab(tokenizer_lib.find_vocab_file())
  server = CaptionServer(restored.network, vocab, options, image_size=restored.image_size,
                         serving_batch=serving_batch, max_pixels=max_pixels)
  export(server, export_dir)
  return {"export_dir": export_dir, "checkpoint": restored.checkpoint,
          "image_size": restored.image_size, "max_pixels": max_pixels,
          "options": dataclasses.asdict(options)}
