"""Tests of m6t_tf.parallel.mesh: the (data, expert) layout of ranks, without Horovod."""

import itertools

import pytest

from m6t_tf.parallel import mesh as mesh_lib
from m6t_tf.parallel.mesh import Mesh


def test_rank_to_coordinates_is_expert_minor():
  mesh = Mesh(data=2, expert=3)
  assert mesh.size == 6
  assert [mesh.coords(r) for r in range(6)] == [
      (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
  for r in range(6):
    assert mesh.rank_of(*mesh.coords(r)) == r
    assert mesh.data_index(r) == r // 3 and mesh.expert_index(r) == r % 3


def test_groups_of_a_2x3_mesh():
  mesh = Mesh(data=2, expert=3)
  assert mesh.expert_groups() == [(0, 1, 2), (3, 4, 5)]
  assert mesh.replica_groups() == [(0, 3), (1, 4), (2, 5)]
  assert mesh.expert_group(4) == (3, 4, 5)
  assert mesh.replica_group(4) == (1, 4)
  assert [mesh.replica_root(r) for r in range(6)] == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("data,expert", [(1, 1), (1, 4), (4, 1), (2, 2), (2, 3), (3, 2)])
def test_groups_partition_the_world(data, expert):
  mesh = Mesh(data, expert)
  for groups, size in ((mesh.expert_groups(), expert), (mesh.replica_groups(), data)):
    assert sorted(itertools.chain(*groups)) == list(range(mesh.size))
    assert all(len(g) == size for g in groups)
  for r in range(mesh.size):
    # An expert group and a replica group meet in exactly one rank: r itself.
    assert set(mesh.expert_group(r)) & set(mesh.replica_group(r)) == {r}
    # A rank's position in its expert group is its expert_index (hvd.alltoall row order).
    assert mesh.expert_group(r).index(r) == mesh.expert_index(r)


def test_expert_ids_are_contiguous_blocks_shared_by_replicas():
  mesh = Mesh(data=2, expert=4)
  assert mesh.expert_ids(0, 16) == [0, 1, 2, 3]
  assert mesh.expert_ids(3, 16) == [12, 13, 14, 15]
  assert mesh.expert_ids(5, 16) == mesh.expert_ids(1, 16) == [4, 5, 6, 7]
  held = sorted(itertools.chain(*(mesh.expert_ids(r, 16) for r in mesh.expert_group(4))))
  assert held == list(range(16))


def test_for_world():
  assert Mesh.for_world(8) == Mesh(1, 8)
  assert Mesh.for_world(8, expert=2) == Mesh(4, 2)
  with pytest.raises(ValueError, match=r"cannot lay out 6 ranks with expert=4.*\[1, 2, 3, 6\]"):
    Mesh.for_world(6, expert=4)


@pytest.mark.parametrize("data,expert", [(0, 2), (2, 0), (-1, 1), (1.5, 2), (True, 2)])
def test_bad_axis_sizes(data, expert):
  with pytest.raises(ValueError, match="must be an integer >= 1"):
    Mesh(data, expert)


def test_validate_accepts_a_matching_world():
  Mesh(2, 2).validate(4, num_experts=8)
  Mesh(2, 2).validate(4)


def test_validate_world_size_message_names_values_and_fix():
  with pytest.raises(ValueError) as info:
    Mesh(data=2, expert=3).validate(4)
  message = str(info.value)
  assert "data=2 × expert=3 = 6 ranks, but 4 were started" in message
  assert "horovodrun -np 6" in message
  assert "Mesh(data=2, expert=2)" in message and "Mesh(data=1, expert=4)" in message


def test_validate_experts_message_names_values_and_fix():
  with pytest.raises(ValueError) as info:
    Mesh(data=1, expert=4).validate(4, num_experts=6)
  message = str(info.value)
  assert "num_experts=6 is not divisible by the expert axis expert=4" in message
  assert "multiple of 4" in message
  assert "[1, 2]" in message  # expert axes dividing both E=6 and the 4 ranks


def test_out_of_mesh_rank():
  with pytest.raises(ValueError, match="rank=4 is outside the mesh of 4 ranks"):
    Mesh(2, 2).coords(4)
  with pytest.raises(ValueError, match="outside"):
    Mesh(2, 2).rank_of(2, 0)


@pytest.mark.parametrize("data,expert,want", [
    (1, 1, []),
    (1, 4, []),                          # expert group = world: Horovod's global set
    (4, 1, []),                          # replica group = world; expert groups of one rank
    (2, 2, [(0, 1), (2, 3), (0, 2), (1, 3)]),
    (2, 4, [(0, 1, 2, 3), (4, 5, 6, 7), (0, 4), (1, 5), (2, 6), (3, 7)]),
    (3, 2, [(0, 1), (2, 3), (4, 5), (0, 2, 4), (1, 3, 5)]),
])
def test_process_set_ranks(data, expert, want):
  assert Mesh(data, expert).process_set_ranks() == want


def test_process_set_ranks_are_unique_and_identical_for_every_rank():
  for data, expert in itertools.product(range(1, 5), repeat=2):
    groups = Mesh(data, expert).process_set_ranks()
    assert len(groups) == len(set(groups))
    assert groups == Mesh(data, expert).process_set_ranks()  # a pure function of the mesh
    assert all(1 < len(g) < data * expert for g in groups)
    assert all(list(g) == sorted(g) for g in groups)  # Horovod sorts ranks of a ProcessSet


def test_make_process_sets_with_a_stand_in_factory():
  made = []

  def factory(ranks):
    made.append(ranks)
    return ("set", tuple(ranks))

  sets = mesh_lib.make_process_sets(Mesh(2, 2), factory)
  assert made == [[0, 1], [2, 3], [0, 2], [1, 3]]
  assert list(sets) == [(0, 1), (2, 3), (0, 2), (1, 3)]
  assert sets[(0, 2)] == ("set", (0, 2))


def test_describe():
  text = mesh_lib.describe(Mesh(2, 2), num_experts=8)
  assert text.splitlines()[0] == "Mesh(data=2, expert=2): 4 ranks"
  assert ("rank 3: data_index=1 expert_index=1 expert_group=[2, 3] replica_group=[1, 3] "
          "experts=[4..7]") in text
