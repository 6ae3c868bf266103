"""The size × layout combinations the documentation shows bind mixed precision and FP16
communication as the paper's Table 5 has them (arXiv 2105.15082, appendix A.2): base, 10B and
100B with mixed precision, float16 all-to-all payloads and fp16-compressed allreduce; 1T with
neither.

The combinations are read from the commands of README.md and docs/*.md
(`--gin_file=gin/<size>.gin --gin_file=gin/layouts/<layout>.gin`), so a documented command that loses or gains FP16
communication fails here; the values are the ones `make_context` and `train` receive from gin.
"""

import glob
import inspect
import os
import re

import gin
import tensorflow as tf

from m6t_tf.run import configurables
from tests.support import REPO


# Table 5: workers (one GPU each), mixed precision, FP16 communication.
TABLE_5 = {"base": (8, True, True), "10B": (16, True, True), "100B": (128, True, True),
           "1T": (480, False, False)}


def _documented_pairs():
  pairs = set()
  for path in [os.path.join(REPO, "README.md")] + glob.glob(os.path.join(REPO, "docs", "*.md")):
    with open(path) as f:
      text = f.read()
    pairs |= set(re.findall(r"--gin_file=gin/([\w.]+)\.gin\s+(?:\\\n\s*)?"
                            r"(?:--gin_bindings=\S+\s+)*--gin_file=gin/layouts/(\w+)\.gin", text))
  return pairs


def _bound(size, layout):
  gin.clear_config()
  configurables.parse([os.path.join(REPO, "gin", f"{size}.gin"),
                       os.path.join(REPO, "gin", "layouts", f"{layout}.gin")], [], [REPO])
  defaults = {k: p.default for k, p in
              inspect.signature(configurables.make_context).parameters.items()}
  q = configurables.query
  return dict(
      workers=q("make_context.mesh_data", defaults["mesh_data"])
      * q("make_context.mesh_expert", defaults["mesh_expert"]),
      mixed_precision=q("train.mixed_precision"),
      alltoall_dtype=q("make_context.alltoall_dtype", defaults["alltoall_dtype"]),
      allreduce_compression=q("make_context.allreduce_compression",
                              defaults["allreduce_compression"]))


class LayoutTest(tf.test.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def test_readme_documents_every_paper_size_on_its_layout(self):
    pairs = _documented_pairs()
    for size, (workers, _, _) in TABLE_5.items():
      self.assertIn((size, f"1x{workers}"), pairs)

  def test_documented_combinations_bind_table_5(self):
    pairs = sorted(_documented_pairs())
    self.assertGreaterEqual(len(pairs), 5, pairs)   # the four paper sizes and the demo
    for size, layout in pairs:
      got = _bound(size, layout)
      if size in TABLE_5:
        workers, mixed, fp16 = TABLE_5[size]
        want = dict(workers=workers, mixed_precision=mixed,
                    alltoall_dtype="float16" if fp16 else None,
                    allreduce_compression="fp16" if fp16 else "none")
      else:
        # Not in Table 5 (the demo): FP16 communication goes with mixed precision.
        mixed = got["mixed_precision"]
        want = dict(got, alltoall_dtype="float16" if mixed else None,
                    allreduce_compression="fp16" if mixed else "none")
      self.assertEqual(got, want, f"{size}.gin + layouts/{layout}.gin")


if __name__ == "__main__":
  tf.test.main()
