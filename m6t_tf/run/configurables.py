"""Everything gin may configure, registered in one place (layers never import gin: gin stays
at the edge, as in t5x).

Gin names: `M6Transformer.*` (the network), `MoEConfig.*` (every MoE layer), `train.*` (the
trainer, `m6t_tf.run.training.train`), `Mesh.*` (the worker layout). See gin/base.gin.
"""

from __future__ import annotations

import inspect
import logging
import os
import tokenize

import gin
import tensorflow as tf

from m6t_tf import storage
from m6t_tf.data import metadata
from m6t_tf.errors import ConfigError
from m6t_tf.networks import m6_transformer
from m6t_tf.parallel import context as context_lib
from m6t_tf.parallel import launch_env
from m6t_tf.parallel import mesh as mesh_lib
from m6t_tf.run import config as config_lib
from m6t_tf.run import training

_REGISTERED = []
_CONFIGURED = {}


def register() -> None:
  """Idempotently registers the configurables with gin."""
  if _REGISTERED:
    return
  _CONFIGURED["network"] = gin.external_configurable(m6_transformer.M6Transformer, module="m6t_tf")
  gin.external_configurable(m6_transformer.MoEConfig, module="m6t_tf")
  gin.external_configurable(training.train, name="train", module="m6t_tf",
                            denylist=["ctx", "network_fn", "stop_after"])
  gin.external_configurable(make_context, module="m6t_tf")
  _REGISTERED.append(True)


def parse(gin_files, gin_bindings, search_paths=(), *, read_data: bool = True) -> None:
  """Parses gin files and bindings, then fixes a data-following caption length.

  `read_data` False (a dry run): `MAX_LEN = None` and `REAL_TOKEN_FRACTION = None` stay None
  instead of following train.train_data.

  Raises:
    ConfigError: a missing gin file, an unknown configurable or parameter, a syntax error: one
      line with the file or binding (gin's own message spans several).
  """
  register()
  # A run's config.gin may live on remote storage (model_dir on gs://, s3://, ...).
  gin.config.register_file_reader(tf.io.gfile.GFile, _remote_file)
  search_paths = list(search_paths)
  # Our gin files (`--gin_file=gin/demo.gin`, and their `include 'gin/base.gin'`) are found in
  # the checkout holding the package too, so a run can start in another folder (the user's).
  checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if os.path.isdir(os.path.join(checkout, "gin")):
    search_paths.append(checkout)
  for path in gin_files or []:
    if not any(os.path.isfile(os.path.join(root, path)) or _remote_file(os.path.join(root, path))
               for root in ["", *search_paths]):
      raise ConfigError(f"--gin_file={path}: no such file (looked in {os.getcwd()!r}"
                        f"{''.join(f', {p!r}' for p in search_paths if p not in ('', '.'))})")
  for path in search_paths:
    gin.add_config_file_search_path(path)
  # gin logs "Path not found" before raising for a missing include; the error says it.
  quiet = _DropMessages("Path not found: ")
  logging.getLogger().addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(list(gin_files or []), list(gin_bindings or []),
                                        finalize_config=False)
  except (ValueError, SyntaxError, OSError, tokenize.TokenError) as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    where = f" ({'; '.join(lines[1:])})" if len(lines) > 1 else ""
    raise ConfigError(f"gin config: {lines[0] if lines else type(e).__name__}{where}") from None
  finally:
    logging.getLogger().removeFilter(quiet)
  if read_data:
    resolve_max_len()
    resolve_real_token_fraction()


def _remote_file(path: str) -> bool:
  return not storage.is_local(path) and tf.io.gfile.exists(path)


class _DropMessages(logging.Filter):
  """Drops log records whose message starts with `prefix`."""

  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record) -> bool:
    return not record.getMessage().startswith(self.prefix)


def resolve_max_len() -> None:
  """`MAX_LEN = None` (gin/demo.gin): the caption length follows the data.

  Binds MAX_LEN to the longest caption ([CLS]/[SEP] included) of train.train_data and
  train.eval_data, read from their metadata.json (or their records), so the network's position
  table, the pipeline and the `config.gin` the trainer writes all hold that number, and the
  evaluator rebuilds the same model from it. A pinned MAX_LEN is left alone. When the data
  cannot be read here the macro stays None, and the trainer names the reason.
  """
  try:
    if gin.query_parameter("%MAX_LEN") is not None:
      return
  except ValueError:  # no MAX_LEN macro: the config wires its lengths itself
    return
  lengths = []
  for name in ("train_data", "eval_data"):
    pattern = query(f"train.{name}")
    if not isinstance(pattern, str) or not pattern:
      continue
    try:
      lengths.append(metadata.read(pattern, binding=f"train.{name}",
                                   need_length=True).max_caption_tokens)
    except ConfigError:
      return
  if lengths:
    gin.bind_parameter("%MAX_LEN", max(lengths))


def real_token_fraction(mean_caption_tokens: float, max_len: int,
                        num_patches: int = 16) -> float:
  """The share of a batch's positions that are real tokens: patches plus the caption input.

  The network reads `tokens[:, :-1]` of captions padded (or cut) to `max_len`, so a caption of
  n tokens ([CLS]/[SEP] included) fills min(n, max_len − 1) of its max_len − 1 input
  positions; the 16 patches are always real. Computed at the mean n (for truncated data this
  slightly overstates the share: C errs on the large side).
  """
  real = num_patches + min(float(mean_caption_tokens), max_len - 1)
  return round(real / (num_patches + max_len - 1), 4)


def resolve_real_token_fraction() -> None:
  """`REAL_TOKEN_FRACTION = None` (gin/demo.gin): expert capacity follows the real tokens.

  Padding is not routed, so a capacity computed from every position of a padded batch gives
  an effective γ of γ / (real share) — about 1.8 for the demo's 1.25. Binds the macro to the
  real share of train.train_data's batches (`real_token_fraction`, from metadata.json's
  mean caption length and MAX_LEN), so `MoE` sizes C = ceil(k · share · T / E · γ) and the
  γ of the config is the one routing gets. It lands in config.gin, so the evaluator and the
  caption tools rebuild the same capacity. Unknown (no mean in metadata.json): 1.0, every
  position, as before.
  """
  try:
    if gin.query_parameter("%REAL_TOKEN_FRACTION") is not None:
      return
  except ValueError:  # no macro: the config wires MoEConfig itself
    return
  fraction = 1.0
  pattern, max_len = query("train.train_data"), query("train.max_len")
  if isinstance(pattern, str) and pattern and isinstance(max_len, int):
    try:
      mean = metadata.read(pattern, binding="train.train_data").mean_caption_tokens
    except ConfigError:
      mean = None
    if mean is not None:
      fraction = real_token_fraction(mean, max_len)
  gin.bind_parameter("%REAL_TOKEN_FRACTION", fraction)


def required_unset() -> list[str]:
  """The `train.*` settings the config leaves `%gin.REQUIRED`."""
  out = []
  for name in inspect.signature(training.train).parameters:
    value = query(f"train.{name}")
    if isinstance(value, gin.config.ConfigurableReference) and (
        value.scoped_selector == "gin.REQUIRED/gin.constant"):
      out.append(name)
  return out


def check_required() -> None:
  """ConfigError naming the first `train.*` value a config leaves `%gin.REQUIRED`."""
  examples = {"train_data": "\"train.train_data='data/mine/train-*.tfrecord'\"",
              "num_steps": "train.num_steps=1000"}
  for name in required_unset():
    raise ConfigError(f"train.{name} is required by the config: pass --gin_bindings="
                      f"{examples.get(name, f'train.{name}=...')}")


def make_context(*, mesh_data: int = 1, mesh_expert: int = 0, alltoall_dtype=None,
                 allreduce_compression: str = "none"):
  """The worker context: `LocalContext` for one process, Horovod's under horovodrun/mpirun.

  Args:
    mesh_data: size of the data axis of the (data × expert) mesh.
    mesh_expert: size of the expert axis; 0 = world size / mesh_data (the paper: every worker
      on the expert axis).
    alltoall_dtype: None (compute dtype) or "float16": the paper's FP16 communication for the
      all-to-all payloads.
    allreduce_compression: "none" or "fp16" for the gradient allreduce.
  """
  world = launch_env.world_size()
  if world <= 1 and mesh_data * max(mesh_expert, 1) <= 1:
    return context_lib.LocalContext()
  if world <= 1:
    raise ConfigError(
        f"the layout's mesh (data={mesh_data}) × (expert={mesh_expert}) needs "
        f"{mesh_data * max(mesh_expert, 1)} workers, but this is a single process: launch with "
        f"`horovodrun -np {mesh_data * max(mesh_expert, 1)} ...` (or python -m m6t_tf.launch), or "
        f"drop the layout file")
  # Horovod only under a launcher: a single process never imports it.
  from m6t_tf.parallel import horovod as horovod_lib  # pylint: disable=g-import-not-at-top
  expert = mesh_expert or max(world // max(mesh_data, 1), 1)
  ctx = horovod_lib.init_horovod(mesh_lib.Mesh(data=mesh_data, expert=expert),
                                 num_experts=query("MoEConfig.num_experts"),
                                 wire_dtype=alltoall_dtype)
  ctx.gradient_compression = allreduce_compression
  return ctx


def network_fn():
  """The network class with gin's bindings applied (`M6Transformer.*`)."""
  register()
  return _CONFIGURED["network"]


def run_train(**overrides) -> dict:
  """Calls the gin-configured `train` with the gin-configured network and worker context."""
  register()
  check_required()
  ctx = overrides.pop("ctx", None) or make_context_configured()
  return gin.get_configurable("train")(ctx=ctx, network_fn=network_fn(), **overrides)


def validate_run(*, num_workers: int = 1, **overrides) -> config_lib.RunConfig:
  """The trainer's checks alone, on the parsed gin config: every `train.*` rule
  (`RunConfig.validate`) and the network's own (sizes, MoE options, train.remat, caption
  length against the network), with no data read and no weight made — what the dry run and
  the configuration fuzzing run.

  Raises:
    ConfigError: the first problem, naming the binding (and a fix, `ConfigError.fix`).
  """
  register()
  bindings = {**gin.get_bindings("train"), **overrides}
  if any(name not in overrides for name in required_unset()):
    check_required()
  config = config_lib.RunConfig.from_bindings(**bindings).validate(num_workers)
  training.build_network(config, network_fn())
  return config


def make_context_configured():
  return gin.get_configurable("make_context")()


def query(name: str, default=None):
  """`gin.query_parameter` with macros (`%X`) resolved; `default` if the binding is absent."""
  try:
    value = gin.query_parameter(name)
  except ValueError:
    return default
  while isinstance(value, gin.config.ConfigurableReference) and value.configurable.name == "macro":
    value = gin.query_parameter("%" + value.scoped_selector.split("/")[0])
  return value


def make_eval_context():
  """Evaluation runs on whatever was launched, whatever layout trained the checkpoint: one
  process holds every expert; under horovodrun every worker is on the expert axis."""
  return make_context(mesh_data=1, mesh_expert=launch_env.world_size())
