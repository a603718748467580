#!/usr/bin/env bash
# The test suite (README command 2): sets up .venv (idempotent), fetches the tiny real data
# the end-to-end tests use, then runs pytest.  Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
.venv/bin/python tools/dataset_converters/fetch_fashion_mnist.py --out data/fashion_mnist
.venv/bin/python tools/dataset_converters/deepforest_trees.py --out data/trees
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
