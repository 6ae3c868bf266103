r"""Decode speed: the KV cache against recomputing the whole prefix at every step.

  .venv/bin/python tools/bench_decode.py                      # demo.gin, random weights
  .venv/bin/python tools/bench_decode.py --model_dir=runs/demo --batch_sizes=1,64 --repeats=3

Both decoders are greedy and generate exactly `--caption_length` tokens per caption (no early
stop; the last token is [SEP], forced), in the same process, on the same images and weights:

  * cached: `m6t_tf.models.decoding.decode` — patches and [CLS] encoded once, then one position per
    step through every block with the key/value cache (one `tf.function`, one while loop);
  * recompute: at step t the full network runs over the t + 1 known caption positions and the
    16 patches (one `tf.function` per length, traced before timing), keeping the last logits.

Both route MoE layers with C = T (no token dropped), so they produce the same tokens up to each
caption's [SEP] (checked; the cached decoder writes [PAD] after it, both keep computing).
Time excludes tracing (a warm-up run first); the best of `--repeats` runs is kept. Prints a table
and (--format=json) the JSON report, schema_version 1:

  {"schema_version": 1, "machine": {...}, "config": {...},
   "results": [{"batch": B, "cached_tokens_per_s": ..., "recompute_tokens_per_s": ...,
                "speedup": cached / recompute, "same_tokens": true}, ...]}
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from m6t_tf import cli

if __name__ == "__main__":
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

# pylint: disable=g-import-not-at-top
import gin
import numpy as np
import tensorflow as tf

from m6t_tf.run import configurables
from m6t_tf.models import decoding
from m6t_tf.run import generation
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.bench import report as report_lib
from m6t_tf.bench import timing
# pylint: enable=g-import-not-at-top


def parse_args(argv=None):
  p = cli.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=None,
                 help="model config (default gin/demo.gin); ignored with --model_dir")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help="extra gin bindings, e.g. MAX_LEN=20 (ignored with --model_dir)")
  p.add_argument("--model_dir", default=None, help="a trained model_dir (default: random weights)")
  p.add_argument("--batch_sizes", default="1,64")
  p.add_argument("--caption_length", type=int, default=20, help="tokens generated per caption")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--format", choices=("json", "table"), default="table")
  p.add_argument("--out", default=None, help="also write the JSON report here")
  args = p.parse_args(argv)
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
  if not args.batch_sizes or min(args.batch_sizes) < 1:
    p.error(f"--batch_sizes={args.batch_sizes} must be positive integers")
  if args.caption_length < 2 or args.repeats < 1:
    p.error("--caption_length must be >= 2 and --repeats >= 1")
  return args


def build_network(args):
  """(network, image size): restored from --model_dir, or demo.gin with random weights."""
  if args.model_dir:
    restored = generation.restore(args.model_dir)
    return restored.network, restored.image_size
  gin.clear_config()
  configurables.parse(args.gin_file or ["gin/demo.gin"], args.gin_bindings, ["."])
  batch = {"image": tf.zeros([1, 64, 64, 3], tf.uint8), "tokens": tf.ones([1, 2], tf.int32)}
  model = trainer_lib.build_model(configurables.network_fn(), batch=batch)
  return model.network, 64


def recompute_decoder(network, length: int):
  """Greedy decoding that reruns the full network on the whole prefix at every step."""
  steps = {}

  def step_fn(t):
    if t not in steps:
      steps[t] = tf.function(lambda image, tokens: network(
          {"image": image, "tokens": tokens}, moe_no_drop=True)[:, -1])
    return steps[t]

  max_len = length + 1

  def decode(image):
    b = image.shape[0]
    tokens = tf.fill([b, 1], decoding.CLS_ID)
    for t in range(1, length + 1):
      logits = step_fn(t)(image, tokens)
      # pylint: disable-next=protected-access
      allowed = decoding._allowed(network.vocab_size, t, max_len)
      nxt = tf.argmax(tf.where(allowed[None], logits, float("-inf")), -1, output_type=tf.int32)
      tokens = tf.concat([tokens, nxt[:, None]], 1)
    return tokens

  return decode


def cached_decoder(network, length: int):
  # max_len = length + 1: `length` tokens after [CLS], the last one forced to [SEP] (the
  # recomputing decoder forces it too; it costs a full step either way). lockstep: no early stop.
  options = decoding.DecodeOptions(method="greedy", max_len=length + 1)
  options.check(network.max_text_length, network.vocab_size)
  fn = tf.function(lambda image: decoding.decode(network, {"image": image}, options,
                                                 lockstep=True)["tokens"][:, 0])
  return fn


def until_sep(tokens):
  """[PAD] after each row's first [SEP], as the cached decoder writes finished captions (both
  decoders keep computing every step, so their costs stay comparable)."""
  after = np.cumsum(np.cumsum(tokens == decoding.SEP_ID, axis=1), axis=1) > 1
  return np.where(after, decoding.PAD_ID, tokens)


def time_best(fn, image, repeats: int) -> tuple[float, object]:
  out = fn(image)  # warm-up: traces
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn(image)
    _ = out.numpy()
    best = min(best, time.perf_counter() - t0)
  return best, out


def run(args, log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
  machine_start = timing.machine_info()  # load average before the timing
  network, size = build_network(args)
  length = args.caption_length
  if length > network.max_text_length:
    raise ValueError(f"--caption_length={length} exceeds the model's max_text_length="
                     f"{network.max_text_length}")
  cached, recompute = cached_decoder(network, length), recompute_decoder(network, length)
  results = []
  for b in args.batch_sizes:
    image = tf.constant(np.random.default_rng(b).integers(0, 256, [b, size, size, 3],
                                                          dtype=np.uint8))
    log(f"batch {b}: timing the cached decoder")
    t_cached, tok_cached = time_best(cached, image, args.repeats)
    log(f"batch {b}: timing the recomputing decoder")
    t_full, tok_full = time_best(recompute, image, args.repeats)
    tokens = b * length
    results.append({"batch": b, "tokens": tokens, "cached_s": t_cached, "recompute_s": t_full,
                    "cached_tokens_per_s": tokens / t_cached,
                    "recompute_tokens_per_s": tokens / t_full,
                    "speedup": t_full / t_cached,
                    "same_tokens": bool(np.array_equal(tok_cached.numpy(),
                                                       until_sep(tok_full.numpy())))})
  return {"schema_version": 1, "machine": machine_start,
          "config": {"gin_file": args.gin_file or ["gin/demo.gin"], "model_dir": args.model_dir,
                     "caption_length": length, "repeats": args.repeats,
                     "hidden_size": network.hidden_size, "num_layers": network.num_layers,
                     "moe_layers": len(network.moe_layers)},
          "results": results}


def table(report: dict) -> str:
  lines = [f"{'batch':>5}  {'cached tok/s':>12}  {'recompute tok/s':>15}  {'speedup':>7}  same",
           "-" * 52]
  for r in report["results"]:
    lines.append(f"{r['batch']:>5}  {r['cached_tokens_per_s']:>12,.0f}  "
                 f"{r['recompute_tokens_per_s']:>15,.0f}  {r['speedup']:>6.2f}×  "
                 f"{'yes' if r['same_tokens'] else 'NO'}")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  # The recomputing decoder has one tf.function per prefix length by design; TF calls it
  # "retracing".
  tf.get_logger().setLevel("ERROR")
  try:
    result = run(args)
  except (ValueError, OSError) as e:
    raise cli.ConfigError(cli.one_line(e)) from e
  result["machine"]["loadavg_end"] = list(os.getloadavg())
  report_lib.emit(result, format=args.format, table=table, out=args.out)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
