"""The packages' arrows run one way: a forbidden import anywhere fails here, with the file
and line. (Imports inside functions count too.)"""

from __future__ import annotations

import ast

import pytest

from tests.support.paths import ROOT

# Package folder -> the pdcluster packages its modules may import (besides their own).
ALLOWED = {
    "pdcluster/common": set(),
    "protos": set(),
    "kv_transfer": {"common", "protos"},
    "worker": {"common", "protos", "kv_transfer"},
    "prefill_worker": {"common", "protos", "kv_transfer", "worker"},
    "decode_worker": {"common", "protos", "kv_transfer", "worker"},
    "router": {"common", "protos"},
    # The cluster places workers and routers: it reads their config types, nothing else of theirs.
    "cluster": {"common", "protos", "worker.config", "router.config", "kv_transfer.settings"},
    # The planner runs the router's own policies in its simulator and writes cluster specs.
    "planner": {"common", "protos", "router", "worker", "kv_transfer", "cluster.cluster_spec"},
    # The one process that hosts both roles' handlers.
    "pdcluster/role_switching_worker.py": {"common", "worker", "prefill_worker", "decode_worker"},
    # Emulated hosts for a multi-host cluster on one machine: a tool beside the cluster, not part of it.
    "pdcluster/lab": {"common"},
    # The CLI and the benchmarks may use anything; nothing imports them.
    "pdcluster/cli.py": {"*"},
    "pdcluster/__main__.py": {"*"},
    "bench": {"*"},
}
UNIMPORTABLE = {"cli", "bench", "__main__", "role_switching_worker"}


def pdcluster_imports(path):
    """(line, module under pdcluster.) for every pdcluster import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("pdcluster."):
                yield node.lineno, name.removeprefix("pdcluster.")


def modules_of(folder: str):
    base = ROOT / folder
    return [base] if base.suffix == ".py" else sorted(base.rglob("*.py"))


def own_package(folder: str) -> str:
    return folder.removeprefix("pdcluster/").removesuffix(".py")


def allowed(folder: str, module: str) -> bool:
    rules, root = ALLOWED[folder], module.split(".")[0]
    if root == own_package(folder).split("/")[0] or "*" in rules:
        return True
    if root in UNIMPORTABLE:
        return False
    return any(module == rule or module.startswith(rule + ".") for rule in rules)


@pytest.mark.parametrize("folder", list(ALLOWED))
def test_no_forbidden_imports(folder):
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports pdcluster.{module}"
        for path in modules_of(folder)
        for line, module in pdcluster_imports(path)
        if not allowed(folder, module)
    ]
    assert not bad, "\n".join(bad)


def test_every_package_and_module_has_rules():
    """A new package, or a new module or folder directly under pdcluster/, is checked only once
    it is given rules here."""
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "pdcluster"}
    assert folders <= set(ALLOWED)
    under_pdcluster = {f"pdcluster/{p.name}" for p in (ROOT / "pdcluster").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert under_pdcluster - {"pdcluster/__init__.py"} <= set(ALLOWED)


def test_the_check_catches_a_forbidden_import():
    assert not allowed("router", "cluster.cluster_spec")
    assert not allowed("prefill_worker", "decode_worker.decode_handler")
    assert not allowed("cluster", "planner.workloads") and not allowed("cluster", "router.request_flow")
    assert allowed("cluster", "router.config") and allowed("bench", "cluster.controller")


def test_test_modules_import_no_other_test_module():
    bad = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests."):
                if not node.module.startswith("tests.support"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}")
    assert not bad, "\n".join(bad)
