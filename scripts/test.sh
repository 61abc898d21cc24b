#!/usr/bin/env bash
# The whole test suite, slow tests (real vLLM engines) included: unit tests first (seconds),
# then the integration tests (real engines, gRPC, Redis, TLS), then the cluster tests (real Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then set -- tests/unit tests/integration tests/cluster; fi
exec .venv/bin/python -m pytest -ra --durations=40 "$@"
