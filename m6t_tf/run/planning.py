"""Capacity planning for M6-T configs: parameters, memory, FLOPs and traffic, without weights.

Everything here is arithmetic on the values a gin config binds (`M6Transformer.*`,
`MoEConfig.*`, `train.*`, `make_context.*`); no variable is created. `tools/plan.py` is the
command line over it:

    python tools/plan.py --gin_file=gin/1T.gin --gin_file=gin/layouts/1x480.gin --format=table

Notation (the MoE layer's, `m6t_tf.layers.moe`): V vocabulary, M hidden size, N layers,
H·d = A attention width, I expert /
FFN intermediate size, E experts, e = E/D per worker, D expert-axis workers, R data-axis
replicas (workers = R·D), k choices per token, C capacity, P patch input width, B batch per
worker, S = 16 + max_len − 1 positions per caption (16 patches, `tokens[:, :-1]`), T = B·S
tokens per worker, L_t = max_len − 1 scored text positions, X MoE layers, n_w = 2 weight
matrices per FFN/expert (3 with SwiGLU).

Patch input width. The paper feeds precomputed ResNet patch features; our data is 64×64 RGB
pixels cut into a 4×4 grid, so a patch is 16×16×3 = 768 values. The width P is not in gin (it
follows from the data), so it is an argument (`--patch_dim`, default 768).

Parameters (what `keras.Model.count_params()` counts). Keras 3 `count_params()` sums the size
of every variable in `model.weights`, trainable or not. Each MoE layer has E + 4 non-trainable
routing-statistics variables (`tokens_per_expert` <int32>[E] and four scalars). So for a model
built on one worker (D = 1):

    count_params() == params_total + params_nontrainable

`params_total` counts trainable parameters only (the "1T" of the paper). The split:

    embeddings        V·M (token table, tied with the output) + V (output bias)
                      + (16 + max_text_length)·M (learned positions; 0 with RoPE)
                      + P·M + M (patch projection)
    attention         per dense-attention layer: 4·M·A + 3·A + M (Q, K, V, output with biases)
    attention_experts per MoE-attention layer: E·(3·M·A + A·M) (linear experts, no bias)
    routers           per MoE FFN: M·E; per MoE-attention layer: (3·M + A)·E
    experts           X · E · n_w · M · I
    norms             post-LN: 2·M per LayerNorm, 2 per layer + the embedding LayerNorm;
                      pre-RMS: M per RMSNorm, 2 per layer + the final RMSNorm
    dense_ffn         (N − X) · n_w · M · I (no biases)

`params_activated` (per token) is every non-expert parameter plus k experts of each MoE
(k chosen experts for top-k, one in each of the Z = k prototypes for prototyping), ignoring
capacity drops.

Memory per worker (bytes; "GB" of `gpu_memory_gb` means GiB = 2³⁰ bytes):

    weights         4 · (dense params + e/E of the expert params) + the routing statistics;
                    variables are float32 also under mixed precision (fp32 master weights)
    weight_casts    mixed precision only: the float16 copy of every matmul kernel that Keras'
                    autocast makes and the tape keeps for the backward pass, 2 bytes each
                    (routers stay float32; the tied embedding is used in float32)
    gradients       4 · trainable params on the worker (float32, one copy)
    optimizer_state AdamW: two float32 slots (m, v) per parameter.
                    Adafactor (`m6t_tf.optimizers.Adafactor`): no first moment; a ≥2-D weight
                    [..., a, b] keeps a row statistic [..., a] and a column statistic [..., b]
                    (expert [e, M, I] → [e, M] + [e, I]); a 1-D weight keeps a full velocity.
    activations     tensors saved for the backward pass at the config's batch (model below)

Activation model (a = 2 bytes under mixed precision, else 4; f = 4 for tensors that are float32
either way; "mask" terms exist only when dropout_rate > 0). Saved for backward:

    embedding       B·16·P·a (patch input) + T·M·a (embedding LayerNorm input, post-LN)
                    + T·M·a (dropout mask)
    every layer     2·T·M·a norm inputs + T·M·a attention input + T·M·a FFN input
                    + 2·T·M·a residual dropout masks
      attention     3·T·A·a (Q, K, V) + T·A·a (context)
                    + B·H·S²·(f + a [+ a]) (float32 softmax output, probabilities,
                    [dropout mask])
      MoE attention instead of the attention input and context: per projection (input width
                    W_in, output W_out) the float32 router input T·W_in·f, router probabilities
                    T·E·f, expert input buffer E·C·W_in·a, combined rows k·T·W_out·a
      dense FFN     n_a·T·I·a, n_a = 4 for GeLU: the tanh approximation is not one kernel
                    but element-wise ops whose gradients keep the input, x³, the tanh output
                    and the activation (measured: tools/measure_memory.py, docs/memory.md;
                    counting 2, pre- and post-activation, missed 30% of the shrunk 1T's
                    activations); 4 for SwiGLU (gate, up, silu(gate), product); 2 for ReLU
                    and linear (pre- and post-activation)
      MoE FFN       instead of the FFN input (the gather-based dispatch does not keep it):
                    T·M·f (float32 router input) + T·E·f (router probabilities)
                    + E·C·M·a (expert input buffer, after the all-to-all)
                    + n_a·E·C·I·a (expert hidden, on all E·C slots, padding included)
                    + k·T·M·a (combined rows, index dispatch) or, for einsum dispatch,
                    2·T·E·C·a (dispatch mask, combine weights) + E·C·M·a (returned buffer)
    output layer    B·L_t·M·f (float32 text states) + B·L_t·V·f (softmax-cross-entropy
                    backprop) [+ T·M·a final RMSNorm input, pre-RMS]

With recomputation (checkpoint at every layer boundary: the trainer's `train.remat="block"`,
`keras.remat` around each block) the layers keep only their inputs, N·T·M·a, plus one
layer's activations at a time, rematerialised during the backward pass after the output
layer's buffers are freed: embedding + N·T·M·a + max(largest layer, output). (Adding the two,
as this model once did, over-predicted the measured shrunk 1T by 1.5×.) `tools/measure_memory.py` measures the
activations of shrunk configs against this model (docs/memory.md: within ±25%). Not modelled: cuDNN/cuBLAS workspaces, the
CUDA context, allocator fragmentation, NCCL/Horovod fusion buffers, the input pipeline.

FLOPs per step per worker. Matmul FLOPs only (2 per multiply-add; element-wise ops, softmax,
norms and the gather-based dispatch are not counted), which is what the tests check against the
MatMul/Einsum ops of the traced forward graph. Forward, by component:

    embeddings             2·B·16·P·M (patch projection; the token lookup is a gather)
    attention_projections  2·T·4·M·A per dense-attention layer;
                           2·E·C·4·M·A per MoE-attention layer (linear experts on E·C slots)
    attention_scores       4·B·S²·A per layer (Q·Kᵀ and P·V, masked entries included)
    dense_ffn              2·T·n_w·M·I per dense FFN
    experts                2·E·C·n_w·M·I per MoE FFN: this worker's e experts run on the E·C
                           slots that D·e·C = E·C makes (padding slots are computed too)
    router                 2·T·M·E per MoE FFN; 2·T·(3·M + A)·E per MoE-attention layer
    dispatch_combine       index dispatch: 2·k·T·W_out per MoE (the gate-weighted sum);
                           einsum dispatch: 2·T·E·C·(W_in + W_out) per MoE (one-hot einsums)
    output_softmax         2·B·L_t·M·V (tied output embedding)

Backward = 2 × forward, so a step is 3 × forward (4 × with recomputation, less the embedding and
output layers). `moe_expert_flops_share` is the share of the two (three with SwiGLU) expert
matmuls in one MoE FFN layer's FLOPs (experts + router + dispatch/combine), ~98.7% at 1T.

Communication per step per worker.

    all-to-all  2 per MoE layer per forward pass, each moving the whole [D, e, C, W] buffer
                (as `MoE.alltoall_bytes_per_forward` counts it, the worker's own row included):
                E·C·(W_in + W_out)·bytes per MoE per forward, the same again backward, and
                with block recomputation (`train.remat="block"`) the forward's again. Payload
                bytes are the compute dtype's (2 under mixed precision, else 4) unless given.
    allreduce   dense (non-expert, routers included) gradients over all workers when there is
                more than one; expert gradients only over the R data-axis replicas holding the
                same experts (none when R = 1). float32 gradients (the trainer casts before
                reducing). `allreduce_wire_bytes_per_step` is what a ring allreduce sends per
                worker, 2·(n − 1)/n × the payload of each group of n workers.

JSON keys (`plan()` returns them; `tools/plan.py --format=json` prints them):

    config                        the values the plan used: gin_files, gin_bindings,
                                  num_workers, mesh_data (R), mesh_expert (D), experts_per_worker
                                  (e), vocab_size, hidden_size, num_layers, num_heads,
                                  head_size, intermediate_size, max_text_length, max_len,
                                  patch_dim, norm, activation, positions, moe_placement,
                                  moe_layers (indices), moe_attention, num_experts, routing, k,
                                  capacity_factor, capacity_mode, dispatch,
                                  batch_size_per_worker, global_batch_size,
                                  sequence_length (S), tokens_per_worker (T), capacity (C),
                                  optimizer, mixed_precision, dropout_rate
    params_total                  int, trainable parameters of the whole model (all experts)
    params_activated              int, parameters a token passes through
    params_nontrainable           int, MoE routing-statistics variables
    params_keras_count            int, = params_total + params_nontrainable = count_params() of
                                  the model on one worker
    params_by_component           {embeddings, attention, attention_experts, routers, experts,
                                  norms, dense_ffn}: ints summing to params_total
    params_per_worker             int, trainable parameters one worker holds
    params_per_worker_dense       int, of which replicated on every worker
    params_per_worker_expert      int, of which this worker's e experts (FFN and attention)
    memory_bytes                  {weights, weight_casts, gradients, optimizer_state,
                                  activations, activations_recompute, total, total_recompute}
                                  per worker; total uses activations, total_recompute uses
                                  activations_recompute
    gpu_memory_bytes              int, gpu_memory_gb · 2³⁰
    fits                          bool, memory_bytes.total <= gpu_memory_bytes
    fits_with_recompute           bool, memory_bytes.total_recompute <= gpu_memory_bytes
    headroom_bytes                int, gpu_memory_bytes − memory_bytes.total (negative: short)
    headroom_bytes_recompute      int, the same with recomputation
    verdict                       str, one line for people
    flops_forward                 {embeddings, attention_projections, attention_scores,
                                  dense_ffn, experts, router, dispatch_combine, output_softmax,
                                  total} per worker, one forward pass
    flops_per_step                int, 3 × flops_forward.total (forward + backward)
    flops_per_step_recompute      int, flops_per_step + the layers' forward again
    moe_expert_flops_share        float in [0, 1] (null without MoE FFN layers)
    alltoall_bytes_per_forward    int, per worker, all MoE layers, one forward pass
    alltoall_bytes_per_step       int, 2 × alltoall_bytes_per_forward (forward + backward)
    alltoall_bytes_per_step_recompute  int, 3 × alltoall_bytes_per_forward: block
                                  recomputation repeats the forward's all-to-alls (the
                                  "attention" and "experts" modes repeat none, except MoE
                                  attention's under "attention")
    alltoall_bytes_per_element    int, the payload dtype's size
    allreduce_bytes_per_step      {dense, expert, total}: gradient payload reduced per worker
    allreduce_wire_bytes_per_step int, ring-allreduce bytes one worker sends per step
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Optional, Sequence

import gin

from m6t_tf.errors import ConfigError
from m6t_tf.layers import embeddings
from m6t_tf.layers import moe_options as moe_options_lib
from m6t_tf.layers import routing as routing_lib
from m6t_tf.networks import m6_transformer
from m6t_tf.run import configurables
from m6t_tf.run import training

NUM_PATCHES = embeddings.NUM_PATCHES   # 4×4 grid
DEFAULT_PATCH_DIM = 16 * 16 * 3   # a 16×16 RGB patch of a 64×64 image
GIB = 2 ** 30
PARAM_COMPONENTS = ("embeddings", "attention", "attention_experts", "routers", "experts",
                    "norms", "dense_ffn")
FLOP_COMPONENTS = ("embeddings", "attention_projections", "attention_scores", "dense_ffn",
                   "experts", "router", "dispatch_combine", "output_softmax")
_FLOAT32 = 4


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  """Every config value the plan depends on (gin-bound, or the constructor's default)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  head_size: int
  intermediate_size: int
  max_text_length: int
  norm: str = "post_ln"
  activation: str = "gelu"
  positions: str = "learned"
  dropout_rate: float = 0.1
  moe: Optional[dict] = None             # MoE keyword arguments (MoEConfig fields)
  moe_placement: str = "all"
  moe_every: int = 4
  moe_attention: bool = False
  batch_size_per_worker: int = 8
  max_len: int = 128
  optimizer: str = "adamw"
  mixed_precision: bool = False
  mesh_data: int = 1
  mesh_expert: int = 1
  patch_dim: int = DEFAULT_PATCH_DIM
  gin_files: tuple = ()
  gin_bindings: tuple = ()

  @property
  def num_workers(self) -> int:
    return self.mesh_data * self.mesh_expert

  @property
  def attention_width(self) -> int:
    return self.num_heads * self.head_size

  @property
  def sequence_length(self) -> int:
    """S: 16 patches + the max_len − 1 caption inputs the captioner feeds (`tokens[:, :-1]`)."""
    return NUM_PATCHES + self.max_len - 1

  @property
  def tokens_per_worker(self) -> int:
    return self.batch_size_per_worker * self.sequence_length

  @property
  def num_experts(self) -> int:
    return int(self.moe["num_experts"]) if self.moe else 0

  @property
  def k(self) -> int:
    return int(self.moe.get("k", 1)) if self.moe else 0

  @property
  def moe_layers(self) -> list[int]:
    if not self.moe:
      return []
    return m6_transformer.moe_layer_indices(self.num_layers, self.moe_placement, self.moe_every)

  @property
  def moe_options(self) -> Optional[moe_options_lib.MoEOptions]:
    """The options every MoE FFN layer gets (validated: ValueError for a bad one), or None."""
    if not self.moe:
      return None
    return moe_options_lib.MoEOptions(**{"intermediate_size": self.intermediate_size,
                                         "activation": self.activation, **self.moe})

  @property
  def capacity(self) -> int:
    """Slots per expert in the buffers: O · C, with C = `MoE.capacity_for(ceil(T / O), True)`
    for O outer groups (`num_groups`; 1 by default). Dropless has no C: the planner sizes it at
    balanced routing, k·T/E rows per expert, or at its `max_tokens_per_expert_factor`
    ceiling when one is set (the worst case it allows)."""
    options = self.moe_options
    if options is None:
      return 0
    if options.capacity_mode == "dropless":
      factor = options.max_tokens_per_expert_factor
      return routing_lib.capacity(self.tokens_per_worker, self.num_experts, k=self.k,
                                  capacity_factor=float(factor or 1.0), mode="k")
    # The layer's own rule: C of a group of ceil(T / O) tokens (the last group padded).
    return options.num_groups * options.capacity_for(
        options.group_size(self.tokens_per_worker), True)

  @property
  def ffn_matrices(self) -> int:
    """n_w: weight matrices of an FFN or expert (SwiGLU adds a gate)."""
    return 3 if self.activation == "swiglu" else 2


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  """One variable the model would create: name, full shape, component, sharding."""
  name: str
  shape: tuple
  component: str            # one of PARAM_COMPONENTS, or "stats" (non-trainable)
  expert: bool = False      # sharded over the expert axis: dim 0 is E (e on a worker)
  trainable: bool = True

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def worker_shape(self, experts_per_worker: int) -> tuple:
    return (experts_per_worker,) + self.shape[1:] if self.expert else self.shape


# ---------------------------------------------------------------------------------------------
# Reading a gin config
# ---------------------------------------------------------------------------------------------
def _resolve(value):
  """Evaluates gin references (`%MACRO`, `@MoEConfig()`) to plain values."""
  if isinstance(value, gin.config.ConfigurableReference):
    fn = value.scoped_configurable_fn
    return _resolve(fn() if value.evaluate else fn)
  if isinstance(value, (list, tuple)):
    return type(value)(_resolve(v) for v in value)
  if isinstance(value, dict):
    return {k: _resolve(v) for k, v in value.items()}
  return value


def _query(name: str, default: Any) -> Any:
  try:
    return _resolve(gin.query_parameter(name))
  except ValueError:   # not bound: the configurable's own default applies
    return default


def _signature_defaults(fn) -> dict:
  return {k: p.default for k, p in inspect.signature(fn).parameters.items()
          if p.default is not inspect.Parameter.empty}


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
              search_paths: Sequence[str] = (".",), *, read_data: bool = True) -> None:
  """Clears gin and parses a config (the configurables of `m6t_tf.run.configurables`)."""
  gin.clear_config()
  configurables.parse(list(gin_files), list(gin_bindings), list(search_paths),
                      read_data=read_data)


def config_from_gin(*, num_workers: Optional[int] = None, patch_dim: int = DEFAULT_PATCH_DIM,
                    gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = ()) -> PlanConfig:
  """A `PlanConfig` from the gin config parsed now (see `parse_gin`).

  Args:
    num_workers: workers of the run; None = the layout's `mesh_data × mesh_expert` (1 without a
      layout). With `make_context.mesh_expert = 0` (the default) the expert axis is
      num_workers / mesh_data.
    patch_dim: P, width of one patch's input (768 = 16×16×3 pixels of a 64×64 image).
    gin_files, gin_bindings: recorded in the plan, for reproducibility.

  Raises:
    ValueError: the layout does not match num_workers, or E does not split over the expert axis.
  """
  configurables.register()
  net = _signature_defaults(m6_transformer.M6Transformer.__init__)
  values = {}
  for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_size",
               "intermediate_size", "max_text_length", "norm", "activation", "positions",
               "dropout_rate", "moe", "moe_placement", "moe_every", "moe_attention"):
    values[name] = _query(f"M6Transformer.{name}", net.get(name, None))
    if values[name] is None and name == "max_text_length":
      raise ConfigError("M6Transformer.max_text_length is None: MAX_LEN = None follows the data, "
                       "and train.train_data matches no file here; pass --gin_bindings=MAX_LEN=n "
                       "(caption tokens incl. [CLS]/[SEP])")
    if values[name] is None and name not in ("moe",):
      raise ConfigError(f"M6Transformer.{name} is not bound by the gin config")
  moe = values.pop("moe")
  if isinstance(moe, m6_transformer.MoEConfig):
    moe = moe.kwargs()
  if values["moe_placement"] == "none":
    moe = None
  tr = _signature_defaults(training.train)
  for name in ("batch_size_per_worker", "max_len", "optimizer", "mixed_precision"):
    values[name] = _query(f"train.{name}", tr[name])
  ctx = _signature_defaults(configurables.make_context)
  mesh_data = int(_query("make_context.mesh_data", ctx["mesh_data"]))
  mesh_expert = int(_query("make_context.mesh_expert", ctx["mesh_expert"]))
  if mesh_expert == 0:   # "all workers / mesh_data", as make_context resolves it
    mesh_expert = max((num_workers or mesh_data) // mesh_data, 1)
  if num_workers is not None and num_workers != mesh_data * mesh_expert:
    raise ConfigError(
        f"--num_workers={num_workers} but the layout is make_context.mesh_data={mesh_data} × "
        f"mesh_expert={mesh_expert} = {mesh_data * mesh_expert} workers; pass the matching "
        f"gin/layouts/*.gin or --num_workers={mesh_data * mesh_expert}")
  config = PlanConfig(moe=moe, mesh_data=mesh_data, mesh_expert=mesh_expert, patch_dim=patch_dim,
                      gin_files=tuple(gin_files), gin_bindings=tuple(gin_bindings), **values)
  validate(config)
  return config


def validate(config: PlanConfig) -> None:
  """Raises ConfigError for a config the trainer would reject (before any arithmetic)."""
  if config.max_len - 1 > config.max_text_length:
    raise ConfigError(f"train.max_len={config.max_len} feeds {config.max_len - 1} caption "
                     f"positions, more than M6Transformer.max_text_length="
                     f"{config.max_text_length}")
  if config.moe_placement != "none" and not config.moe:
    raise ConfigError(f"M6Transformer.moe_placement={config.moe_placement!r} needs an MoE config "
                     f"(M6Transformer.moe = @MoEConfig())")
  if config.moe:
    try:
      config.moe_options  # pylint: disable=pointless-statement  (constructing it validates)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"the MoE config (MoEConfig.*): {e}") from None
  if config.moe and config.num_experts % config.mesh_expert:
    raise ConfigError(f"E={config.num_experts} experts do not split over the expert axis "
                     f"D={config.mesh_expert}; choose a layout whose mesh_expert divides E")
  if config.patch_dim < 1:
    raise ConfigError(f"patch_dim={config.patch_dim} must be >= 1")


def plan_from_gin(gin_files: Sequence[str], gin_bindings: Sequence[str] = (), *,
                  num_workers: Optional[int] = None, patch_dim: int = DEFAULT_PATCH_DIM,
                  gpu_memory_gb: Optional[float] = None, search_paths: Sequence[str] = (".",),
                  read_data: bool = True, **plan_kwargs) -> dict:
  """Parses a gin config (clearing gin first) and returns its `plan()`.

  `gpu_memory_gb` None: the layout's `DEVICE_MEMORY_GB` macro, else 32 (a V100-32GB, the
  paper's worker).

  Payload sizes not given (or None) come from the layout, as the trainer uses them:
  `make_context.alltoall_dtype` ("float16": 2 bytes; unset: the compute dtype) and
  `make_context.allreduce_compression` ("fp16": 2 bytes; else float32 gradients, 4 bytes).
  """
  parse_gin(gin_files, gin_bindings, search_paths, read_data=read_data)
  if gpu_memory_gb is None:
    gpu_memory_gb = float(configurables.query("%DEVICE_MEMORY_GB", 32.0))
  config = config_from_gin(num_workers=num_workers, patch_dim=patch_dim, gin_files=gin_files,
                           gin_bindings=gin_bindings)
  if plan_kwargs.get("alltoall_bytes_per_element") is None:
    wire = configurables.query("make_context.alltoall_dtype")
    plan_kwargs["alltoall_bytes_per_element"] = {"float16": 2, "float32": 4}.get(wire)
  if plan_kwargs.get("allreduce_bytes_per_element") is None:
    fp16 = configurables.query("make_context.allreduce_compression") == "fp16"
    plan_kwargs["allreduce_bytes_per_element"] = 2 if fp16 else _FLOAT32
  return plan(config, gpu_memory_gb=gpu_memory_gb, **plan_kwargs)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
def _norm_specs(config: PlanConfig, name: str) -> list[WeightSpec]:
  m = config.hidden_size
  if config.norm == "post_ln":
    return [WeightSpec(f"{name}/gamma", (m,), "norms"), WeightSpec(f"{name}/beta", (m,), "norms")]
  return [WeightSpec(f"{name}/scale", (m,), "norms")]


def _moe_specs(prefix: str, num_experts: int, expert_shapes, router_in: int,
               component: str, router_component: str = "routers") -> list[WeightSpec]:
  specs = [WeightSpec(f"{prefix}/router/kernel", (router_in, num_experts), router_component)]
  specs += [WeightSpec(f"{prefix}/experts/{n}", (num_experts,) + s, component, expert=True)
            for n, s in expert_shapes]
  specs.append(WeightSpec(f"{prefix}/tokens_per_expert", (num_experts,), "stats", trainable=False))
  specs += [WeightSpec(f"{prefix}/{n}", (), "stats", trainable=False)
            for n in ("load_cv", "dropped_fraction", "aux_loss", "z_loss")]
  return specs


def weight_specs(config: PlanConfig) -> list[WeightSpec]:
  """Every variable `M6Captioner(network=M6Transformer(...))` creates; shapes with all E experts."""
  v, m, a = config.vocab_size, config.hidden_size, config.attention_width
  i = config.intermediate_size
  e = config.num_experts
  specs = [WeightSpec("token_embedding/embeddings", (v, m), "embeddings"),
           WeightSpec("patch_embedding/kernel", (config.patch_dim, m), "embeddings"),
           WeightSpec("patch_embedding/bias", (m,), "embeddings")]
  if config.positions == "learned":
    specs.append(WeightSpec("position_embedding", (NUM_PATCHES + config.max_text_length, m),
                            "embeddings"))
  if config.norm == "post_ln":
    specs += _norm_specs(config, "embedding_norm")
  ffn = [("wi", (m, i))] + ([("wi_gate", (m, i))] if config.activation == "swiglu" else []) + [
      ("wo", (i, m))]
  moe_layers = set(config.moe_layers)
  for layer in range(config.num_layers):
    p = f"block_{layer}"
    if layer in moe_layers and config.moe_attention:
      for name, w_in, w_out in (("query", m, a), ("key", m, a), ("value", m, a), ("output", a, m)):
        specs += _moe_specs(f"{p}/attention/{name}", e, [("kernel", (w_in, w_out))], w_in,
                            "attention_experts")
    else:
      for name, w_in, w_out in (("query", m, a), ("key", m, a), ("value", m, a), ("output", a, m)):
        specs += [WeightSpec(f"{p}/attention/{name}/kernel", (w_in, w_out), "attention"),
                  WeightSpec(f"{p}/attention/{name}/bias", (w_out,), "attention")]
    if layer in moe_layers:
      specs += _moe_specs(f"{p}/moe", e, ffn, m, "experts")
    else:
      specs += [WeightSpec(f"{p}/ffn/{n}", s, "dense_ffn") for n, s in ffn]
    specs += _norm_specs(config, f"{p}/attention_norm") + _norm_specs(config, f"{p}/ffn_norm")
  if config.norm == "pre_rms":
    specs += _norm_specs(config, "final_norm")
  specs.append(WeightSpec("output_bias", (v,), "embeddings"))
  return specs


def parameter_counts(config: PlanConfig) -> dict:
  """The params_* keys of `plan()`."""
  specs = weight_specs(config)
  e_local = config.num_experts // config.mesh_expert if config.moe else 0
  by_component = {c: 0 for c in PARAM_COMPONENTS}
  nontrainable = activated = worker_dense = worker_expert = 0
  for s in specs:
    if not s.trainable:
      nontrainable += s.size
      continue
    by_component[s.component] += s.size
    if s.expert:
      # One expert's share of the stacked tensor, times the k experts a token visits.
      activated += s.size // config.num_experts * config.k
      worker_expert += math.prod(s.worker_shape(e_local))
    else:
      activated += s.size
      worker_dense += s.size
  total = sum(by_component.values())
  return {"params_total": total, "params_activated": activated,
          "params_nontrainable": nontrainable, "params_keras_count": total + nontrainable,
          "params_by_component": by_component, "params_per_worker": worker_dense + worker_expert,
          "params_per_worker_dense": worker_dense, "params_per_worker_expert": worker_expert}


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def optimizer_state_elements(shapes: Sequence[tuple], optimizer: str) -> int:
  """Slot elements of `optimizer` for variables of these (per-worker) shapes."""
  if optimizer == "adamw":
    return 2 * sum(math.prod(s) for s in shapes)
  if optimizer == "adafactor":
    total = 0
    for s in shapes:
      if len(s) >= 2:   # row [..., a] + column [..., b] statistics of the last two axes
        total += math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]
      else:             # full velocity
        total += math.prod(s)
    return total
  raise ValueError(f"optimizer={optimizer!r}; allowed: 'adamw', 'adafactor'")


def _activation_bytes(config: PlanConfig) -> dict:
  """Saved-for-backward bytes per worker: embedding, each layer, output (module docstring)."""
  a = 2 if config.mixed_precision else 4
  f = _FLOAT32
  b, s, t = config.batch_size_per_worker, config.sequence_length, config.tokens_per_worker
  m, aw, v = config.hidden_size, config.attention_width, config.vocab_size
  i = config.intermediate_size
  e, c, k = config.num_experts, config.capacity, config.k
  drop = config.dropout_rate > 0
  n_act = 4 if config.activation in ("swiglu", "gelu") else 2
  einsum = bool(config.moe) and config.moe.get("dispatch", "index") == "einsum"
  lt = config.max_len - 1

  def moe_bytes(w_in, w_out, hidden):
    out = t * w_in * f + t * e * f + e * c * w_in * a + n_act * e * c * hidden * a * (hidden > 0)
    if einsum:
      return out + 2 * t * e * c * a + e * c * w_out * a
    return out + k * t * w_out * a

  embedding = b * NUM_PATCHES * config.patch_dim * a + t * m * a * (
      (config.norm == "post_ln") + drop)
  moe_layers = set(config.moe_layers)
  layers = []
  for layer in range(config.num_layers):
    total = (2 + 2 + 2 * drop) * t * m * a                     # norms, sublayer inputs, masks
    total += 3 * t * aw * a + b * config.num_heads * s * s * (f + a + a * drop)
    if layer in moe_layers and config.moe_attention:
      total -= t * m * a                                       # the projections' MoE terms
      total += sum(moe_bytes(w_in, w_out, 0)
                   for w_in, w_out in ((m, aw), (m, aw), (m, aw), (aw, m)))
    else:
      total += t * aw * a                                      # context
    if layer in moe_layers:
      total += moe_bytes(m, m, i) - t * m * a                  # the router's fp32 copy instead
    else:
      total += n_act * t * i * a
    layers.append(total)
  output = b * lt * m * f + b * lt * v * f + (t * m * a if config.norm == "pre_rms" else 0)
  return {"embedding": embedding, "layers": layers, "output": output,
          "checkpoints": config.num_layers * t * m * a}


def memory_bytes(config: PlanConfig, params: dict) -> dict:
  """The memory_bytes key of `plan()` (bytes per worker)."""
  e_local = config.num_experts // config.mesh_expert if config.moe else 0
  specs = weight_specs(config)
  trainable_shapes = [s.worker_shape(e_local) for s in specs if s.trainable]
  stats = sum(math.prod(s.shape) for s in specs if not s.trainable)
  weights = _FLOAT32 * (params["params_per_worker"] + stats)
  casts = 0
  if config.mixed_precision:
    cast_components = ("attention", "attention_experts", "experts", "dense_ffn")
    casts = 2 * sum(math.prod(s.worker_shape(e_local)) for s in specs
                    if s.trainable and s.component in cast_components)
    casts += 2 * config.patch_dim * config.hidden_size
  gradients = _FLOAT32 * params["params_per_worker"]
  optimizer = _FLOAT32 * optimizer_state_elements(trainable_shapes, config.optimizer)
  act = _activation_bytes(config)
  full = act["embedding"] + sum(act["layers"]) + act["output"]
  # With recomputation the output layer's buffers are freed before the first block is
  # recomputed, so they and the largest block's activations are never alive together.
  recompute = act["embedding"] + act["checkpoints"] + max(max(act["layers"], default=0),
                                                          act["output"])
  static = weights + casts + gradients + optimizer
  return {"weights": weights, "weight_casts": casts, "gradients": gradients,
          "optimizer_state": optimizer, "activations": full, "activations_recompute": recompute,
          "total": static + full, "total_recompute": static + recompute}


# ---------------------------------------------------------------------------------------------
# FLOPs and communication
# ---------------------------------------------------------------------------------------------
def flops_forward(config: PlanConfig) -> dict:
  """Matmul FLOPs of one forward pass on one worker, by component (module docstring)."""
  b, s, t = config.batch_size_per_worker, config.sequence_length, config.tokens_per_worker
  m, aw, v = config.hidden_size, config.attention_width, config.vocab_size
  i = config.intermediate_size
  e, c, k, nw = config.num_experts, config.capacity, config.k, config.ffn_matrices
  einsum = bool(config.moe) and config.moe.get("dispatch", "index") == "einsum"
  out = {name: 0 for name in FLOP_COMPONENTS}
  out["embeddings"] = 2 * b * NUM_PATCHES * config.patch_dim * m
  out["output_softmax"] = 2 * b * (config.max_len - 1) * m * v

  def dispatch_combine(w_in, w_out):
    return 2 * t * e * c * (w_in + w_out) if einsum else 2 * k * t * w_out

  moe_layers = set(config.moe_layers)
  for layer in range(config.num_layers):
    out["attention_scores"] += 4 * b * s * s * aw
    if layer in moe_layers and config.moe_attention:
      out["attention_projections"] += 2 * e * c * 4 * m * aw
      out["router"] += 2 * t * (3 * m + aw) * e
      out["dispatch_combine"] += 3 * dispatch_combine(m, aw) + dispatch_combine(aw, m)
    else:
      out["attention_projections"] += 2 * t * 4 * m * aw
    if layer in moe_layers:
      out["experts"] += 2 * e * c * nw * m * i
      out["router"] += 2 * t * m * e
      out["dispatch_combine"] += dispatch_combine(m, m)
    else:
      out["dense_ffn"] += 2 * t * nw * m * i
  out["total"] = sum(out[name] for name in FLOP_COMPONENTS)
  return out


def moe_expert_flops_share(config: PlanConfig) -> Optional[float]:
  """Share of the expert matmuls in one MoE FFN layer's FLOPs (None without MoE layers)."""
  if not config.moe_layers:
    return None
  t, m, i = config.tokens_per_worker, config.hidden_size, config.intermediate_size
  e, c, k = config.num_experts, config.capacity, config.k
  experts = 2 * e * c * config.ffn_matrices * m * i
  einsum = config.moe.get("dispatch", "index") == "einsum"
  other = 2 * t * m * e + (2 * t * e * c * 2 * m if einsum else 2 * k * t * m)
  return experts / (experts + other)


def alltoall_bytes_per_forward(config: PlanConfig, bytes_per_element: int) -> int:
  """Σ over MoE layers of `MoE.alltoall_bytes_per_forward`: E·C·(W_in + W_out)·bytes."""
  e, c, m, aw = config.num_experts, config.capacity, config.hidden_size, config.attention_width
  per_layer = e * c * 2 * m
  if config.moe_attention:
    per_layer += 3 * e * c * (m + aw) + e * c * (aw + m)
  return len(config.moe_layers) * per_layer * bytes_per_element


def allreduce_bytes(config: PlanConfig, params: dict, bytes_per_element: int = _FLOAT32) -> dict:
  """Gradient payload one worker reduces per step: dense over all, experts over replicas."""
  dense = params["params_per_worker_dense"] * bytes_per_element if config.num_workers > 1 else 0
  expert = params["params_per_worker_expert"] * bytes_per_element if config.mesh_data > 1 else 0
  return {"dense": dense, "expert": expert, "total": dense + expert}


def _ring(payload: int, n: int) -> int:
  return 2 * (n - 1) * payload // n if n > 1 else 0


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
def plan(config: PlanConfig, *, gpu_memory_gb: float = 32.0,
         alltoall_bytes_per_element: Optional[int] = None,
         allreduce_bytes_per_element: int = _FLOAT32) -> dict:
  """Parameters, memory, FLOPs and traffic of `config`; the keys of the module docstring.

  Args:
    config: a `PlanConfig` (e.g. from `config_from_gin`).
    gpu_memory_gb: memory of one GPU in GiB (32 for the paper's V100-32GB).
    alltoall_bytes_per_element: all-to-all payload element size; default the compute dtype's
      (2 under mixed precision, else 4), as `MoE.alltoall_bytes_per_forward` without a wire dtype.
    allreduce_bytes_per_element: gradient allreduce element size (4: float32 gradients).
  """
  validate(config)
  params = parameter_counts(config)
  memory = memory_bytes(config, params)
  gpu = int(gpu_memory_gb * GIB)
  flops = flops_forward(config)
  layer_flops = sum(flops[k] for k in FLOP_COMPONENTS if k not in ("embeddings", "output_softmax"))
  a2a_elem = alltoall_bytes_per_element or (2 if config.mixed_precision else 4)
  a2a = alltoall_bytes_per_forward(config, a2a_elem)
  allreduce = allreduce_bytes(config, params, allreduce_bytes_per_element)
  wire = _ring(allreduce["dense"], config.num_workers) + _ring(allreduce["expert"],
                                                               config.mesh_data)
  e_local = config.num_experts // config.mesh_expert if config.moe else 0
  out = {
      "config": {
          "gin_files": list(config.gin_files), "gin_bindings": list(config.gin_bindings),
          "num_workers": config.num_workers, "mesh_data": config.mesh_data,
          "mesh_expert": config.mesh_expert, "experts_per_worker": e_local,
          "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
          "num_layers": config.num_layers, "num_heads": config.num_heads,
          "head_size": config.head_size, "intermediate_size": config.intermediate_size,
          "max_text_length": config.max_text_length, "max_len": config.max_len,
          "patch_dim": config.patch_dim, "norm": config.norm, "activation": config.activation,
          "positions": config.positions, "moe_placement": config.moe_placement,
          "moe_layers": config.moe_layers, "moe_attention": bool(config.moe_attention),
          "num_experts": config.num_experts, "routing": (config.moe or {}).get("routing"),
          "k": config.k, "capacity_factor": (config.moe or {}).get("capacity_factor"),
          "capacity_mode": (config.moe or {}).get("capacity_mode"),
          "dispatch": (config.moe or {}).get("dispatch"),
          "batch_size_per_worker": config.batch_size_per_worker,
          "global_batch_size": config.batch_size_per_worker * config.num_workers,
          "sequence_length": config.sequence_length,
          "tokens_per_worker": config.tokens_per_worker, "capacity": config.capacity,
          "optimizer": config.optimizer, "mixed_precision": bool(config.mixed_precision),
          "dropout_rate": config.dropout_rate,
      },
      **params,
      "memory_bytes": memory,
      "gpu_memory_bytes": gpu,
      "fits": memory["total"] <= gpu,
      "fits_with_recompute": memory["total_recompute"] <= gpu,
      "headroom_bytes": gpu - memory["total"],
      "headroom_bytes_recompute": gpu - memory["total_recompute"],
      "flops_forward": flops,
      "flops_per_step": 3 * flops["total"],
      "flops_per_step_recompute": 3 * flops["total"] + layer_flops,
      "moe_expert_flops_share": moe_expert_flops_share(config),
      "alltoall_bytes_per_forward": a2a,
      "alltoall_bytes_per_step": 2 * a2a,
      "alltoall_bytes_per_step_recompute": 3 * a2a,
      "alltoall_bytes_per_element": a2a_elem,
      "allreduce_bytes_per_step": allreduce,
      "allreduce_wire_bytes_per_step": wire,
  }
  out["verdict"] = verdict(out, gpu_memory_gb)
  return out


def verdict(p: dict, gpu_memory_gb: float) -> str:
  """One line: fits or not, and by how much."""
  total, recompute = p["memory_bytes"]["total"], p["memory_bytes"]["total_recompute"]
  gpu = p["gpu_memory_bytes"]
  if p["fits"]:
    return (f"fits: {total / GIB:.2f} of {gpu_memory_gb:g} GiB per worker, "
            f"{p['headroom_bytes'] / GIB:.2f} GiB to spare")
  line = (f"does not fit: {total / GIB:.2f} GiB per worker, {-p['headroom_bytes'] / GIB:.2f} GiB "
          f"over {gpu_memory_gb:g} GiB")
  if p["fits_with_recompute"]:
    return line + f"; fits with recomputation ({recompute / GIB:.2f} GiB)"
  return line + f"; {recompute / GIB:.2f} GiB even with recomputation"


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _si(x: float, unit: str = "") -> str:
  for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= factor:
      return f"{x / factor:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}".rstrip()


def _gib(x: int) -> str:
  return f"{x / GIB:.2f} GiB"


def _bytes(x: int) -> str:
  return _gib(x) if x >= GIB else f"{x / 2 ** 20:.1f} MiB"


def table_rows(p: dict) -> list[tuple[str, str]]:
  """(quantity, value) rows of one plan, for people."""
  c, mem, fl = p["config"], p["memory_bytes"], p["flops_forward"]
  by = p["params_by_component"]
  rows = [
      ("workers (data × expert)", f"{c['num_workers']} ({c['mesh_data']} × {c['mesh_expert']})"),
      ("layers / MoE layers", f"{c['num_layers']} / {len(c['moe_layers'])}"),
      ("M / I / heads×size", f"{c['hidden_size']} / {c['intermediate_size']} / "
                             f"{c['num_heads']}×{c['head_size']}"),
      ("experts E (per worker e)", f"{c['num_experts']} ({c['experts_per_worker']})"),
      ("routing", f"{c['routing']} k={c['k']}, γ={c['capacity_factor']}, capacity "
                  f"{c['capacity_mode']}×" if c["routing"] else "dense"),
      ("T tokens per worker / C", f"{c['tokens_per_worker']:,} / {c['capacity']}"),
      ("params total", f"{p['params_total']:,} ({_si(p['params_total'])})"),
      ("params activated per token", f"{p['params_activated']:,} ({_si(p['params_activated'])})"),
  ]
  rows += [(f"  {name}", f"{by[name]:,}") for name in PARAM_COMPONENTS if by[name]]
  rows += [
      ("params per worker", f"{p['params_per_worker']:,} ({_si(p['params_per_worker'])})"),
      ("optimizer / mixed precision",
       f"{c['optimizer']} / {'yes' if c['mixed_precision'] else 'no'}"),
      ("memory: weights (fp32)", _gib(mem["weights"])),
      ("memory: fp16 weight casts", _gib(mem["weight_casts"])),
      ("memory: gradients", _gib(mem["gradients"])),
      ("memory: optimizer state", _gib(mem["optimizer_state"])),
      ("memory: activations", _gib(mem["activations"])),
      ("memory: activations, recompute", _gib(mem["activations_recompute"])),
      ("memory: total (recompute)", f"{_gib(mem['total'])} ({_gib(mem['total_recompute'])})"),
      ("verdict", p["verdict"]),
  ]
  rows += [(f"forward FLOPs: {name}", _si(fl[name], "FLOP")) for name in FLOP_COMPONENTS
           if fl[name]]
  share = p["moe_expert_flops_share"]
  rows += [
      ("FLOPs per step (fwd + bwd)", _si(p["flops_per_step"], "FLOP")),
      ("expert share of an MoE layer", f"{100 * share:.1f}%" if share is not None else "-"),
      ("all-to-all per step", f"{_bytes(p['alltoall_bytes_per_step'])} "
                              f"({p['alltoall_bytes_per_element']}-byte elements)"),
      ("allreduce payload per step (dense + expert)",
       f"{_bytes(p['allreduce_bytes_per_step']['total'])} ("
       f"{_bytes(p['allreduce_bytes_per_step']['dense'])} + "
       f"{_bytes(p['allreduce_bytes_per_step']['expert'])})"),
  ]
  return rows


def markdown_table(plans: dict) -> str:
  """A markdown table, one column per plan (`{"name": plan(...)}`)."""
  names = list(plans)
  columns = [dict(table_rows(plans[n])) for n in names]
  keys = [k for k, _ in table_rows(plans[names[0]])]
  for col in columns[1:]:
    keys += [k for k in col if k not in keys]
  lines = ["| quantity | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  for key in keys:
    lines.append(f"| {key} | " + " | ".join(col.get(key, "") for col in columns) + " |")
  return "\n".join(lines)
