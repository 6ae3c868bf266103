"""Dense → MoE upcycling: an MoE run's step-0 checkpoint made from a trained dense one.

Command line: `tools/upcycle.py`; `tools/compare_dense.py` upcycles in its own process through
`upcycle()`.

The dense run is a config with `M6Transformer.moe_placement = 'none'` (the dense twin of
`tools/compare_dense.py`: a dense FFN of intermediate size I in every layer). The MoE config
(`moe_gin`, comma-joined files allowed, plus `gin_bindings`) must have the same backbone
(vocabulary, M, layers, heads, I, max_len, norm, activation, positions). The result in
`model_dir` is what `m6t_tf.train` writes at step 0:

  * each MoE layer's E experts are copies of that layer's dense FFN (`ffn/wi` → `moe/experts/wi`
    [E, M, I], `wo`, `wi_gate` alike), plus N(0, noise_std²) noise per expert if asked;
  * attention, norms, embeddings, output bias and the dense FFNs of non-MoE layers (every_k /
    last_k placement) are copied unchanged;
  * routers keep the MoE config's own initialiser (truncated normal, `router_init_std` or
    `init_std`, drawn from `train.seed`), not zeros: zero logits tie every expert, so top-k
    and prototype routing would send every token to the first experts (ties break to the
    lowest index) and capacity would drop most of them; small random logits spread the tokens
    so that the identical experts see different tokens and drift apart. With gates that sum
    to 1 (top-k with `renormalize`, or top-1 with gate 1) the MoE then computes exactly the
    dense function whatever the router says;
  * routing statistics, optimiser state (fresh slots, iterations 0), step 0, the loss scale's
    initial value;
  * `config.gin`: the MoE config as the trainer writes it.

The checkpoint is the trainer's global format (`m6t_tf.run.checkpointing`: every expert under its
global id), so it restores on 1 worker or on D workers whose expert axis divides E;
`num_workers` only checks that. Errors (a missing or MoE checkpoint, a dense config, shapes
that differ) raise `ConfigError` before anything is written (the command line prints them as
one line and exits 2).
"""

from __future__ import annotations

import os

import gin
import numpy as np
import tensorflow as tf

from m6t_tf.run import checkpointing
from m6t_tf import cli
from m6t_tf.run import configurables
from m6t_tf import optimizers
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.cli import ConfigError
from m6t_tf.data import records
from m6t_tf.parallel import context as context_lib

EXPERT_FRAGMENT = "/moe/experts/"


def dense_key(moe_key: str) -> str:
  """The dense checkpoint key an MoE key is copied from (expert stacks: the layer's FFN)."""
  if EXPERT_FRAGMENT in moe_key:
    return moe_key.replace(EXPERT_FRAGMENT, "/ffn/")
  return moe_key


def _fresh(key: str) -> bool:
  """Entries that keep the MoE's own initial value: routers, routing statistics, optimiser."""
  if not key.startswith("model/"):
    return True
  return "/moe/" in key and EXPERT_FRAGMENT not in key


def upcycle(*, dense_model_dir: str, moe_gin, gin_bindings=(), model_dir: str,
            noise_std: float = 0.0, num_workers: int = 1, search_paths=None) -> dict:
  """Writes the upcycled step-0 checkpoint and config.gin (see the module docstring).

  Returns:
    {"checkpoint", "copied", "experts_from_ffn", "fresh", "num_experts", "moe_layers"}.

  Raises:
    ConfigError: every input error, before anything is written.
  """

  files = [f for spec in moe_gin for f in spec.split(",") if f]
  if not noise_std >= 0:
    raise ConfigError(f"--noise_std={noise_std} must be >= 0")
  if num_workers < 1:
    raise ConfigError(f"--num_workers={num_workers} must be >= 1")
  latest = checkpointing.Checkpointer(
      os.path.join(dense_model_dir, "checkpoints"), {}, ctx=context_lib.LocalContext()).latest()
  if not latest:
    raise ConfigError(f"--dense_model_dir={dense_model_dir!r} has no checkpoint "
                      f"(checkpoints/latest); train the dense model there first")
  if os.path.exists(os.path.join(model_dir, "checkpoints", checkpointing.LATEST)):
    raise ConfigError(f"--model_dir={model_dir!r} already holds a checkpoint; choose a new "
                      f"--model_dir (upcycling never overwrites a run)")
  dense = tf.train.load_checkpoint(latest).get_variable_to_shape_map()
  moe_keys = sorted(k for k in dense if k.startswith("model/") and "/moe/" in k)
  if moe_keys:
    raise ConfigError(f"{latest} is not a dense checkpoint: it has MoE entries such as "
                      f"{moe_keys[0]!r}; pass the model_dir of a run with "
                      f"M6Transformer.moe_placement = 'none'")

  gin.clear_config()
  configurables.parse(files, list(gin_bindings), search_paths or ["."])
  if configurables.query("M6Transformer.moe_placement", "all") == "none":
    raise ConfigError(f"--moe_gin={','.join(files)} is a dense config "
                      f"(M6Transformer.moe_placement = 'none'); give the MoE config")
  if configurables.query("M6Transformer.moe_attention", False):
    raise ConfigError("M6Transformer.moe_attention = True: upcycling copies the dense FFN into "
                      "the experts; attention experts (no biases) have no dense counterpart")
  seed = configurables.query("train.seed", 0) or 0
  max_len = configurables.query("train.max_len", 64)
  mixed = bool(configurables.query("train.mixed_precision", False))
  opt_name = configurables.query("train.optimizer", "adamw")
  try:
    network = configurables.network_fn()(name="m6")
  except ValueError as e:
    raise ConfigError(f"the MoE config (M6Transformer.*, MoEConfig.*): {cli.one_line(e)}") from e
  num_experts = network.moe["num_experts"] if network.moe else 0
  if num_experts % num_workers:
    raise ConfigError(f"E={num_experts} experts do not split over --num_workers={num_workers}; "
                      f"use a worker count that divides {num_experts}")

  # The MoE run's variables exactly as `training.train` creates them (same seed, same order).
  trainer_lib.set_seeds(seed, False, rank=0)
  batch = {"tokens": tf.zeros([1, max_len], tf.int32),
           "image": tf.zeros([1, 64, 64, 3], tf.uint8)}
  if configurables.query("train.image_mode", "pixels") == "features":
    batch = {"tokens": batch["tokens"], "patch_features": tf.zeros([1, 16, 2048], tf.float32)}
  model = trainer_lib.build_model(batch=batch, mixed_precision=mixed, network=network)
  opt = optimizers.make_optimizer(opt_name, optimizers.WarmupSchedule(1e-4, 1))
  trainer = trainer_lib.Trainer(model, opt, mixed_precision=mixed)
  entries = trainer_lib.variables_by_path(model, opt)
  step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
  entries.update({"train/step": step_var, "train/loss_scale": trainer.loss_scale.scale,
                  "train/good_steps": trainer.loss_scale.good_steps,
                  "train/skipped_steps": trainer.loss_scale.skipped})
  entries["train/bad_records"] = tf.Variable(tf.zeros([len(records.REASON_NAMES)], tf.int64),
                                             trainable=False, name="bad_records")
  fp16_wire = configurables.query("make_context.allreduce_compression", "none") == "fp16"
  if fp16_wire and num_workers > 1 and not mixed:
    # The trainer enables loss scaling for FP16 gradient communication: start from its scale.
    trainer.loss_scale.scale.assign(trainer_lib.LossScale(True).scale)
  config_text = gin.config_str()
  gin.clear_config()

  # Check every copy before writing anything.
  plan = {}
  for key in sorted(entries):
    if _fresh(key):
      continue
    src = dense_key(key)
    want = list(entries[key].shape)
    if src not in dense:
      raise ConfigError(f"the dense checkpoint {latest} has no {src!r} for the MoE's {key!r}: "
                        f"the two configs differ (layers, norm, activation or positions)")
    have = list(dense[src])
    need = want[1:] if EXPERT_FRAGMENT in key else want
    if have != need:
      raise ConfigError(f"shape mismatch: dense {src!r} is {have}, the MoE's {key!r} needs "
                        f"{want}; use the same backbone (M, I, heads, vocabulary, max_len) in "
                        f"--moe_gin as in the dense run")
    plan[key] = src
  reader = tf.train.load_checkpoint(latest)
  rng = np.random.default_rng(seed)
  for key, src in plan.items():
    value = reader.get_tensor(src)
    if EXPERT_FRAGMENT in key:
      value = np.broadcast_to(value, (num_experts,) + value.shape).copy()
      if noise_std > 0:
        value = value + rng.normal(0.0, noise_std, value.shape).astype(value.dtype)
    dtype = entries[key].dtype
    entries[key].assign(value.astype(getattr(dtype, "as_numpy_dtype", None) or np.dtype(dtype)))
  os.makedirs(model_dir, exist_ok=True)
  checkpointer = checkpointing.Checkpointer(
      os.path.join(model_dir, "checkpoints"), entries, ctx=context_lib.LocalContext(),
      num_experts=num_experts, max_to_keep=1)
  prefix = checkpointer.save(0)
  with open(os.path.join(model_dir, "config.gin"), "w") as f:
    f.write(config_text)
  experts = [k for k in plan if EXPERT_FRAGMENT in k]
  return {"checkpoint": prefix, "copied": len(plan) - len(experts),
          "experts_from_ffn": len(experts), "fresh": len(entries) - len(plan),
          "num_experts": num_experts, "moe_layers": len(model.moe_layers)}
