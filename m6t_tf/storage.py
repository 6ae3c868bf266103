"""File I/O under `model_dir` on any TensorFlow filesystem: a local disk, or cluster and object
storage (`gs://`, `s3://`, `hdfs://`, and `ram://` in tests) through `tf.io.gfile`.

Every file a run writes (trainer, checkpointer, evaluator, caption generator, exporter) goes
through here, or through TensorFlow ops that take any filesystem's paths (checkpoints,
summaries, `tf.saved_model.save`), never through Python's `open`/`os`: a `scheme://` path
handed to those names a local directory called `scheme:`. What differs on a remote path:

  * no fsync and no atomic rename (object stores copy then delete): a small file that must
    never be seen half written (`latest`, train_summary.json, eval.json) is written *whole*, in
    one write of its complete content, which an object store publishes atomically (one PUT);
    on a local disk it goes to a temp file renamed over the target, as before;
  * no free-space figure (`shutil.disk_usage` needs a mounted path): that check is skipped;
    the writability probe stays;
  * no append (`append_text` rewrites the object): per-step logs are buffered and appended at
    logging cadence (`logs._StepLog`).
"""

from __future__ import annotations

import os

import tensorflow as tf


def is_local(path: str) -> bool:
  """True for a plain path of the local (POSIX) filesystem, with fsync and atomic rename.

  Any `scheme://` path, `file://` included, goes through `tf.io.gfile` only.
  """
  return "://" not in path


def makedirs(path: str) -> None:
  tf.io.gfile.makedirs(path)


def exists(path: str) -> bool:
  return tf.io.gfile.exists(path)


def isdir(path: str) -> bool:
  return tf.io.gfile.isdir(path)


def listdir(path: str) -> list[str]:
  """Entry names of directory `path` (object stores mark sub-directories with a trailing /)."""
  return [name.rstrip("/") for name in tf.io.gfile.listdir(path)]


def rmtree(path: str) -> None:
  """Deletes directory `path` and everything under it; nothing there is not an error."""
  try:
    tf.io.gfile.rmtree(path)
  except tf.errors.NotFoundError:
    pass


def read_text(path: str) -> str:
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` (replacing it), in one write."""
  if path.startswith("ram://") and tf.io.gfile.exists(path):
    # TensorFlow's in-memory test filesystem keeps the old content of a file opened with "w"
    # (its writes append); every other filesystem replaces it.
    tf.io.gfile.remove(path)
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(text)


def append_text(path: str, text: str) -> None:
  """Appends `text` to `path` (created if missing). Object stores have no append: TensorFlow's
  filesystems emulate it by rewriting the object, so callers append at logging cadence only."""
  with tf.io.gfile.GFile(path, "a") as f:
    f.write(text)


def write_whole(path: str, text: str) -> None:
  """Publishes `text` at `path` so that a reader sees the old content or the new, never a part:
  temp file + atomic rename on a local disk, one whole write elsewhere (an object store's PUT
  is atomic, and its rename is not)."""
  if not is_local(path):
    write_text(path, text)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  write_text(tmp, text)
  os.replace(tmp, path)


#: Schemes TensorFlow itself does not serve: the `tensorflow-io` package registers them when
#: imported (gs:// is built in).
PLUGIN_SCHEMES = ("s3", "hdfs", "viewfs", "har", "az", "http", "https")


def check_writable(path: str) -> None:
  """Creates directory `path` and writes and deletes a 4 KiB probe file in it.

  Raises:
    OSError or tf.errors.OpError: `path` cannot be created or written.
  """
  if path.split("://", 1)[0] in PLUGIN_SCHEMES and "://" in path:
    try:
      import tensorflow_io  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      pass  # the write below fails with "File system scheme ... not implemented"
  makedirs(path)
  probe = os.path.join(path, f".write-test-{os.getpid()}")
  with tf.io.gfile.GFile(probe, "wb") as f:
    f.write(b"\0" * 4096)
  tf.io.gfile.remove(probe)
