"""Single-process tests of m6t_tf.parallel.horovod (no horovodrun, Horovod never initialised).

The multi-process behaviour (all-to-all, reductions, broadcasts, failures on every rank) is in
tests/test_parallel_moe.py, which launches tests/distributed/moe_worker.py under horovodrun.
"""

import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.layers.moe import MoE
from m6t_tf.parallel import horovod as hvd_lib
from m6t_tf.parallel.mesh import Mesh

_STAND_IN_SET = object()  # where a Horovod process set is required but never used


def _has_horovod_tf():
  try:
    import horovod.tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


needs_horovod = pytest.mark.skipif(not _has_horovod_tf(),
                                   reason="horovod.tensorflow is not installed")


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


def test_expert_variable_filter():
  comm = hvd_lib.HorovodCommunicator(Mesh(1, 2), 0, _STAND_IN_SET)
  layer = MoE(4, 7, communicator=comm)
  layer.build((None, 6))
  is_expert = hvd_lib.expert_variable_filter(layer)
  assert is_expert(layer.experts.wi) and is_expert(layer.experts.wo)
  assert is_expert(layer.experts.wi.value)  # the tf.Variable behind it too
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
  assert {k: float(v) for k, v in ctx.allreduce_metrics({"b": 2, "a": 1.5}).items()} == {
      "a": 1.5, "b": 2.0}
  ctx.broadcast_initial_state([dense], [expert])
  ctx.check_consistent({"capacity": 3})
  with pytest.raises(ValueError, match="compression='int8'"):
    ctx.allreduce_gradients(grads, lambda v: False, compression="int8")


class _FakeConfig:
  """`tf.config` stand-in: a node with `n` GPUs (no GPU runs TensorFlow here)."""

  def __init__(self, n):
    self.gpus = [type("Device", (), {"name": f"/physical_device:GPU:{i}"})() for i in range(n)]
    self.visible, self.growth = None, []
    self.experimental = self

  def list_physical_devices(self, kind):
    return list(self.gpus) if kind == "GPU" else []

  def set_visible_devices(self, device, kind):
    self.visible = (device.name, kind)

  def set_memory_growth(self, device, on):
    self.growth.append((device.name, on))


@pytest.mark.parametrize("local_rank,gpus,want", [(0, 4, 0), (3, 4, 3), (5, 4, 1), (1, 1, 0)])
def test_each_rank_computes_on_its_own_gpu(local_rank, gpus, want):
  config = _FakeConfig(gpus)
  name = hvd_lib.pin_gpu(local_rank, config)
  assert name == f"/physical_device:GPU:{want}"
  assert config.visible == (name, "GPU")
  assert config.growth == [(name, True)]


def test_no_gpu_pins_nothing():
  config = _FakeConfig(0)
  assert hvd_lib.pin_gpu(2, config) is None
  assert config.visible is None
