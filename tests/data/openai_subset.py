"""Writes openai-chat.json: the operations of OpenAI's published OpenAPI document
that exo serves on its OpenAI face (chat completions, completions, models) with
every component they reference, for tests/test_schemathesis.py.

    python tests/data/openai_subset.py PATH/TO/openai-openapi.yaml
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

WANT = {"/chat/completions": ["post"], "/completions": ["post"], "/models": ["get"]}


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for x in node:
            yield from refs(x)


def subset(spec: dict[str, Any]) -> dict[str, Any]:
    paths = {p: {m: spec["paths"][p][m] for m in ms} for p, ms in WANT.items()}
    components: dict[str, dict[str, Any]] = {}
    todo, seen = list(refs(paths)), set()
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, _, kind, name = ref.split("/")
        node = spec["components"][kind][name]
        components.setdefault(kind, {})[name] = node
        todo += list(refs(node))
    return {
        "openapi": spec["openapi"],
        "info": spec["info"],
        "paths": paths,
        "components": components,
    }


if __name__ == "__main__":
    spec = yaml.safe_load(Path(sys.argv[1]).read_text())
    out = Path(__file__).with_name("openai-chat.json")
    out.write_text(json.dumps(subset(spec), indent=None, sort_keys=True))
    print(f"wrote {out}")
