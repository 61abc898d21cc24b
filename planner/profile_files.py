"""Profile files: the reference profiles shipped with the planner, and a profile's siblings
for other tensor-parallel sizes (`NAME-tpN.json`)."""

from __future__ import annotations

import re
from pathlib import Path

from pdcluster.common.engine_profile import EngineProfile, load_profile

REFERENCE_DIR = Path(__file__).parent / "reference_profiles"

_TP_SUFFIX = re.compile(r"-tp(\d+)\.json$")


def profile_for_tp(path: str | Path, tp: int) -> EngineProfile:
    """The profile at `path`, or its sibling for tensor-parallel size `tp` (same name, `-tpN`)."""
    profile = load_profile(path)
    if profile.tensor_parallel_size == tp:
        return profile
    path = Path(path)
    if not _TP_SUFFIX.search(path.name):
        raise ValueError(f"{path} is a TP {profile.tensor_parallel_size} profile and names no sibling for TP {tp}")
    sibling = path.with_name(_TP_SUFFIX.sub(f"-tp{tp}.json", path.name))
    if not sibling.exists():
        raise ValueError(f"no TP {tp} profile beside {path} (looked for {sibling.name})")
    return load_profile(sibling)


def tp_sizes(path: str | Path) -> list[int]:
    """The tensor-parallel sizes with a profile beside `path` (just its own without a -tpN name)."""
    path = Path(path)
    if not _TP_SUFFIX.search(path.name):
        return [load_profile(path).tensor_parallel_size]
    stem = _TP_SUFFIX.sub("", path.name)
    return sorted(int(m.group(1)) for p in path.parent.glob(f"{stem}-tp*.json") if (m := _TP_SUFFIX.search(p.name)))


def resolve_profile_path(name: str) -> Path:
    """A profile file, or the name of a reference profile (`h100-llama-3-8b-tp1`)."""
    path = Path(name)
    if path.exists():
        return path
    reference = REFERENCE_DIR / (name if name.endswith(".json") else name + ".json")
    if reference.exists():
        return reference
    raise ValueError(f"no profile {name!r}: not a file, nor one of {sorted(p.stem for p in REFERENCE_DIR.glob('*.json'))}")


def profiles_by_size(names: list[str]) -> dict[int, EngineProfile]:
    """Each named profile and its -tpN siblings, by replica size (TP size on GPUs, cores on a CPU)."""
    out: dict[int, EngineProfile] = {}
    for name in names:
        path = resolve_profile_path(name)
        for tp in tp_sizes(path):
            profile = profile_for_tp(path, tp)
            if profile.replica_size in out:
                raise ValueError(
                    f"two profiles for replicas of size {profile.replica_size}: {out[profile.replica_size].name} and {profile.name}"
                )
            out[profile.replica_size] = profile
    return out
