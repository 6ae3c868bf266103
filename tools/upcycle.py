r"""Dense → MoE upcycling: start an MoE run from a trained dense checkpoint.

  python tools/upcycle.py --dense_model_dir=runs/dense --moe_gin=gin/demo.gin \
      --model_dir=runs/upcycled [--gin_bindings=...] [--noise_std=0] [--num_workers=D]
  python -m m6t_tf.train --gin_file=runs/upcycled/config.gin --model_dir=runs/upcycled
  horovodrun -np 2 -H localhost:2 --gloo python -m m6t_tf.train \
      --gin_file=runs/upcycled/config.gin --gin_file=gin/layouts/1x2.gin --model_dir=runs/upcycled

The dense run is a config with `M6Transformer.moe_placement = 'none'`; the MoE config
(`--moe_gin`, comma-joined files allowed, plus `--gin_bindings`) must have the same backbone.
`--model_dir` receives what `m6t_tf.train` writes at step 0: experts copied from the dense
FFNs (plus N(0, noise_std²) noise if asked), everything else of the backbone copied, routers,
routing statistics and optimiser state fresh (`m6t_tf.bench.upcycle` tells which and why).
`--num_workers` only checks that E divides over them. Errors (a missing or MoE checkpoint, a
dense config, shapes that differ) print one line and exit 2 before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys

from m6t_tf import cli

if __name__ == "__main__":
  cli.quiet_tensorflow()  # before TensorFlow is imported: its start-up notices are not ours

from m6t_tf.bench import upcycle as upcycle_lib  # pylint: disable=g-import-not-at-top

# Gin files are named relative to the checkout holding this script, from any folder.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dense_model_dir", required=True,
                 help="model_dir of a dense run (its checkpoints/latest)")
  p.add_argument("--moe_gin", required=True, action="append",
                 help="the MoE config: gin file(s), comma-separated or repeated")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help="extra gin bindings of the MoE config")
  p.add_argument("--gin_search_paths", action="append", default=None)
  p.add_argument("--model_dir", required=True, help="the new MoE run's model_dir")
  p.add_argument("--noise_std", type=float, default=0.0,
                 help="std of the Gaussian noise added to every expert copy (0: exact copies)")
  p.add_argument("--num_workers", type=int, default=1,
                 help="workers D the run will use: checks that E divides over them")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  out = upcycle_lib.upcycle(dense_model_dir=args.dense_model_dir, moe_gin=args.moe_gin,
                            gin_bindings=args.gin_bindings, model_dir=args.model_dir,
                            noise_std=args.noise_std, num_workers=args.num_workers,
                            search_paths=args.gin_search_paths or [ROOT, "."])
  print(f"Upcycled {args.dense_model_dir} → {out['checkpoint']}: {out['moe_layers']} MoE layers × "
        f"{out['num_experts']} experts from the dense FFNs ({out['experts_from_ffn']} expert "
        f"tensors, noise std {args.noise_std:g}), {out['copied']} tensors copied, "
        f"{out['fresh']} fresh (routers, routing statistics, optimiser state, step 0).\n"
        f"Continue: python -m m6t_tf.train --gin_file={os.path.join(args.model_dir, 'config.gin')}"
        f" --model_dir={args.model_dir}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argparse(main))
