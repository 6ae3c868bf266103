"""The trained model: M6 with the image-captioning loss (teacher forcing, next-token CE).

Batch format (see `m6t_tf.data.pipeline`): `{"image" <uint8>[B,H,W,3] | "patch_features"
<float32>[B,16,P], "tokens" <int32>[B, L]}` with `tokens = [CLS] caption [SEP] 0 …`. The model
reads `tokens[:, :-1]` and predicts `tokens[:, 1:]`; targets equal to 0 ([PAD]) are not scored.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from m6t_tf.layers import moe as moe_lib
from m6t_tf.networks import m6_transformer

PAD_ID = 0


def split_tokens(tokens: tf.Tensor):
  """<int32>[B, L] -> inputs <int32>[B, L-1], targets <int32>[B, L-1], weights <float32>[B, L-1]."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  return inputs, targets, tf.cast(targets != PAD_ID, tf.float32)


def token_nll(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
  """<float32>[B, L] negative log-likelihood of each target under <float32>[B, L, V] logits."""
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)


@keras.saving.register_keras_serializable(package="m6t_tf")
class M6Captioner(keras.Model):
  """M6 (`M6Transformer`) trained as an image captioner. Keyword arguments go to the network."""

  def __init__(self, network: m6_transformer.M6Transformer | None = None, **kwargs):
    network_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("name", "dtype", "trainable")}
    # A fixed name keeps variable paths (checkpoint keys) independent of how many models the
    # process built before.
    kwargs.setdefault("name", "m6_captioner")
    super().__init__(**kwargs)
    self.network = network or m6_transformer.M6Transformer(name="m6", **network_kwargs)

  def call(self, batch, training=None):
    """Returns logits <float32>[B, L-1, V] for the caption targets `batch["tokens"][:, 1:]`."""
    inputs, _, _ = split_tokens(batch["tokens"])
    features = {k: v for k, v in batch.items() if k in ("image", "patch_features")}
    return self.network({**features, "tokens": inputs}, training=training)

  def losses_and_metrics(self, batch, training: bool):
    """One forward pass: (total loss for the gradient, metrics dict of scalar tensors).

    The cross-entropy is the mean over non-padding target tokens of this worker's batch; the
    auxiliary and z-losses come from the MoE layers through `add_loss`.
    """
    logits = self(batch, training=training)
    _, targets, weights = split_tokens(batch["tokens"])
    nll = token_nll(logits, targets)
    num_tokens = tf.reduce_sum(weights)
    nll_sum = tf.reduce_sum(nll * weights)
    ce = tf.math.divide_no_nan(nll_sum, num_tokens)
    moe_losses = tf.add_n([tf.cast(l, tf.float32) for l in self.losses]) if self.losses else 0.0
    metrics = {"loss": ce, "nll_sum": nll_sum, "num_tokens": num_tokens,
               "moe_loss": tf.convert_to_tensor(moe_losses, tf.float32)}
    return ce + moe_losses, metrics

  @property
  def moe_layers(self) -> list[moe_lib.MoE]:
    return self.network.moe_sublayers

  def build_from_batch(self, batch) -> None:
    """Creates every weight by running one forward pass on (a slice of) `batch`."""
    self(batch, training=False)

  def get_config(self):
    config = super().get_config()
    config.update(self.network.get_config())
    for k in ("name", "trainable", "dtype"):
      config.pop(k, None)
    return config
