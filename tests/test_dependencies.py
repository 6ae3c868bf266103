"""The package's dependency direction: `m6t_tf.parallel` never imports the model code.

Layers depend on the communicator interface (`m6t_tf.parallel.communicator`) and mark their
expert-sharded variables (`communicator.mark_expert_sharded`); the parallel package reads the mark.
"""

import ast
import glob
import os

import tensorflow as tf
from tests.support import REPO

MODEL_PACKAGES = ("m6t_tf.layers", "m6t_tf.networks", "m6t_tf.models")


def _imports(path):
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f"{node.module}.{a.name}" for a in node.names)


class DependencyTest(tf.test.TestCase):

  def test_parallel_does_not_import_the_model(self):
    files = glob.glob(os.path.join(REPO, "m6t_tf", "parallel", "*.py"))
    self.assertNotEmpty(files)
    for path in files:
      bad = [m for m in _imports(path) if m.startswith(MODEL_PACKAGES)]
      self.assertEqual(bad, [], f"{os.path.relpath(path, REPO)} imports {bad}")

  def test_expert_layers_carry_the_mark(self):
    from m6t_tf.layers import experts
    from m6t_tf.layers import moe
    from m6t_tf.parallel import communicator
    layer = moe.MoE(4, 8)
    layer.build((None, 6))
    self.assertEqual(sorted(v.path for v in layer.weights if communicator.is_expert_sharded(v)),
                     sorted(v.path for v in layer.experts.trainable_variables))
    linear = experts.LinearExperts(2, 3, 3)
    linear.build(None)
    self.assertTrue(communicator.is_expert_sharded(linear.kernel))


if __name__ == "__main__":
  tf.test.main()
