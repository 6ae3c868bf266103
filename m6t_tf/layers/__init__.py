"""Keras building blocks of M6-T: routing, routers, experts, the MoE layer, attention, embeddings."""
from m6t_tf.layers import experts, moe, moe_options, routers, routing  # noqa: F401
from m6t_tf.layers.experts import Experts, LinearExperts  # noqa: F401
from m6t_tf.layers.moe import MoE  # noqa: F401
from m6t_tf.layers.moe_options import MoEOptions  # noqa: F401
