# Shared by test.sh and demo.sh: a venv in .venv with pinned torch, then metanet.
# Override the torch pin with METANET_TORCH (e.g. METANET_TORCH="torch==2.5.1").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check "${METANET_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,plot]"
