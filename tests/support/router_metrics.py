"""Reading the router's Prometheus text in tests."""

from __future__ import annotations


def metric(http, name: str, labels: str = "") -> float:
    """The sum of every series of `name` (those whose labels start with `labels`, if given)."""
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + (("{" + labels) if labels else "")) and not line.startswith("#"):
            key = line.split(" ")[0]
            if key == name or key.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total
