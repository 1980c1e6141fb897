#!/usr/bin/env bash
# Install everything (scripts/install.sh), then run the demo: 2 MPI ranks train a small CNN on
# the handwritten digits bundled with scikit-learn, with local SGD (H = 4) and SlowMo.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/install.sh"
# shellcheck source=/dev/null
source "$here/scripts/mpi-env.sh"
run_dir=${RUN_DIR:-$here/runs/demo-$(date +%Y%m%d-%H%M%S)}
exec mpirun -np "${NP:-2}" --oversubscribe "$here/.venv/bin/hpc-localsgd" train "$here/configs/demo.yaml" --run-dir "$run_dir" "$@"
