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


def test_serve_and_the_router_with_a_taken_port_fail_naming_it_before_starting_anything(taken_port):
    # All three at once: each is mostly its imports.
    commands = {
        "--port": [*SERVE, "--port", str(taken_port), "--grpc-port", "0"],
        "--grpc-port": [*SERVE, "--grpc-port", str(taken_port), "--port", "0"],
        "router": [sys.executable, "-m", "pdcluster.router", "--port", str(taken_port), "--worker", "127.0.0.1:1"],
    }
    procs = {
        which: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for which, command in commands.items()
    }
    results = {which: (proc, *proc.communicate(timeout=180)) for which, proc in procs.items()}
    for which in ("--port", "--grpc-port"):
        proc, out, err = results[which]
        assert proc.returncode == 1
        assert f"cannot listen on 127.0.0.1:{taken_port}" in err and which in err
        assert "starting" not in out and "Ray" not in out + err  # nothing was started
    proc, _, err = results["router"]
    assert proc.returncode == 1 and f"cannot listen on 127.0.0.1:{taken_port} (OpenAI HTTP, --port)" in err


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
