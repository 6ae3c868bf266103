#!/usr/bin/env bash
# The first thing to run on a GPU node, after `make setup GPU=1` (docs/gpu.md "The NCCL
# build"). A minute or two; one verdict line per check, then the overall verdict:
#
#   bash tools/gpu_check.sh               # every GPU of this node (N = number of GPUs)
#   bash tools/gpu_check.sh --np=4        # 4 ranks for the multi-rank checks
#   bash tools/gpu_check.sh --cpu         # the same steps on the CPU with Gloo (2 ranks): tries
#                                         # the script where there is no GPU
#   bash tools/gpu_check.sh --build-only  # only the build checks (what `make gpu-build-check` runs)
#   (--steps=K trains K steps instead of 2; --keep keeps the logs and model dirs and prints where)
#
# Checks, in order:
#   build       horovodrun --check-build lists NCCL; hvd.nccl_built(); m6t_tf imports
#   gpu         nvidia-smi and TensorFlow see a GPU (else: exit 2 here, nothing else can run)
#   train-1     two training steps of gin/base.gin shrunk by gin/tiny.gin, mixed precision, 1 rank
#   train-N     the same on N ranks under horovodrun (experts sharded, FP16 all-to-all and
#               allreduce as the paper's layouts), one GPU per rank
#   alltoall    hvd.alltoall of GPU tensors over N ranks (NCCL): exact result, and bandwidth
#
# Exit status: 0 every check passed, 1 a check failed, 2 no GPU visible (or bad arguments).
# PYTHON (default .venv/bin/python) picks the venv; its horovodrun is used.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
HOROVODRUN=$(dirname "$PY")/horovodrun
MODE=gpu
NP=""
STEPS=2
BUILD_ONLY=0
KEEP=0

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }  # the comment above
for arg in "$@"; do
  case $arg in
    --cpu) MODE=cpu ;;
    --np=*) NP=${arg#--np=} ;;
    --steps=*) STEPS=${arg#--steps=} ;;
    --build-only) BUILD_ONLY=1 ;;
    --keep) KEEP=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -n $NP && ! $NP =~ ^[1-9][0-9]*$ ]]; then
  echo "gpu_check: --np=$NP is not a positive number of ranks, e.g. --np=8" >&2; exit 2
fi
if [[ ! $STEPS =~ ^[1-9][0-9]*$ ]]; then
  echo "gpu_check: --steps=$STEPS is not a positive number of steps, e.g. --steps=2" >&2; exit 2
fi
if [[ ! -x $PY ]]; then
  echo "gpu_check: no Python at $PY: run \`make setup GPU=1\` first, or set PYTHON=" >&2; exit 2
fi

WORK=$(mktemp -d -t gpu_check.XXXXXX)
[[ $KEEP == 1 ]] || trap 'rm -rf "$WORK"' EXIT
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# --cpu hides any GPU, so that what runs is what a GPU-less machine runs.
[[ $MODE == cpu ]] && export CUDA_VISIBLE_DEVICES=""

FAILED=()
PASSED=0
verdict() {  # verdict PASS|FAIL|SKIP NAME DETAIL...
  local status=$1 name=$2; shift 2
  printf '%-4s %-9s %s\n' "$status" "$name" "$*"
  case $status in PASS) PASSED=$((PASSED + 1)) ;; FAIL) FAILED+=("$name") ;; esac
}
show_log() { sed 's/^/    | /' "$1" | tail -n "${2:-15}"; }
finish() {
  [[ $KEEP == 1 ]] && echo "     (logs and model dirs kept in $WORK)"
  if ((${#FAILED[@]})); then
    echo "VERDICT: FAIL (${FAILED[*]}); logs above"
    exit 1
  fi
  local what=$MODE; [[ $BUILD_ONLY == 1 ]] && what="$MODE, build only"
  echo "VERDICT: PASS ($PASSED checks, $what)"
  exit 0
}

# --- build ------------------------------------------------------------------------------------
if [[ ! -x $HOROVODRUN ]]; then
  verdict FAIL build "no horovodrun beside $PY: run \`make setup GPU=1\`"
  finish
fi
"$HOROVODRUN" --check-build 2>&1 | sed -n '/^Horovod v/,$p' > "$WORK/check_build.txt"
if [[ $MODE == cpu ]]; then
  if grep -q '\[X\] Gloo' "$WORK/check_build.txt"; then
    verdict PASS build "horovodrun --check-build: Gloo (NCCL not needed with --cpu)"
  else
    verdict FAIL build "horovodrun --check-build does not list Gloo"; show_log "$WORK/check_build.txt" 30
  fi
elif grep -q '\[X\] NCCL' "$WORK/check_build.txt"; then
  verdict PASS build "horovodrun --check-build lists NCCL"
else
  verdict FAIL build "horovodrun --check-build does not list NCCL: \`make setup GPU=1\` builds it"
  show_log "$WORK/check_build.txt" 30
fi
# hvd.init() alone is one rank; nccl_built() is the NCCL version code the library was built
# with (0 without NCCL).
if "$PY" - > "$WORK/import.txt" 2>&1 <<'EOF'
import horovod.tensorflow as hvd
import m6t_tf  # noqa: F401
hvd.init()
print(f"nccl_built={hvd.nccl_built()} cuda_built={hvd.cuda_built()} gloo_built={hvd.gloo_built()} "
      f"mpi_built={hvd.mpi_built()} size={hvd.size()}")
EOF
then
  built=$(tail -n 1 "$WORK/import.txt")
  if [[ $MODE == cpu || ($built == *"cuda_built=True"* && $built != *"nccl_built=0 "*) ]]; then
    verdict PASS import "horovod.tensorflow and m6t_tf import; $built"
  else
    verdict FAIL import "Horovod imports but was built without CUDA/NCCL: $built"
  fi
else
  verdict FAIL import "import horovod.tensorflow / m6t_tf failed:"; show_log "$WORK/import.txt"
fi
[[ $BUILD_ONLY == 1 ]] && finish

# --- gpu --------------------------------------------------------------------------------------
if [[ $MODE == gpu ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    SMI=$(nvidia-smi -L 2>&1 | head -n 16)
    SMI_STATUS=$([[ $SMI == GPU* ]] && echo "$(grep -c '^GPU' <<< "$SMI") GPU(s)" || echo "${SMI%%$'\n'*}")
  else
    SMI_STATUS="no nvidia-smi on PATH (no NVIDIA driver on this machine)"
  fi
  NGPU=$("$PY" -c 'import tensorflow as tf; print(len(tf.config.list_physical_devices("GPU")))' \
         2> "$WORK/tf_gpu.txt" | tail -n 1)
  if [[ ! $NGPU =~ ^[0-9]+$ || $NGPU == 0 ]]; then
    echo "FAIL gpu       nvidia-smi: $SMI_STATUS; TensorFlow sees ${NGPU:-no} GPU(s)"
    grep -i "cuda\|gpu\|driver" "$WORK/tf_gpu.txt" | sed 's/^/    | /' | tail -n 5
    echo "VERDICT: no GPU visible: nvidia-smi: $SMI_STATUS; TensorFlow: ${NGPU:-0} GPUs." \
         "Run this on a GPU node (or --cpu to try the steps on the CPU)."
    exit 2
  fi
  verdict PASS gpu "nvidia-smi: $SMI_STATUS; TensorFlow sees $NGPU GPU(s)"
  NP=${NP:-$NGPU}
  if ((NP > NGPU)); then
    verdict FAIL gpu "--np=$NP ranks but $NGPU GPUs: one rank per GPU"; finish
  fi
else
  verdict SKIP gpu "--cpu: CUDA_VISIBLE_DEVICES='' (Gloo on the CPU)"
  NP=${NP:-2}
fi

# --- train-1, train-N -------------------------------------------------------------------------
if [[ ! -f $ROOT/.data/demo/metadata.json ]]; then
  echo "     (building the demo dataset first: tools/build_demo_data.py, as \`make data\`)"
  "$PY" tools/build_demo_data.py > "$WORK/data.txt" 2>&1 || {
    verdict FAIL data "tools/build_demo_data.py failed:"; show_log "$WORK/data.txt"; finish; }
fi
# One GPU per rank: the trainer pins the local rank's GPU itself before TensorFlow's runtime
# starts (m6t_tf.parallel.horovod.place_process), and refuses more ranks than GPUs per node.
# base.gin at tiny.gin's sizes, with base.gin's mixed precision back on.
TRAIN_ARGS=(--gin_file=gin/base.gin --gin_file=gin/tiny.gin
            --gin_bindings=train.mixed_precision=True "--gin_bindings=train.num_steps=$STEPS")

train_check() {  # train_check NAME NP
  local name=$1 np=$2 dir=$WORK/$1 cmd experts
  # Every rank on the expert axis: E must split over the ranks (tiny.gin has 8 experts).
  experts=$(( (8 + np - 1) / np * np ))
  local args=("${TRAIN_ARGS[@]}" "--gin_bindings=NUM_EXPERTS=$experts" "--model_dir=$dir")
  if ((np == 1)); then
    cmd=("$PY" -m m6t_tf.train "${args[@]}")
  else
    args+=("--gin_bindings=make_context.alltoall_dtype='float16'"
           "--gin_bindings=make_context.allreduce_compression='fp16'")
    cmd=("$HOROVODRUN" -np "$np" -H "localhost:$np" --gloo "$PY" -m m6t_tf.train
         "${args[@]}")
  fi
  local t0=$SECONDS
  if "${cmd[@]}" > "$WORK/$name.txt" 2>&1 && [[ -f $dir/losses.jsonl ]]; then
    local last
    last=$("$PY" -c '
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
bad = [r for r in rows if not math.isfinite(r["loss"])]
print(("nonfinite " if bad else "") + " ".join("%.4f" % r["loss"] for r in rows))' \
      "$dir/losses.jsonl")
    if [[ $last == nonfinite* || -z $last ]]; then
      verdict FAIL "$name" "$np rank(s): non-finite or no losses: $last"
    else
      verdict PASS "$name" "$np rank(s), E=$experts, mixed precision: losses $last ($((SECONDS - t0)) s)"
    fi
  else
    verdict FAIL "$name" "$np rank(s) failed (exit or no losses.jsonl):"; show_log "$WORK/$name.txt" 25
  fi
}
train_check train-1 1
if ((NP >= 2)); then
  train_check "train-$NP" "$NP"
else
  verdict SKIP train-N "1 GPU: the multi-rank run needs --np=2 or more"
fi

# --- alltoall ---------------------------------------------------------------------------------
cat > "$WORK/alltoall.py" <<'EOF'
"""hvd.alltoall of a float16 tensor on each rank's GPU (NCCL) or CPU (Gloo, --cpu)."""
import os
import time

import tensorflow as tf
import horovod.tensorflow as hvd

gpus = tf.config.list_physical_devices("GPU")
local = int(os.environ.get("HOROVOD_LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
if gpus:
  tf.config.set_visible_devices(gpus[local], "GPU")
  tf.config.experimental.set_memory_growth(gpus[local], True)
hvd.init()
n, rank = hvd.size(), hvd.rank()
device = "/GPU:0" if gpus else "/CPU:0"
mib = int(os.environ.get("ALLTOALL_MIB", "64" if gpus else "8"))
iters = int(os.environ.get("ALLTOALL_ITERS", "20" if gpus else "5"))
rows = (mib * 2**20 // 2 // 1024) // n * n        # float16 [rows, 1024], rows a multiple of n
with tf.device(device):
  # Row block j goes to rank j and holds n * rank + j: exact in float16 up to 45 ranks.
  block = tf.repeat(tf.range(n) + n * rank, rows // n)[:, None]
  x = tf.tile(tf.cast(block, tf.float16), [1, 1024])
  y = hvd.alltoall(x)                              # warm-up (NCCL communicator set-up)
  got = tf.reshape(y[:, 0], [n, rows // n])
  want = tf.cast(tf.repeat(n * tf.range(n)[:, None] + rank, rows // n, axis=1), tf.float16)
  exact = bool(tf.reduce_all(got == want))
  _ = y.numpy()
  t0 = time.perf_counter()
  for _ in range(iters):
    y = hvd.alltoall(x)
  _ = y.numpy()                                    # waits for the last exchange
  dt = (time.perf_counter() - t0) / iters
nbytes = rows * 1024 * 2
# nccl-tests' definitions: algbw = bytes per rank / time; busbw = algbw * (n - 1) / n (the share
# that crosses the links).
algbw = nbytes / dt / 1e9
stats = hvd.allgather(tf.constant([[algbw, float(exact)]], tf.float64)).numpy()
if rank == 0:
  print(f"RESULT exact={bool(stats[:, 1].all())} device={y.device.split('device:')[-1]} mib={mib} "
        f"ms={dt * 1e3:.2f} algbw={stats[:, 0].min():.2f} busbw={stats[:, 0].min() * (n - 1) / n:.2f}")
EOF
if ((NP >= 2)); then
  if "$HOROVODRUN" -np "$NP" -H "localhost:$NP" --gloo "$PY" "$WORK/alltoall.py" \
       > "$WORK/alltoall.txt" 2>&1 && grep -q 'RESULT ' "$WORK/alltoall.txt"; then
    r=$(grep -o 'RESULT .*' "$WORK/alltoall.txt" | tail -n 1)   # horovodrun prefixes [0]<stdout>:
    declare -A kv=()
    for f in ${r#RESULT }; do kv[${f%%=*}]=${f#*=}; done
    detail="$NP ranks, ${kv[mib]} MiB per rank on ${kv[device]}: ${kv[ms]} ms,"
    detail+=" algbw ${kv[algbw]} GB/s, busbw ${kv[busbw]} GB/s (slowest rank)"
    if [[ ${kv[exact]} != True ]]; then
      verdict FAIL alltoall "$detail; WRONG RESULT"
    elif [[ $MODE == gpu && ${kv[device]} != GPU* ]]; then
      verdict FAIL alltoall "$detail; the result is not on a GPU"
    else
      verdict PASS alltoall "$detail, exact"
    fi
  else
    verdict FAIL alltoall "horovodrun -np $NP failed:"; show_log "$WORK/alltoall.txt" 25
  fi
else
  verdict SKIP alltoall "1 GPU: an all-to-all needs --np=2 or more"
fi
finish
