"""Prefix digests: what the broker knows of a node's prefix cache without any KV.

A request's payload is cut into parts that later requests repeat whole: a chat
into its messages (after the tools it offers, which the template renders first),
a text prompt into blocks of BLOCK_CHARS characters, a token prompt into blocks
of BLOCK_IDS ids. Each digest covers its part and every part before it (a hash
chain), so one digest held by a node says the whole prefix up to it is cached
there. A node reports the digests of what its cache holds (nodes/engine/prefix.py,
the answer included: a chat's next turn repeats it as a message); the broker
sends a request to the instance holding its longest chain (broker/routing.py).
Both ends compute them here, from the payload as the client sent it.
"""

from __future__ import annotations

import hashlib
import json

BLOCK_CHARS = 512
BLOCK_IDS = 128
SIZE = 8  # bytes per digest: 16 hex characters


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    return json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)


def _parts(kind: str, payload: object) -> list[str]:
    if kind == "chat" and isinstance(payload, dict):
        head = _text([payload.get("tools"), payload.get("template")])
        messages = payload.get("messages") or []
    elif kind == "chat" and isinstance(payload, list):
        head, messages = "", payload
    elif kind == "completion" and isinstance(payload, str):
        full = len(payload) // BLOCK_CHARS * BLOCK_CHARS  # whole blocks only
        return [payload[i : i + BLOCK_CHARS] for i in range(0, full, BLOCK_CHARS)]
    elif kind == "completion" and isinstance(payload, list):
        full = len(payload) // BLOCK_IDS * BLOCK_IDS
        return [_text(payload[i : i + BLOCK_IDS]) for i in range(0, full, BLOCK_IDS)]
    else:
        return []
    parts = [
        _text({k: m.get(k) for k in ("role", "content", "tool_calls", "name")})
        for m in messages
        if isinstance(m, dict)
    ]
    if parts:  # the tools and template switches come first, with the first message
        parts[0] = head + "\x00" + parts[0]
    return parts


def chain(kind: str, payload: object, answer: str | None = None) -> list[str]:
    """The digests of a request's prefixes, shortest first. `answer`: what the
    model answered, as a client repeats it (a chat's next assistant message, a
    prompt's continuation)."""
    if answer is not None:
        messages = payload.get("messages") if isinstance(payload, dict) else payload
        if kind == "chat" and isinstance(messages, list):
            turn = [*messages, {"role": "assistant", "content": answer}]
            payload = {**payload, "messages": turn} if isinstance(payload, dict) else turn
        elif kind == "completion" and isinstance(payload, str):
            payload = payload + answer
    out: list[str] = []
    h = b""
    for part in _parts(kind, payload):
        h = hashlib.blake2b(h + part.encode("utf-8", "replace"), digest_size=SIZE).digest()
        out.append(h.hex())
    return out


def held(wanted: list[str], have: set[str]) -> int:
    """How many of `wanted`'s parts a holder of the digests `have` has cached."""
    for i in range(len(wanted), 0, -1):
        if wanted[i - 1] in have:
            return i
    return 0
