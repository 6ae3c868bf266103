r"""Does expert prototyping pay more as the model grows? top-1 vs 4 top-1 at three sizes.

  python tools/experiments/scale.py                           # the committed docs/results run
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

NAME = "scale"
# (size label, overlay gin files): the demo (E = 8) and 2× / 4× its experts.
SIZES = (("E = 8 (demo)", ()), ("E = 16", ("experts16",)), ("E = 32", ("experts32",)))
ROUTINGS = (("top-1", "top1"), ("4 top-1", "4top1_cap_k"))


def parse_args(argv):
  return common.start(common.make_parser(__doc__, NAME), argv)


def specs_for(args) -> list:
  return [common.RunSpec(f"{routing}, {size}", (gin,) + overlay, seed)
          for seed in args.seeds for size, overlay in SIZES for routing, gin in ROUTINGS]
