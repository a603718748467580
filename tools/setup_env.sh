#!/usr/bin/env bash
# Idempotent environment setup for repq_mm.
#   bash tools/setup_env.sh        -> creates/updates .venv/ at the repository root
# Installs the pinned stack (see requirements.txt), building mmcv 2.1.0 with ops from
# its sdist (C++20 patch, see README "Setup") once; the built wheel is kept in
# ${REPQ_WHEEL_CACHE:-$HOME/.cache/repq_mm/wheels} and in pip's cache, so later runs take seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
WHEELS="${REPQ_WHEEL_CACHE:-$HOME/.cache/repq_mm/wheels}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.repq_setup_stamp"
REQ_HASH="$(cat "$ROOT/requirements.txt" "$ROOT/setup.py" "$0" | sha256sum | cut -c1-16)"

log() { echo "[setup $(date +%H:%M:%S)] $*" >&2; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQ_HASH" ] && "$VENV/bin/python" -c "import mmcv.ops, mmdet, mmpretrain, repq_mm" 2>/dev/null; then
  log "environment up to date ($VENV)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || { log "creating venv"; "$PY" -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip<25" wheel

log "installing torch/torchvision and pure-python deps"
$PIP install -q -r "$ROOT/requirements-base.txt"

if ! "$VENV/bin/python" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  mkdir -p "$WHEELS"
  WHL="$(ls "$WHEELS"/mmcv-2.1.0-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$WHL" ]; then
    log "building mmcv 2.1.0 with ops from the sdist (about 13 min on 2 cores, once)"
    TMP="$(mktemp -d)"
    # mmcv 2.1.0's setup.py imports pkg_resources (gone from setuptools >= 81).
    $PIP install -q "setuptools<70"
    trap 'rm -rf "$TMP"' EXIT
    $PIP download -q --no-deps --no-build-isolation --no-binary :all: mmcv==2.1.0 -d "$TMP"
    tar -xzf "$TMP"/mmcv-2.1.0.tar.gz -C "$TMP"
    grep -q -- "-std=c++17" "$TMP/mmcv-2.1.0/setup.py"
    sed -i 's/-std=c++17/-std=c++20/g' "$TMP/mmcv-2.1.0/setup.py"
    (cd "$TMP/mmcv-2.1.0" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
        $PIP wheel -q --no-build-isolation --no-deps . -w "$TMP/out")
    cp "$TMP"/out/mmcv-2.1.0-*.whl "$WHEELS/"
    WHL="$(ls "$WHEELS"/mmcv-2.1.0-*.whl | head -n1)"
  fi
  log "installing $WHL"
  $PIP install -q --no-deps "$WHL"
fi

log "installing mmdet / mmpretrain / repq_mm"
$PIP install -q -r "$ROOT/requirements.txt"
$PIP install -q --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c "import mmcv.ops, mmdet, mmpretrain, repq_mm; print('stack ok: torch', __import__('torch').__version__, 'mmcv', mmcv.__version__)"
echo "$REQ_HASH" > "$STAMP"
