r"""Exports a trained captioner as a TensorFlow SavedModel for serving.

  python -m m6t_tf.export --model_dir=runs/demo --export_dir=exports/demo \
      [--decode=greedy|beam] [--beam_size=4] [--length_penalty=0.0] [--max_len=0] \
      [--serving_batch=8] [--max_pixels=25000000]
  saved_model_cli show --dir exports/demo --all

The `serving_default` signature takes `images`, a <string>[N] batch of encoded
PNG/JPEG/GIF/BMP/WebP files, and returns `captions` (<string>[N], UTF-8), `scores`,
`log_probs`, `num_tokens` and `errors` ("" for a captioned image, else why request i has no
caption: empty, not an image, more than --max_pixels pixels, corrupt or truncated; a bad
request never fails the others; see m6t_tf/serving.py): image decoding and resizing (as
tools/make_dataset.py), the decoding loop with its KV cache and the detokenisation all run
inside the graph (m6t_tf/serving.py), so a client needs TensorFlow only:

  import tensorflow as tf
  serve = tf.saved_model.load("exports/demo").signatures["serving_default"]
  out = serve(images=tf.constant([open("cat.jpg", "rb").read()]))
  print(out["captions"][0].numpy().decode("utf-8"))

Runs in one process (all experts); a checkpoint trained on any number of workers restores.
"""

from __future__ import annotations

from absl import app
from absl import flags

from m6t_tf import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "A trainer's model_dir (config.gin + checkpoints/).")
flags.DEFINE_string("export_dir", None, "Where the SavedModel goes (must not exist, or be empty).")
flags.DEFINE_enum("decode", "greedy", ["greedy", "beam"], "Decoding method in the graph.")
flags.DEFINE_integer("beam_size", 4, "Beams (--decode=beam); the best is returned.")
flags.DEFINE_float("length_penalty", 0.0, "GNMT alpha of the beam score (see m6t_tf/models/decoding.py).")
flags.DEFINE_integer("max_len", 0, "Caption tokens incl. [CLS]/[SEP]; 0 = the training max_len.")
flags.DEFINE_integer("serving_batch", 8, "Images decoded together inside the graph.")
flags.DEFINE_integer("max_pixels", 25_000_000, "Larger images are refused with a per-request "
                     "error before their pixels are decoded.")
flags.DEFINE_string("checkpoint", None, "A checkpoint prefix; default: the latest.")


def main(argv):
  del argv
  if not FLAGS.model_dir or not FLAGS.export_dir:
    raise app.UsageError("--model_dir and --export_dir are required")
  from m6t_tf.models import decoding
  options = decoding.DecodeOptions(method=FLAGS.decode, max_len=FLAGS.max_len,
                                   beam_size=FLAGS.beam_size, length_penalty=FLAGS.length_penalty)
  from m6t_tf.run import serving
  info = serving.export_model(FLAGS.model_dir, FLAGS.export_dir, options=options,
                      serving_batch=FLAGS.serving_batch, checkpoint=FLAGS.checkpoint,
                      max_pixels=FLAGS.max_pixels)
  print(f"Exported {info['checkpoint']} ({info['options']['method']}, max_len "
        f"{info['options']['max_len']}, {info['image_size']}x{info['image_size']} images) to "
        f"{info['export_dir']}")
  print(f"  saved_model_cli show --dir {info['export_dir']} --all")


if __name__ == "__main__":
  cli.run(main)
