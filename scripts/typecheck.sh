#!/usr/bin/env bash
# mypy over pdcluster's own packages. They install under one import root through setuptools'
# package-dir, which mypy cannot follow, so it reads them through a tree of links laid out as
# installed (build/typecheck/pdcluster/<package> -> <folder>).
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck
rm -rf "$tree" && mkdir -p "$tree/pdcluster"
for entry in pdcluster/*; do ln -s "$PWD/$entry" "$tree/pdcluster/"; done
for folder in protos kv_transfer worker prefill_worker decode_worker router cluster bench planner; do
  ln -s "$PWD/$folder" "$tree/pdcluster/$folder"
done
root=$PWD
cd "$tree" && exec "$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" -p pdcluster "$@"
