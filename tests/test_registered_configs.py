"""Every object the package registers with Keras (`register_keras_serializable(package="m6t_tf")`)
rebuilds from its config: `cls.from_config(obj.get_config())` gives an object with the same
config. The registered set is read from Keras after importing every module that registers
something, so a new registered class without an example here fails the test.
"""

import ast
import glob
import importlib
import os

import keras
import tensorflow as tf

from tests.support import REPO


def _registering_modules():
  """Modules of the package whose source calls `register_keras_serializable`."""
  out = []
  for path in glob.glob(os.path.join(REPO, "m6t_tf", "**", "*.py"), recursive=True):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    if any(isinstance(n, ast.Attribute) and n.attr == "register_keras_serializable"
           for n in ast.walk(tree)):
      out.append(os.path.relpath(path, REPO)[:-3].replace(os.sep, "."))
  return sorted(out)


def _examples():
  """One non-default instance of every registered class, by registered name."""
  from m6t_tf import optimizers
  from m6t_tf.layers import attention, dropout, embeddings, experts, feedforward, moe
  from m6t_tf.layers import normalization
  from m6t_tf.models import m6_captioner
  from m6t_tf.networks import m6_transformer
  schedule = optimizers.WarmupSchedule(1e-3, 10, decay="cosine", total_steps=100,
                                       final_fraction=0.1)
  moe_config = m6_transformer.MoEConfig(num_experts=4, k=2, capacity_factor=2.0,
                                        drop_policy="probability", num_groups=2)
  network = lambda: m6_transformer.M6Transformer(
      vocab_size=50, hidden_size=8, num_layers=2, num_heads=2, head_size=4,
      intermediate_size=16, max_text_length=6, norm="pre_rms", activation="swiglu",
      positions="rope", moe=moe_config, moe_placement="last_k", moe_every=1, name="m6")
  return {
      "Adafactor": lambda: optimizers.Adafactor(schedule, weight_decay=0.01, clip_threshold=0.5),
      "WarmupSchedule": lambda: schedule,
      "Dropout": lambda: dropout.Dropout(0.25),
      "Experts": lambda: experts.Experts(2, 4, 8, activation="swiglu", dropout_rate=0.1),
      "LinearExperts": lambda: experts.LinearExperts(2, 3, 5, init_std=0.01),
      "FeedForward": lambda: feedforward.FeedForward(8, activation="relu", dropout_rate=0.1),
      "MoE": lambda: moe.MoE(4, 8, routing="prototype", k=2, capacity_mode="1",
                             aux_loss_weight=0.01, name="moe"),
      "PatchEmbedding": lambda: embeddings.PatchEmbedding(8, init_std=0.01),
      "PositionEmbedding": lambda: embeddings.PositionEmbedding(7, init_std=0.01),
      "RMSNorm": lambda: normalization.RMSNorm(epsilon=1e-5),
      "SelfAttention": lambda: attention.SelfAttention(
          2, 4, use_rope=True, moe_projections=dict(num_experts=2, k=1)),
      "TransformerBlock": lambda: m6_transformer.TransformerBlock(
          num_heads=2, head_size=4, intermediate_size=16, norm="post_ln", activation="gelu",
          use_rope=False, dropout_rate=0.1, init_std=0.02, moe=moe_config.kwargs()),
      "M6Transformer": network,
      "M6Captioner": lambda: m6_captioner.M6Captioner(network=network()),
  }


class RegisteredConfigTest(tf.test.TestCase):

  def test_every_registered_object_round_trips_its_config(self):
    modules = _registering_modules()
    self.assertNotEmpty(modules)
    for module in modules:
      importlib.import_module(module)
    registered = {key.split(">", 1)[1]: cls
                  for key, cls in keras.saving.get_custom_objects().items()
                  if key.startswith("m6t_tf>")}
    examples = _examples()
    self.assertEqual(sorted(registered), sorted(examples),
                     "every registered class needs an example here")
    for name, make in examples.items():
      with self.subTest(name):
        obj = make()
        self.assertIsInstance(obj, registered[name])
        config = obj.get_config()
        # A fresh copy to compare with: Keras' optimizers rewrite the config they read.
        clone = registered[name].from_config(obj.get_config())
        self.assertEqual(clone.get_config(), config)


if __name__ == "__main__":
  tf.test.main()
