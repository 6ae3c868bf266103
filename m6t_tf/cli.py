"""What every command-line entry point shares: one-line errors for bad input, a quiet start-up.

**User errors.** A configuration or input error is the user's to fix, so a CLI prints one line
to stderr (what is wrong, where, the fix) and exits with status 2, without a traceback. These
count as user errors, deliberately and nothing else:

* `ConfigError` (`m6t_tf.errors`), raised by our own checks of flags, gin bindings, data and paths, before any
  compute. It subclasses ValueError, so library callers that catch ValueError keep working;
* absl's `app.UsageError` and flag-parsing errors; argparse errors (`ArgumentParser` below).

Everything else keeps its traceback and exit status 1, plain ValueError and FileNotFoundError
included: TensorFlow, Keras and NumPy raise ValueError for bugs (a shape mismatch inside a
layer), and a one-line message would hide where a genuine crash came from. So a check a user
can act on raises ConfigError, never a bare ValueError.

Under horovodrun / mpirun every rank runs the same checks and usually raises the same error:
each rank prints its line once, prefixed with its rank, and exits 2, so the launcher ends the
whole job with a non-zero status.

**Quiet start-up.** Importing TensorFlow 2.21 prints, whatever `TF_CPP_MIN_LOG_LEVEL` says:

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... port.cc:153] oneDNN custom operations are on. ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    E0000 ... cuda_platform.cc:52] failed call to cuInit: ... (303)     (first device query)

They are C++ log lines written while TensorFlow's shared libraries load (static initialisers)
and when the devices are first listed, before anything could call `absl::InitializeLog()`;
until then absl writes every message to stderr, ignoring TensorFlow's level variable and
absl's own threshold, and no environment variable reaches it (absl has none; none of these
lines comes from grpc or glog, so their variables do not apply either). Lines logged later do
honour `TF_CPP_MIN_LOG_LEVEL`.

`quiet_tensorflow()` therefore sets `TF_CPP_MIN_LOG_LEVEL=3` unless the user set it (2 would
still let through ERROR-level notices such as "oneDNN supports DT_INT32 only on platforms with
AVX-512. Falling back to the default Eigen-based implementation", logged when the first step
is traced; TensorFlow's real errors reach Python as exceptions carrying their message, and
FATAL lines always print). Then it imports TensorFlow and lists the devices with file
descriptor 2 pointed at a temporary file, and writes back every line that is not one of the
known notices above (`_NOISE`), so an error during the import still shows.
`TF_ENABLE_ONEDNN_OPTS=0` would silence the oneDNN line too, but it moves the CPU kernels from
oneDNN to Eigen, which changes results (a 5-step tiny.gin run: the first four losses equal,
the fifth 9.5e-7 apart) and speed, so it is left alone. `M6T_TF_LOGS=1` (or `--verbosity=0`
on the absl entry points) shows everything again, for debugging.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from typing import Callable, Iterator

from m6t_tf.errors import ConfigError
from m6t_tf.errors import one_line

VERBOSE_ENV = "M6T_TF_LOGS"
EXIT_USER_ERROR = 2


# TensorFlow's start-up notices (module docstring). A cuInit failure is a notice only on a
# machine without a CUDA driver, which the cudart_stub line says; elsewhere it is kept.
_NOISE = tuple(re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR$",
    r"\] oneDNN custom operations are on\. ",
    r"\] Could not find cuda drivers on your machine, GPU will not be used\.$",
    r"\] Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory for "
    r"plugin cu\w+ when one has already been registered$",
    r"\] TF-TRT Warning: Could not find TensorRT$",
    r"\] This TensorFlow binary is optimized to use available CPU instructions in "
    r"performance-critical operations\.$",
    r"^To enable the following instructions: .*, in other operations, rebuild TensorFlow "
    r"with the appropriate compiler flags\.$",
))
_NO_DRIVER = re.compile(r"\] Could not find cuda drivers on your machine")
_CUINIT = re.compile(r"^E\d{4} [\d:. ]+\d+ cuda_platform\.cc:\d+\] failed call to cuInit: ")


def tensorflow_logs_wanted() -> bool:
  """True when the user asked to see TensorFlow's own log lines (`M6T_TF_LOGS=1`)."""
  return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


def without_noise(text: str) -> str:
  """`text` minus TensorFlow's known start-up notices (every other line is kept, in order)."""
  lines = text.splitlines(keepends=True)
  no_driver = any(_NO_DRIVER.search(line) for line in lines)
  kept = [line for line in lines
          if not any(p.search(line.rstrip("\n")) for p in _NOISE)
          and not (no_driver and _CUINIT.search(line))]
  return "".join(kept)


@contextlib.contextmanager
def _stderr_filtered() -> Iterator[None]:
  """Points fd 2 at a temporary file; afterwards writes back what is not a known notice."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      kept = without_noise(tmp.read().decode("utf-8", errors="replace"))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


def quiet_tensorflow(verbose: bool | None = None) -> None:
  """Imports TensorFlow without its start-up notices (see the module docstring).

  Call it before anything imports TensorFlow; afterwards it does nothing.

  Args:
    verbose: show TensorFlow's lines; None = `tensorflow_logs_wanted()`.
  """
  if verbose is None:
    verbose = tensorflow_logs_wanted()
  if verbose or "tensorflow" in sys.modules:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  with _stderr_filtered():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.list_physical_devices()  # the cuInit notice comes with the first device query


def _rank_prefix() -> str:
  from m6t_tf.parallel import launch_env  # no TensorFlow behind it
  if launch_env.world_size() <= 1:
    return ""
  for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
    if os.environ.get(name, "").isdigit():
      return f"rank {os.environ[name]}: "
  return ""


def report(prog: str, error: BaseException) -> int:
  """Prints `error` as one line on stderr; returns the exit status for a user error."""
  sys.stdout.flush()
  print(f"{_rank_prefix()}{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
  return EXIT_USER_ERROR


def _user_errors() -> tuple[type[BaseException], ...]:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  return (ConfigError, app.UsageError, flags.Error)


def _prog() -> str:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  if spec is not None and spec.name and spec.name != "__main__":
    return "python -m " + spec.name.removesuffix(".__main__")
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "m6t_tf"


def run(main: Callable[[list[str]], int | None]) -> None:
  """`absl.app.run(main)` with the behaviour of the module docstring; never returns.

  Flags are parsed by absl as usual; a flag error, `UsageError` or `ConfigError` prints one
  line and exits 2. TensorFlow is imported quietly before `main` runs unless the user asked
  for its logs (`M6T_TF_LOGS=1`, or an explicit `--verbosity` of 0 or more).
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  prog = _prog()

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      sys.exit(report(prog, e))

  def guarded(argv):
    verbosity = flags.FLAGS["verbosity"]
    quiet_tensorflow(verbose=tensorflow_logs_wanted()
                     or (verbosity.present and verbosity.value >= 0))
    try:
      return main(argv)
    except _user_errors() as e:
      return report(prog, e)

  app.run(guarded, flags_parser=parse_flags)


def run_argparse(main: Callable[[list[str] | None], int | None],
                 argv: list[str] | None = None) -> int:
  """Runs an argparse `main(argv)`; a user error prints one line and gives 2 (returned).

  Use with `ArgumentParser`, whose errors are ConfigErrors: `sys.exit(cli.run_argparse(main))`.
  TensorFlow is imported quietly first (unless `M6T_TF_LOGS=1`).
  """
  quiet_tensorflow()
  try:
    return main(argv) or 0
  except _user_errors() as e:
    return report(_prog(), e)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one-line `ConfigError`s (argparse prints usage and exits 2)."""

  def error(self, message):
    raise ConfigError(f"{message} (see --help)")

