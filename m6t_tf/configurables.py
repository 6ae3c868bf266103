"""Everything gin may configure, registered in one place (layers never import gin; STYLE.md).

Gin names: `M6Transformer.*` (the network), `MoEConfig.*` (every MoE layer), `train.*` (the
trainer, `m6t_tf.training.train`), `Mesh.*` (the worker layout). See gin/base.gin.
"""

from __future__ import annotations

import gin

from m6t_tf import training
from m6t_tf.networks import m6_transformer
from m6t_tf.parallel import context as context_lib

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


def parse(gin_files, gin_bindings, search_paths=()) -> None:
  """Parses gin files and bindings; unknown or malformed bindings raise before any compute."""
  register()
  for path in search_paths:
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(list(gin_files or []), list(gin_bindings or []),
                                      finalize_config=False)


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
  from m6t_tf.parallel import launch_env
  world = launch_env.world_size()
  if world <= 1 and mesh_data * max(mesh_expert, 1) <= 1:
    return context_lib.LocalContext()
  if world <= 1:
    raise ValueError(
        f"the layout's mesh (data={mesh_data}) × (expert={mesh_expert}) needs "
        f"{mesh_data * max(mesh_expert, 1)} workers, but this is a single process: launch with "
        f"`horovodrun -np {mesh_data * max(mesh_expert, 1)} ...` (or python -m launch.run), or "
        f"drop the layout file")
  from m6t_tf.parallel import horovod as horovod_lib
  from m6t_tf.parallel import mesh as mesh_lib
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
  ctx = overrides.pop("ctx", None) or make_context_configured()
  return gin.get_configurable("train")(ctx=ctx, network_fn=network_fn(), **overrides)


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
  from m6t_tf.parallel import launch_env
  return make_context(mesh_data=1, mesh_expert=launch_env.world_size())
