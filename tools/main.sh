#!/usr/bin/env bash
# The main job (README command 1): set up .venv (idempotent), fetch Fashion-MNIST, train (or
# reuse) the full-precision RepVGG, run PTQ / LSQ-baseline / RepQ-BN / RepQ-BNEst at W8A8 and
# W4A4, merge the RepQ models with tools/merge_quant.py, evaluate the merged checkpoints with
# the stock mmpretrain tools/test.py and print the accuracy table.
# Extra arguments go to tools/fmnist_experiments.py (e.g. --seeds 0 1 2, --bits 8).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
.venv/bin/python tools/dataset_converters/fetch_fashion_mnist.py --out data/fashion_mnist
[ $# -gt 0 ] || set -- --seeds 0
exec .venv/bin/python tools/fmnist_experiments.py "$@"
