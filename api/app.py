"""The OpenAI-compatible HTTP API. It holds no model: every request becomes a
SUBMIT to the broker, and the tokens that come back are streamed out."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from exo.api.client import BrokerClient, BrokerUnavailable
from exo.api.errors import error_body, error_response
from exo.api.limits import BodyLimit
from exo.api.schemas import ChatRequest, CompletionRequest, PlaceRequest, Sampling, first_error
from exo.api.security import Guard, Policy, keys_from_env
from exo.broker import protocol as P
from exo.common import keys
from exo.common.names import valid_model_id

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0


@dataclass
class Job:
    """One request on its way through the cluster, as the API sees it."""

    rid: str
    kind: str  # "chat" | "completion"
    model: str
    queue: asyncio.Queue[P.Message]
    created: int = field(default_factory=lambda: int(time.time()))
    peeked: list[P.Message] = field(default_factory=list)
    token_ids: bool = False

    @property
    def id(self) -> str:
        return f"chatcmpl-{self.rid}" if self.kind == "chat" else f"cmpl-{self.rid}"

    def chunk(
        self,
        text: str | None,
        finish: str | None = None,
        first: bool = False,
        ids: list[int] | None = None,
    ) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
            }
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        if self.token_ids and ids is not None:
            choice["token_ids"] = ids
        return self.envelope(obj, choice)

    def envelope(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "exo",
            "choices": [choice],
        }

    def whole(
        self, text: str, finish: str | None, usage: dict[str, int] | None, ids: list[int]
    ) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        if self.token_ids:
            choice["token_ids"] = ids
        return {**self.envelope(obj, choice), "usage": usage}


def api_key(request: Request) -> str | None:
    """The caller's API key, as the Guard checked it (None with keys off)."""
    state = request.scope.get("state") or {}
    return state.get("api_key")


def sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def create_app(
    broker: str, policy: Policy | None = None, members: keys.Cluster | None = None
) -> FastAPI:
    """The API against `broker`, with `policy` (keys, hosts, origins) and the
    cluster's keys (`members`; None: an insecure cluster)."""
    client = BrokerClient(broker, members)
    policy = policy or Policy(keys=keys_from_env())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await client.start()
        yield
        await client.close()

    app = FastAPI(title="exo", lifespan=lifespan)
    app.state.client = client
    app.add_middleware(BodyLimit)
    app.add_middleware(Guard, policy=policy)  # outermost: before anything reads the body

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Whatever got past the checks is still answered in OpenAI's shape.
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, str(exc.errors()[0].get("msg", "invalid request")))

    @app.exception_handler(BrokerUnavailable)
    async def broker_down(request: Request, exc: BrokerUnavailable) -> JSONResponse:
        return error_response(503, str(exc), "broker_unavailable")

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> dict[str, Any]:
        data = await client.query("models")
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

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        for m in (await models())["data"]:
            if m["id"] == model_id:
                return m
        return error_response(
            404, f"The model '{model_id}' does not exist", "model_not_found", "model"
        )

    @app.post("/v1/models/pull")
    async def pull(request: Request) -> Any:
        try:
            body = json.loads(await request.body() or b"{}")
        except (ValueError, RecursionError):
            return error_response(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            body = {}
        model, node = body.get("model"), body.get("node")
        if not isinstance(model, str) or "/" not in model or not valid_model_id(model):
            return error_response(400, "'model' must be a hub id ORG/NAME", param="model")
        if node is not None and not isinstance(node, str):
            return error_response(400, "'node' must be a node id or name", param="node")
        data = await client.pull(model, node)
        if "error" in data:
            return error_response(404, data["error"], "node_not_found", "node")
        return JSONResponse({"model": model, **data}, status_code=202)

    @app.post("/v1/cancel/{request_id}")
    async def cancel(request_id: str, request: Request) -> Any:
        rid = request_id.removeprefix("chatcmpl-").removeprefix("cmpl-")
        # Only whoever submitted it may cancel it (its API key, when keys are on).
        mine = rid in client.owners and client.owners[rid] == api_key(request)
        if not mine or not await client.cancel_explicit(rid):
            return error_response(404, f"no request {request_id} is in flight", "request_not_found")
        return {"id": rid, "object": "cancellation", "cancelled": True}

    @app.post("/v1/instances")
    async def place(request: Request) -> Any:
        return await place_or_preview(request, "place")

    @app.post("/v1/instances/preview")
    async def preview(request: Request) -> Any:
        return await place_or_preview(request, "preview")

    async def place_or_preview(request: Request, op: str) -> Any:
        try:
            body = PlaceRequest.model_validate_json(await request.body())
        except ValidationError as e:
            msg, param = first_error(e)
            return error_response(400, msg, param=param)
        return instances_reply(await client.ask("INSTANCES", op=op, spec=body.spec()))

    @app.get("/v1/instances")
    async def list_instances() -> Any:
        reply = await client.ask("INSTANCES", op="list")
        return {"object": "list", "data": reply["body"]}

    @app.delete("/v1/instances/{instance_id}")
    async def delete_instance(instance_id: str) -> Any:
        return instances_reply(await client.ask("INSTANCES", op="delete", id=instance_id))

    def instances_reply(reply: dict[str, Any]) -> Any:
        status, body = int(reply["status"]), reply["body"]
        if status >= 400:
            return error_response(status, body["message"], body["code"])
        return JSONResponse(body, status_code=status)

    @app.get("/v1/cluster")
    async def cluster() -> Any:
        return await client.query("cluster")

    @app.post("/v1/chat/completions")
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

    @app.post("/v1/completions")
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

    async def run(
        request: Request, kind: str, body: Sampling, payload: Any, limit: int | None
    ) -> Any:
        timeout_s = None
        if (header := request.headers.get("x-request-timeout")) is not None:
            try:
                timeout_s = float(header)
                if not timeout_s > 0:
                    raise ValueError
            except ValueError:
                return error_response(
                    400,
                    "X-Request-Timeout must be a positive number of seconds",
                    param="X-Request-Timeout",
                )
        rid = uuid.uuid4().hex[:24]
        queue = await client.submit(
            rid, body.model, kind, payload, body.params(limit), timeout_s, api_key(request)
        )
        job = Job(rid, kind, body.model, queue, token_ids=bool(body.return_token_ids))
        # The ASGI disconnect event, not polling: a client that leaves ends its request.
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            return await respond(job, body)
        finally:
            # A streaming response watches for disconnect itself from here on.
            watcher.cancel()

    async def watch_disconnect(request: Request, job: Job) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.queue.put_nowait(P.Message("DISCONNECT", {"rid": job.rid}))

    async def respond(job: Job, body: Sampling) -> Any:
        rid, queue = job.rid, job.queue
        first = await queue.get()
        if first.type == "DISCONNECT":
            await client.cancel(rid, "disconnect")
            return None
        headers = {"X-Request-Id": rid}
        if first.type == "FAIL":
            client.done(rid)
            return failed(first, headers)
        if body.stream:
            # Hold the status line until the node admits the request, so a refusal
            # (prompt too long...) is a proper 4xx; past KEEPALIVE_S (a model still
            # loading) start streaming and report any later failure in the stream.
            verdict = await admitted(job)
            if verdict is not None and verdict.type == "DISCONNECT":
                await client.cancel(rid, "disconnect")
                return None
            if verdict is not None:
                client.done(rid)
                return failed(verdict, headers)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream(job, include_usage),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        return await collect(job, headers)

    def failed(msg: P.Message, headers: dict[str, str]) -> JSONResponse:
        """The HTTP answer to a FAIL from the broker or a node."""
        param = "model" if msg["code"] == "model_not_found" else None
        return error_response(msg["status"], msg["message"], msg["code"], param, headers=headers)

    async def admitted(job: Job) -> P.Message | None:
        """Wait for the node to take the request: its FAIL if it refuses, else None."""
        deadline = time.monotonic() + KEEPALIVE_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await asyncio.wait_for(job.queue.get(), left)
            except TimeoutError:
                return None
            if msg.type in ("FAIL", "DISCONNECT"):
                return msg
            if (
                msg.type == "TOKENS"
                or msg.type == "STATE"
                and msg["state"] in ("admitted", "downloading")
            ):
                # Admitted, or waiting on a download: its progress goes out in the stream.
                job.peeked.append(msg)
                return None
        return None

    async def next_message(job: Job) -> P.Message | None:
        """The request's next message, or None after KEEPALIVE_S of silence."""
        if job.peeked:
            return job.peeked.pop(0)
        try:
            return await asyncio.wait_for(job.queue.get(), KEEPALIVE_S)
        except TimeoutError:
            return None

    async def stream(job: Job, include_usage: bool) -> AsyncIterator[bytes]:
        finished = False
        try:
            yield sse(job.chunk("" if job.kind == "chat" else None, first=True))
            while True:
                msg = await next_message(job)
                if msg is not None and msg.type == "STATE" and msg["state"] == "admitted":
                    continue
                if msg is None or msg.type == "STATE":
                    # SSE comments keep proxies and clients from timing out while
                    # a model loads or a long prompt prefills.
                    state = msg["state"] if msg is not None else "working"
                    if msg is not None and "total" in msg.fields:
                        state += f" {msg['done']}/{msg['total']}"
                    yield f": {state}\n\n".encode()
                    continue
                if msg.type == "FAIL":
                    finished = True
                    yield sse(error_body(msg["status"], msg["message"], msg["code"]))
                    yield b"data: [DONE]\n\n"
                    return
                if msg.type != "TOKENS":
                    continue
                finish = msg.get("finish")
                if msg["text"] or (job.token_ids and msg["ids"]):
                    yield sse(job.chunk(msg["text"], ids=msg["ids"]))
                if finish:
                    finished = True
                    yield sse(job.chunk(None, finish))
                    if include_usage:
                        yield sse({**job.chunk(None), "choices": [], "usage": msg.get("usage")})
                    yield b"data: [DONE]\n\n"
                    return
        finally:
            if finished:
                client.done(job.rid)
            else:
                # The client went away (or the server is stopping): no one is listening.
                await client.cancel(job.rid, "disconnect")
                log.info("rid=%s stream closed early; cancelled", job.rid)

    async def collect(job: Job, headers: dict[str, str]) -> Any:
        parts: list[str] = []
        ids: list[int] = []
        try:
            while True:
                msg = await next_message(job)
                if msg is None or msg.type in ("STATE", "ACCEPTED"):
                    continue
                if msg.type == "DISCONNECT":
                    await client.cancel(job.rid, "disconnect")
                    log.info("rid=%s client left before the reply; cancelled", job.rid)
                    return None
                if msg.type == "FAIL":
                    return failed(msg, headers)
                parts.append(msg["text"])
                ids.extend(msg["ids"])
                if msg.get("finish"):
                    return JSONResponse(
                        job.whole("".join(parts), msg["finish"], msg.get("usage"), ids),
                        headers=headers,
                    )
        finally:
            client.done(job.rid)

    return app
