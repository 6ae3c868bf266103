#!/usr/bin/env bash
# Creates .venv/ with the pinned stack and a Horovod 0.28.1 wheel built against it.
#
#   bash tools/setup_env.sh          # (what `make setup` runs; every other target depends on it)
#   M6T_GPU=1 bash tools/setup_env.sh  # `make setup GPU=1`: tensorflow[and-cuda] and Horovod with NCCL
#
# M6T_GPU=1 is the GPU flavour: TensorFlow's CUDA 12 packages and a Horovod whose GPU operations
# (allreduce, all-to-all, ...) run on NCCL, built with the nvcc of a CUDA toolkit (M6T_CUDA_HOME,
# CUDA_HOME, /usr/local/cuda or the nvcc on PATH; a 12.x one is preferred).  A venv set up with
# M6T_GPU=1 stays GPU on later runs without it (`make train` after `make setup GPU=1`);
# M6T_GPU=0 turns it back to CPU.  M6T_VENV picks the venv (default .venv; `make
# gpu-build-check` uses .venv-gpu so that the CPU suite's .venv is never touched).
#
# Re-running it when nothing changed takes about a second: each step leaves a stamp keyed by
# the content of what it depends on.  The Horovod wheel is cached outside the repo in
#   ${M6T_CACHE:-$HOME/.cache/m6t_tf}/horovod-0.28.1/tf<TF>-py<PY>-<gloo|gloo-mpi>/
#   ${M6T_CACHE:-$HOME/.cache/m6t_tf}/horovod-0.28.1/tf<TF>-py<PY>-nccl-cuda<CUDA>-<gloo|gloo-mpi>/
# because pip's own wheel cache does not key on the TensorFlow version the wheel was built against.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${M6T_VENV:-.venv}; [[ $VENV == /* ]] || VENV=$ROOT/$VENV
PY=${PYTHON:-python3.11}
CACHE=${M6T_CACHE:-$HOME/.cache/m6t_tf}
HVD_VERSION=0.28.1
log() { echo "[setup] $*" >&2; }

hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# --- 0. flavour: CPU (Gloo) or GPU (NCCL) -------------------------------------------------
GPU=${M6T_GPU:-}
if [[ -z $GPU ]]; then GPU=0; [[ -f $VENV/.m6t-gpu ]] && GPU=1; fi
if [[ $GPU != 0 && $GPU != 1 ]]; then
  log "M6T_GPU=$GPU: use M6T_GPU=1 (GPU flavour, NCCL) or M6T_GPU=0 (CPU flavour, Gloo)"; exit 2
fi

# GPU flavour: the CUDA toolkit whose nvcc compiles Horovod's CUDA kernels
# (horovod/common/ops/cuda). It cannot come from TensorFlow's own CUDA packages: PyPI's
# nvidia-cuda-nvcc-cu12 wheels, 12.0 to 12.9 alike, hold ptxas but no nvcc. Horovod links the
# CUDA runtime statically, so its kernels need a driver of this toolkit's CUDA version (12.x: any
# driver TensorFlow's CUDA 12 libraries run on; 13.x: driver 580 or newer, and no Volta). A 12.x
# toolkit is preferred; M6T_CUDA_HOME names one outright.
find_cuda() {
  local c cands=() first=""
  if [[ -n ${M6T_CUDA_HOME:-} ]]; then
    cands=("$M6T_CUDA_HOME")
  else
    cands=(${CUDA_HOME:-} /usr/local/cuda $(ls -d /usr/local/cuda-12* 2>/dev/null | sort -rV))
    if command -v nvcc >/dev/null; then
      cands+=("$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")")
    fi
  fi
  for c in "${cands[@]}"; do
    [[ -x $c/bin/nvcc && -f $c/include/cuda_runtime.h ]] || continue
    [[ -z $first ]] && first=$c
    if cuda_release "$c" | grep -q '^12\.'; then echo "$c"; return 0; fi
  done
  [[ -n $first ]] && { echo "$first"; return 0; }
  return 1
}
cuda_release() { "$1/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p'; }

# sm_70 V100, 75 T4, 80 A100, 86 A10/A40, 89 L4/L40, 90 H100, 100 B200, 120 RTX 50: native code
# for those this nvcc still supports, PTX of the newest for later GPUs (Horovod's default is
# every architecture nvcc knows: twice the compile time for GPUs no cluster of ours has).
cuda_cc_list() {
  local have
  have=" $("$1/bin/nvcc" --list-gpu-code | sed -n 's/^sm_\([0-9]*\)$/\1/p' | tr '\n' ' ') "
  local cc out=()
  for cc in 70 75 80 86 89 90 100 120; do [[ $have == *" $cc "* ]] && out+=("$cc"); done
  (IFS=,; echo "${out[*]}")
}

# OpenMPI already on the machine (step 4 may install it).
mpi_found() {
  command -v mpirun >/dev/null 2>&1 && [[ -e /usr/include/x86_64-linux-gnu/openmpi || -n "$(command -v mpicc || true)" ]]
}
# The wheel cache's flavour key: gloo | gloo-mpi, prefixed nccl-cuda<CUDA>- for the GPU flavour.
flavour_of() {  # flavour_of GPU WITH_MPI [CUDA_VERSION]
  local f=gloo; [[ $2 == 1 ]] && f=gloo-mpi
  [[ $1 == 1 ]] && f=nccl-cuda$3-$f
  echo "$f"
}
# --print-flavour: the flavour key this machine and these variables give; nothing is installed
# or built (tests/test_gpu_setup.py).
if [[ ${1:-} == --print-flavour ]]; then
  WITH_MPI=0; mpi_found && WITH_MPI=1
  if [[ $GPU == 1 ]]; then
    CUDA_ROOT=$(find_cuda) || { log "no CUDA toolkit with nvcc found"; exit 1; }
    flavour_of 1 "$WITH_MPI" "$(cuda_release "$CUDA_ROOT")"
  else
    flavour_of 0 "$WITH_MPI"
  fi
  exit 0
fi

# --- 1. virtual environment -------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
  log "creating $VENV with $($PY --version)"
  $PY -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
fi
VPY=$VENV/bin/python
if [[ $GPU == 1 ]]; then touch "$VENV/.m6t-gpu"; else rm -f "$VENV/.m6t-gpu"; fi
# pip's stderr minus the per-package notes about local index folders that this machine's pip
# configuration names but does not have; errors still show and still fail the script.
VPIP=pip_quiet
pip_quiet() { "$VPY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# --- 2. pinned packages -----------------------------------------------------------------
REQ_STAMP=$VENV/.stamp-req-$(hash_of requirements.txt setup.py)
[[ $GPU == 1 ]] && REQ_STAMP=$VENV/.stamp-req-gpu-$(hash_of requirements.txt setup.py)
if [[ ! -f $REQ_STAMP ]]; then
  if [[ $GPU == 1 ]]; then
    # The same pin with TensorFlow's `and-cuda` extra: cuDNN, cuBLAS, ..., NCCL, CUDA runtime
    # (CUDA 12) as pip packages under site-packages/nvidia/, found by TensorFlow's RUNPATH.
    TF_PIN=$(grep -E '^tensorflow==' requirements.txt)
    log "installing pinned packages (requirements.txt) with tensorflow[and-cuda]==${TF_PIN#tensorflow==}"
    $VPIP install -q -r requirements.txt "tensorflow[and-cuda]==${TF_PIN#tensorflow==}"
  else
    log "installing pinned packages (requirements.txt)"
    $VPIP install -q -r requirements.txt
  fi
  $VPIP install -q --no-deps -e .
  rm -f "$VENV"/.stamp-req-*; touch "$REQ_STAMP"
fi

# --- 3. data packages (no code of theirs is imported; only files are read) -------------------
DATA_STAMP=$VENV/.stamp-data-$(hash_of requirements-data.txt)
if [[ ! -f $DATA_STAMP ]]; then
  log "installing data packages with --no-deps (requirements-data.txt)"
  $VPIP install -q --no-deps -r requirements-data.txt
  rm -f "$VENV"/.stamp-data-*; touch "$DATA_STAMP"
fi

# --- 4. OpenMPI (optional; Gloo is always built) --------------------------------------------
WITH_MPI=0
if mpi_found; then
  WITH_MPI=1
elif [[ $(id -u) == 0 && ${M6T_NO_APT:-0} != 1 ]] && command -v apt-get >/dev/null; then
  log "installing OpenMPI with apt (root)"
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin) >/dev/null 2>&1; then
    WITH_MPI=1
  else
    log "apt could not install OpenMPI: building Horovod with Gloo only"
  fi
else
  log "not root and no OpenMPI found: building Horovod with Gloo only (mpirun launches unavailable)"
fi

# --- 5. Horovod wheel, built once per (TF, Python, MPI[, CUDA]) -----------------------------
TF_VERSION=$($VPY -c 'import importlib.metadata as m; print(m.version("tensorflow"))')
PY_VERSION=$($VPY -c 'import sys; print("%d.%d" % sys.version_info[:2])')
FLAVOUR=$(flavour_of 0 "$WITH_MPI")
if [[ $GPU == 1 ]]; then
  if ! CUDA_ROOT=$(find_cuda); then
    log "no CUDA toolkit with nvcc found (M6T_CUDA_HOME, CUDA_HOME, /usr/local/cuda, PATH): install"
    log "CUDA 12's (e.g. /usr/local/cuda-12.x) and run again, or name it: M6T_CUDA_HOME=/path/to/cuda"
    log "(PyPI's nvidia-cuda-nvcc-cu12 has no nvcc, only ptxas)"
    exit 1
  fi
  FLAVOUR=$(flavour_of 1 "$WITH_MPI" "$(cuda_release "$CUDA_ROOT")")
fi
WHEEL_DIR=$CACHE/horovod-$HVD_VERSION/tf$TF_VERSION-py$PY_VERSION-$FLAVOUR
have_hvd() { $VPY -c 'import importlib.metadata as m, sys; sys.exit(m.version("horovod") != "'$HVD_VERSION'")' 2>/dev/null; }
HVD_STAMP=$VENV/.stamp-hvd-tf$TF_VERSION-$FLAVOUR
if [[ ! -f $HVD_STAMP ]] || ! have_hvd; then
  if ! ls "$WHEEL_DIR"/horovod-$HVD_VERSION-*.whl >/dev/null 2>&1; then
    if [[ $GPU == 1 ]]; then
      log "building Horovod $HVD_VERSION against TF $TF_VERSION / Python $PY_VERSION ($FLAVOUR, nvcc of $CUDA_ROOT); ~10 min on 2 cores"
    else
      log "building Horovod $HVD_VERSION against TF $TF_VERSION / Python $PY_VERSION ($FLAVOUR); ~3 min on 2 cores"
    fi
    BUILD=$(mktemp -d)
    $VPIP download -q --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$BUILD"
    tar -xzf "$BUILD"/horovod-$HVD_VERSION.tar.gz -C "$BUILD"
    SRC=$BUILD/horovod-$HVD_VERSION
    # The XLA custom-call ops do not compile against TF 2.21 headers; they are only used with
    # HOROVOD_ENABLE_XLA_OPS=1, which we never set.
    sed -i '/horovod\/tensorflow\/xla_mpi_ops.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
    if [[ $GPU == 1 ]]; then
      # Horovod's GPU ops get TensorFlow's CUDA stream through
      # stream_executor::gpu::AsGpuStreamValue, which TF 2.21's libraries no longer export
      # (the import would fail with an undefined symbol): define it in the op library from the
      # stream's platform_specific_handle(), which is what it returned.
      "$VPY" - "$SRC/horovod/tensorflow/mpi_ops.cc" <<'PATCH'
import sys
path = sys.argv[1]
text = open(path).read()
anchor = ('#include "tensorflow/stream_executor/stream.h"\n'
          '#endif // TENSORFLOW_VERSION >= 2011000000\n')
if text.count(anchor) != 1:
  sys.exit(f"{path}: the stream.h include block to patch was not found once")
text = text.replace(anchor, anchor + (
    '#if TENSORFLOW_VERSION >= 2021000000\n'
    'GpuStreamHandle stream_executor::gpu::AsGpuStreamValue(Stream* stream) {\n'
    '  return static_cast<GpuStreamHandle>(stream->platform_specific_handle().stream);\n'
    '}\n'
    '#endif\n'))
open(path, "w").write(text)
PATCH
      # NCCL from TensorFlow's nvidia-nccl-cu12: the package has libnccl.so.2 only, so
      # Horovod's find_library(nccl) needs an unversioned libnccl.so beside the headers (there
      # is no libnccl_static.a: HOROVOD_NCCL_LINK=SHARED).
      NCCL_PKG=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/nccl
      mkdir -p "$BUILD/nccl/lib"
      ln -s "$NCCL_PKG/include" "$BUILD/nccl/include"
      ln -s "$NCCL_PKG/lib/libnccl.so.2" "$BUILD/nccl/lib/libnccl.so"
    fi
    $VPIP install -q cmake 2>/dev/null || true
    # A subshell with exported variables, not `env VAR=… cmd`: `env` runs programs only, and
    # $VPIP is a shell function (this line once failed on every machine without a cached wheel).
    (
      export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 \
             HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo MAKEFLAGS=-j$(nproc)
      if [[ $WITH_MPI == 1 ]]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
      if [[ $GPU == 1 ]]; then
        export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME=$CUDA_ROOT \
               HOROVOD_NCCL_HOME=$BUILD/nccl HOROVOD_NCCL_LINK=SHARED
        export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-$(cuda_cc_list "$CUDA_ROOT")}
        # Horovod asks the first `nvcc` on PATH for its architectures, before HOROVOD_CUDA_HOME's.
        export PATH=$CUDA_ROOT/bin:$PATH
        # libnccl.so.2 is found at run time where TensorFlow finds it (its own RUNPATH holds
        # $ORIGIN/../../nvidia/nccl/lib): the op library sits two folders below site-packages.
        export LDFLAGS="-Wl,-rpath,\$ORIGIN/../../nvidia/nccl/lib${LDFLAGS:+ $LDFLAGS}"
        # Gloo's CMakeLists asks for CMake < 3.5, which CMake 4 (pip's cmake) refuses.
        export CMAKE_POLICY_VERSION_MINIMUM=3.5
      fi
      $VPIP wheel -q --no-deps --no-build-isolation "$SRC" -w "$BUILD/wheel"
    )
    mkdir -p "$WHEEL_DIR"
    cp "$BUILD"/wheel/horovod-*.whl "$WHEEL_DIR/.tmp.whl.part"
    mv "$WHEEL_DIR/.tmp.whl.part" "$WHEEL_DIR/$(basename "$BUILD"/wheel/horovod-*.whl)"
    rm -rf "$BUILD"
  fi
  log "installing $(ls "$WHEEL_DIR"/horovod-*.whl)"
  # Horovod's runtime deps (cloudpickle, psutil, pyyaml, packaging) come from requirements.txt.
  $VPIP install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-$HVD_VERSION-*.whl
  $VPIP install -q pyyaml
  CHECK=$("$VENV/bin/horovodrun" --check-build 2>&1)
  echo "$CHECK" | grep -q '\[X\] TensorFlow' || { echo "$CHECK"; log "Horovod was built without TensorFlow"; exit 1; }
  echo "$CHECK" | grep -q '\[X\] Gloo' || { echo "$CHECK"; log "Horovod was built without Gloo"; exit 1; }
  if [[ $GPU == 1 ]]; then
    echo "$CHECK" | grep -q '\[X\] NCCL' || { echo "$CHECK"; log "Horovod was built without NCCL"; exit 1; }
  fi
  rm -f "$VENV"/.stamp-hvd-*; touch "$HVD_STAMP"
fi
log "ready: $VENV (TF $TF_VERSION, Horovod $HVD_VERSION $FLAVOUR)"
