"""A SavedModel that captions encoded images with TensorFlow alone (TF Serving's convention).

`CaptionServer` puts the whole path from file bytes to text in one graph:

    <string>[N] PNG/JPEG/GIF/BMP bytes
      → decode, alpha over white, RGB, antialiased resize      (`m6t_tf.data.images`)
      → chunks of `serving_batch` images (the last one padded with filler rows)
      → greedy or beam decoding with the KV cache               (`m6t_tf.decoding`)
      → detokenisation by vocabulary tables and string ops      (`m6t_tf.data.detokenizer`)
      → {"captions": <string>[N], "scores": <float32>[N], "log_probs": <float32>[N],
         "num_tokens": <int32>[N]}

Decoding needs static shapes (MoE capacity is C = T of the decode call), so a request of any
size is cut into fixed chunks; since every MoE layer routes with C = T, an image's caption does
not depend on the chunk it lands in, and equals what `m6t_tf.generate` writes for the same file.
The graph uses only core TensorFlow ops (no tensorflow_text): a client loads it with
`tf.saved_model.load` and nothing else.
"""

from __future__ import annotations

import tensorflow as tf

from m6t_tf import decoding
from m6t_tf import storage
from m6t_tf.cli import ConfigError
from m6t_tf.data import detokenizer as detokenizer_lib
from m6t_tf.data import images as images_lib

SIGNATURE_KEY = "serving_default"


class CaptionServer(tf.Module):
  """Captions encoded images; `serve` is the serving signature.

  Args:
    network: an `M6Transformer` with its weights (all experts in this process).
    vocab: the 21128 vocabulary tokens.
    options: greedy or beam `DecodeOptions` (max_len set).
    image_size: side of the square training images.
    serving_batch: images decoded together (static chunk size).
  """

  def __init__(self, network, vocab: list[str], options: decoding.DecodeOptions, *,
               image_size: int, serving_batch: int = 8):
    super().__init__(name="caption_server")
    if options.method not in ("greedy", "beam"):
      raise ConfigError(f"export decodes with 'greedy' or 'beam', not {options.method!r} (a "
                       f"served caption should not change between two identical requests)")
    if serving_batch < 1:
      raise ConfigError(f"serving_batch={serving_batch} must be >= 1")
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
    self.serve = tf.function(self._serve, input_signature=[
        tf.TensorSpec([None], tf.string, name="images")])

  def _serve(self, images):
    """<string>[N] encoded images -> captions, scores, log_probs, num_tokens, each [N]."""
    size, chunk = self.image_size, self.serving_batch
    pixels = images_lib.decode_images(images, size)                        # [N, S, S, 3]
    n = tf.shape(pixels)[0]
    num_chunks = (n + chunk - 1) // chunk
    pad = num_chunks * chunk - n
    pixels = tf.concat([pixels, tf.zeros([pad, size, size, 3], tf.uint8)], 0)
    row_mask = tf.range(num_chunks * chunk) < n
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
    return {"captions": self.detokenizer(tokens), "scores": flat(scores),
            "log_probs": flat(log_probs), "num_tokens": flat(lengths)}


def export(server: CaptionServer, export_dir: str) -> None:
  """Writes the SavedModel with the `serving_default` signature, on any TensorFlow filesystem
  (`tf.saved_model.save` writes through `tf.io.gfile`: no local staging)."""
  tf.saved_model.save(server, export_dir,
                      signatures={SIGNATURE_KEY: server.serve.get_concrete_function()})


def export_model(model_dir: str, export_dir: str, *, options, serving_batch: int = 8,
                 checkpoint=None) -> dict:
  """Restores `model_dir` and writes the SavedModel (`python -m m6t_tf.export`); returns what
  was exported."""
  import dataclasses
  from m6t_tf import generation
  from m6t_tf.data import tokenizer as tokenizer_lib
  from m6t_tf.parallel import launch_env
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
                         serving_batch=serving_batch)
  export(server, export_dir)
  return {"export_dir": export_dir, "checkpoint": restored.checkpoint,
          "image_size": restored.image_size, "options": dataclasses.asdict(options)}
