r"""Builds and starts the horovodrun / mpirun command of a training run: one process per GPU.

  python -m m6t_tf.launch --gin_file=gin/1T.gin --gin_file=gin/layouts/1x480.gin \
      --num_workers=480 --hostfile=hosts --backend=mpi --model_dir=/ckpt/1T --dry_run
  python -m m6t_tf.launch --gin_file=gin/demo.gin --gin_file=gin/layouts/1x2.gin \
      --num_workers=2 --hosts=localhost:2 --backend=gloo --model_dir=runs/demo2

Before anything starts, the config is checked against the worker count: the layout's
(data × expert) mesh must multiply to --num_workers and the experts must divide over the expert
axis — the errors a cluster would otherwise report as a hang in the first all-to-all. Then the
command is printed and run (unless --dry_run); the launcher exits with its exit status (128 + N
when it died of signal N), so a job script sees a failed rank as a failed job.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys

from absl import app
from absl import flags

from m6t_tf import cli
from m6t_tf.errors import ConfigError
from m6t_tf.parallel import watchdog

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin files passed to the trainer.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings passed to the trainer.")
flags.DEFINE_integer("num_workers", None, "Processes in total (one per GPU).")
flags.DEFINE_string("hosts", None, "host1:slots,host2:slots (default localhost:N).")
flags.DEFINE_string("hostfile", None, "A hostfile, one 'host slots=N' line per host.")
flags.DEFINE_enum("backend", "gloo", ["gloo", "mpi"], "horovodrun --gloo, or mpirun.")
flags.DEFINE_string("model_dir", None, "The trainer's --model_dir.")
flags.DEFINE_string("python", sys.executable, "Python interpreter on every host.")
flags.DEFINE_bool("dry_run", False, "Print the command and exit.")

# The environment every rank needs. NCCL_* matter on GPUs only and are harmless on CPUs. The
# stall inspector's settings (defaults set by `main`) end a job whose rank stopped answering.
FORWARDED_ENV = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME",
                 "NCCL_IB_DISABLE", "TF_CPP_MIN_LOG_LEVEL", "M6T_TF_LOGS",
                 "HOROVOD_FUSION_THRESHOLD", "HOROVOD_CYCLE_TIME", *watchdog.STALL_ENV_DEFAULTS)

# Under mpirun, Horovod's controller and CPU collectives are MPI's. Horovod picks MPI by default
# when it was built with it, but a HOROVOD_CONTROLLER=gloo left in the environment (horovodrun
# --gloo sets it) would make every rank wait for a Gloo rendezvous that never comes.
MPI_ENV = {"HOROVOD_CONTROLLER": "mpi", "HOROVOD_CPU_OPERATIONS": "mpi"}


def check_layout(gin_files, gin_bindings, num_workers: int) -> tuple[int, int]:
  """(data, expert) of the config's mesh, validated against `num_workers` and E."""
  import gin

  from m6t_tf.run import configurables
  gin.clear_config()
  configurables.parse(gin_files, gin_bindings, ["."])
  data = configurables.query("make_context.mesh_data", 1)
  expert = configurables.query("make_context.mesh_expert", 0)
  expert = expert or num_workers // max(data, 1)
  if data * expert != num_workers:
    raise ConfigError(
        f"the layout's mesh (data={data}) × (expert={expert}) = {data * expert} workers, but "
        f"--num_workers={num_workers}; pick a gin/layouts/*.gin file for {num_workers} workers")
  num_experts = configurables.query("MoEConfig.num_experts")
  if num_experts % expert:
    raise ConfigError(f"num_experts={num_experts} is not divisible by the expert axis "
                     f"({expert} workers); use a layout whose expert axis divides {num_experts}")
  return data, expert


def build_command(*, gin_files, gin_bindings, num_workers: int, hosts=None, hostfile=None,
                  backend: str = "gloo", model_dir=None, python: str = sys.executable) -> list[str]:
  """The launcher command line as a list of arguments."""
  if num_workers < 1:
    raise ConfigError(f"--num_workers={num_workers} must be >= 1")
  if hosts and hostfile:
    raise ConfigError("pass --hosts or --hostfile, not both")
  trainer = [python, "-m", "m6t_tf.train"]
  trainer += [f"--gin_file={f}" for f in gin_files]
  trainer += [f"--gin_bindings={b}" for b in gin_bindings]
  if model_dir:
    trainer.append(f"--model_dir={model_dir}")
  where = (["--hostfile", hostfile] if hostfile else ["-H", hosts or f"localhost:{num_workers}"])
  if backend == "gloo":
    horovodrun = shutil.which("horovodrun") or os.path.join(os.path.dirname(python), "horovodrun")
    return [horovodrun, "-np", str(num_workers), *where, "--gloo", *trainer]
  env = []
  for name in FORWARDED_ENV:
    if name in os.environ:  # Open MPI's -x of an unset variable is an error on some versions
      env += ["-x", name]
  for name, value in MPI_ENV.items():
    env += ["-x", f"{name}={value}"]
  # Horovod's recommended Open MPI flags: no core binding (TF manages its own threads), slot
  # mapping (one rank per GPU), TCP/shared-memory transport for control (NCCL carries the data).
  mpi = ["mpirun", "-np", str(num_workers), *where, "-bind-to", "none", "-map-by", "slot",
         "-mca", "pml", "ob1", "-mca", "btl", "^openib", *env]
  if os.geteuid() == 0:
    mpi.insert(1, "--allow-run-as-root")
  return [*mpi, *trainer]


def run_command(cmd: list[str]) -> int:
  """Runs `cmd`, passing SIGINT/SIGTERM on to it; its exit status (128 + N for signal N)."""
  proc = subprocess.Popen(cmd)

  def forward(signum, frame):
    del frame
    proc.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    code = proc.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  return 128 - code if code < 0 else code


def main(argv):
  del argv
  if not FLAGS.gin_file:
    raise app.UsageError("--gin_file is required")
  if not FLAGS.num_workers:
    raise app.UsageError("--num_workers is required")
  check_layout(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.num_workers)
  # Inherited by horovodrun's ranks, forwarded with -x by mpirun.
  stall = watchdog.set_stall_env_defaults()
  print(" ".join(f"{k}={v}" for k, v in stall.items()), flush=True)
  cmd = build_command(gin_files=FLAGS.gin_file, gin_bindings=FLAGS.gin_bindings,
                      num_workers=FLAGS.num_workers, hosts=FLAGS.hosts, hostfile=FLAGS.hostfile,
                      backend=FLAGS.backend, model_dir=FLAGS.model_dir, python=FLAGS.python)
  print(shlex.join(cmd), flush=True)
  if FLAGS.dry_run:
    return 0
  return run_command(cmd)


if __name__ == "__main__":
  cli.run(main)
