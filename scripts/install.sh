#!/usr/bin/env bash
# Install everything hpc-localsgd needs, from nothing, into ./.venv:
#   Debian's Open MPI and HDF5 tools, torch/torchvision, mpi4py, h5py, PyYAML, and
#   Horovod 0.28.1 built from source against this torch and MPI (wheel cached).
# Idempotent: a second run only checks what is there. Safe to call from CI.
#
# Environment knobs:
#   VENV=path                 virtual environment (default: ./.venv)
#   HPC_LOCALSGD_CACHE=dir    cache for the Horovod wheel (default: ~/.cache/hpc-localsgd)
#   WITH_HOROVOD=0            skip Horovod (the mpi and torch backends still work)
#   WITH_APT=0                do not touch system packages (e.g. on a cluster: `module load` instead)
#   WITH_NCCL=1               build Horovod's GPU collectives on NCCL (HOROVOD_GPU_OPERATIONS=NCCL): needs a
#                             CUDA build of torch, a CUDA toolkit, and NCCL's headers and library, taken from
#                             NCCL_HOME or else from the nvidia-nccl wheel that comes with torch (default 0:
#                             Horovod then stages CUDA tensors through host memory, as the start-up line says)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$here/.venv}
CACHE=${HPC_LOCALSGD_CACHE:-$HOME/.cache/hpc-localsgd}
WITH_HOROVOD=${WITH_HOROVOD:-1}
WITH_APT=${WITH_APT:-1}
WITH_NCCL=${WITH_NCCL:-0}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
HOROVOD_VERSION=0.28.1

log() { printf '[install] %s\n' "$*"; }

# --- system packages -------------------------------------------------------
if [ "$WITH_APT" = 1 ] && command -v apt-get >/dev/null; then
  need=()
  command -v mpirun >/dev/null || need+=(openmpi-bin libopenmpi-dev)
  [ -e /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] || need+=(libopenmpi-dev)
  command -v h5dump >/dev/null || need+=(hdf5-tools)
  # Slurm for tests/slurm (a private cluster, scripts/slurm-cluster.sh); pulls in munge, unused there.
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null ||
    need+=(slurmctld slurmd slurm-client)
  if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The postinst of munge, slurmd and slurmctld start their services through invoke-rc.d. Without
    # systemd (a container) that would leave a munged running: deny service starts for this install,
    # the way Debian's container images do, unless a policy is already there.
    deny_starts=0
    if [ ! -d /run/systemd/system ] && [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && deny_starts=1
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    if [ "$deny_starts" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  fi
fi

# --- virtual environment -----------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

if ! "$PY" -c 'import torch, torchvision' 2>/dev/null; then
  log "pip install $TORCH_SPEC"
  # shellcheck disable=SC2086
  pip install $TORCH_SPEC
fi
pip install 'mpi4py>=4' h5py 'pyyaml>=6' 'xxhash>=3' 'matplotlib>=3.7' scikit-learn 'mnist1d>=0.0.2' tqdm numpy 'pytest>=8' psutil cloudpickle packaging wheel \
  'jsonschema>=4.18' 'reframe-hpc>=4.5' ruff mypy types-PyYAML import-linter

# --- Horovod 0.28.1, built against this torch --------------------------------
# The published sdist needs C++20 for torch >= 2.6 headers (std::strong_ordering), and
# a CUDA toolkit when torch is a CUDA build. The wheel is cached per torch/python version.
if [ "$WITH_HOROVOD" = 1 ] && ! "$PY" -c 'import horovod.torch' 2>/dev/null; then
  tag=$("$PY" -c 'import sys, torch; print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.replace(chr(43), chr(95))}")')
  if [ "$WITH_NCCL" = 1 ]; then
    # NCCL_HOME, or the wheel torch's CUDA builds depend on (include/nccl.h, lib/libnccl.so.2).
    NCCL_HOME=${NCCL_HOME:-$("$PY" -c 'import nvidia.nccl as n; print(list(n.__path__)[0])' 2>/dev/null || true)}
    [ -e "${NCCL_HOME:-/nonexistent}/include/nccl.h" ] || {
      echo "install: WITH_NCCL=1 but no NCCL was found (no nvidia-nccl wheel beside torch); set NCCL_HOME" >&2; exit 1; }
    tag="$tag-nccl"
  fi
  wheeldir="$CACHE/horovod-$HOROVOD_VERSION-$tag"
  if ! ls "$wheeldir"/horovod-*.whl >/dev/null 2>&1; then
    log "building Horovod $HOROVOD_VERSION (about 5 minutes on 2 cores); cache: $wheeldir"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    pip download --no-binary :all: --no-deps -d "$build" "horovod==$HOROVOD_VERSION"
    tar -xzf "$build"/horovod-$HOROVOD_VERSION.tar.gz -C "$build"
    src="$build/horovod-$HOROVOD_VERSION"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    sed -i 's/-std=c++11/-std=c++20/g' "$src/CMakeLists.txt"
    export CMAKE_POLICY_VERSION_MINIMUM=3.5
    if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
      # The toolkit folder is the one holding cuda_runtime.h (nvcc may be a wrapper elsewhere).
      for candidate in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc || echo /x/x)")")"; do
        if [ -n "$candidate" ] && [ -e "$candidate/include/cuda_runtime.h" ]; then CUDA_HOME=$candidate; break; fi
      done
      [ -e "${CUDA_HOME:-/nonexistent}/include/cuda_runtime.h" ] || {
        echo "install: torch is a CUDA build but no CUDA toolkit (include/cuda_runtime.h) was found; set CUDA_HOME" >&2; exit 1; }
      # Horovod finds the toolkit through the nvcc it runs: use the real one, not a wrapper on PATH.
      export CUDA_HOME CUDAToolkit_ROOT=$CUDA_HOME CUDACXX=$CUDA_HOME/bin/nvcc PATH=$CUDA_HOME/bin:$PATH
    elif [ "$WITH_NCCL" = 1 ]; then
      echo "install: WITH_NCCL=1 needs a CUDA build of torch; this torch is CPU-only" >&2; exit 1
    fi
    if [ "$WITH_NCCL" = 1 ]; then
      # The wheel ships only libnccl.so.2; the linker looks for libnccl.so. At run time the library is the
      # one torch has loaded already (same soname).
      mkdir -p "$build/nccl-lib"
      ln -sf "$(ls "$NCCL_HOME"/lib/libnccl.so* | head -n 1)" "$build/nccl-lib/libnccl.so"
      export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_INCLUDE=$NCCL_HOME/include HOROVOD_NCCL_LIB=$build/nccl-lib \
             HOROVOD_NCCL_LINK=SHARED
      log "Horovod's GPU collectives on NCCL from $NCCL_HOME"
    fi
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
           HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
           MAKEFLAGS="-j$(nproc)"
    mkdir -p "$wheeldir"
    pip wheel --no-build-isolation --no-deps -w "$build/out" "$src"
    mv "$build"/out/horovod-*.whl "$wheeldir/"
  fi
  pip install --no-deps "$wheeldir"/horovod-*.whl
fi

# --- the package itself ------------------------------------------------------
pip install --no-deps -e "$here"
log "ready: source $VENV/bin/activate"
