#!/usr/bin/env bash
# Creates .venv/ with the pinned stack and a Horovod 0.28.1 wheel built against it.
#
#   bash tools/setup_env.sh          # (what `make setup` runs; every other target depends on it)
#
# Re-running it when nothing changed takes about a second: each step leaves a stamp keyed by
# the content of what it depends on.  The Horovod wheel is cached outside the repo in
#   ${M6T_CACHE:-$HOME/.cache/m6t_tf}/horovod-0.28.1/tf<TF>-py<PY>-<gloo|gloo-mpi>/
# because pip's own wheel cache does not key on the TensorFlow version the wheel was built against.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=${PYTHON:-python3.11}
CACHE=${M6T_CACHE:-$HOME/.cache/m6t_tf}
HVD_VERSION=0.28.1
log() { echo "[setup] $*" >&2; }

hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# --- 1. virtual environment -------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
  log "creating $VENV with $($PY --version)"
  $PY -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
fi
VPY=$VENV/bin/python
# pip's stderr minus the per-package notes about local index folders that this machine's pip
# configuration names but does not have; errors still show and still fail the script.
VPIP=pip_quiet
pip_quiet() { "$VPY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# --- 2. pinned packages -----------------------------------------------------------------
REQ_STAMP=$VENV/.stamp-req-$(hash_of requirements.txt setup.py)
if [[ ! -f $REQ_STAMP ]]; then
  log "installing pinned packages (requirements.txt)"
  $VPIP install -q -r requirements.txt
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
if command -v mpirun >/dev/null 2>&1 && [[ -e /usr/include/x86_64-linux-gnu/openmpi || -n "$(command -v mpicc || true)" ]]; then
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

# --- 5. Horovod wheel, built once per (TF, Python, MPI) -------------------------------------
TF_VERSION=$($VPY -c 'import importlib.metadata as m; print(m.version("tensorflow"))')
PY_VERSION=$($VPY -c 'import sys; print("%d.%d" % sys.version_info[:2])')
FLAVOUR=gloo; [[ $WITH_MPI == 1 ]] && FLAVOUR=gloo-mpi
WHEEL_DIR=$CACHE/horovod-$HVD_VERSION/tf$TF_VERSION-py$PY_VERSION-$FLAVOUR
have_hvd() { $VPY -c 'import importlib.metadata as m, sys; sys.exit(m.version("horovod") != "'$HVD_VERSION'")' 2>/dev/null; }
HVD_STAMP=$VENV/.stamp-hvd-tf$TF_VERSION-$FLAVOUR
if [[ ! -f $HVD_STAMP ]] || ! have_hvd; then
  if ! ls "$WHEEL_DIR"/horovod-$HVD_VERSION-*.whl >/dev/null 2>&1; then
    log "building Horovod $HVD_VERSION against TF $TF_VERSION / Python $PY_VERSION ($FLAVOUR); ~3 min on 2 cores"
    BUILD=$(mktemp -d)
    $VPIP download -q --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$BUILD"
    tar -xzf "$BUILD"/horovod-$HVD_VERSION.tar.gz -C "$BUILD"
    SRC=$BUILD/horovod-$HVD_VERSION
    # The XLA custom-call ops do not compile against TF 2.21 headers; they are only used with
    # HOROVOD_ENABLE_XLA_OPS=1, which we never set.
    sed -i '/horovod\/tensorflow\/xla_mpi_ops.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
    $VPIP install -q cmake 2>/dev/null || true
    # A subshell with exported variables, not `env VAR=… cmd`: `env` runs programs only, and
    # $VPIP is a shell function (this line once failed on every machine without a cached wheel).
    (
      export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 \
             HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo MAKEFLAGS=-j$(nproc)
      if [[ $WITH_MPI == 1 ]]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
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
  rm -f "$VENV"/.stamp-hvd-*; touch "$HVD_STAMP"
fi
log "ready: $VENV (TF $TF_VERSION, Horovod $HVD_VERSION $FLAVOUR)"
