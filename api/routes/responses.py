"""OpenAI's Responses face (`POST /v1/responses`), as the openai SDK's
`responses.create` and agent tools speak it: `input` (a string or items: messages,
function calls and their outputs), `instructions`, function tools, streaming
events, and `previous_response_id` for the turns the server keeps (in this API
process, the last MAX_KEPT responses, each readable only with the API key that
made it). One internal chat request underneath, as for every face.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from exo.api.errors import error_response
from exo.api.replies import Done, Reply, Text
from exo.api.routes import api_key, replier, submitted
from exo.broker import protocol as P
from exo.common.sampling import SamplingParams

router = APIRouter()

MAX_KEPT = 1000
# response id -> (the API key that made it, the whole conversation after it)
kept: OrderedDict[str, tuple[str | None, list[dict[str, Any]]]] = OrderedDict()


class Refused(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def text_of(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in (
                "input_text",
                "output_text",
                "text",
            ):
                raise Refused(f"{where}: only text parts are supported", "input")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise Refused(f"{where}: content must be text", "input")


def turns_of(items: Any) -> list[dict[str, Any]]:
    """Responses' input -> chat turns (with the tool history as chat keeps it)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise Refused("input must be a string or a list of items", "input")
    turns: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise Refused(f"input.{i}: an item is an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise Refused(f"input.{i}: unknown role {role!r}", "input")
            role = "system" if role == "developer" else role
            turns.append({"role": role, "content": text_of(item.get("content"), f"input.{i}")})
        elif kind == "function_call":
            args = json.loads(item.get("arguments") or "{}")
            call = {"name": item.get("name"), "arguments": args}
            c = {"id": item.get("call_id"), "type": "function", "function": call}
            turns.append({"role": "assistant", "content": "", "tool_calls": [c]})
        elif kind == "function_call_output":
            turns.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": str(item.get("output")),
                }
            )
        else:
            raise Refused(f"input.{i}: '{kind}' items are not supported", "input")
    return turns


def tools_of(tools: Any) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for t in tools:
        if not isinstance(t, dict) or t.get("type") != "function" or not t.get("name"):
            raise Refused("tools: only function tools are supported", "tools")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def parse(
    body: Any, key: str | None
) -> tuple[str, list[dict[str, Any]], P.Payload, SamplingParams, bool]:
    """-> model, the conversation so far (kept turns + this input), the chat
    payload, sampling parameters, stream."""
    if not isinstance(body, dict):
        raise Refused("the body must be an object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Refused("model is required", "model")
    history: list[dict[str, Any]] = []
    if (prev := body.get("previous_response_id")) is not None:
        got = kept.get(prev) if isinstance(prev, str) else None
        if got is None or got[0] != key:
            raise Refused(f"no response {prev!r}", "previous_response_id")
        history = list(got[1])
    turns = [*history, *turns_of(body.get("input", []))]
    if isinstance(body.get("instructions"), str):  # (not carried over: as OpenAI does)
        turns = [{"role": "system", "content": body["instructions"]}, *turns]
    wire: dict[str, Any] = {}
    for ours, theirs in (
        ("max_tokens", "max_output_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
    ):
        if body.get(theirs) is not None:
            wire[ours] = body[theirs]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        choice = choice.get("name")
    tools = tools_of(body.get("tools"))
    if tools and isinstance(choice, str):
        wire["tool_choice"] = choice
    if body.get("parallel_tool_calls") is False:
        wire["parallel_tool_calls"] = False
    try:
        params = SamplingParams.from_wire(wire)
    except ValueError as e:
        raise Refused(str(e)) from None
    payload: P.Payload = {"messages": turns, "tools": tools} if tools else turns
    return model, turns, payload, params, body.get("stream") is True


def items(text: str, done: Done) -> list[dict[str, Any]]:
    """The output items: the calls, or one message."""
    if done.tool_calls:
        return [
            {
                "type": "function_call",
                "id": f"fc_{c['id'].removeprefix('call_')}",
                "call_id": c["id"],
                "name": c["function"]["name"],
                "arguments": c["function"]["arguments"],
                "status": "completed",
            }
            for c in done.tool_calls
        ]
    part = {"type": "output_text", "text": text, "annotations": []}
    return [
        {
            "type": "message",
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }
    ]


def response(rid: str, model: str, status: str, output: list[Any], usage: Any) -> dict[str, Any]:
    u = usage or {}
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": int(u.get("prompt_tokens", 0)),
            "output_tokens": int(u.get("completion_tokens", 0)),
            "total_tokens": int(u.get("total_tokens", 0)),
            "input_tokens_details": {
                "cached_tokens": int((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
            },
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def keep(rid: str, key: str | None, turns: list[dict[str, Any]], text: str, done: Done) -> None:
    """The conversation after this response, for a next one that names it."""
    reply: dict[str, Any] = {"role": "assistant", "content": text}
    if done.tool_calls:
        reply["tool_calls"] = [
            {
                **c,
                "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])},
            }
            for c in done.tool_calls
        ]
    kept[rid] = (key, [t for t in turns if t["role"] != "system"] + [reply])
    while len(kept) > MAX_KEPT:
        kept.popitem(last=False)


@router.post("/v1/responses")
async def create(request: Request) -> Any:
    key = api_key(request)
    try:
        body = json.loads(await request.body() or b"null")
        model, turns, payload, params, stream = parse(body, key)
    except Refused as e:
        return error_response(400, str(e), param=e.param)
    except (ValueError, RecursionError):
        return error_response(400, "We could not parse the JSON body of your request.")
    async with submitted(request, "chat", model, payload, params) as job:
        rid = f"resp_{job.rid}"

        def kept_as(text: str, done: Done) -> None:
            keep(rid, key, turns, text, done)

        def whole(text: str, _: list[int], done: Done) -> dict[str, Any]:
            kept_as(text, done)
            return response(rid, model, "completed", items(text, done), done.usage)

        return await replier(request).answer(
            job,
            stream,
            lambda f: error_response(f.status, f.message, f.code),
            lambda replies: StreamingResponse(
                sse(rid, model, replies, kept_as), media_type="text/event-stream"
            ),
            whole,
        )


class Events:
    """Responses' SSE events, numbered."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, kind: str, **data: Any) -> bytes:
        self.n += 1
        payload = {"type": kind, "sequence_number": self.n, **data}
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()

    def part(self, kind: str, mid: str, **data: Any) -> bytes:
        """An event about the message's one text part."""
        return self(kind, item_id=mid, output_index=0, content_index=0, **data)


async def sse(
    rid: str, model: str, replies: AsyncGenerator[Reply, None], kept_as: Callable[[str, Done], None]
) -> AsyncIterator[bytes]:
    event = Events()
    yield event("response.created", response=response(rid, model, "in_progress", [], None))
    mid = f"msg_{uuid.uuid4().hex[:24]}"
    text, started = "", False
    async with contextlib.aclosing(replies) as evs:  # (closed with us: a cancel)
        async for ev in evs:
            if isinstance(ev, Text) and ev.text:
                if not started:
                    started = True
                    item: dict[str, Any] = {"type": "message", "id": mid, "role": "assistant"}
                    item.update(status="in_progress", content=[])
                    yield event("response.output_item.added", output_index=0, item=item)
                    part = {"type": "output_text", "text": "", "annotations": []}
                    yield event.part("response.content_part.added", mid, part=part)
                text += ev.text
                yield event.part("response.output_text.delta", mid, delta=ev.text)
            elif isinstance(ev, P.Fail):
                yield event("error", code=ev.code, message=ev.message, param=None)
            elif isinstance(ev, Done):
                out = items(text, ev)
                if started and not ev.tool_calls:
                    out[0]["id"] = mid
                    yield event.part("response.output_text.done", mid, text=text)
                    yield event.part("response.content_part.done", mid, part=out[0]["content"][0])
                for i, item in enumerate(out):
                    if not started or ev.tool_calls:
                        yield event("response.output_item.added", output_index=i, item=item)
                    yield event("response.output_item.done", output_index=i, item=item)
                kept_as(text, ev)
                done = response(rid, model, "completed", out, ev.usage)
                yield event("response.completed", response=done)
