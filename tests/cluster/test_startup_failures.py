"""Start-up failures are found at once and said plainly: a taken port before anything starts,
and a worker that cannot start, with its cause and its log, until serve gives up on a cause
that repeats."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from tests.support.processes import EAGER

SERVE = [sys.executable, "-m", "pdcluster", "serve"]


@pytest.fixture
def taken_port():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


@pytest.mark.parametrize("which", ["--port", "--grpc-port"])
def test_serve_with_a_taken_port_fails_before_starting_anything(taken_port, which):
    other = "--grpc-port" if which == "--port" else "--port"
    result = subprocess.run([*SERVE, which, str(taken_port), other, "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken_port}" in result.stderr and which in result.stderr
    assert "starting" not in result.stdout and "Ray" not in result.stdout + result.stderr  # nothing was started


def test_router_with_a_taken_port_fails_naming_it(taken_port):
    result = subprocess.run(
        [sys.executable, "-m", "pdcluster.router", "--port", str(taken_port), "--worker", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and f"cannot listen on 127.0.0.1:{taken_port} (OpenAI HTTP, --port)" in result.stderr


def test_workers_that_cannot_start_are_reported_with_their_cause_and_serve_gives_up():
    # Longer than the tiny model's positions: every engine refuses it at start.
    result = subprocess.run(
        [*SERVE, "--port", "0", "--grpc-port", "0", "--max-model-len=100000", *EAGER], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 1, result.stdout + result.stderr
    failures = re.findall(r"(prefill|decode) worker (\S+) failed to start: \w+ process exited with \d+ \(log: (\S+)\):", result.stderr)
    assert {role for role, _, _ in failures} <= {"prefill", "decode"} and len(failures) >= 3
    assert all(log.endswith(".log") for _, _, log in failures)
    assert "max_model_len (100000) is greater than the derived max_model_len" in result.stderr  # the engine's own words
    assert re.search(r"3 (prefill|decode) workers in a row failed to start", result.stderr)
    assert "pdcluster ready" not in result.stdout
