#!/usr/bin/env bash
# The whole test suite, slow tests (real vLLM engines) included. Unit tests first (seconds);
# then two lanes at once: the tests that run a Ray cluster (one at a time: each starts a local
# Ray), and the integration tests on bare worker and router processes (real engines, gRPC,
# Redis, TLS). Most of a slow test is an engine starting or a stream running, which keeps one
# of the two cores busy, so the lanes overlap well. With arguments: pytest on just those.
set -euo pipefail
cd "$(dirname "$0")/.."
pytest=(.venv/bin/python -m pytest -ra --durations=25)
if [ $# -gt 0 ]; then exec "${pytest[@]}" "$@"; fi

ray_lane=(tests/cluster tests/integration/test_planner_roundtrip.py tests/integration/test_bench_compare.py)
"${pytest[@]}" tests/unit
log=$(mktemp /tmp/pdcluster-ray-lane-XXXX.log)
"${pytest[@]}" "${ray_lane[@]}" >"$log" 2>&1 &
ray_pid=$!
trap 'kill $ray_pid 2>/dev/null || true' EXIT
status=0
"${pytest[@]}" tests/integration "${ray_lane[@]/#/--ignore=}" || status=$?
wait $ray_pid || status=$?
echo "================ the Ray lane (tests/cluster, planner, bench compare) ================"
cat "$log"
exit $status
