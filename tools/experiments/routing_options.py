r"""Routing beyond fixed capacity on the demo model: dropless, GShard's random second expert,
drop by probability — each against the same routing without the option.

  python tools/experiments/routing_options.py                 # the committed docs/results run
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

NAME = "routing_options"
# (arm name, gin files of the arm, gin files of its baseline, what the comparison asks)
ARMS = (
    ("top-1 dropless", ("top1", "dropless"), ("top1",), "dropless vs capacity 1.25"),
    ("top-2 dropless", ("top2_cap_k", "dropless"), ("top2_cap_k",), "dropless vs capacity k×"),
    ("top-2 random second", ("top2_cap_k", "second_random"), ("top2_cap_k",),
     "GShard random second expert vs naive"),
    ("top-1 drop by probability", ("top1", "drop_probability"), ("top1",),
     "drop by probability vs by position, Capacity 1×"),
    ("top-2 drop by probability, Capacity 1×", ("top2_cap_1", "drop_probability"),
     ("top2_cap_1",), "drop by probability vs by position, Capacity 1×"),
)


def parse_args(argv):
  return common.start(common.make_parser(__doc__, NAME), argv)


def specs_for(args) -> list:
  """Every arm and its baseline, every seed of `--seeds`."""
  out = []
  for seed in args.seeds:
    for name, gins, base, _ in ARMS:
      out.append(common.RunSpec(name, gins, seed))
      out.append(common.RunSpec("+".join(base), base, seed))
  return out
