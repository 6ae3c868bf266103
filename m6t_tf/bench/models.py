"""A gin config's model with the trainer's own pieces, ready to time one training step.

`GinModel` builds what `python -m m6t_tf.train` would for the same gin files and bindings:
`training.build_model`, `optimizers.make_optimizer` with the config's `train.*` values and a
`training.Trainer`, on a real training batch of `train.train_data` (a synthetic batch of the
same shapes if the files are missing; `batch_source` says which). `step()` runs the trainer's
compiled `train_step` once and returns its seconds.
"""

from __future__ import annotations

import glob
import inspect
import math
import os
import time

import gin
import keras
import numpy as np
import tensorflow as tf

from m6t_tf.run import configurables
from m6t_tf import optimizers
from m6t_tf.run import training
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.bench import timing
from m6t_tf.data import pipeline

# The dense twin of an MoE config: the same backbone with a dense FFN of intermediate size I in
# every layer.
DENSE_BINDING = "M6Transformer.moe_placement = 'none'"
NUM_PATCHES = 16
# Variables of the input and output maps (`m6t_tf.run.planning`'s "embeddings" component).
EMBEDDING_NAMES = ("token_embedding", "position_embedding", "patch_embedding", "output_bias")
_TRAIN_VALUES = ("train_data", "num_steps", "batch_size_per_worker", "max_len", "image_mode",
                 "optimizer", "learning_rate", "warmup_steps", "lr_decay", "final_lr_fraction",
                 "weight_decay", "beta_1", "beta_2", "epsilon", "clip_norm", "mixed_precision",
                 "jit_compile", "seed", "global_batch_size")


def split_files(spec: str) -> list[str]:
  """"gin/a.gin, gin/b.gin" -> ["gin/a.gin", "gin/b.gin"] (one model's files, later ones win)."""
  files = [f.strip() for f in spec.split(",") if f.strip()]
  if not files:
    raise ValueError(f"empty gin spec {spec!r}")
  return files


def model_name(files: list[str], dense: bool) -> str:
  """"demo+tiny", or "dense(demo+tiny)" for a dense twin."""
  stems = "+".join(os.path.splitext(os.path.basename(f))[0] for f in files)
  return f"dense({stems})" if dense else stems


def train_values() -> dict:
  """The `train.*` values of the parsed config (the signature's default where unbound)."""
  defaults = {k: p.default for k, p in inspect.signature(training.train).parameters.items()
              if p.default is not inspect.Parameter.empty}
  out = {}
  for name in _TRAIN_VALUES:
    value = configurables.query(f"train.{name}", defaults.get(name))
    if value is gin.REQUIRED or type(value).__name__ == "ConfigurableReference":
      value = defaults.get(name)   # %gin.REQUIRED and not needed to time a step
    out[name] = value
  return out


def synthetic_batch(batch_size: int, max_len: int, image_mode: str) -> dict:
  """A batch of the pipeline's shapes: 64×64 images (or 16×2048 features), 6-token captions."""
  rng = np.random.default_rng(0)
  tokens = np.zeros((batch_size, max_len), np.int32)
  length = min(max_len, 8)
  tokens[:, 0] = 101                                              # [CLS]
  tokens[:, 1:length - 1] = rng.integers(670, 8000, (batch_size, length - 2))
  tokens[:, length - 1] = 102                                     # [SEP]
  batch = {"tokens": tf.constant(tokens)}
  if image_mode == "features":
    batch["patch_features"] = tf.constant(rng.normal(size=(batch_size, NUM_PATCHES, 2048))
                                          .astype(np.float32))
  else:
    batch["image"] = tf.constant(rng.integers(0, 256, (batch_size, 64, 64, 3), dtype=np.uint8))
  return batch


def first_batch(values: dict, batch_size: int) -> tuple:
  """(one training batch of the config's data, "data" | "synthetic (...)")."""
  pattern = values["train_data"]
  if isinstance(pattern, str) and glob.glob(pattern):
    ds = pipeline.make_dataset(pattern, batch_size=batch_size, max_len=values["max_len"],
                               training=True, seed=values["seed"] or 0,
                               image_mode=values["image_mode"], shuffle_buffer=256)
    return next(iter(ds.take(1))), "data"
  return (synthetic_batch(batch_size, values["max_len"], values["image_mode"]),
          f"synthetic (train.train_data={pattern!r} matches no file)")


def count_params(model) -> dict:
  """{"params_total", "params_embedding", "params_non_embedding"} of the trainable variables."""
  total = embedding = 0
  for v in model.trainable_variables:
    n = int(math.prod(v.shape))
    total += n
    if any(name in v.path for name in EMBEDDING_NAMES):
      embedding += n
  return {"params_total": total, "params_embedding": embedding,
          "params_non_embedding": total - embedding}


def activated_params(model) -> int:
  """Every non-expert parameter plus the k experts a token visits in each MoE layer."""
  expert_ids = set()
  out = 0
  for layer in model.moe_layers:
    for v in layer.experts.trainable_variables:
      expert_ids.add(id(v))
      out += int(math.prod(v.shape)) // layer.num_experts * layer.k
  return out + sum(int(math.prod(v.shape)) for v in model.trainable_variables
                   if id(v) not in expert_ids)


class GinModel:
  """One model ready to step: its Trainer, its batch and what a report says about it.

  Attributes (after `build`): trainer, batch, batch_source, tokens_per_step, params (counts,
  "params_activated" included), moe ({"moe_layers", "num_experts", "routing", "k",
  "capacity_mode"}); `times` collects the seconds of timed steps.
  """

  def __init__(self, name: str, files: list, bindings: list, dense: bool, search_paths: list):
    self.name, self.files, self.bindings, self.dense = name, files, bindings, dense
    self.search_paths = search_paths
    self.times: list[float] = []

  def build(self) -> None:
    gin.clear_config()
    configurables.parse(self.files, self.bindings, self.search_paths)
    values = train_values()
    batch_size = values["batch_size_per_worker"]
    if values["global_batch_size"]:
      batch_size = values["global_batch_size"]      # one worker holds the global batch
    mixed = bool(values["mixed_precision"])
    # The policy is process-global: set it for this model, whatever the previous one used.
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    network = configurables.network_fn()(name="m6")
    self.batch, self.batch_source = first_batch(values, batch_size)
    model = trainer_lib.build_model(batch=self.batch, mixed_precision=mixed, network=network)
    total_steps = values["num_steps"] if isinstance(values["num_steps"], int) else 0
    decay = values["lr_decay"] if total_steps > values["warmup_steps"] else "constant"
    schedule = optimizers.WarmupSchedule(values["learning_rate"], values["warmup_steps"],
                                         decay=decay, total_steps=total_steps,
                                         final_fraction=values["final_lr_fraction"])
    opt = optimizers.make_optimizer(values["optimizer"], schedule,
                                    weight_decay=values["weight_decay"], beta_1=values["beta_1"],
                                    beta_2=values["beta_2"], epsilon=values["epsilon"])
    self.trainer = trainer_lib.Trainer(model, opt, clip_norm=values["clip_norm"],
                                    mixed_precision=mixed, jit_compile=bool(values["jit_compile"]))
    self.tokens_per_step = batch_size * (NUM_PATCHES + values["max_len"] - 1)
    self.params = count_params(model)
    self.params["params_activated"] = activated_params(model)
    layers = model.moe_layers
    self.moe = {"moe_layers": len([l for l in layers if l.expert_type == "ffn"]),
                "num_experts": layers[0].num_experts if layers else 0,
                "routing": layers[0].routing if layers else None,
                "k": layers[0].k if layers else 0,
                "capacity_mode": layers[0].capacity_mode if layers else None}
    gin.clear_config()

  def step(self) -> float:
    """One `Trainer.train_step` on the batch; its wall seconds (result waited for)."""
    start = time.perf_counter()
    metrics = self.trainer.train_step(self.batch)
    float(metrics["loss"])                           # waits for the step's result
    return time.perf_counter() - start


def time_interleaved(models: list, rounds: int, warmup: int, log) -> None:
  """`warmup` untimed steps of each model, then `rounds` interleaved rounds (`timing`); each
  model's seconds are appended to its `times`."""
  def progress(done):
    if done % 5 == 0 or done == rounds:
      log(f"  round {done}/{rounds}")

  times = timing.interleaved(models, rounds, lambda m: m.step(), warmup=warmup,
                             after_round=progress)
  for m, t in zip(models, times):
    m.times.extend(t)
