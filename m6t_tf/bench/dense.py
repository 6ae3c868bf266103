"""MoE vs its dense twin at one wall-clock budget (Du et al. 2024, arXiv 2405.15052), and the
upcycling arms: the budget arithmetic and the training runs of `tools/compare_dense.py`, whose
docstring gives the method.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import statistics
import sys
import time

import gin
import keras

from m6t_tf.run import checkpointing
from m6t_tf.run import configurables
from m6t_tf.run import evaluation
from m6t_tf.run import training
from m6t_tf.run import trainer as trainer_lib
from m6t_tf.run import inputs
from m6t_tf.run import config as config_lib
from m6t_tf.bench import timing
from m6t_tf.bench import upcycle as upcycle_lib
from m6t_tf.bench.models import DENSE_BINDING
from m6t_tf.parallel import context as context_lib

# Du et al. 2024: the dense→MoE step-time increase of their 3D-sharded MoEs stays under ~20%.
THEIR_MAX_INCREASE_PCT = 20.0


# --------------------------------------------------------------------------------------------
# The budget arithmetic (pure: tested on its own)


def budget(*, dense_params: int, tokens_per_param: float, dense_tokens_per_step: int,
           dense_step_time_s: float) -> dict:
  tokens = tokens_per_param * dense_params
  steps = tokens / dense_tokens_per_step
  return {"budget_params": dense_params, "budget_tokens": tokens, "steps": steps,
          "budget_s": steps * dense_step_time_s}


def moe_at_budget(*, budget_s: float, dense_steps: float, dense_tokens: float,
                  dense_step_time_s: float, ratio: float, tokens_per_step: int) -> dict:
  step_time = dense_step_time_s * ratio
  steps = budget_s / step_time
  tokens = steps * tokens_per_step
  increase = (ratio - 1.0) * 100.0
  return {"step_time_ratio": ratio, "step_time_s": step_time,
          "step_time_increase_pct": increase,
          "within_20pct": bool(increase <= THEIR_MAX_INCREASE_PCT), "steps": steps,
          "tokens": tokens, "steps_vs_dense": steps / dense_steps,
          "tokens_vs_dense": tokens / dense_tokens}


# --------------------------------------------------------------------------------------------
# Upcycling at the same wall-clock budget

ARMS = ("dense", "upcycled", "moe_scratch")
# The arms' runs evaluate once, at their end: periodic evaluation and caption decoding would
# only add wall time that no arm's step budget counts.
ARM_BINDINGS = ("train.eval_every = 0",)


def upcycle_budgets(*, upcycle_at: int, budget_steps: int, dense_step_time_s: float,
                    ratio: float) -> dict:
  """Steps of the three arms inside the wall-clock of `budget_steps` dense steps.

  Each arm gets the whole steps that fit (floor), its MoE steps costing `ratio` dense steps:
    budget_s     = budget_steps × dense step time
    dense        = budget_steps dense steps (upcycle_at of them before the upcycling point)
    upcycled     = upcycle_at dense steps + floor((budget_steps − upcycle_at) / ratio) MoE steps
    moe_scratch  = floor(budget_steps / ratio) MoE steps

  Args:
    upcycle_at: dense steps N before the upcycling.
    budget_steps: the budget S in dense steps (S > N).
    dense_step_time_s: the dense twin's measured step time.
    ratio: MoE step time / dense step time (the paired ratio of the timing rounds).

  Returns:
    {"budget_s", "moe_step_time_s", "arms": {arm: {"dense_steps", "moe_steps", "steps",
     "budget_used_s", "budget_fraction"}}}.

  Raises:
    ValueError: N < 1, S <= N, a ratio <= 0, or an upcycled arm left with no MoE step.
  """
  if upcycle_at < 1:
    raise ValueError(f"--upcycle_at={upcycle_at} must be >= 1 dense step")
  if budget_steps <= upcycle_at:
    raise ValueError(f"--upcycle_budget_steps={budget_steps} must exceed --upcycle_at="
                     f"{upcycle_at}: the budget must leave time after the upcycling")
  if not ratio > 0 or not dense_step_time_s > 0:
    raise ValueError(f"step times must be > 0 (dense {dense_step_time_s} s, ratio {ratio})")
  moe_time = dense_step_time_s * ratio
  budget_s = budget_steps * dense_step_time_s
  # The 1e-9 keeps a budget that is exactly k MoE steps from flooring to k − 1.
  fit = lambda dense_steps: math.floor((budget_steps - dense_steps) / ratio + 1e-9)
  steps = {"dense": (budget_steps, 0), "upcycled": (upcycle_at, fit(upcycle_at)),
           "moe_scratch": (0, fit(0))}
  if steps["upcycled"][1] < 1:
    raise ValueError(f"the MoE step is {ratio:.2f}× the dense one: {budget_steps - upcycle_at} "
                     f"dense steps after --upcycle_at={upcycle_at} fit no MoE step; raise "
                     f"--upcycle_budget_steps")
  arms = {}
  for arm, (d, m) in steps.items():
    used = d * dense_step_time_s + m * moe_time
    arms[arm] = {"dense_steps": d, "moe_steps": m, "steps": d + m, "budget_used_s": used,
                 "budget_fraction": used / budget_s}
  return {"budget_s": budget_s, "moe_step_time_s": moe_time, "arms": arms}


def window_mean(losses: list[float], end_step: int, window: int) -> float:
  """Mean of the losses of steps end_step − window + 1 … end_step (losses[0] is step 1)."""
  return statistics.fmean(losses[end_step - window:end_step])


def _set_float32_policy() -> None:
  # The timing phase may leave mixed_float16 set process-wide; `training.train` sets it again
  # for a mixed-precision config.
  keras.mixed_precision.set_global_policy("float32")


def _run_arm(files, bindings, search_paths, model_dir, **overrides):
  """One `m6t_tf.train` invocation in this process; (summary, wall seconds)."""
  _set_float32_policy()
  gin.clear_config()
  configurables.parse(files, bindings, search_paths)
  start = time.perf_counter()
  # The trainer's console lines go to stderr: stdout carries the report.
  with contextlib.redirect_stdout(sys.stderr):
    summary = configurables.run_train(model_dir=model_dir, **overrides)
  wall = time.perf_counter() - start
  summary.pop("model", None)
  gin.clear_config()
  return summary, wall


def checkpoint_log_perplexity(model_dir: str, search_paths) -> dict:
  """Validation log-perplexity of `model_dir`'s latest checkpoint, evaluated as the trainer's
  final evaluation does (its `config.gin`: eval data, batch size, `train.eval_batches`)."""
  _set_float32_policy()
  gin.clear_config()
  configurables.parse([os.path.join(model_dir, "config.gin")], [], search_paths)
  q = lambda name: configurables.query(f"train.{name}")
  ctx = context_lib.LocalContext()
  batch_size = config_lib.per_worker_batch(q("batch_size_per_worker"), q("global_batch_size") or 0,
                                         1)
  dataset = inputs.eval_stream(q("eval_data"), batch_size=batch_size,
                                       max_len=q("max_len"), image_mode=q("image_mode"), ctx=ctx)
  model = trainer_lib.build_model(configurables.network_fn(), batch=next(iter(dataset.take(1))))
  num_experts = model.moe_layers[0].num_experts if model.moe_layers else 0
  checkpointer = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"),
                                            trainer_lib.variables_by_path(model), ctx=ctx,
                                            num_experts=num_experts)
  path = checkpointer.latest()
  checkpointer.restore(path)
  trainer = trainer_lib.Trainer(model, evaluation._NoOpt(), ctx=ctx)
  out = trainer_lib.evaluate_perplexity(trainer, dataset, q("eval_batches") or None)
  gin.clear_config()
  return {"checkpoint": path, "log_perplexity": out["log_perplexity"],
          "perplexity": out["perplexity"], "batches": out["batches"]}


def run_upcycle(*, dense, target, upcycle_at: int, budget_steps: int, upcycle_dir: str,
                noise_std: float, gin_bindings, search_paths, log) -> dict:
  """The three arms of an upcycling run (`tools/compare_dense.py --upcycle_moe_gin`).

  Args:
    dense: the dense twin, timed (`models.GinModel` with its `times`).
    target: the MoE it is upcycled into, timed in the same rounds.
    upcycle_at: dense steps N before upcycling.
    budget_steps: the wall-clock budget in dense steps at the measured dense step time.
    upcycle_dir: the arms' model_dirs go under it (dense/, upcycled/, moe_scratch/).
    noise_std: std of the noise added to the expert copies.
    gin_bindings: bindings applied to every arm.
    search_paths: gin search paths.
    log: prints one progress line.

  Returns:
    The report's "upcycle" entry.
  """
  dense_time = statistics.median(dense.times)
  ratio = timing.paired_ratio(target.times, dense.times)
  plan = upcycle_budgets(upcycle_at=upcycle_at, budget_steps=budget_steps,
                         dense_step_time_s=dense_time, ratio=ratio)
  steps = {arm: plan["arms"][arm]["steps"] for arm in ARMS}
  dirs = {arm: os.path.join(upcycle_dir, arm) for arm in ARMS}
  common = list(gin_bindings) + list(ARM_BINDINGS)
  if "eval_captions" in inspect.signature(training.train).parameters:
    common.append("train.eval_captions = 0")
  dense_bindings = common + [DENSE_BINDING, f"train.num_steps = {steps['dense']}"]
  sp = search_paths
  n = upcycle_at
  log(f"upcycling run in {upcycle_dir}: budget {budget_steps} dense steps = "
      f"{plan['budget_s']:.1f} s; MoE step {ratio:.3f}× dense; steps {steps}")

  log(f"[dense] steps 0→{n}")
  first, wall_a = _run_arm(dense.files, dense_bindings, sp, dirs["dense"], stop_after=n)
  dense_at_n = checkpoint_log_perplexity(dirs["dense"], sp)
  log(f"[upcycle] {dense_at_n['checkpoint']} → {dirs['upcycled']}")
  _set_float32_policy()
  start = time.perf_counter()
  made = upcycle_lib.upcycle(
      dense_model_dir=dirs["dense"], moe_gin=[",".join(target.files)],
      gin_bindings=common + [f"train.num_steps = {plan['arms']['upcycled']['moe_steps']}"],
      model_dir=dirs["upcycled"], noise_std=noise_std, search_paths=sp)
  upcycle_s = time.perf_counter() - start
  upcycled_at_0 = checkpoint_log_perplexity(dirs["upcycled"], sp)
  log(f"[dense] steps {n}→{steps['dense']}")
  rest, wall_b = _run_arm(dense.files, dense_bindings, sp, dirs["dense"])
  runs = {"dense": (first["losses"] + rest["losses"], rest["eval"], wall_a + wall_b)}
  log(f"[upcycled] MoE steps 0→{plan['arms']['upcycled']['moe_steps']}")
  up, wall = _run_arm([os.path.join(dirs["upcycled"], "config.gin")], [], sp, dirs["upcycled"])
  runs["upcycled"] = (first["losses"] + up["losses"], up["eval"], wall_a + wall)
  log(f"[moe_scratch] MoE steps 0→{steps['moe_scratch']}")
  scratch, wall = _run_arm(target.files, common + [f"train.num_steps = {steps['moe_scratch']}"],
                           sp, dirs["moe_scratch"])
  runs["moe_scratch"] = (scratch["losses"], scratch["eval"], wall)

  equal_step = min(steps.values())
  window = max(1, min(20, equal_step // 10))
  arms = []
  for arm in ARMS:
    losses, evaluation, wall = runs[arm]
    if len(losses) != steps[arm]:
      raise RuntimeError(f"the {arm} arm logged {len(losses)} losses for {steps[arm]} steps")
    a = plan["arms"][arm]
    arms.append({
        "arm": arm, "name": dense.name if arm == "dense" else target.name,
        "model_dir": dirs[arm], **a,
        "tokens": (a["dense_steps"] * dense.tokens_per_step
                   + a["moe_steps"] * target.tokens_per_step),
        "train_wall_s": wall, "final_loss": losses[-1],
        "train_loss_at_equal_steps": window_mean(losses, equal_step, window),
        "val_log_perplexity": evaluation["log_perplexity"],
        "val_perplexity": evaluation["perplexity"], "losses": losses})
  up_losses = runs["upcycled"][0]
  return {
      "moe_gin_files": target.files, "moe_name": target.name, "upcycle_at": n,
      "budget_dense_steps": budget_steps, "budget_s": plan["budget_s"],
      "dense_step_time_s": dense_time, "moe_step_time_s": plan["moe_step_time_s"],
      "step_time_ratio": ratio, "noise_std": noise_std, "upcycle_s": upcycle_s,
      "upcycled_experts": made["num_experts"], "upcycled_moe_layers": made["moe_layers"],
      "rule": "fixed step counts: each arm gets floor(remaining budget / its measured step "
              "time) steps (dense and MoE step times of the timing rounds); the conversion "
              "(upcycle_s), model builds, tracing, checkpoints and evaluations are not charged",
      "start": {"dense_val_log_perplexity_at_upcycle": dense_at_n["log_perplexity"],
                "upcycled_val_log_perplexity_at_0": upcycled_at_0["log_perplexity"],
                "dense_checkpoint": dense_at_n["checkpoint"],
                "dense_loss_at_upcycle": up_losses[n - 1],
                "dense_loss_next_step": runs["dense"][0][n],
                "upcycled_first_loss": up_losses[n]},
      "equal_steps": {"step": equal_step, "window": window,
                      "definition": "mean training loss of the steps (dense steps included) "
                                    "ending at this one; dropout on, each arm's own batches"},
      "arms": arms}
