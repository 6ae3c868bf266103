"""One source per MoE option, one table of routers, and what the layer reports about itself.

* `MoEOptions` is the only list of options: the layer's keywords and signature, its
  `get_config`, gin's `MoEConfig` and the planner's checks all follow it, and an old `.keras`
  config (without options added since) still loads.
* Routers are looked up in one table; a router may own state that the trainer updates after
  every step through `MoE.after_step` with the context's sum over workers (a stateful test
  router registered here shows the hook).
* The trainer reads the layer's reports (`effective_capacity_factor`, `capacity_summary`,
  `ceiling_warning`, `alltoall_bytes_per_step`), not its private state.
"""

import dataclasses
import inspect

import keras
import numpy as np
import tensorflow as tf

from m6t_tf.run import planning
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.errors import ConfigError
from m6t_tf.layers import moe as moe_lib
from m6t_tf.layers import moe_options
from m6t_tf.layers import routers
from m6t_tf.layers import routing as routing_lib
from m6t_tf.networks import m6_transformer
from m6t_tf.parallel import context as context_lib

M, I = 6, 8

# What `MoE(4, 8, routing="prototype", k=2, capacity_factor=2.0).get_config()` wrote before the
# options became one dataclass: such `.keras` files must still load.
OLD_CONFIG = {
    "name": "old_moe", "trainable": True,
    "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
              "registered_name": None},
    "num_experts": 4, "intermediate_size": 8, "routing": "prototype", "k": 2,
    "capacity_factor": 2.0, "eval_capacity_factor": None, "capacity_mode": "k",
    "normalization": "auto", "dispatch": "index", "activation": "gelu", "expert_type": "ffn",
    "output_size": None, "init_std": 0.02, "router_init_std": None, "dropout_rate": 0.0,
    "aux_loss_weight": 0.0, "z_loss_weight": 0.0, "min_capacity": 1,
    "second_expert_policy": "all", "drop_policy": "position",
    "max_tokens_per_expert_factor": None, "num_groups": 1, "capacity_token_fraction": None}


def _router_option_names():
  return {f.name for cls in routers.ROUTERS.values() for f in dataclasses.fields(cls.Options)}


class OneSourceTest(tf.test.TestCase):

  def test_signature_config_and_gin_follow_the_dataclass(self):
    names = moe_options.option_names()
    self.assertContainsSubset(_router_option_names(), names)   # routers' options included
    params = inspect.signature(moe_lib.MoE).parameters
    self.assertEqual(list(params), list(names) + ["communicator", "kwargs"])
    self.assertEqual([p.kind for p in list(params.values())[:2]],
                     [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2)
    layer = moe_lib.MoE(4, I, k=2, capacity_factor=2.0, drop_policy="probability",
                        second_expert_policy="random", num_groups=3, name="moe")
    config = layer.get_config()
    self.assertContainsSubset(names, config)
    self.assertEqual({n: config[n] for n in names}, dataclasses.asdict(layer.options))
    clone = moe_lib.MoE.from_config(config)
    self.assertEqual(clone.options, layer.options)
    self.assertEqual((clone.k, clone.num_groups, clone.second_expert_policy), (2, 3, "random"))
    # gin's MoEConfig: every option the network does not set itself, with the same defaults
    # (E = 32, the base model, where the layer has none).
    network_set = {"intermediate_size", "activation", "expert_type", "output_size", "init_std",
                   "router_init_std", "dropout_rate"}
    gin_fields = {f.name: f.default for f in dataclasses.fields(m6_transformer.MoEConfig)}
    want = {f.name: f.default for f in dataclasses.fields(moe_options.MoEOptions)
            if f.name not in network_set}
    want["num_experts"] = 32
    self.assertEqual(gin_fields, want)

  def test_setting_an_option_checks_it(self):
    layer = moe_lib.MoE(4, I, k=2)
    layer.aux_loss_weight = 0.5                                  # read at each call
    self.assertEqual(layer.options.aux_loss_weight, 0.5)
    with self.assertRaisesRegex(ValueError, "capacity_factor=0.0 must be > 0"):
      layer.capacity_factor = 0.0
    layer.second_expert_policy = "random"                       # before build: gets its RNG
    self.assertIsNotNone(layer._seed_generator)  # pylint: disable=protected-access
    layer.build((None, M))
    with self.assertRaisesRegex(ValueError, r"\['intermediate_size'\] of a built MoE layer"):
      layer.intermediate_size = 2 * I
    self.assertEqual(layer.get_config()["aux_loss_weight"], 0.5)

  def test_old_keras_config_loads(self):
    layer = moe_lib.MoE.from_config(dict(OLD_CONFIG))
    self.assertEqual((layer.routing, layer.k, layer.capacity_factor), ("prototype", 2, 2.0))
    # Options the old file lacks (router options added since) take their defaults.
    trimmed = {k: v for k, v in OLD_CONFIG.items() if k not in _router_option_names()}
    self.assertEqual(moe_lib.MoE.from_config(trimmed).options, layer.options)
    x = tf.random.stateless_normal([10, M], [1, 2])
    self.assertEqual(layer(x).shape, (10, M))

  def test_the_planner_checks_with_the_layers_rule(self):
    bad = [dict(routing="hash"), dict(k=3, routing="prototype"), dict(capacity_factor=0.0),
           dict(routing="prototype", k=2, second_expert_policy="random"),
           dict(num_groups=2, capacity_mode="dropless")]
    for kwargs in bad:
      with self.subTest(kwargs):
        with self.assertRaises(ValueError) as layer_error:
          moe_lib.MoE(4, I, **kwargs)
        config = planning.PlanConfig(vocab_size=10, hidden_size=M, num_layers=1, num_heads=2,
                                     head_size=3, intermediate_size=I, max_text_length=8,
                                     max_len=8, moe=dict(num_experts=4, **kwargs))
        with self.assertRaisesRegex(ConfigError, "MoEConfig") as plan_error:
          planning.validate(config)
        self.assertIn(str(layer_error.exception), str(plan_error.exception))

  def test_an_option_of_another_router_is_rejected_the_same_way_everywhere(self):
    message = "second_expert_policy='random' needs routing='top_k'"
    with self.assertRaisesRegex(ValueError, message):
      moe_lib.MoE(4, I, routing="prototype", k=2, second_expert_policy="random")
    with self.assertRaisesRegex(ValueError, message):
      routers.route(np.zeros([3, 4], np.float32), routing="prototype", k=2, capacity=2,
                    second_expert_policy="random")


class _CountingRouter(routers.Router):
  """Top-k routing that counts the choices it routed and, after each step, adds the count
  summed over the workers to a running total: the shape of a stateful router."""

  name = "test_counting"

  def build(self, layer):
    e = self.options.num_experts
    self.routed = layer.add_weight(name="routed", shape=(e,), initializer="zeros",
                                   trainable=False)
    self.total = layer.add_weight(name="routed_total", shape=(e,), initializer="zeros",
                                  trainable=False)

  def route(self, logits, *, capacity, token_mask=None, uniform=None, training=True):
    r = routing_lib.top_k_routing(logits, k=self.options.k, capacity=capacity,
                                  token_mask=token_mask)
    self.routed.assign(tf.cast(r.tokens_per_expert, tf.float32))
    return r

  def after_step(self, sum_over_workers, applied):
    self.total.assign_add(tf.where(applied, sum_over_workers(self.routed), 0.0))


class _TwoMoE(keras.Model):
  """Two MoE layers and a squared-output loss: a model `Trainer` steps in milliseconds."""

  def __init__(self, routing):
    super().__init__(name="two")
    self.moe_layers = [moe_lib.MoE(4, I, k=2, routing=routing, capacity_factor=4.0,
                                   name=f"moe_{i}") for i in range(2)]

  def call(self, batch, training=None):
    x = batch["x"]
    for layer in self.moe_layers:
      x = layer(x, training=training)
    return x

  def losses_and_metrics(self, batch, training):
    nll = tf.reduce_sum(tf.square(self(batch, training=training)))
    return nll, {"nll_sum": nll, "num_tokens": tf.constant(6.0), "loss": nll,
                 "moe_loss": tf.constant(0.0)}


class _DoublingContext(context_lib.LocalContext):
  """One process standing for two identical workers: Σ over workers doubles."""

  def sum_over_world(self, x):
    return 2.0 * x


class RouterTableTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    routers.register(_CountingRouter)
    self.addCleanup(routers.ROUTERS.pop, _CountingRouter.name)

  def test_the_layer_and_route_find_routers_by_name(self):
    self.assertContainsSubset({"top_k", "prototype", "test_counting"}, routers.names())
    layer = moe_lib.MoE(4, I, routing="test_counting")
    self.assertIsInstance(layer.gating, _CountingRouter)
    self.assertIsInstance(moe_lib.MoE(4, I, routing="prototype", k=2).gating,
                          routers.get("prototype"))
    with self.assertRaisesRegex(ValueError, "routing='nope'; allowed: .*'test_counting'"):
      moe_lib.MoE(4, I, routing="nope")

  def test_a_late_router_cannot_bring_options(self):
    @dataclasses.dataclass(frozen=True)
    class LateOptions:
      late_option: float = routers.option(1.0, "an option nobody could pass")

    class Late(_CountingRouter):
      name = "test_late"
      Options = LateOptions

    with self.assertRaisesRegex(ValueError, "'test_late' has options, but the MoE options"):
      routers.register(Late)
    self.assertNotIn("test_late", routers.names())

  def test_the_trainer_updates_router_state_after_every_step(self):
    keras.utils.set_random_seed(3)
    batch = {"x": tf.random.normal([6, M])}
    for ctx, factor in ((context_lib.LocalContext(), 1.0), (_DoublingContext(), 2.0)):
      with self.subTest(type(ctx).__name__):
        model = _TwoMoE("test_counting")
        model(batch)
        trainer = trainer_lib.Trainer(model, keras.optimizers.SGD(0.01), ctx=ctx)
        for layer in model.moe_layers:
          # The state is the layer's: non-trainable, replicated, stored in checkpoints.
          self.assertNotIn(layer.gating.total.path, [v.path for v in layer.trainable_weights])
          self.assertFalse(context_lib.is_expert_variable(layer.gating.total))
          self.assertIn(f"model/{layer.gating.total.path}", trainer_lib.variables_by_path(model))
        trainer.train_step(batch)
        for layer in model.moe_layers:
          routed = layer.stats["tokens_per_expert"].numpy().astype(np.float32)
          self.assertEqual(routed.sum(), 12)                  # 6 tokens × k = 2, none dropped
          self.assertAllEqual(layer.gating.total, factor * routed)
        # A step that was not applied leaves the state alone.
        before = [layer.gating.total.numpy() for layer in model.moe_layers]
        for layer, value in zip(model.moe_layers, before):
          layer.after_step(ctx.sum_over_world, tf.constant(False))
          self.assertAllEqual(layer.gating.total, value)


class ReportsTest(tf.test.TestCase):
  """The values the trainer logs and prints, from the layer's public methods."""

  def test_capacity_reports(self):
    x = tf.random.stateless_normal([10, M], [5, 6])
    layer = moe_lib.MoE(4, I, k=2, capacity_factor=1.25)
    self.assertIsNone(layer.effective_capacity_factor(8.0))    # no call yet: no C
    layer(x, training=True)
    self.assertEqual(layer.last_capacity, 7)                    # ceil(2·10/4·1.25)
    self.assertAlmostEqual(layer.effective_capacity_factor(8.0), 7 * 4 / (2 * 8.0))
    self.assertIsNone(layer.effective_capacity_factor(0.0))
    self.assertEqual(layer.alltoall_bytes_per_step(), 2.0 * layer.alltoall_bytes_per_forward())
    self.assertEqual(layer.capacity_summary(10), "Experts: C = 7 slots per expert, γ = 1.25 "
                     "over all 10 positions (padding included)")
    one = moe_lib.MoE(4, I, k=2, capacity_mode="1", num_groups=2, capacity_token_fraction=0.5)
    one(x, training=True)
    self.assertEqual(one.last_capacity, 1)                      # ceil(1·ceil(0.5·5)/4·1.25)
    self.assertAlmostEqual(one.effective_capacity_factor(8.0), 1 * 2 * 4 / (1 * 8.0))
    self.assertEqual(one.capacity_summary(10), "Experts: C = 1 slots per expert per group, "
                     "γ = 1.25 over 50.0% of the 10 positions, the real tokens' share")

  def test_dropless_reports(self):
    layer = moe_lib.MoE(4, I, k=2, capacity_mode="dropless", max_tokens_per_expert_factor=1.5)
    layer(tf.random.stateless_normal([10, M], [5, 6]), training=True)
    self.assertIsNone(layer.last_capacity)
    self.assertIsNone(layer.effective_capacity_factor(8.0))
    self.assertIsNone(layer.alltoall_bytes_per_step())
    self.assertEqual(layer.capacity_summary(10),
                     "Experts: dropless (no capacity; every token reaches its experts)")
    self.assertIsNone(layer.ceiling_warning("moe", 0.0, 1.0))
    self.assertEqual(
        layer.ceiling_warning("block_0/moe", 0.125, 2.5),
        "warning: block_0/moe is dropless but its max_tokens_per_expert_factor=1.5 ceiling "
        "dropped 12.50% of its token choices this step (busiest expert 2.5× the mean load); "
        "raise the factor if memory allows, or balance the router (MoEConfig.aux_loss_weight)")
    # A layer with a capacity drops by design: no warning.
    self.assertIsNone(moe_lib.MoE(4, I).ceiling_warning("moe", 0.5, 3.0))
    self.assertIsNone(moe_lib.MoE(4, I, capacity_mode="dropless").ceiling_warning(
        "moe", 0.5, 3.0))


if __name__ == "__main__":
  tf.test.main()
