"""Anthropic's face: the Messages API (`POST /v1/messages`), as the anthropic SDK
and tools built on it speak it: system prompts, stop sequences, streaming events
(message_start, content_block_*, ping, message_delta, message_stop) and errors in
Anthropic's shape; thinking blocks; and `POST /v1/messages/count_tokens`. A
field the engine cannot honour (images, for now) is a 400 naming it, never
ignored.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from exo.api.replies import Done, Reply, Text, Waiting
from exo.api.routes import replier, submitted
from exo.broker import protocol as P
from exo.common.sampling import SamplingParams

router = APIRouter()

THOUGHTS = ("thinking", "redacted_thinking")
STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
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


def text_of(content: object, where: str) -> str:
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


def turns_of(m: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """One Anthropic message -> chat turns: its text, its tool_use blocks as the
    assistant's calls, its tool_result blocks as tool turns."""
    content = m.get("content")
    if not isinstance(content, list):
        return [{"role": m["role"], "content": text_of(content, where)}]
    # (earlier thoughts, sent back by agents, are not the model's to read again:
    # templates drop them too)
    content = [b for b in content if not (isinstance(b, dict) and b.get("type") in THOUGHTS)]
    texts = [b for b in content if isinstance(b, dict) and b.get("type") == "text"]
    uses = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]
    results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
    if len(texts) + len(uses) + len(results) != len(content):
        raise Refused(
            f"{where}: only text, thinking, tool_use and tool_result blocks are supported"
        )
    out: list[dict[str, Any]] = [
        {
            "role": "tool",
            "tool_call_id": str(r.get("tool_use_id", "")),
            "content": text_of(r.get("content", ""), where),
        }
        for r in results
    ]
    if texts or uses or not results:
        turn: dict[str, Any] = {"role": m["role"], "content": text_of(texts, where)}
        if uses:
            turn["tool_calls"] = [
                {
                    "id": u.get("id"),
                    "type": "function",
                    "function": {"name": u.get("name"), "arguments": u.get("input") or {}},
                }
                for u in uses
            ]
        out.append(turn)
    return out


def tools_of(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None, bool]:
    """Anthropic's tools and tool_choice -> the chat's (OpenAI's shape), and whether
    several calls may come at once."""
    tools = body.get("tools")
    if not tools:
        return None, None, True
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("name") for t in tools):
        raise Refused("tools: each tool needs its name")
    fns = [
        {"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                          "parameters": t.get("input_schema") or {"type": "object"}}}
        for t in tools
    ]  # fmt: skip
    choice = body.get("tool_choice") or {"type": "auto"}
    kind = choice.get("type") if isinstance(choice, dict) else None
    named = {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))
    if kind == "tool":
        named = str(choice.get("name"))
    if named is None:
        raise Refused("tool_choice: auto, any, tool or none")
    return fns, named, choice.get("disable_parallel_tool_use") is not True


def parse(body: Any, counting: bool = False) -> tuple[str, P.Payload, SamplingParams, bool]:
    """-> model, the chat payload, sampling parameters, stream; or Refused.
    `counting` (count_tokens): no max_tokens is asked for."""
    if not isinstance(body, dict):
        raise Refused("the body must be an object")
    switch = thinking_of(body.get("thinking"))
    model, max_tokens = body.get("model"), body.get("max_tokens", 1 if counting else None)
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
        turns += turns_of(m, f"messages.{i}")
    tools, choice, parallel = tools_of(body)
    wire: dict[str, Any] = {"max_tokens": max_tokens}
    if tools:
        wire["tool_choice"] = choice
        wire["parallel_tool_calls"] = parallel
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("stop", "stop_sequences"),
    ):
        if body.get(theirs) is not None:
            wire[ours] = body[theirs]
    try:
        params = SamplingParams.from_wire(wire)
    except ValueError as e:
        raise Refused(str(e)) from None
    payload: P.Payload = turns
    if tools or switch is not None:
        payload = {"messages": turns}
        if tools:
            payload["tools"] = tools
        if switch is not None:  # the template's own switch, where it has one
            payload["template"] = {"enable_thinking": switch}
    return model, payload, params, body.get("stream") is True


def thinking_of(thinking: object) -> bool | None:
    """Anthropic's `thinking` -> the chat template's switch (None: not asked).
    budget_tokens is taken within max_tokens: thoughts and answer share it."""
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return False
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if kind != "enabled" or not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise Refused("thinking: {type: enabled, budget_tokens: N} or {type: disabled}")
    return True


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
        model, payload, params, stream = parse(body)
    except (ValueError, RecursionError) as e:
        return error(400, str(e) if isinstance(e, Refused) else "the body is not JSON")
    async with submitted(request, "chat", model, payload, params) as job:
        mid = f"msg_{job.rid}"

        def whole(text: str, _: list[int], done: Done) -> dict[str, Any]:
            out = message(mid, model, text or None, tokens(done.usage or {}))
            if done.reasoning:
                thought = {"type": "thinking", "thinking": done.reasoning, "signature": ""}
                out["content"].insert(0, thought)
            out["content"] += [tool_use(c) for c in done.tool_calls or []]
            out["stop_reason"] = STOP_REASON.get(done.finish, "end_turn")
            return out

        return await replier(request).answer(
            job,
            stream,
            lambda f: error(f.status, f.message),
            lambda replies: StreamingResponse(
                events(mid, model, replies), media_type="text/event-stream"
            ),
            whole,
        )


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Any:
    """The input tokens a Messages request comes to (system, turns, tools) by the
    model's own tokenizer and chat template on the node holding its first stage:
    nothing is generated."""
    try:
        body = json.loads(await request.body() or b"null")
        model, payload, params, _ = parse(body, counting=True)
    except (ValueError, RecursionError) as e:
        return error(400, str(e) if isinstance(e, Refused) else "the body is not JSON")
    async with submitted(request, "count", model, payload, params) as job:

        def counted(_text: str, _ids: list[int], done: Done) -> dict[str, Any]:
            return {"input_tokens": int((done.usage or {}).get("prompt_tokens", 0))}

        return await replier(request).answer(
            job,
            False,
            lambda f: error(f.status, f.message),
            lambda _: error(500, "count_tokens does not stream"),  # (never: stream is False)
            counted,
        )


def tool_use(call: dict[str, Any]) -> dict[str, Any]:
    """A call (OpenAI's shape) as Anthropic's tool_use block."""
    fn = call["function"]
    uid = "toolu_" + str(call["id"]).removeprefix("call_")
    return {"type": "tool_use", "id": uid, "name": fn["name"], "input": json.loads(fn["arguments"])}


def tokens(usage: dict[str, Any]) -> dict[str, int]:
    """Anthropic's usage: input tokens read from the prefix cache counted apart."""
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    return {
        "input_tokens": int(usage.get("prompt_tokens", 0)) - cached,
        "output_tokens": int(usage.get("completion_tokens", 0)),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Blocks:
    """A streamed message's content blocks, one open at a time: a thinking block
    (its thoughts, then its signature) and a text block, in the order they come."""

    def __init__(self) -> None:
        self.index, self.open = -1, ""

    def delta(self, kind: str, text: str) -> list[bytes]:
        out = [] if self.open == kind else self.close()
        if self.open != kind:
            self.index, self.open = self.index + 1, kind
            block = {"type": kind, kind: ""} | ({"signature": ""} if kind == "thinking" else {})
            start = {"type": "content_block_start", "index": self.index, "content_block": block}
            out.append(event("content_block_start", start))
        if text:
            delta = {"type": f"{kind}_delta", kind: text}
            out.append(
                event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": self.index, "delta": delta},
                )
            )
        return out

    def close(self) -> list[bytes]:
        if not self.open:
            return []
        out = []
        if self.open == "thinking":  # (no signature: nothing here signs thoughts)
            delta = {"type": "signature_delta", "signature": ""}
            out.append(
                event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": self.index, "delta": delta},
                )
            )
        out.append(event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        self.open = ""
        return out


async def events(
    mid: str, model: str, replies: AsyncGenerator[Reply, None]
) -> AsyncIterator[bytes]:
    start = message(mid, model, None, {"input_tokens": 0, "output_tokens": 0})
    yield event("message_start", {"type": "message_start", "message": start})
    blocks = Blocks()
    async with contextlib.aclosing(replies) as evs:  # (closed with us: a cancel)
        async for ev in evs:
            if isinstance(ev, Waiting):
                yield event("ping", {"type": "ping"})
            elif isinstance(ev, Text) and (ev.text or ev.reasoning):
                # a thinking model's thoughts come first, in a thinking block
                if ev.reasoning:
                    for out in blocks.delta("thinking", ev.reasoning):
                        yield out
                if ev.text:
                    for out in blocks.delta("text", ev.text):
                        yield out
            elif isinstance(ev, P.Fail):
                yield event("error", error_body(ev.status, ev.message))
            elif isinstance(ev, Done):
                if blocks.index < 0:
                    for out in blocks.delta("text", ""):
                        yield out
                for out in blocks.close():
                    yield out
                for i, call in enumerate(ev.tool_calls or [], start=blocks.index + 1):
                    use = tool_use(call)
                    start_use = {**use, "input": {}}
                    yield event(
                        "content_block_start",
                        {"type": "content_block_start", "index": i, "content_block": start_use},
                    )
                    delta = {"type": "input_json_delta", "partial_json": json.dumps(use["input"])}
                    yield event(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": i, "delta": delta},
                    )
                    yield event("content_block_stop", {"type": "content_block_stop", "index": i})
                stop = {
                    "stop_reason": STOP_REASON.get(ev.finish, "end_turn"),
                    "stop_sequence": None,
                }
                usage = tokens(ev.usage or {})
                yield event(
                    "message_delta", {"type": "message_delta", "delta": stop, "usage": usage}
                )
                yield event("message_stop", {"type": "message_stop"})
