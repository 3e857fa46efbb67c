#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow end-to-end tests included.
# Tests run in parallel processes (pytest-xdist, one per core up to 4, a test file per process),
# each with one torch thread: on the 2-core CI machine this halves the wall time, and one thread
# per process avoids OpenMP threads spinning against each other.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers="${MEDCLF_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile "$@"
