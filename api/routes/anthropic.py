"""Anthropic's face: the Messages API (`POST /v1/messages`), as the anthropic SDK
and tools built on it speak it: system prompts, stop sequences, streaming events
(message_start, content_block_*, ping, message_delta, message_stop) and errors in
Anthropic's shape. A field the engine cannot honour (tools, images, thinking,
for now) is a 400 naming it, never ignored.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from exo.api.jobs import Disconnected
from exo.api.replies import Done, Reply, Text, Waiting
from exo.api.routes import replier, submitted
from exo.broker import protocol as P
from exo.common.sampling import SamplingParams

router = APIRouter()

STOP_REASON = {"stop": "end_turn", "length": "max_tokens"}
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class Refused(ValueError):
    pass


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPE.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


def text_of(content: Any, where: str) -> str:
    """A message's or system prompt's text: a string, or text blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Refused(f"{where}: content must be a string or a list of blocks")
    parts = []
    for block in content:
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise Refused(f"{where}: '{kind}' blocks are not supported by this server yet")
        if not isinstance(block.get("text"), str):
            raise Refused(f"{where}: a text block needs its text")
        parts.append(block["text"])
    return "".join(parts)


def parse(body: Any) -> tuple[str, list[dict[str, str]], dict[str, Any], bool]:
    """-> model, chat turns, sampling parameters, stream; or Refused."""
    if not isinstance(body, dict):
        raise Refused("the body must be an object")
    for field in ("tools", "tool_choice", "thinking"):
        if body.get(field) is not None:
            raise Refused(f"{field}: not supported by this server yet")
    model, max_tokens = body.get("model"), body.get("max_tokens")
    if not isinstance(model, str) or not model:
        raise Refused("model: a model id is required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise Refused("max_tokens: a positive integer is required")
    turns = []
    if body.get("system") is not None:
        turns.append({"role": "system", "content": text_of(body["system"], "system")})
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise Refused("messages: at least one message is required")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise Refused(f"messages.{i}: role must be user or assistant")
        turns.append({"role": m["role"], "content": text_of(m.get("content"), f"messages.{i}")})
    wire: dict[str, Any] = {"max_tokens": max_tokens}
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("stop", "stop_sequences"),
    ):
        if body.get(theirs) is not None:
            wire[ours] = body[theirs]
    try:
        params = SamplingParams.from_wire(wire).wire()
    except ValueError as e:
        raise Refused(str(e)) from None
    return model, turns, params, body.get("stream") is True


def message(mid: str, model: str, text: str | None, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }


@router.post("/v1/messages")
async def messages(request: Request) -> Any:
    try:
        body = json.loads(await request.body() or b"null")
        model, turns, params, stream = parse(body)
    except (ValueError, RecursionError) as e:
        return error(400, str(e) if isinstance(e, Refused) else "the body is not JSON")
    async with submitted(request, "chat", model, turns, params) as job:
        r = replier(request)
        bad = await r.open(job, stream)
        if isinstance(bad, Disconnected):
            return None
        if bad is not None:
            return error(bad.status, bad.message)
        mid = f"msg_{job.rid}"
        if stream:
            return StreamingResponse(
                events(mid, model, r.events(job)), media_type="text/event-stream"
            )
        got = await r.collect(job)
        if got is None:
            return None
        if isinstance(got, P.Fail):
            return error(got.status, got.message)
        text, _, done = got
        usage = done.usage or {}
        out = message(mid, model, text, tokens(usage))
        out["stop_reason"] = STOP_REASON.get(done.finish, "end_turn")
        return out


def tokens(usage: dict[str, Any]) -> dict[str, int]:
    return {
        "input_tokens": int(usage.get("prompt_tokens", 0)),
        "output_tokens": int(usage.get("completion_tokens", 0)),
    }


def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def events(
    mid: str, model: str, replies: AsyncGenerator[Reply, None]
) -> AsyncIterator[bytes]:
    start = message(mid, model, None, {"input_tokens": 0, "output_tokens": 0})
    yield event("message_start", {"type": "message_start", "message": start})
    block = {"type": "text", "text": ""}
    yield event(
        "content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}
    )
    async with contextlib.aclosing(replies) as evs:  # (closed with us: a cancel)
        async for ev in evs:
            if isinstance(ev, Waiting):
                yield event("ping", {"type": "ping"})
            elif isinstance(ev, Text) and ev.text:
                delta = {"type": "text_delta", "text": ev.text}
                yield event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            elif isinstance(ev, P.Fail):
                yield event("error", error_body(ev.status, ev.message))
            elif isinstance(ev, Done):
                yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
                stop = {
                    "stop_reason": STOP_REASON.get(ev.finish, "end_turn"),
                    "stop_sequence": None,
                }
                usage = tokens(ev.usage or {})
                yield event(
                    "message_delta", {"type": "message_delta", "delta": stop, "usage": usage}
                )
                yield event("message_stop", {"type": "message_stop"})
