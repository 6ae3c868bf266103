"""Expert-sharded, atomic checkpoints that restore onto any number of workers.

Every variable of a run (model weights, optimiser slots, step, loss scale) is stored under a
stable key (its Keras path, see `trainer.variables_by_path`) as one *global* tensor:

  * replicated variables (attention, embeddings, routers, norms, and their slots) are written
    whole, by rank 0;
  * expert variables and their slots hold e = E/D experts on each worker, `[e, ...]`; each
    worker of data index 0 writes its block as the slice `[r·e, (r+1)·e)` of the global
    `[E, ...]` tensor, so the checkpoint holds every expert under its *global* id.

This is TensorFlow's own partitioned-variable format (SaveV2 with `shape_and_slices`, merged by
MergeV2Checkpoints), readable by `tf.train.load_checkpoint`. Restoring reads each worker's own
slice, whatever D wrote it: a checkpoint of 4 workers restores onto 1, 2 or 8.

Atomicity: shards are written to `tmp-<step>/`, rank 0 merges them into `ckpt-<step>` and only
then rewrites the `latest` pointer (temp file + rename). A crash at any point leaves either the
previous checkpoint or the new one as `latest`, never a partial one.

Durability (a power cut or host crash, not only a killed process): renames and written data sit
in the page cache until flushed, so without `fsync` a crash can leave `latest` pointing at a
checkpoint whose data never reached the disk while its predecessor is already deleted. A save
therefore runs, in this order:

  1. flush: every writer fsyncs its shard files; rank 0 fsyncs the merged `ckpt-<step>.*` files
     and the directory (their entries);
  2. publish: `latest` is written to a temp file, fsynced, and renamed over `latest`;
  3. flush the directory (the rename itself);
  4. prune checkpoints that `latest` no longer lists.

Every file operation goes through a `FileOps` object (`LocalFileOps` for a POSIX disk), and
every path through `tf.io.gfile`, so `directory` may be on any TensorFlow filesystem (`gs://`,
`s3://`, `hdfs://`, `ram://`). A remote directory gets `GFileOps`: no fsync exists there (its
flushes are no-ops: a closed object is stored) and rename is not atomic (a copy then a delete),
so step 2 writes `latest` whole, in one write, which an object store publishes atomically. The
checkpoint is complete before that write, so the order above still holds.

Hangs: a save and a restore are phases of the stall watchdog (`m6t_tf.parallel.watchdog`),
named "checkpoint save at step N" and "checkpoint restore of <prefix>": file operations are
`STORAGE` waits (limited in every run, with the time to move the checkpoint's bytes at the
watchdog's storage floor granted on top), barriers are `COLLECTIVES` waits. A worker stuck on a
hung filesystem therefore ends the run naming itself, instead of hanging every worker.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Optional

import numpy as np
import tensorflow as tf

from m6t_tf import errors
from m6t_tf import storage
from m6t_tf.errors import ConfigError
from m6t_tf.parallel import communicator as comm_lib
from m6t_tf.parallel import watchdog as watchdog_lib

LATEST = "latest"


class LocalFileOps:
  """The file operations of a checkpoint save on a local (POSIX) filesystem.

  Args:
    flush: fsync files and directories (True); False skips every flush (the behaviour of a
      filesystem without fsync, and the baseline of `tools/bench_checkpoint.py`).
  """

  #: `os.replace` is atomic: `latest` is published by a rename.
  atomic_rename = True

  def __init__(self, flush: bool = True):
    self.flush = flush

  def flush_file(self, path: str) -> None:
    """Forces `path`'s data and metadata to the disk."""
    if self.flush:
      fd = os.open(path, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)

  def flush_dir(self, path: str) -> None:
    """Forces the entries of directory `path` (files created, renamed or removed) to the disk."""
    if self.flush:
      fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
      try:
        os.fsync(fd)
      finally:
        os.close(fd)

  def replace(self, src: str, dst: str) -> None:
    """Renames `src` over `dst` atomically."""
    os.replace(src, dst)

  def remove(self, path: str) -> None:
    os.remove(path)


class GFileOps:
  """The file operations on a remote `tf.io.gfile` filesystem (object or cluster storage).

  There is no fsync: a file is stored when its writer closes it, so flushes are no-ops. Rename
  is not atomic (copy, then delete), so the checkpointer publishes `latest` with one whole
  write instead (`atomic_rename = False`).
  """

  atomic_rename = False

  def flush_file(self, path: str) -> None:
    del path

  def flush_dir(self, path: str) -> None:
    del path

  def replace(self, src: str, dst: str) -> None:
    tf.io.gfile.rename(src, dst, overwrite=True)

  def remove(self, path: str) -> None:
    tf.io.gfile.remove(path)


def file_ops_for(directory: str):
  """`LocalFileOps()` for a local path, `GFileOps()` for any other TensorFlow filesystem."""
  return LocalFileOps() if storage.is_local(directory) else GFileOps()


def step_of(prefix: str) -> int:
  """The step of checkpoint `prefix` (`.../ckpt-<step>`)."""
  return int(prefix.rsplit("-", 1)[-1])


class Checkpointer:
  """Saves and restores `entries` ({key: variable}) as described in the module docstring.

  Args:
    directory: where `ckpt-<step>.{index,data-*}` and `latest` go (shared by all workers).
    entries: every variable to save, by stable key. Expert shards are the variables that
      carry the layers' expert mark (`communicator.is_expert_sharded`: expert weights and
      their optimizer slots); every other entry is replicated.
    ctx: the worker context (rank, expert_index, data_index, expert_group_size, barrier).
    num_experts: E (global); expert variables have leading dimension E / expert_group_size.
    max_to_keep: older checkpoints are deleted after a successful save (>= 1: the newest is
      always kept).
    file_ops: the file operations (flush, rename, remove); by default `file_ops_for(directory)`.
    watchdog: the `StallWatchdog` told about each wait of a save or restore (default: off).
  """

  def __init__(self, directory: str, entries: dict, *, ctx, num_experts: int = 0,
               max_to_keep: int = 3, file_ops=None, watchdog=None):
    self.directory = directory
    self.entries = entries
    self.ctx = ctx
    self.num_experts = num_experts
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
      # `kept[-0:]` is the whole list: 0 would keep every checkpoint, not none.
      raise ValueError(f"max_to_keep={max_to_keep!r} must be an integer >= 1")
    self.max_to_keep = max_to_keep
    self.fs = file_ops or file_ops_for(directory)
    self.watchdog = watchdog or watchdog_lib.OFF
    #: Test hook called after this worker wrote its shard, before the merge publishes it.
    self.before_merge = lambda step: None
    #: Test hook called on rank 0 after `latest` was published and flushed, before pruning.
    self.before_prune = lambda step: None
    #: Test hook called by `restore` before it reads the checkpoint.
    self.before_read = lambda prefix: None
    if ctx.rank == 0 and storage.isdir(directory):
      # Shards of a save that a crash interrupted were never published: drop them.
      for name in storage.listdir(directory):
        if name.startswith("tmp-"):
          storage.rmtree(os.path.join(directory, name))
    d = getattr(ctx, "expert_group_size", 1)
    self.expert_keys = {k for k, v in entries.items() if comm_lib.is_expert_sharded(v)}
    for k in self.expert_keys:
      shape = entries[k].shape
      if num_experts and (not shape or shape[0] * d != num_experts):
        raise ValueError(f"checkpoint entry {k!r} has shape {shape}; an expert shard must be "
                         f"[E/D = {num_experts}/{d}, ...]")

  # -- layout -------------------------------------------------------------------------------

  def _slice(self, key: str) -> str:
    """SaveV2/RestoreV2 `shape_and_slices` of this worker's part of `key` ('' = whole)."""
    if key not in self.expert_keys:
      return ""
    shape = list(self.entries[key].shape)
    e = shape[0]
    start = getattr(self.ctx, "expert_index", 0) * e
    global_shape = [e * getattr(self.ctx, "expert_group_size", 1)] + shape[1:]
    spec = [f"{start},{e}"] + ["-"] * (len(shape) - 1)
    return " ".join(str(s) for s in global_shape) + " " + ":".join(spec)

  def _writes(self, key: str) -> bool:
    if key in self.expert_keys:
      return getattr(self.ctx, "data_index", 0) == 0
    return self.ctx.rank == 0

  def share_bytes(self) -> int:
    """Bytes of this worker's entries (its expert slices, every replicated variable): what it
    reads at a restore, and at most what it writes at a save."""
    return sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size
               for v in self.entries.values())

  def total_bytes(self) -> int:
    """Bytes of the whole checkpoint (every expert of every worker)."""
    d = getattr(self.ctx, "expert_group_size", 1)
    return sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size
               * (d if k in self.expert_keys else 1) for k, v in self.entries.items())

  def _allowance_s(self, reading: bool) -> float:
    """The watchdog's extra time for a save (`reading=False`) or a restore: this worker's bytes;
    for a save without atomic rename, all of them (the merge copies every shard)."""
    nbytes = self.share_bytes() if reading or self.fs.atomic_rename else self.total_bytes()
    return watchdog_lib.allowance_for_bytes(nbytes)

  # -- save ---------------------------------------------------------------------------------

  def save(self, step: int) -> str:
    """Writes `ckpt-<step>` (collective: every worker must call it); returns its prefix."""
    with self.watchdog.phase(f"checkpoint save at step {step}", watchdog_lib.STORAGE,
                             allowance_s=self._allowance_s(reading=False)):
      return self._save(step)

  def _waiting_on(self, kind: str) -> None:
    self.watchdog.enter(kind)

  def _save(self, step: int) -> str:
    tmp = os.path.join(self.directory, f"tmp-{step}")
    final = os.path.join(self.directory, f"ckpt-{step}")
    if self.ctx.rank == 0:
      storage.rmtree(tmp)
      storage.makedirs(tmp)
    self._waiting_on(watchdog_lib.COLLECTIVES)
    self.ctx.barrier()
    self._waiting_on(watchdog_lib.STORAGE)
    keys = sorted(k for k in self.entries if self._writes(k))
    shard_prefix = os.path.join(tmp, f"shard-{self.ctx.rank:05d}")
    if keys:
      tf.raw_ops.SaveV2(prefix=shard_prefix, tensor_names=keys,
                        shape_and_slices=[self._slice(k) for k in keys],
                        tensors=[tf.convert_to_tensor(self.entries[k]) for k in keys])
      # Each writer flushes its own shard: on a shared filesystem only the host that wrote the
      # data can force it out of its cache.
      self._flush_files(tmp, os.path.basename(shard_prefix) + ".")
    self.before_merge(step)
    self._waiting_on(watchdog_lib.COLLECTIVES)
    self.ctx.barrier()
    self._waiting_on(watchdog_lib.STORAGE)
    if self.ctx.rank == 0:
      shards = sorted({os.path.join(tmp, f[: f.index(".")]) for f in storage.listdir(tmp)
                       if f.endswith(".index")})
      tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=shards, destination_prefix=final,
                                    delete_old_dirs=False)
      # Merging renames the shards' data into place and writes a new index: flush both, then
      # the directory entries, before `latest` may name them.
      self._flush_files(self.directory, os.path.basename(final) + ".")
      self.fs.flush_dir(self.directory)
      self._write_latest(step)
      self.before_prune(step)
      storage.rmtree(tmp)
      self._prune()
    self._waiting_on(watchdog_lib.COLLECTIVES)
    self.ctx.barrier()
    return final

  def _flush_files(self, folder: str, prefix: str) -> None:
    for name in sorted(storage.listdir(folder)):
      if name.startswith(prefix):
        self.fs.flush_file(os.path.join(folder, name))

  def _write_latest(self, step: int) -> None:
    """Publishes `step`: `latest` written whole to a temp file, flushed, renamed into place,
    and the rename flushed (so that pruning never runs ahead of a durable `latest`). Without
    an atomic rename (`GFileOps`), `latest` itself is written whole, in one write."""
    path = os.path.join(self.directory, LATEST)
    kept = [s for s in self.steps() if s != step] + [step]
    content = json.dumps({"latest": step, "all": kept[-self.max_to_keep:]})
    if not self.fs.atomic_rename:
      storage.write_text(path, content)
      return
    tmp = f"{path}.tmp-{os.getpid()}"
    storage.write_text(tmp, content)
    self.fs.flush_file(tmp)
    self.fs.replace(tmp, path)
    self.fs.flush_dir(self.directory)

  def _prune(self) -> None:
    keep = set(self.steps())
    for name in sorted(storage.listdir(self.directory)):
      if name.startswith("ckpt-"):
        step = name[len("ckpt-"):].split(".")[0]
        if step.isdigit() and int(step) not in keep:
          self.fs.remove(os.path.join(self.directory, name))

  # -- restore ------------------------------------------------------------------------------

  def _read_latest(self) -> Optional[dict]:
    path = os.path.join(self.directory, LATEST)
    if not storage.exists(path):
      return None
    return json.loads(storage.read_text(path))

  def steps(self) -> list[int]:
    pointer = self._read_latest()
    return list(pointer["all"]) if pointer else []

  def latest(self) -> Optional[str]:
    """Prefix of the newest complete checkpoint, or None."""
    pointer = self._read_latest()
    return os.path.join(self.directory, f"ckpt-{pointer['latest']}") if pointer else None

  def restore(self, prefix: str) -> None:
    """Assigns every entry from `prefix`, reading this worker's expert slices."""
    with self.watchdog.phase(f"checkpoint restore of {prefix}", watchdog_lib.STORAGE,
                             allowance_s=self._allowance_s(reading=True)):
      self.before_read(prefix)
      self._restore(prefix)

  def _restore(self, prefix: str) -> None:
    # Not tf.train.load_checkpoint: it asks isdir(prefix) first, which the in-memory ram://
    # filesystem answers True for any prefix of a file name.
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    stored = reader.get_variable_to_shape_map()
    missing = sorted(k for k in self.entries if k not in stored)
    if missing:
      raise ValueError(f"checkpoint {prefix} lacks {len(missing)} entries of this model, e.g. "
                       f"{missing[:3]}; was it written by a different config?")
    keys = sorted(self.entries)
    for k in keys:
      want = list(self.entries[k].shape)
      have = list(stored[k])
      if k in self.expert_keys:
        want = [want[0] * getattr(self.ctx, "expert_group_size", 1)] + want[1:]
      if want != have:
        raise ValueError(f"checkpoint entry {k!r} has global shape {have}, this model needs "
                         f"{want}")
    values = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=keys,
                                  shape_and_slices=[self._slice(k) for k in keys],
                                  dtypes=[tf.as_dtype(self.entries[k].dtype) for k in keys])
    for k, value in zip(keys, values):
      self.entries[k].assign(value)


def check_model_dir(model_dir: str) -> None:
  """Fails at start-up, not at the first checkpoint, when `model_dir` cannot be written (on
  any TensorFlow filesystem: `storage.check_writable`)."""
  try:
    storage.check_writable(model_dir)
  except (OSError, tf.errors.OpError) as e:
    why = e.strerror if isinstance(e, OSError) and e.strerror else errors.one_line(e)
    if isinstance(e, tf.errors.UnimplementedError):
      why += "; s3://, hdfs:// and az:// need the tensorflow-io package (gs:// is built in)"
    raise ConfigError(f"model_dir={model_dir!r} is not writable ({why}); choose another "
                      f"--model_dir or free space there") from e


def check_free_space(model_dir: str, entries: dict, keep: int) -> None:
  """Fails at start-up when `model_dir` cannot hold the checkpoints the run will keep (a local
  disk only: remote storage reports no free space)."""
  if not storage.is_local(model_dir):
    return
  need = sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in entries.values())
  free = shutil.disk_usage(model_dir).free
  # keep + 1: a new checkpoint is complete before the oldest is deleted.
  if free < need * (keep + 1):
    raise ConfigError(f"model_dir={model_dir!r} has {free / 2**20:,.0f} MiB free, but "
                      f"{keep + 1} checkpoints of {need / 2**20:,.0f} MiB (this worker's share) "
                      f"need {need * (keep + 1) / 2**20:,.0f} MiB; free space or lower "
                      f"train.keep_checkpoints")
