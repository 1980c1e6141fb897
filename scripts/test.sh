#!/usr/bin/env bash
# Install everything (scripts/install.sh), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/install.sh"
# shellcheck source=/dev/null
source "$here/scripts/mpi-env.sh"
cd "$here"
exec "$here/.venv/bin/python" -m pytest "$@"
