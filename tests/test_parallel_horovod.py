"""Single-process tests of m6t_tf.parallel.horovod (no horovodrun, Horovod never initialised).

The multi-process behaviour (all-to-all, reductions, broadcasts, failures on every rank) is in
tests/test_parallel_moe.py, which launches tests/distributed/moe_worker.py under horovodrun.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.errors import ConfigError
from m6t_tf.layers.moe import MoE
from m6t_tf.parallel import context as context_lib
from m6t_tf.parallel import horovod as hvd_lib
from m6t_tf.parallel.mesh import Mesh

_STAND_IN_SET = object()  # where a Horovod process set is required but never used


def needs_horovod(test):
  """Fails `test`, naming `make setup`, when horovod.tensorflow cannot be imported."""
  def run(*args, **kwargs):
    try:
      import horovod.tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      pytest.fail(f"horovod.tensorflow does not import ({e}): run `make setup`", pytrace=False)
    return test(*args, **kwargs)
  return functools.wraps(test)(run)


def test_communicator_coordinates_follow_the_mesh():
  comm = hvd_lib.HorovodCommunicator(Mesh(2, 4), 6, _STAND_IN_SET)
  assert comm.expert_group_size == 4
  assert comm.expert_rank == 2
  assert comm.expert_ids(16) == [8, 9, 10, 11]
  assert comm.wire_dtype is None


def test_group_of_one_is_the_identity_and_sends_nothing():
  comm = hvd_lib.HorovodCommunicator(Mesh(4, 1), 3)
  x = tf.reshape(tf.range(2 * 3 * 5, dtype=tf.float32), [1, 2, 3, 5])
  assert comm.all_to_all(x) is x
  assert comm.bytes_sent == 0 and comm.calls == 0


def test_expert_group_needs_a_process_set():
  with pytest.raises(ValueError, match="needs a process set"):
    hvd_lib.HorovodCommunicator(Mesh(1, 2), 0, None)


def test_all_to_all_checks_the_leading_dimension():
  comm = hvd_lib.HorovodCommunicator(Mesh(1, 2), 0, _STAND_IN_SET)
  with pytest.raises(ValueError, match=r"expects a \[D=2, \.\.\.\] tensor, got shape \(3, 5\)"):
    comm.all_to_all(tf.zeros([3, 5]))


@pytest.mark.parametrize("given,want", [(None, None), ("float16", "float16"),
                                        (tf.float16, "float16"), ("float32", "float32")])
def test_wire_dtypes(given, want):
  comm = hvd_lib.HorovodCommunicator(Mesh(1, 2), 0, _STAND_IN_SET, wire_dtype=given)
  assert comm.wire_dtype == want


def test_bfloat16_wire_is_refused_with_the_reason():
  with pytest.raises(ValueError, match="does not take bfloat16"):
    hvd_lib.HorovodCommunicator(Mesh(1, 2), 0, _STAND_IN_SET, wire_dtype="bfloat16")


def test_moe_layer_takes_its_experts_from_the_communicator():
  comm = hvd_lib.HorovodCommunicator(Mesh(2, 2), 3, _STAND_IN_SET, wire_dtype="float16")
  layer = MoE(8, 7, communicator=comm)
  assert layer.expert_ids == [4, 5, 6, 7]
  assert layer.num_local_experts == 4
  layer.build((None, 6))
  # 2 · E · C · M · bytes, float16 on the wire.
  assert layer.alltoall_bytes_per_forward(capacity=3) == 2 * 8 * 3 * 6 * 2


def test_moe_layer_refuses_experts_that_do_not_split_over_the_group():
  comm = hvd_lib.HorovodCommunicator(Mesh(1, 2), 1, _STAND_IN_SET)
  with pytest.raises(ValueError, match="num_experts=5 is not divisible"):
    MoE(5, 7, communicator=comm)


def test_expert_variables_carry_the_mark():
  comm = hvd_lib.HorovodCommunicator(Mesh(1, 2), 0, _STAND_IN_SET)
  layer = MoE(4, 7, communicator=comm)
  layer.build((None, 6))
  is_expert = context_lib.is_expert_variable   # what HorovodContext.is_expert defaults to
  assert is_expert(layer.experts.wi) and is_expert(layer.experts.wo)
  assert not is_expert(layer.router.kernel)
  assert not any(is_expert(v) for v in layer.non_trainable_variables)


def test_capacity_fingerprint():
  comm = hvd_lib.HorovodCommunicator(Mesh(1, 2), 0, _STAND_IN_SET)
  layers = [MoE(8, 7, k=2, capacity_factor=1.25, communicator=comm),
            MoE(8, 7, capacity_factor=1.0, eval_capacity_factor=2.0, communicator=comm)]
  assert hvd_lib.capacity_fingerprint(layers, num_tokens=10) == {
      "tokens_per_worker": 10,
      "moe0.num_experts": 8, "moe0.expert_group_size": 2,
      "moe0.capacity_train": 4, "moe0.capacity_eval": 4,     # ceil(2 · 10 / 8 · 1.25)
      "moe1.num_experts": 8, "moe1.expert_group_size": 2,
      "moe1.capacity_train": 2, "moe1.capacity_eval": 3,     # ceil(10 / 8 · 2.0)
  }


@pytest.mark.parametrize("value,shown", [
    (0, "0"), (-3, "-3"), (2 ** 40, str(2 ** 40)), (True, "1"), (1.25, "1.25"), (-0.0, "-0.0"),
    (float("inf"), "inf"), (None, "None")])
def test_fingerprint_encoding_round_trips(value, shown):
  tag, payload = hvd_lib._encode(value)  # pylint: disable=protected-access
  assert -(2 ** 63) <= payload < 2 ** 63
  assert hvd_lib._decode(tag, payload) == shown  # pylint: disable=protected-access


def test_fingerprint_encoding_tells_types_and_strings_apart():
  codes = [hvd_lib._encode(v) for v in (None, 0, 0.0, -0.0, "", "fp16", "fp32")]  # pylint: disable=protected-access
  assert len(set(codes)) == len(codes)
  assert hvd_lib._decode(*hvd_lib._encode("fp16")).startswith("str with crc32=0x")  # pylint: disable=protected-access


def test_fingerprint_rejects_other_types():
  with pytest.raises(TypeError, match="takes int, float, bool, str or None"):
    hvd_lib._encode([1, 2])  # pylint: disable=protected-access


def test_world_size_from_env(monkeypatch):
  for name in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
    monkeypatch.delenv(name, raising=False)
  assert hvd_lib.world_size_from_env() is None
  monkeypatch.setenv("PMI_SIZE", "16")
  assert hvd_lib.world_size_from_env() == 16
  monkeypatch.setenv("HOROVOD_SIZE", "4")
  assert hvd_lib.world_size_from_env() == 4


def test_resolve_mesh():
  assert hvd_lib.resolve_mesh(Mesh(2, 2), None, None) == Mesh(2, 2)
  assert hvd_lib.resolve_mesh(Mesh(2, 2), 2, 4) == Mesh(2, 2)
  assert hvd_lib.resolve_mesh(None, 2, 8) == Mesh(4, 2)
  assert hvd_lib.resolve_mesh(None, None, 8) == Mesh(1, 8)
  assert hvd_lib.resolve_mesh(None, None, None) is None
  with pytest.raises(ValueError, match="expert=4 contradicts mesh=Mesh"):
    hvd_lib.resolve_mesh(Mesh(2, 2), 4, 4)
  with pytest.raises(ValueError, match="pass mesh=Mesh"):
    hvd_lib.resolve_mesh(None, 2, None)
  with pytest.raises(ValueError, match="cannot lay out 6 ranks with expert=4"):
    hvd_lib.resolve_mesh(None, 4, 6)


@needs_horovod
def test_check_build():
  hvd = hvd_lib.check_build()
  assert hvd.gloo_built() or hvd.mpi_built()


def _single_rank_context():
  mesh = Mesh(1, 1)
  comm = hvd_lib.HorovodCommunicator(mesh, 0)
  return hvd_lib.HorovodContext(mesh=mesh, rank=0, size=1, local_rank=0, communicator=comm,
                                expert_process_set=None, replica_process_set=None)


def test_both_contexts_are_worker_contexts():
  from m6t_tf.parallel import context  # pylint: disable=g-import-not-at-top
  assert isinstance(_single_rank_context(), context.WorkerContext)
  assert isinstance(context.LocalContext(), context.WorkerContext)
  # The interface has no aliases: one name per collective.
  for alias in ("allreduce_metrics", "broadcast_initial_state", "expert_norm_sq"):
    assert not hasattr(_single_rank_context(), alias), alias


@needs_horovod
def test_one_rank_helpers_are_identities():
  ctx = _single_rank_context()
  dense, expert = tf.Variable([1.0, 2.0]), tf.Variable([[3.0]])
  grads = [(tf.constant([0.5, -1.0]), dense), (tf.constant([[2.0]]), expert), (None, dense)]
  out = ctx.allreduce_gradients(grads, lambda v: v is expert)
  assert [v for _, v in out] == [dense, expert, dense]
  np.testing.assert_array_equal(out[0][0], [0.5, -1.0])
  np.testing.assert_array_equal(out[1][0], [[2.0]])
  assert out[2][0] is None
  assert {k: float(v) for k, v in ctx.mean_metrics({"b": 2, "a": 1.5}).items()} == {
      "a": 1.5, "b": 2.0}
  ctx.broadcast_state([dense, expert])
  ctx.check_consistent({"capacity": 3})
  with pytest.raises(ValueError, match="compression='int8'"):
    ctx.allreduce_gradients(grads, lambda v: False, compression="int8")


class _FakeConfig:
  """`tf.config` stand-in: a node with `n` GPUs (no GPU runs TensorFlow here) that, like
  `tf.config`, refuses a change of device configuration once the runtime started (`start()`)."""

  def __init__(self, n):
    self.gpus = [type("Device", (), {"name": f"/physical_device:GPU:{i}"})() for i in range(n)]
    self.visible, self.growth, self.started = None, [], False
    self.experimental = self

  def start(self):
    self.started = True

  def list_physical_devices(self, kind):
    return list(self.gpus) if kind == "GPU" else []

  def set_visible_devices(self, device, kind):
    if self.visible == (device.name, kind):
      return
    if self.started:
      raise RuntimeError("Visible devices cannot be modified after being initialized")
    self.visible = (device.name, kind)

  def set_memory_growth(self, device, on):
    if (device.name, on) in self.growth:
      return
    if self.started:
      raise RuntimeError("Physical devices cannot be modified after being initialized")
    self.growth.append((device.name, on))


@pytest.mark.parametrize("local_rank,gpus,want", [(0, 4, 0), (3, 4, 3), (1, 2, 1), (0, 1, 0)])
def test_each_rank_computes_on_its_own_gpu(local_rank, gpus, want):
  config = _FakeConfig(gpus)
  name = hvd_lib.pin_gpu(local_rank, config, local_size=gpus, environ={})
  assert name == f"/physical_device:GPU:{want}"
  assert config.visible == (name, "GPU")
  assert config.growth == [(name, True)]


def test_no_gpu_pins_nothing():
  config = _FakeConfig(0)
  assert hvd_lib.pin_gpu(2, config, local_size=4, environ={}) is None
  assert config.visible is None


@pytest.mark.parametrize("local_rank,local_size,needle", [
    (0, 4, "this node runs 4 ranks but has 2 GPU(s)"),
    (3, None, "local rank 3 means at least 4 ranks on this node but has 2 GPU(s)")])
def test_more_ranks_than_gpus_is_an_error_unless_shared(local_rank, local_size, needle):
  config = _FakeConfig(2)
  with pytest.raises(ConfigError) as e:
    hvd_lib.pin_gpu(local_rank, config, local_size=local_size, environ={})
  assert needle in str(e.value)
  assert "start at most 2 ranks per node" in str(e.value)
  assert "or set M6T_SHARE_GPUS=1 to share them on purpose" in str(e.value)
  assert config.visible is None
  # The fix the message names works.
  name = hvd_lib.pin_gpu(local_rank, config, local_size=local_size,
                         environ={"M6T_SHARE_GPUS": "1"})
  assert name == f"/physical_device:GPU:{local_rank % 2}"
  with pytest.raises(ConfigError, match="M6T_SHARE_GPUS='yes': use M6T_SHARE_GPUS=1"):
    hvd_lib.pin_gpu(0, _FakeConfig(2), local_size=4, environ={"M6T_SHARE_GPUS": "yes"})


def test_one_gpu_assigned_by_the_launcher_is_not_shared():
  """Slurm's --gpus-per-task=1 shows each rank its own GPU only (CUDA_VISIBLE_DEVICES)."""
  config = _FakeConfig(1)
  name = hvd_lib.pin_gpu(3, config, local_size=4, environ={"CUDA_VISIBLE_DEVICES": "3"})
  assert name == "/physical_device:GPU:0"
  with pytest.raises(ConfigError, match="this node runs 4 ranks but has 1 GPU"):
    hvd_lib.pin_gpu(3, _FakeConfig(1), local_size=4, environ={})


def test_pinning_after_the_runtime_started_says_why():
  config = _FakeConfig(2)
  config.start()
  with pytest.raises(RuntimeError, match="cannot be modified after being initialized.*call "
                     r"m6t_tf.parallel.horovod.place_process\(\)"):
    hvd_lib.pin_gpu(1, config, local_size=2, environ={})
  config = _FakeConfig(2)
  hvd_lib.pin_gpu(1, config, local_size=2, environ={})
  config.start()
  assert hvd_lib.pin_gpu(1, config, local_size=2, environ={}) == "/physical_device:GPU:1"


def test_place_process_reads_the_launcher():
  launched = {"HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"}
  config = _FakeConfig(2)
  assert hvd_lib.place_process(config, {}) is None                  # one process: every GPU
  assert config.visible is None
  assert hvd_lib.place_process(config, launched) == "/physical_device:GPU:1"
  mpi = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
         "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
  with pytest.raises(ConfigError, match="this node runs 4 ranks but has 2 GPU"):
    hvd_lib.place_process(_FakeConfig(2), mpi)
  with pytest.raises(ConfigError, match="did not export its rank on the node"):
    hvd_lib.place_process(_FakeConfig(2), {"PMI_SIZE": "2"})
  assert hvd_lib.place_process(_FakeConfig(0), {"PMI_SIZE": "2"}) is None


# Runs an entry point's start-up in a process of its own, under a stand-in launcher (rank 1 of
# 2 on a node of 2 GPUs), until it asks for its Horovod context. The stand-in `tf.config`
# refuses a device change as TensorFlow does, after probing the *real* runtime: configuring
# the CPU's virtual devices raises once the runtime started.
_ENTRY_PROBE = """
import json, runpy, sys
import tensorflow as tf
events = []

def runtime_started():
  cpu = tf.config.list_physical_devices("CPU")[0]
  try:
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()])
    return False
  except RuntimeError as e:
    return str(e)

class Device:
  def __init__(self, name):
    self.name, self.device_type = name, "GPU"

GPUS = [Device(f"/physical_device:GPU:{i}") for i in range(2)]
list_devices = tf.config.list_physical_devices
state = {"visible": None, "growth": set()}

def set_visible_devices(device, kind):
  if state["visible"] == device.name:
    return
  started = runtime_started()
  if started:
    events.append("too late: " + started)
    raise RuntimeError(started)
  state["visible"] = device.name
  events.append("pinned " + device.name)

def set_memory_growth(device, on):
  if (device.name, on) not in state["growth"]:
    if runtime_started():
      raise RuntimeError("Physical devices cannot be modified after being initialized")
    state["growth"].add((device.name, on))

tf.config.list_physical_devices = lambda kind=None: GPUS if kind == "GPU" else list_devices(kind)
tf.config.set_visible_devices = set_visible_devices
tf.config.experimental.set_memory_growth = set_memory_growth

from m6t_tf.run import configurables
from m6t_tf.parallel import horovod as hvd_lib

def context(*a, **k):
  events.append("config parsed" + (" (the runtime started)" if runtime_started() else ""))
  try:  # what init_horovod does after hvd.init
    events.append(hvd_lib.pin_gpu(1))
  except RuntimeError as e:
    events.append("init_horovod failed")
  print("EVENTS " + json.dumps(events), flush=True)
  sys.exit(0)

configurables.make_context_configured = context
configurables.make_eval_context = context
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.multiprocess
def test_train_entry_point_pins_before_the_config_reads_data(tmp_path):
  """`configurables.parse` reads records when the data has no metadata.json (MAX_LEN = None),
  which starts TensorFlow's runtime: the GPU must be chosen before."""
  import glob
  import json
  import os
  import shutil
  import subprocess
  import sys
  from tests import jobs
  for f in glob.glob(os.path.join(jobs.REPO, ".data", "demo", "*.tfrecord"))[:1] + glob.glob(
      os.path.join(jobs.REPO, ".data", "demo", "validation-*.tfrecord")):
    shutil.copy(f, tmp_path)
  assert not (tmp_path / "metadata.json").exists()
  env = jobs.worker_env(HOROVOD_SIZE="2", HOROVOD_RANK="1", HOROVOD_LOCAL_RANK="1",
                        HOROVOD_LOCAL_SIZE="2")
  env.pop("CUDA_VISIBLE_DEVICES")
  args = [sys.executable, "-c", _ENTRY_PROBE, "m6t_tf.train", "--gin_file=gin/demo.gin",
          f"--model_dir={tmp_path / 'run'}",
          f"--gin_bindings=train.train_data='{tmp_path}/train-*.tfrecord'",
          f"--gin_bindings=train.eval_data='{tmp_path}/validation-*.tfrecord'"]
  proc = subprocess.run(args, cwd=jobs.REPO, env=env, capture_output=True, text=True,
                        timeout=240)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("EVENTS ")]
  assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert json.loads(lines[0][len("EVENTS "):]) == [
      "pinned /physical_device:GPU:1", "config parsed (the runtime started)",
      "/physical_device:GPU:1"]
