"""Software versions across the nodes: what the stages of one pipeline must share,
and where the cluster disagrees (shown by the dashboard, doctor and linkstat)."""

from __future__ import annotations

from typing import Any

# What the stages of one pipeline must share: the same step computed by other
# versions of these may give other tokens (nodes report them: machine/info.py).
ANSWER_KEYS = ("mlx", "mlx_lm", "protocol")


def answer_versions(versions: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """What a node's versions (NodeInfo.versions) say of the tokens it computes."""
    return tuple((k, versions.get(k, "")) for k in ANSWER_KEYS)


def version_skew(nodes: list[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """For each version the nodes do not agree on: which node runs which."""
    seen: dict[str, dict[str, list[str]]] = {}
    for n in nodes:
        for k, v in (n.get("info", {}).get("versions") or {}).items():
            seen.setdefault(k, {}).setdefault(str(v), []).append(str(n.get("name") or n["id"]))
    return {k: by for k, by in seen.items() if len(by) > 1 and k not in ("os", "python")}
