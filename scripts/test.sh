#!/usr/bin/env bash
# Install everything from scratch into .venv (pinned torch first), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
exec .venv/bin/python -m pytest -q "$@"
