r"""Starts an M6-T job on many workers: `python launch/run.py ...` = `python -m m6t_tf.launch ...`.

The launcher lives in the package (m6t_tf/launch.py), so that installing the package installs
it; this script is the same command for a checkout, e.g.

  python launch/run.py --gin_file=gin/1T.gin --gin_file=gin/layouts/1x480.gin \
      --num_workers=480 --hostfile=hosts.txt --backend=mpi --dry_run
"""

from m6t_tf import cli
from m6t_tf import launch

if __name__ == "__main__":
  cli.run(launch.main)
