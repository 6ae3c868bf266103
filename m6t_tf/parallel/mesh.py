"""The worker mesh: Horovod ranks laid out as (data, expert) for expert parallelism
(arXiv 2405.15052 §3: data × expert; M6-T's 480 workers are all on the expert axis).

    world = data × expert                 rank r ↔ (data_index, expert_index)
    data_index   = r // expert            which replica of the full expert set r belongs to
    expert_index = r %  expert            which block of e = E / expert experts r holds

Two kinds of groups follow from the layout:

  * expert group (same data_index): the `expert` ranks that together hold all E experts and
    exchange tokens by all-to-all, twice per MoE layer per forward pass (D = `expert`);
  * replica group (same expert_index): the `data` ranks holding the same e experts; expert
    gradients are reduced over these only, dense gradients over the whole world.

Why expert-minor (r % expert) and not data-minor: launchers number ranks host by host, so with
this choice an expert group is a block of *consecutive* ranks and, when `expert` is at most the
GPUs per host, its all-to-alls (4 per layer per step, on the critical path) stay inside one host,
while only the once-per-step expert-gradient allreduce crosses hosts. DeepSpeed-MoE and
Megatron lay out expert-parallel groups the same way. Example, Mesh(data=2, expert=4):

    rank:           0 1 2 3 | 4 5 6 7
    data_index:     0 0 0 0 | 1 1 1 1     expert groups  [0 1 2 3] [4 5 6 7]
    expert_index:   0 1 2 3 | 0 1 2 3     replica groups [0 4] [1 5] [2 6] [3 7]

This module is pure Python (no Horovod import) so the layout is testable anywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

Ranks = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Mesh:
  """A (data, expert) layout of `data × expert` Horovod ranks.

  Attributes:
    data: ranks holding a replica of the same experts (the Data axis; experts replicate on it).
    expert: ranks of one expert-parallel group (the Expert axis), D in the MoE layer's notation.
  """
  data: int
  expert: int

  def __post_init__(self):
    for name in ("data", "expert"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Mesh {name}={value!r} must be an integer >= 1")

  @classmethod
  def for_world(cls, world_size: int, *, expert: Optional[int] = None) -> "Mesh":
    """The mesh over `world_size` ranks with `expert` ranks per expert group (all by default)."""
    expert = world_size if expert is None else expert
    if expert < 1 or world_size % expert:
      raise ValueError(
          f"cannot lay out {world_size} ranks with expert={expert}: the expert axis must divide "
          f"the number of ranks; choose expert from {divisors(world_size)}")
    return cls(data=world_size // expert, expert=expert)

  @property
  def size(self) -> int:
    """Ranks the mesh covers: data × expert."""
    return self.data * self.expert

  def validate(self, world_size: int, num_experts: Optional[int] = None) -> None:
    """Raises ValueError unless the mesh covers exactly `world_size` ranks and E splits evenly.

    Args:
      world_size: number of Horovod processes actually started.
      num_experts: E of the MoE layers (checked when given): E must divide by `expert`.
    """
    if self.size != world_size:
      options = ", ".join(f"Mesh(data={world_size // x}, expert={x})"
                          for x in divisors(world_size))
      raise ValueError(
          f"mesh data={self.data} × expert={self.expert} = {self.size} ranks, but "
          f"{world_size} were started; start {self.size} processes (horovodrun -np {self.size}) "
          f"or use a mesh of {world_size} ranks: {options}")
    if num_experts is not None:
      if num_experts < 1 or num_experts % self.expert:
        axes = [x for x in divisors(world_size) if num_experts >= 1 and num_experts % x == 0]
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the expert axis expert={self.expert} "
            f"of {self}: each rank of an expert group holds E / expert experts. Choose E as a "
            f"multiple of {self.expert}, or an expert axis that divides both E and the "
            f"{world_size} ranks: {axes}")

  def check_rank(self, rank: int) -> None:
    if not 0 <= rank < self.size:
      raise ValueError(f"rank={rank} is outside the mesh of {self.size} ranks {self}")

  def coords(self, rank: int) -> tuple[int, int]:
    """(data_index, expert_index) of `rank`."""
    self.check_rank(rank)
    return rank // self.expert, rank % self.expert

  def data_index(self, rank: int) -> int:
    return self.coords(rank)[0]

  def expert_index(self, rank: int) -> int:
    return self.coords(rank)[1]

  def rank_of(self, data_index: int, expert_index: int) -> int:
    """The rank at (data_index, expert_index)."""
    if not (0 <= data_index < self.data and 0 <= expert_index < self.expert):
      raise ValueError(f"coordinates ({data_index}, {expert_index}) are outside {self}")
    return data_index * self.expert + expert_index

  def expert_group(self, rank: int) -> Ranks:
    """Ranks exchanging tokens with `rank` by all-to-all (same data_index), in expert order."""
    d = self.data_index(rank)
    return tuple(self.rank_of(d, x) for x in range(self.expert))

  def replica_group(self, rank: int) -> Ranks:
    """Ranks holding the same experts as `rank` (same expert_index), in data order."""
    x = self.expert_index(rank)
    return tuple(self.rank_of(d, x) for d in range(self.data))

  def expert_groups(self) -> list[Ranks]:
    return [self.expert_group(self.rank_of(d, 0)) for d in range(self.data)]

  def replica_groups(self) -> list[Ranks]:
    return [self.replica_group(self.rank_of(0, x)) for x in range(self.expert)]

  def replica_root(self, rank: int) -> int:
    """The rank experts are broadcast from at start: data_index 0 of `rank`'s replica group."""
    return self.replica_group(rank)[0]

  def expert_ids(self, rank: int, num_experts: int) -> list[int]:
    """Global ids of the e = E / expert experts `rank` holds (a contiguous block)."""
    self.validate(self.size, num_experts)
    e = num_experts // self.expert
    x = self.expert_index(rank)
    return list(range(x * e, (x + 1) * e))

  def process_set_ranks(self) -> list[Ranks]:
    """The groups that need their own Horovod process set, in a fixed order.

    Expert groups first, then replica groups. Left out: groups of one rank (they never
    communicate) and a group spanning the whole world (Horovod's global process set serves
    it, and Horovod refuses a duplicate of it). Every rank must register this same list in the
    same order, because Horovod numbers process sets by registration order.
    """
    out: list[Ranks] = []
    for group in self.expert_groups() + self.replica_groups():
      if 1 < len(group) < self.size and group not in out:
        out.append(group)
    return out

  def __str__(self) -> str:
    return f"Mesh(data={self.data}, expert={self.expert})"


def divisors(n: int) -> list[int]:
  return [x for x in range(1, n + 1) if n % x == 0] if n >= 1 else []


def make_process_sets(mesh: Mesh,
                      factory: Optional[Callable[[list[int]], Any]] = None) -> dict[Ranks, Any]:
  """Process-set objects for `mesh.process_set_ranks()`, keyed by their ranks, in order.

  Pass `list(result.values())` to `hvd.init(process_sets=...)`; look a group's set up by its
  ranks afterwards (groups missing from the dict use `hvd.global_process_set` or need none).

  Args:
    mesh: the layout.
    factory: builds one process set from a list of ranks; defaults to `hvd.ProcessSet`
      (imported only then, so tests can pass e.g. `tuple` without Horovod).
  """
  if factory is None:
    import horovod.tensorflow as hvd  # pylint: disable=g-import-not-at-top
    factory = hvd.ProcessSet
  return {group: factory(list(group)) for group in mesh.process_set_ranks()}


def describe(mesh: Mesh, num_experts: Optional[int] = None) -> str:
  """A one-rank-per-line table of the layout, for logs."""
  lines = [f"{mesh}: {mesh.size} ranks"]
  for r in range(mesh.size):
    d, x = mesh.coords(r)
    line = (f"  rank {r}: data_index={d} expert_index={x} expert_group={list(mesh.expert_group(r))}"
            f" replica_group={list(mesh.replica_group(r))}")
    if num_experts is not None:
      ids = mesh.expert_ids(r, num_experts)
      line += f" experts=[{ids[0]}..{ids[-1]}]"
    lines.append(line)
  return "\n".join(lines)
