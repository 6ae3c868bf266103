"""Dropout whose masks a recomputed forward pass draws again, bit for bit.

Recomputation (`keras.remat`, i.e. `tf.recompute_grad`) runs a block's forward a second time in
the backward pass. Keras' `Dropout` draws from a stateful seed generator, so the second run
would draw new masks and the gradient would belong to a different network than the loss. Here a
`seed_scope(seed)` makes every `Dropout` call inside it stateless: the n-th call in the scope
uses `fold_in(seed, n)`. A function that enters the scope itself (`scoped`, `remat`) therefore
draws the same masks however often it runs, and the masks are a pure function of the scope's
seed.

Outside any scope, `Dropout` is Keras' own (stateful) dropout.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Optional

import keras
import tensorflow as tf

_SCOPE = threading.local()


@contextlib.contextmanager
def seed_scope(seed: Optional[tf.Tensor]):
  """Within, the n-th random draw (`next_seed`) is `fold_in(seed, n)`; `seed=None` is a no-op.

  Args:
    seed: <int>[2] stateless seed, or None (keep the enclosing scope, if any).
  """
  if seed is None:
    yield
    return
  previous = getattr(_SCOPE, "state", None)
  _SCOPE.state = [seed, 0]
  try:
    yield
  finally:
    _SCOPE.state = previous


def next_seed() -> Optional[tf.Tensor]:
  """<int32>[2] seed of the next draw in the current `seed_scope`, or None outside one."""
  state = getattr(_SCOPE, "state", None)
  if state is None:
    return None
  seed = tf.random.experimental.stateless_fold_in(state[0], state[1])
  state[1] += 1
  return seed


def scoped(fn: Callable[[tf.Tensor], tuple]) -> Callable[[tf.Tensor], tuple]:
  """`fn` under a `seed_scope` of its own, whose seed is drawn now from the enclosing scope.

  Wrapping a function this way gives it the same random values as `remat(fn)`, so a network
  draws the same dropout masks with and without recomputation.
  """
  seed = next_seed()

  def body(x):
    with seed_scope(seed):
      return fn(x)

  return body


def remat(fn: Callable[[tf.Tensor], tuple]) -> Callable[[tf.Tensor], tuple]:
  """`keras.remat(scoped(fn))`: recomputed in the backward pass with the forward's masks.

  Args:
    fn: one positional float tensor in, a tensor or tuple of tensors out. Everything else it
      needs (masks, flags) is closed over: `tf.recompute_grad` takes no keyword arguments in a
      graph and passes gradients only to positional inputs and variables.
  """
  recomputed = keras.remat(scoped(fn))

  def call(x):
    return tf.nest.map_structure(_dense_gradient, recomputed(x))

  return call


@tf.custom_gradient
def _dense_gradient(x):
  """Identity whose gradient is always a dense tensor. `tf.recompute_grad` (graph mode) fails
  with "Expected a type in (Tensor), got IndexedSlices" when the gradient arriving at its
  outputs is IndexedSlices, as it is when a consumer gathers rows of them."""
  return tf.identity(x), lambda dy: tf.convert_to_tensor(dy)


def maybe_remat(fn: Callable[[tf.Tensor], tuple], enabled: bool):
  """`remat(fn)` if `enabled`, else `scoped(fn)`: the same values either way."""
  return remat(fn) if enabled else scoped(fn)


@keras.saving.register_keras_serializable(package="m6t_tf")
class Dropout(keras.layers.Dropout):
  """`keras.layers.Dropout` that is stateless inside a `seed_scope` (same arguments)."""

  def call(self, inputs, training=False):
    if not (training and self.rate > 0):
      return inputs
    seed = next_seed()
    if seed is None:
      return super().call(inputs, training=training)
    return tf.nn.experimental.stateless_dropout(inputs, rate=self.rate, seed=seed,
                                                noise_shape=self.noise_shape)
