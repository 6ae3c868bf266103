r"""Captions for images: greedy, beam search or sampling with a KV cache.

  python -m m6t_tf.generate --model_dir=runs/demo --split=validation [--num_images=64]
      [--html=runs/demo/captions.html]
  python -m m6t_tf.generate --model_dir=runs/demo --images='photos/*.jpg' --decode=beam \
      --beam_size=4 --length_penalty=0.6
  python -m m6t_tf.generate --model_dir=runs/demo --images='photos/*.png' --decode=sample \
      --temperature=0.8 --top_p=0.9 --num_samples=3 --seed=1
  horovodrun -np 2 -H localhost:2 --gloo python -m m6t_tf.generate --model_dir=runs/demo ...

Writes one JSON object per image to --out (default model_dir/captions.jsonl): key, image path,
caption, log_prob, score, num_tokens, candidates (all beams / samples, best first) and
references (all captions of the image in the split). With --split=validation the captions are
scored with BLEU-1..4 and CIDEr-D next to two baselines (m6t_tf.run.caption_metrics), printed and
written to model_dir/caption_metrics.json. Image files are decoded and resized exactly as
tools/make_dataset.py built the training records. See m6t_tf/models/decoding.py for the scores and the
length penalty.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app
from absl import flags

from m6t_tf import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "A trainer's model_dir (config.gin + checkpoints/).")
flags.DEFINE_string("images", None, "Image files: comma-separated glob patterns.")
flags.DEFINE_enum("split", None, ["validation", "train"],
                  "Caption the records of train.eval_data (validation) or train.train_data.")
flags.DEFINE_string("data", None, "A record pattern overriding the one of --split.")
flags.DEFINE_enum("decode", "greedy", ["greedy", "beam", "sample"], "Decoding method.")
flags.DEFINE_integer("beam_size", 4, "Beams (--decode=beam).")
flags.DEFINE_float("length_penalty", 0.0,
                   "GNMT alpha: beam score = log_prob / ((5 + n) / 6)^alpha, n tokens incl. "
                   "[SEP] (--decode=beam).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (--decode=sample).")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0 = all).")
flags.DEFINE_integer("num_samples", 1, "Captions sampled per image (--decode=sample).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("max_len", 0, "Caption tokens incl. [CLS]/[SEP]; 0 = the training max_len.")
flags.DEFINE_integer("batch_size", 64, "Images per decode batch per worker.")
flags.DEFINE_integer("num_images", 0, "Caption only the first N images (0 = all).")
flags.DEFINE_string("out", None, "JSON-lines output; default model_dir/captions.jsonl.")
flags.DEFINE_string("html", None, "Also write a page of images, captions and scores here.")
flags.DEFINE_string("checkpoint", None, "A checkpoint prefix; default: the latest.")
flags.DEFINE_multi_string("gin_bindings", [], "Overrides applied after config.gin.")


def main(argv):
  del argv
  if not FLAGS.model_dir:
    raise app.UsageError("--model_dir is required")
  if (FLAGS.images is None) == (FLAGS.split is None):
    raise app.UsageError("give exactly one of --images='photos/*.jpg' and --split=validation")
  from m6t_tf.parallel import horovod as horovod_lib
  horovod_lib.place_process()  # each rank's GPU, before anything starts TensorFlow's runtime
  from m6t_tf.models import decoding
  from m6t_tf.run import generation
  from m6t_tf.data import tokenizer
  options = decoding.DecodeOptions(
      method=FLAGS.decode, max_len=FLAGS.max_len, beam_size=FLAGS.beam_size,
      length_penalty=FLAGS.length_penalty, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
      top_p=FLAGS.top_p, seed=FLAGS.seed, num_samples=FLAGS.num_samples)
  # Option errors before the checkpoint is read (max_len is checked against the model later).
  dataclasses.replace(options, max_len=options.max_len or 3).check(
      max_text_length=max(options.max_len, 3), vocab_size=tokenizer.VOCAB_SIZE)
  result = generation.generate(
      FLAGS.model_dir, images=FLAGS.images, split=FLAGS.split, data=FLAGS.data, options=options,
      batch_size=FLAGS.batch_size, num_images=FLAGS.num_images, out=FLAGS.out, html=FLAGS.html,
      checkpoint=FLAGS.checkpoint, gin_bindings=FLAGS.gin_bindings)
  ctx = result["ctx"]
  if ctx.rank == 0:
    for row in result["rows"][:10]:
      print(f"{row['caption']}\t{row['log_prob']:.3f}\t{row['key']}")
    if len(result["rows"]) > 10:
      print(f"... ({len(result['rows'])} captions in {result['out']})")
  if ctx.size > 1:
    ctx.shutdown()

if __name__ == "__main__":
  cli.run(main)
