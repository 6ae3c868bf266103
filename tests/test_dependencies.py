"""The package's module graph: imports go down the floors, at the top of the file, with no cycle.

Floors, top to bottom (a module imports its own floor or lower ones, never a higher one):

    tools library   m6t_tf.bench (what tools/ share)
    entry points    python -m m6t_tf.train | evaluate | generate | export | score_captions |
                    launch, and m6t_tf.cli
    run layer       m6t_tf.run (what the entry points call)
    model           m6t_tf.models, m6t_tf.networks
    layers          m6t_tf.layers, m6t_tf.optimizers (Keras parts; both mark expert weights)
    parallel        m6t_tf.parallel (communicators, contexts, mesh, watchdog)
    base            m6t_tf.errors, storage, m6t_tf.data

The graph includes imports inside functions, which this test allows only where a heavy or
optional dependency justifies one (`LAZY`, with the reason), and in the entry points, which
import TensorFlow and the package after parsing their flags (a flag error answers at once, and
each rank's GPU is chosen before TensorFlow's runtime starts).
"""

import ast
import glob
import os

import tensorflow as tf

from tests.support import REPO

FLOORS = [
    ("tools library", ("m6t_tf.bench",)),
    ("entry points", ("m6t_tf.train", "m6t_tf.evaluate", "m6t_tf.generate", "m6t_tf.export",
                      "m6t_tf.score_captions", "m6t_tf.launch", "m6t_tf.cli")),
    ("run layer", ("m6t_tf.run",)),
    ("model", ("m6t_tf.models", "m6t_tf.networks")),
    ("layers", ("m6t_tf.layers", "m6t_tf.optimizers")),
    ("parallel", ("m6t_tf.parallel",)),
    ("base", ("m6t_tf.errors", "m6t_tf.storage", "m6t_tf.data", "m6t_tf")),
]
ENTRY_POINTS = FLOORS[1][1]

# Imports inside functions that are not the entry points': (importing module, imported
# module) -> why it waits until it is needed.
LAZY = {
    ("m6t_tf.run.configurables", "m6t_tf.parallel.horovod"):
        "Horovod only under a launcher: one process never imports it",
    ("m6t_tf.run.generation", "m6t_tf.run.caption_metrics"):
        "pycocoevalcap is optional: captions are written without metrics when it is missing",
    ("m6t_tf.run.caption_metrics", "m6t_tf.data.pipeline"):
        "TensorFlow only when records are read: scoring a JSONL file needs none",
    ("m6t_tf.run.caption_metrics", "m6t_tf.storage"):
        "TensorFlow only when the page is written through tf.io.gfile",
}
# Third-party modules any module may import inside a function: optional, or heavy for a path
# that does not need them.
LAZY_THIRD_PARTY = {
    "horovod.tensorflow": "optional: only under a launcher",
    "tensorflow_io": "optional: s3://, hdfs:// and az:// model dirs only",
    "tensorflow_text": "only when a vocabulary is learnt or a WordPiece tokenizer built",
    "zstandard": "only when the demo dataset is built",
    "resvg_py": "only when the demo dataset is built",
    "tensorflow": "kept out of the light paths: metadata.json, caption metrics, machine facts",
    "keras": "kept out of the light paths: machine facts",
    "gin": "entry points and the launcher only",
    "absl": "the CLI helpers, when a CLI runs",
    "matplotlib": "optional: only the benchmark tools that draw a figure",
    "official": "optional: the Model Garden MoE that bench_moe compares against, when installed",
}


def module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def package_modules() -> dict:
  """{module name: path} of every module of the package."""
  paths = glob.glob(os.path.join(REPO, "m6t_tf", "**", "*.py"), recursive=True)
  return {module_name(p): p for p in paths}


def imports(path: str, modules) -> list:
  """[(imported module of the package or third party, line, at_top_level)] of `path`."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  top = {id(n) for n in tree.body}
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from pkg import mod` names the module pkg.mod when it is one.
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
               else node.module for a in node.names]
    for name in dict.fromkeys(names):
      out.append((name, node.lineno, id(node) in top))
  return out


def floor_of(module: str) -> int:
  for i, (_, prefixes) in enumerate(FLOORS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return i
  raise AssertionError(f"{module} is on no floor: add it to FLOORS")


def graph() -> dict:
  modules = package_modules()
  return {m: [(name, line, top) for name, line, top in imports(p, modules) if name in modules]
          for m, p in modules.items()}


def find_cycle(edges: dict):
  """A cycle of `edges` ({node: [next nodes]}) as a list of nodes, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in edges.get(node, ()):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(edges):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


class DependencyTest(tf.test.TestCase):

  def test_no_import_cycle(self):
    edges = {m: sorted({n for n, _, _ in deps if n != m}) for m, deps in graph().items()}
    self.assertIsNone(find_cycle(edges))

  def test_imports_go_down_the_floors(self):
    for module, deps in graph().items():
      for name, line, _ in deps:
        with self.subTest(module=module, imports=name):
          self.assertGreaterEqual(
              floor_of(name), floor_of(module),
              f"{module}:{line} imports {name}, a floor above it ({FLOORS[floor_of(name)][0]} "
              f"over {FLOORS[floor_of(module)][0]})")

  def test_imports_inside_functions_are_justified(self):
    modules = package_modules()
    for module, path in modules.items():
      if module in ENTRY_POINTS:
        continue
      for name, line, top in imports(path, modules):
        if top:
          continue
        third_party = name.split(".")[0] != "m6t_tf"
        ok = (any(name == t or name.startswith(t + ".") for t in LAZY_THIRD_PARTY) if third_party
              else (module, name) in LAZY)
        self.assertTrue(ok, f"{module}:{line} imports {name} inside a function: import it at "
                            f"the top, or justify it in tests/test_dependencies.py")

  def test_a_planted_cycle_is_found(self):
    edges = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    self.assertEqual(find_cycle(edges), ["a", "b", "c", "a"])
    self.assertIsNone(find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}))

  def test_expert_layers_carry_the_mark(self):
    from m6t_tf.layers import experts  # pylint: disable=g-import-not-at-top
    from m6t_tf.layers import moe  # pylint: disable=g-import-not-at-top
    from m6t_tf.parallel import communicator  # pylint: disable=g-import-not-at-top
    layer = moe.MoE(4, 8)
    layer.build((None, 6))
    self.assertEqual(sorted(v.path for v in layer.weights if communicator.is_expert_sharded(v)),
                     sorted(v.path for v in layer.experts.trainable_variables))
    linear = experts.LinearExperts(2, 3, 3)
    linear.build(None)
    self.assertTrue(communicator.is_expert_sharded(linear.kernel))


if __name__ == "__main__":
  tf.test.main()
