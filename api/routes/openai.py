"""OpenAI's face: models, chat completions and completions."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from exo.api.errors import error_response
from exo.api.jobs import Disconnected, Job
from exo.api.replies import Replier
from exo.api.routes import api_key, client_of
from exo.api.schemas import ChatRequest, CompletionRequest, Sampling, first_error

router = APIRouter()


@router.get("/v1/models")
@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    data = await client_of(request).query("models")
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
    try:
        body = ChatRequest.model_validate_json(await request.body())
        payload: Any = [m.plain() for m in body.messages]
    except ValidationError as e:
        msg, param = first_error(e)
        return error_response(400, msg, param=param)
    except ValueError as e:
        return error_response(400, str(e), param="messages")
    return await run(request, "chat", body, payload, body.limit())


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    try:
        body = CompletionRequest.model_validate_json(await request.body())
        payload = body.payload()
    except ValidationError as e:
        msg, param = first_error(e)
        return error_response(400, msg, param=param)
    except ValueError as e:
        return error_response(400, str(e), param="prompt")
    return await run(request, "completion", body, payload, body.max_tokens)


def request_timeout(request: Request) -> float | None:
    """X-Request-Timeout, seconds; ValueError when it is not a positive number."""
    header = request.headers.get("x-request-timeout")
    if header is None:
        return None
    timeout_s = float(header)
    if not timeout_s > 0:
        raise ValueError(header)
    return timeout_s


async def run(request: Request, kind: str, body: Sampling, payload: Any, limit: int | None) -> Any:
    try:
        timeout_s = request_timeout(request)
    except ValueError:
        return error_response(
            400, "X-Request-Timeout must be a positive number of seconds", param="X-Request-Timeout"
        )
    client = client_of(request)
    rid = uuid.uuid4().hex[:24]
    queue = await client.submit(
        rid, body.model, kind, payload, body.params(limit), timeout_s, api_key(request)
    )
    job = Job(rid, kind, body.model, queue, token_ids=bool(body.return_token_ids))
    # The ASGI disconnect event, not polling: a client that leaves ends its request.
    watcher = asyncio.create_task(watch_disconnect(request, job))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    try:
        return await Replier(client).respond(job, bool(body.stream), include_usage)
    finally:
        # A streaming response watches for disconnect itself from here on.
        watcher.cancel()


async def watch_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.queue.put_nowait(Disconnected())
