"""OpenAI's face: models, chat completions and completions."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from exo.api.errors import error_body, error_response
from exo.api.jobs import Job, sse
from exo.api.replies import Answer, Done, Replier, Reply, Text, Waiting, failed
from exo.api.routes import client_of, replier, submitted
from exo.api.schemas import ChatRequest, CompletionRequest, Sampling, first_error
from exo.broker import protocol as P

router = APIRouter()
# What another face adds to OpenAI's answer (its last chunk, or the whole body).
Extra = Callable[[Job, Done], dict[str, Any]]


@router.get("/v1/models")
@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    data = await client_of(request).models()
    return {
        "object": "list",
        "data": [
            {
                "id": m["id"],
                "object": "model",
                "created": m["created"],
                "owned_by": "exo",
                "loaded": bool(m["loaded_on"]),
                "nodes": m["nodes"],
            }
            for m in data
        ],
    }


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> Any:
    for m in (await models(request))["data"]:
        if m["id"] == model_id:
            return m
    return error_response(404, f"The model '{model_id}' does not exist", "model_not_found", "model")


@router.post("/v1/chat/completions")
async def chat(request: Request) -> Any:
    return await chat_as(request)


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    return await completions_as(request)


async def chat_as(request: Request, extra: Extra | None = None) -> Any:
    """`extra`: what another face (LM Studio's) adds to OpenAI's answer."""
    try:
        body = ChatRequest.model_validate_json(await request.body())
        payload: P.Payload = body.payload()
    except ValidationError as e:
        msg, param = first_error(e)
        return error_response(400, msg, param=param)
    except ValueError as e:
        return error_response(400, str(e), param="messages")
    try:
        choice = body.choice()
    except ValueError as e:
        return error_response(400, str(e), param="tool_choice")
    return await run(request, "chat", body, payload, body.limit(), choice, extra)


async def completions_as(request: Request, extra: Extra | None = None) -> Any:
    try:
        body = CompletionRequest.model_validate_json(await request.body())
        payload = body.payload()
    except ValidationError as e:
        msg, param = first_error(e)
        return error_response(400, msg, param=param)
    except ValueError as e:
        return error_response(400, str(e), param="prompt")
    return await run(request, "completion", body, payload, body.max_tokens, None, extra)


def request_timeout(request: Request) -> float | None:
    """X-Request-Timeout, seconds; ValueError when it is not a positive number."""
    header = request.headers.get("x-request-timeout")
    if header is None:
        return None
    timeout_s = float(header)
    if not timeout_s > 0:
        raise ValueError(header)
    return timeout_s


async def run(
    request: Request,
    kind: str,
    body: Sampling,
    payload: P.Payload,
    limit: int | None,
    tool_choice: str | None = None,
    extra: Extra | None = None,
) -> Answer | None:
    if (field := body.unsupported()) is not None:
        return error_response(400, f"'{field}' is not supported by this server yet", param=field)
    try:
        timeout_s = request_timeout(request)
    except ValueError:
        return error_response(
            400, "X-Request-Timeout must be a positive number of seconds", param="X-Request-Timeout"
        )
    try:
        params = body.params(limit)
        if tool_choice is not None:
            params.tool_choice = tool_choice
    except ValueError as e:
        known = ("logit_bias", "top_logprobs")
        param = next((k for k in known if k in str(e)), "response_format")
        return error_response(400, str(e), param=param)
    async with submitted(request, kind, body.model, payload, params, timeout_s) as job:
        job.token_ids = bool(body.return_token_ids)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        r = replier(request)
        return await respond(r, job, bool(body.stream), include_usage, extra)


async def respond(
    r: Replier, job: Job, stream: bool, include_usage: bool, extra: Extra | None = None
) -> Answer | None:
    headers = {"X-Request-Id": job.rid}

    def streamed(events: AsyncGenerator[Reply, None]) -> StreamingResponse:
        return StreamingResponse(
            sse_stream(job, events, include_usage, extra),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache"},
        )

    def whole(text: str, ids: list[int], done: Done) -> JSONResponse:
        body = job.whole(text, done.finish, done.usage, ids, done.tool_calls, done.logprobs)
        if done.reasoning and job.kind == "chat":
            body["choices"][0]["message"]["reasoning_content"] = done.reasoning
        if extra is not None:
            body.update(extra(job, done))
        return JSONResponse(body, headers=headers)

    return await r.answer(job, stream, lambda f: failed(f, headers), streamed, whole)


async def sse_stream(
    job: Job,
    events: AsyncGenerator[Reply, None],
    include_usage: bool,
    extra: Extra | None = None,
) -> AsyncIterator[bytes]:
    """OpenAI's chunks; SSE comments keep proxies and clients from timing out
    while a model loads or a long prompt prefills."""
    async with contextlib.aclosing(events) as replies:  # (closed with us: a cancel)
        yield sse(job.chunk("" if job.kind == "chat" else None, first=True))
        async for ev in replies:
            if isinstance(ev, Waiting):
                yield f": {ev.state}\n\n".encode()
            elif isinstance(ev, P.Fail):
                yield sse(error_body(ev.status, ev.message, ev.code))
                yield b"data: [DONE]\n\n"
            elif isinstance(ev, Text):
                if ev.reasoning:
                    yield sse(job.chunk(None, reasoning=ev.reasoning))
                if ev.text or (job.token_ids and ev.ids) or ev.logprobs:
                    yield sse(job.chunk(ev.text, ids=ev.ids, logprobs=ev.logprobs))
            else:
                if ev.tool_calls:
                    yield sse(job.calls_chunk(ev.tool_calls))
                yield sse({**job.chunk(None, ev.finish), **(extra(job, ev) if extra else {})})
                if include_usage:
                    yield sse({**job.chunk(None), "choices": [], "usage": ev.usage})
                yield b"data: [DONE]\n\n"
