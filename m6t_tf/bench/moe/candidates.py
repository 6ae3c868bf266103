"""What the MoE benchmark times: a layer, its input, a compiled forward+backward step.

One `tf.function` step = forward + backward (gradients w.r.t. the input and every trainable
weight) of one layer, training=True, float32; tracing and one warm-up call excluded. A
shape's candidates are built in one process and timed interleaved (`timing.interleaved`);
each result row's ratio is the median over rounds of (candidate / baseline) in the same round.
"""

from __future__ import annotations

import statistics
import time

import tensorflow as tf

from m6t_tf.bench import timing
from m6t_tf.layers import experts as experts_lib
from m6t_tf.layers import moe as moe_lib
from m6t_tf.layers import routing as routing_lib
from m6t_tf.parallel import communicator as comm_lib

GAMMA = 1.25


class Candidate:
  """One thing to time. `build()` makes the layer and traces the step; `run()` runs one step.

  Args:
    key: its name among a shape's candidates.
    make: () -> (layer, call), call(layer, x) being the layer's forward pass.
    input_shape: one shape, or a list of shapes (the layer then takes a list of inputs and
      may return a list, e.g. the bare experts on per-expert row blocks).
    tokens: T, for tokens/s.
    inputs: optional () -> x, the input to use instead of a standard normal one of
      `input_shape` (e.g. inputs that carry a fixed routing, `dropless.pinned_inputs`).
  """

  def __init__(self, key: str, make, input_shape, tokens: int, inputs=None):
    self.key, self._make, self.tokens = key, make, tokens
    self._inputs = inputs
    self.many = isinstance(input_shape, list)
    self.input_shape = ([tuple(s) for s in input_shape] if self.many else tuple(input_shape))
    self.step = None
    self.error = None

  def build(self):
    layer, call = self._make()
    if self._inputs is not None:
      x = self._inputs()
    elif self.many:
      x = [tf.random.stateless_normal(s, [1, 2 + i]) for i, s in enumerate(self.input_shape)]
    else:
      x = tf.random.stateless_normal(self.input_shape, [1, 2])
    y = call(layer, x)                               # eager: builds the weights
    probe = tf.nest.map_structure(
        lambda t: tf.random.stateless_normal(t.shape, [3, 4], dtype=t.dtype), y)
    variables = layer.trainable_variables
    many = self.many

    # The loss is returned too: with gradients alone, TF prunes every forward op whose value no
    # gradient needs (the experts' second matmul, unless a router gradient reads its output).
    @tf.function
    def step(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.add_n([tf.reduce_sum(a * b) for a, b in zip(
            tf.nest.flatten(call(layer, x)), tf.nest.flatten(probe))])
      return loss, tape.gradient(loss, (list(x) if many else [x]) + list(variables))

    self.layer, self.x = layer, x
    step(x)                                          # trace + warm-up, excluded
    self.step = step

  def run(self) -> float:
    start = time.perf_counter()
    self.step(self.x)                                # synchronous on CPU
    return time.perf_counter() - start

  def release(self):
    self.step = self.layer = self.x = None


class ExchangeCandidate(Candidate):
  """The all-to-alls of one layer step alone (forward and backward), on payloads of the sizes
  the layer sends: `fn` is traced once and timed like a layer step."""

  def __init__(self, key: str, fn, args, tokens: int):
    super().__init__(key, None, (), tokens)
    self._fn, self._args = fn, args

  def build(self):
    self.step = tf.function(self._fn)
    self.step(*self._args)

  def run(self) -> float:
    start = time.perf_counter()
    self.step(*self._args)
    return time.perf_counter() - start

  def release(self):
    self.step = self._args = None


def time_candidates(candidates: list, repeats: int, log) -> dict:
  """Builds every candidate, then `repeats` interleaved rounds timing each once.

  A candidate that fails to build or to run (e.g. a peer that cannot run on this stack) is
  reported through `log`, keeps its `error`, and is left out, not fatal.

  Returns:
    {key: [seconds of each round]} of the candidates that ran every round.
  """
  ready = []
  for c in candidates:
    try:
      c.build()
      ready.append(c)
    except Exception as e:  # pylint: disable=broad-except
      c.error = error_text(e)
      c.release()
      log(f"  {c.key}: cannot run ({c.error})")

  def failed(c, r, e):
    c.error = error_text(e)
    log(f"  {c.key}: failed in round {r + 1} ({c.error})")

  times = timing.interleaved(ready, repeats, lambda c: c.run(), on_error=failed,
                             after_round=lambda done: log(f"  round {done}/{repeats} done"))
  return {c.key: t for c, t in zip(ready, times) if len(t) == repeats}


def error_text(e: Exception) -> str:
  """One line of `e`: an OOM's allocation, a traced function's last line, or the first line."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  oom = [l for l in lines if l.startswith("OOM when allocating")]
  if oom:
    text = oom[0].split(" on /job")[0]
  elif lines and lines[0] == "in user code:":     # a traced function's error: its last line
    text = lines[-1]
  else:
    text = lines[0] if lines else ""
  return f"{type(e).__name__}: {text}"[:300]


def ratio(times: dict, key: str, base: str) -> float:
  """Median over rounds of times[key] / times[base] (`timing.paired_ratio`)."""
  return timing.paired_ratio(times[key], times[base])


def row(name, variant, shape_name, cand, times, base_key, baseline_label, **extra) -> dict:
  """One result row of the JSON report (its keys: the tool's docstring)."""
  t = times[cand.key]
  med = statistics.median(t)
  return {"name": name, "variant": variant, "shape": shape_name, "tokens": cand.tokens,
          "median_s": med, "ratio_to_baseline": ratio(times, cand.key, base_key),
          "baseline": baseline_label, "is_baseline": cand.key == base_key,
          "tokens_per_s": cand.tokens / med, "repeats": len(t), "times_s": t, **extra}


def capacity(shape: dict, k: int = 1) -> int:
  """C of a shape's top-k routing at γ (`routing.capacity`)."""
  return routing_lib.capacity(shape["T"], shape["E"], k=k, capacity_factor=shape["gamma"])


def loopback_communicator(group_size: int) -> comm_lib.Communicator:
  """Stands for one worker of a D-worker expert group; its all-to-all is the identity.

  The worker then computes exactly its real share ([D, e, C, M] buffers, e = E/D local experts)
  as if every peer had sent it the same buffer it sends; the communication is not measured.
  Every worker would compute the same C, so the group's maximum is this worker's.
  """

  class Loopback(comm_lib.Communicator):
    expert_group_size = group_size
    expert_rank = 0

    def all_to_all(self, x):
      return x

    def max_over_group(self, x):
      return x

  return Loopback()


def ours(shape, *, routing="top_k", k=1, mode="k", dispatch="index", activation="gelu"):
  """Our MoE layer at `shape` (a loopback communicator for D > 1)."""
  def make():
    comm = loopback_communicator(shape["D"]) if shape["D"] > 1 else None
    layer = moe_lib.MoE(shape["E"], shape["I"], routing=routing, k=k, capacity_mode=mode,
                        capacity_factor=shape["gamma"], dispatch=dispatch,
                        activation=activation, communicator=comm)
    return layer, lambda l, x: l(x, training=True)
  return make


def floor(shape):
  """The bare expert matmuls: `Experts` on [e, D·C, M], the buffer a top-1 MoE gives them."""
  def make():
    layer = experts_lib.Experts(shape["E"] // shape["D"], shape["M"], shape["I"])
    return layer, lambda l, x: l(x, training=True)
  return make
