#!/usr/bin/env bash
# Regenerate the Python stubs in protos/ from the .proto files (needs grpcio-tools).
# protos/ installs as pdcluster.protos, so the stubs import each other under that name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=$(mktemp -d)
"$PY" -m grpc_tools.protoc -Ipdcluster/protos=protos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/*.proto
cp "$out"/pdcluster/protos/*.py* protos/
rm -rf "$out"
# KVTransfer is served through a generic handler (its Push decodes chunks without a copy).
rm -f protos/kv_transfer_pb2_grpc.py
