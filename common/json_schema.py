"""JSON Schema, as the grammars that hold output to it read it."""

from __future__ import annotations

from typing import Any

NAMED = ("properties", "patternProperties", "$defs", "definitions")  # name -> schema maps


def closed(schema: Any, depth: int = 0) -> Any:
    """`schema` with every object that lists its properties closed to others
    (`additionalProperties: false` where it says nothing): what OpenAI's strict
    mode and Ollama's formats produce. Left open, a weak model fills extra keys
    until max_tokens cuts the JSON."""
    if depth > 64:
        return schema
    if isinstance(schema, list):
        return [closed(x, depth + 1) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if k in NAMED and isinstance(v, dict):
            out[k] = {name: closed(sub, depth + 1) for name, sub in v.items()}
        else:
            out[k] = closed(v, depth + 1)
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
