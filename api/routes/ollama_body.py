"""Ollama's request bodies read into the one internal request: options mapped
onto the sampling parameters (or refused by name), messages and tools as chat
templates take them, `format` (json, or a schema) held by constrained decoding.
The runtime knobs (`num_ctx`, threads, GPU layers...) are the cluster's to decide
and are accepted as such."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from exo.common.json_schema import closed
from exo.common.sampling import SamplingParams

MAPPED = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "top_k": "top_k",
    "min_p": "min_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repetition_penalty",
}
# The cluster decides these (placement, the engine's batching): accepted, not applied.
RUNTIME = {
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_thread",
    "numa", "low_vram", "f16_kv", "vocab_only", "num_keep",
}  # fmt: skip


class Refused(ValueError):
    pass


def model_name(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise Refused("model is required")
    return name.removesuffix(":latest")


def params(body: dict[str, Any]) -> SamplingParams:
    """Ollama's options -> the internal sampling parameters, or Refused."""
    for field in ("images", "suffix", "template"):
        if body.get(field):
            raise Refused(f"'{field}' is not supported by this server yet")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise Refused("options must be an object")
    out: dict[str, Any] = {}
    for k, v in options.items():
        if k in MAPPED:
            out[MAPPED[k]] = v
        elif k == "num_predict":
            if isinstance(v, int) and v > 0:
                out["max_tokens"] = v
        elif k not in RUNTIME:
            raise Refused(f"option '{k}' is not supported by this server")
    fmt = body.get("format")
    if fmt == "json":
        out["json_schema"] = '{"type": "object"}'
    elif isinstance(fmt, dict):
        out["json_schema"] = json.dumps(closed(fmt))
    elif fmt not in (None, ""):
        raise Refused("format must be 'json' or a JSON schema")
    try:
        return SamplingParams.from_wire(out)
    except ValueError as e:
        raise Refused(f"options: {e}") from None


def messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Ollama's messages as chat templates take them (tool calls' arguments objects)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise Refused("messages must be a list")
    out: list[dict[str, Any]] = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("content", ""), str):
            raise Refused("each message is {role, content}")
        if m.get("images"):
            raise Refused("images are not supported by this server yet")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise Refused(f"unknown role {role!r}")
        turn: dict[str, Any] = {"role": str(role), "content": m.get("content", "")}
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise Refused("tool_calls must be a list of calls")
        if calls:
            turn["tool_calls"] = [
                {"type": "function", "function": dict(c.get("function") or {})} for c in calls
            ]
        out.append(turn)
    return out


def tools_of(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools
    ):
        raise Refused("tools must be a list of {type: function, function}")
    return [{"type": "function", "function": t["function"]} for t in tools]


async def body_of(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except (ValueError, RecursionError):
        raise Refused("the body is not JSON") from None
    if not isinstance(body, dict):
        raise Refused("the body must be an object")
    return body
