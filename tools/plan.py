r"""Plans an M6-T run before booking the GPUs: parameters, memory per worker, FLOPs, traffic.

Pure arithmetic on the gin config (no weights are built; `m6t_tf.run.planning` documents every
formula, the activation model and the JSON keys):

  python tools/plan.py --gin_file=gin/1T.gin --gin_file=gin/layouts/1x480.gin
  python tools/plan.py --gin_file=gin/base.gin --num_workers=8 --format=json
  python tools/plan.py --gin_file=gin/10B.gin --gin_file=gin/layouts/1x16.gin \
      --gin_bindings="MoEConfig.k=2" --gpu_memory_gb=16

--num_workers defaults to the layout's mesh_data × mesh_expert (1 without a layout); without a
layout, all workers are on the expert axis. --patch_dim is the width of one image patch's
input: 768 = 16×16×3 pixels of our 64×64 images (the paper used precomputed ResNet features;
pass their width for train.image_mode='features'). Exit status 0 whether or not the config fits
(the verdict says); 2 for a config or flag error.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from m6t_tf import cli

from m6t_tf import errors

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config files (later ones override earlier ones).")
flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. \"MoEConfig.k=2\".")
flags.DEFINE_multi_string("gin_search_paths", ["."], "Folders searched for gin includes.")
flags.DEFINE_integer("num_workers", None, "Workers (one GPU each); default: the layout's "
                     "mesh_data × mesh_expert.", lower_bound=1)
flags.DEFINE_float("gpu_memory_gb", None, "Memory of one GPU in GiB; default: the layout's "
                   "DEVICE_MEMORY_GB, else 32 (V100-32GB).", lower_bound=0.0)
flags.DEFINE_integer("patch_dim", 768, "Width P of one patch's input: 16×16×3 = 768 pixels of a "
                     "64×64 image, or the width of precomputed patch features.", lower_bound=1)
flags.DEFINE_enum("alltoall_dtype", "auto", ["auto", "float16", "float32"],
                  "All-to-all payload dtype; auto = the layout's make_context.alltoall_dtype, "
                  "else the compute dtype (float16 under mixed precision).")
flags.DEFINE_enum("allreduce_dtype", "auto", ["auto", "float16", "float32"],
                  "Gradient allreduce dtype; auto = float16 when the layout sets "
                  "make_context.allreduce_compression = 'fp16', else float32.")
flags.DEFINE_enum("format", "table", ["table", "json"], "Output: a markdown table or JSON.")

_BYTES = {"float16": 2, "float32": 4}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.gin_file:
    raise app.UsageError("--gin_file is required, e.g. --gin_file=gin/1T.gin")
  from m6t_tf.run import planning

  try:
    result = planning.plan_from_gin(
        FLAGS.gin_file, FLAGS.gin_bindings, num_workers=FLAGS.num_workers,
        patch_dim=FLAGS.patch_dim, gpu_memory_gb=FLAGS.gpu_memory_gb,
        search_paths=FLAGS.gin_search_paths,
        alltoall_bytes_per_element=_BYTES.get(FLAGS.alltoall_dtype),
        allreduce_bytes_per_element=_BYTES.get(FLAGS.allreduce_dtype))
  except (ValueError, OSError) as e:
    # The planner is arithmetic on the config alone: every error it raises is the config's.
    raise errors.ConfigError(errors.one_line(e)) from e
  if FLAGS.format == "json":
    print(json.dumps(result, indent=2))
  else:
    name = " + ".join(os.path.basename(f) for f in FLAGS.gin_file)
    print(planning.markdown_table({name: result}))
  return 0


if __name__ == "__main__":
  cli.run(main)
