"""Expert-parallel MoE under horovodrun: W ranks equal one process holding all experts.

Each test launches (or reuses the launch of) tests/distributed/moe_worker.py under
`horovodrun --gloo`; see that file's docstring for what the equivalence means exactly (per-rank
routing groups, L = (1/W) Σ_r L_r, expert grads summed over the replica group / W). One launch
per mesh runs every check and writes one JSON file per rank; the tests below read them.

Meshes: (data=1, expert=2) on 2 ranks, (1, 4) and (2, 2) on 4 ranks — the last replicates each
expert on 2 ranks, so expert gradients are reduced over a replica process set. Every variant
(routing × dispatch, dropless load, outer groups and drop policy, unequal batches) runs on the
cheapest mesh, (1, 2); the 4-rank meshes run a subset that keeps both dispatches, both routing
families, skewed dropless, a policy and unequal batches, and every check that depends on the
mesh (the worker's `SCOPES`; the parameter lists below mirror it). The bad configurations run
in one 4-rank launch, each failing on every rank in turn.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from tests import support
from tests.support import HOROVODRUN, REPO

WORKER = pathlib.Path(REPO) / "tests" / "distributed" / "moe_worker.py"


pytestmark = pytest.mark.multiprocess

MESHES = [(1, 2), (1, 4), (2, 2)]
FULL_MESH = (1, 2)   # launched with --scope full, the others with --scope mesh
ROUTING_TAGS = [f"{r}/{d}" for r in ("top_k1", "top_k2", "prototype2") for d in ("einsum", "index")]
DROPLESS = [(load, r) for load in ("balanced", "skewed")
            for r in ("top_k1", "top_k2", "prototype2")]
POLICIES = ["groups2", "groups5", "drop_probability", "groups2_drop_probability"]
UNEQUAL = ["top_k2_index", "prototype2_einsum", "top_k2_groups2", "dropless_top_k2"]
# What the 4-rank meshes run of each sweep.
MESH_SCOPE = dict(tags=["top_k2/index", "prototype2/einsum"], dropless=[("skewed", "top_k2")],
                  policies=["groups2_drop_probability"], policy_routings=["top_k2"],
                  unequal=["top_k2_index", "dropless_top_k2"], fp16_wire=["top_k2"])
FULL_SCOPE = dict(tags=ROUTING_TAGS, dropless=DROPLESS, policies=POLICIES,
                  policy_routings=["top_k2", "prototype2"], unequal=UNEQUAL,
                  fp16_wire=["top_k2", "prototype2"])


def scope(data: int, expert: int) -> dict:
  return FULL_SCOPE if (data, expert) == FULL_MESH else MESH_SCOPE


def per_mesh(sweep: str) -> list:
  """(data, expert, *point) for every point of `sweep` each mesh runs."""
  cases = []
  for data, expert in MESHES:
    for point in scope(data, expert)[sweep]:
      cases.append((data, expert, *(point if isinstance(point, tuple) else (point,))))
  return cases

EQUIVALENCE_TIMEOUT = 240.0
# Every rank must have failed all four configurations and exited by then: 4 ranks' start-up
# on 2 shared cores, a hang would never end.
FAILURE_DEADLINE = 150.0


def launch(num_procs: int, args: list[str], out: pathlib.Path, timeout: float):
  """Runs the worker on `num_procs` ranks; returns (returncode or None on timeout, output, s)."""
  support.require_horovodrun()
  cmd = [HOROVODRUN, "-np", str(num_procs), "-H", f"localhost:{num_procs}", "--gloo",
         sys.executable, str(WORKER), *args, "--out", str(out)]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  started = time.monotonic()
  # A session of its own, so that on timeout the whole tree (horovodrun and its ranks) goes.
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    output, _ = proc.communicate(timeout=timeout)
    code = proc.returncode
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate()
    code = None
  return code, _quiet(output), time.monotonic() - started


def _quiet(output: str) -> str:
  noise = ("WARNING: All log messages", "oneDNN custom operations", "Could not find cuda",
           "cpu_feature_guard", "To enable the following instructions")
  return "\n".join(l for l in output.splitlines() if not any(n in l for n in noise))


class Runs:
  """One horovodrun launch per mesh, shared by the tests of this module."""

  def __init__(self, tmp_path_factory):
    self._tmp = tmp_path_factory
    self._cache = {}

  def equivalence(self, data: int, expert: int) -> dict:
    key = (data, expert)
    if key not in self._cache:
      world = data * expert
      out = self._tmp.mktemp(f"equivalence_{data}x{expert}")
      code, output, seconds = launch(
          world, ["--mode", "equivalence", "--data", str(data), "--expert", str(expert),
                  "--scope", "full" if key == FULL_MESH else "mesh"], out, EQUIVALENCE_TIMEOUT)
      records = {}
      for r in range(world):
        path = out / f"rank{r}.json"
        if path.exists():
          records[r] = json.loads(path.read_text())
      self._cache[key] = dict(code=code, output=output, seconds=seconds, records=records,
                              world=world)
    run = self._cache[key]
    if run["code"] != 0 or len(run["records"]) != run["world"]:
      pytest.fail(f"mesh {key}: horovodrun exited with {run['code']} after {run['seconds']:.0f}s "
                  f"(None = killed at the {EQUIVALENCE_TIMEOUT:.0f}s timeout); ranks with results "
                  f"{sorted(run['records'])}. Output tail:\n{run['output'][-6000:]}")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return Runs(tmp_path_factory)


def _checks(run, prefix: str) -> list[tuple[int, dict]]:
  found = [(r, c) for r, rec in sorted(run["records"].items()) for c in rec["checks"]
           if c["name"].startswith(prefix)]
  assert found, f"the worker reported no check named {prefix}*"
  return found


def _assert_ok(run, prefix: str):
  bad = [f"rank {r}: {c}" for r, c in _checks(run, prefix) if not c["ok"]]
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("data,expert,tag", per_mesh("tags"))
def test_matches_one_process_holding_all_experts(runs, data, expert, tag):
  """Outputs, losses, input grads, router grads and expert-slice grads to 1e-5 (fp32)."""
  run = runs.equivalence(data, expert)
  for part in ("out", "loss", "grad_x", "grad_router", "grad_wi", "grad_wo", "capacity",
               "reference_grads_nonzero"):
    _assert_ok(run, f"{tag}/{part}")
    assert len(_checks(run, f"{tag}/{part}")) == run["world"]  # every rank compared


@pytest.mark.parametrize("data,expert,load,routing", per_mesh("dropless"))
def test_dropless_matches_one_process(runs, data, expert, load, routing):
  """Dropless: variable-size all-to-alls, eager and traced, training and evaluation, equal to
  one process; nothing dropped, even when every token's first choice is one expert."""
  run = runs.equivalence(data, expert)
  tag = f"dropless_{load}/{routing}"
  for part in ("out", "loss", "grad_x", "grad_router", "grad_wi", "grad_wo", "no_drop",
               "tf_function", "eval"):
    _assert_ok(run, f"{tag}/{part}")
  if load == "skewed":
    loads = [c["value"] for _, c in _checks(run, f"{tag}/max_over_mean_load")]
    # Expert 0 takes every token's first choice: E/k times its balanced share (4 here).
    assert min(loads) >= 4.0 - 1e-6, loads


@pytest.mark.parametrize("data,expert,tag", per_mesh("policies"))
def test_outer_groups_and_drop_policy_match_one_process(runs, data, expert, tag):
  """num_groups and drop_policy="probability" under expert parallelism, with tokens dropped."""
  run = runs.equivalence(data, expert)
  for routing in scope(data, expert)["policy_routings"]:
    for part in ("out", "loss", "grad_x", "grad_router", "grad_wi", "grad_wo"):
      _assert_ok(run, f"policies/{tag}/{routing}/{part}")
  dropped = [c["value"] for _, c in _checks(run, f"policies/{tag}/") if "value" in c]
  assert max(dropped) > 0


@pytest.mark.parametrize("data,expert,tag", per_mesh("unequal"))
def test_unequal_batches_agree_on_the_largest_capacity(runs, data, expert, tag):
  """Rank r routes T_r = 5, 9, 15, 19 tokens, eagerly and traced with T unknown (a Keras
  model's unknown batch): the expert group uses the largest C (an allreduce-max), and every
  rank's output and gradients equal one process routing each slice with that C."""
  run = runs.equivalence(data, expert)
  _assert_ok(run, "unequal/max_over_group")
  for mode in ("eager", "unknown_t"):
    for part in ("out", "loss", "grad_x", "grad_router", "grad_wi", "grad_wo"):
      _assert_ok(run, f"unequal/{tag}/{mode}/{part}")
  if tag.startswith("dropless"):
    return
  _assert_ok(run, f"unequal/{tag}/eager/capacity")
  # Some rank's C was raised by a peer's (so agreement, not luck, is compared), and tokens
  # were dropped (so C matters).
  assert max(c["value"] for _, c in _checks(run, f"unequal/{tag}/capacity_raised")) > 0
  assert max(c["value"] for _, c in _checks(run, f"unequal/{tag}/dropped_fraction")) > 0


@pytest.mark.parametrize("data,expert", MESHES)
def test_some_tokens_were_dropped(runs, data, expert):
  """The comparison covers capacity overflow, not only the happy path."""
  run = runs.equivalence(data, expert)
  dropped = [c["value"] for _, c in _checks(run, "") if c["name"].endswith("dropped_fraction")]
  assert max(dropped) > 0


@pytest.mark.parametrize("data,expert", MESHES)
def test_under_tf_function(runs, data, expert):
  """Forward, backward and gradient allreduce traced into one graph, called twice."""
  _assert_ok(runs.equivalence(data, expert), "tf_function")


@pytest.mark.parametrize("data,expert", MESHES)
def test_alltoall_bytes_are_2_E_C_M_bytes(runs, data, expert):
  """Payload handed to hvd.alltoall in one forward = the layer's report = 2·E·C·M·4 (fp32)."""
  run = runs.equivalence(data, expert)
  for tag in scope(data, expert)["tags"]:
    _assert_ok(run, f"{tag}/alltoall_bytes")
    _assert_ok(run, f"{tag}/alltoall_calls")


@pytest.mark.parametrize("data,expert", MESHES)
def test_fp16_wire(runs, data, expert):
  """FP16 communication: 2 bytes per element, results within 1e-2 of fp32, not bit-equal."""
  run = runs.equivalence(data, expert)
  for routing in scope(data, expert)["fp16_wire"]:
    for part in ("alltoall_bytes", "alltoall_bytes_reported", "out", "loss", "grad_x",
                 "grad_router", "grad_wi", "grad_wo", "not_bit_identical"):
      _assert_ok(run, f"fp16_wire/{routing}/index/{part}")


@pytest.mark.parametrize("data,expert", MESHES)
def test_fp16_gradient_compression(runs, data, expert):
  _assert_ok(runs.equivalence(data, expert), "top_k2/index/fp16_gradient_compression")


@pytest.mark.parametrize("data,expert", MESHES)
def test_broadcast_initial_state(runs, data, expert):
  """Dense from rank 0; experts from data_index 0 of each replica group."""
  _assert_ok(runs.equivalence(data, expert), "broadcast")


@pytest.mark.parametrize("data,expert", MESHES)
def test_mesh_coordinates_and_metrics(runs, data, expert):
  run = runs.equivalence(data, expert)
  _assert_ok(run, "mesh")
  _assert_ok(run, "metrics")
  _assert_ok(run, "check_consistent")


@pytest.mark.parametrize("data,expert", MESHES)
def test_trainer_context_interface(runs, data, expert):
  """What m6t_tf.run.training calls: reduce_gradients, global norm, all_finite, broadcast_state..."""
  _assert_ok(runs.equivalence(data, expert), "trainer_interface")


# name: text every rank's error must contain. All run in one launch of 4 ranks, mesh (2, 2)
# (the worker's FAILURES, in that order).
FAILURES = {
    "mesh_larger_than_world": "mesh data=2 × expert=3 = 6 ranks, but 4 were started",
    "experts_not_divisible_at_init": "num_experts=5 is not divisible by the expert axis expert=2",
    "experts_not_divisible_in_layer": "num_experts=5 is not divisible",
    "capacity_mismatch": "moe0.capacity_train (rank 0: 2, rank 1: 2, rank 2: 2, rank 3: 3)",
}
FAILURE_RANKS = 4


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
  out = tmp_path_factory.mktemp("failures")
  code, output, seconds = launch(FAILURE_RANKS, ["--mode", "failures", "--world",
                                                 str(FAILURE_RANKS)], out,
                                 timeout=FAILURE_DEADLINE + 30)
  return dict(out=out, code=code, output=output, seconds=seconds)


@pytest.mark.parametrize("name", sorted(FAILURES))
def test_bad_configuration_fails_on_every_rank_without_hanging(failures, name):
  expected = FAILURES[name]
  code, output, out = failures["code"], failures["output"], failures["out"]
  assert code is not None, f"still running after {FAILURE_DEADLINE + 30:.0f}s:\n{output[-4000:]}"
  assert code != 0, f"horovodrun exited 0:\n{output[-4000:]}"
  assert failures["seconds"] < FAILURE_DEADLINE, f"took {failures['seconds']:.0f}s"
  for r in range(FAILURE_RANKS):
    err = out / f"rank{r}.{name}.err"
    assert err.exists(), f"{name}: rank {r} did not report an error:\n{output[-4000:]}"
    assert expected in err.read_text(), f"rank {r}: {err.read_text()}"
  assert expected in output  # and the user sees it
