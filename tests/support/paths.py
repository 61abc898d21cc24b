"""Where the repository is, for tests that read its files or run commands from it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TRACES = ROOT / "tests" / "data"  # the first requests of ../shared/traces/ (see its README)
