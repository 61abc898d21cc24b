#!/usr/bin/env bash
# Regenerate the Python stubs in protos/ from the .proto files (needs grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/*.proto
