#!/usr/bin/env bash
# The whole test suite, slow tests (real vLLM engines) included.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -ra --durations=40 "$@"
