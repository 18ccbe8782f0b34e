"""From a request's messages to its HTTP answer: one JSON body, or an SSE stream.

The broker's answer to a SUBMIT arrives on the job's queue: ACCEPTED, STATE
(admitted, downloading, prefill progress), TOKENS, and FAIL from the broker or a
node; `Disconnected` when the HTTP client left. A streamed answer holds its status
line until the node admits the request, so a refusal (a prompt too long...) is
still a proper 4xx; past KEEPALIVE_S (a model still loading) it starts streaming,
keeps the connection alive with SSE comments, and reports a later failure in the
stream. Whatever ends early cancels the request on the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from exo.api.client import BrokerClient
from exo.api.errors import error_body, error_response
from exo.api.jobs import Disconnected, Event, Job, sse
from exo.broker import protocol as P

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0


def failed(msg: P.Fail, headers: dict[str, str]) -> JSONResponse:
    """The HTTP answer to a FAIL from the broker or a node."""
    param = "model" if msg.code == "model_not_found" else None
    return error_response(msg.status, msg.message, msg.code, param, headers=headers)


class Replier:
    def __init__(self, client: BrokerClient) -> None:
        self.client = client

    async def respond(self, job: Job, stream: bool, include_usage: bool) -> Any:
        first = await job.queue.get()
        if isinstance(first, Disconnected):
            await self.client.cancel(job.rid, "disconnect")
            return None
        headers = {"X-Request-Id": job.rid}
        if isinstance(first, P.Fail):
            self.client.done(job.rid)
            return failed(first, headers)
        if not stream:
            return await self.collect(job, headers)
        verdict = await self.admitted(job)
        if isinstance(verdict, Disconnected):
            await self.client.cancel(job.rid, "disconnect")
            return None
        if verdict is not None:
            self.client.done(job.rid)
            return failed(verdict, headers)
        return StreamingResponse(
            self.stream(job, include_usage),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache"},
        )

    async def admitted(self, job: Job) -> P.Fail | Disconnected | None:
        """Wait for the node to take the request: its FAIL if it refuses, else None."""
        deadline = time.monotonic() + KEEPALIVE_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await asyncio.wait_for(job.queue.get(), left)
            except TimeoutError:
                return None
            if isinstance(msg, P.Fail | Disconnected):
                return msg
            if isinstance(msg, P.Tokens) or (
                isinstance(msg, P.State) and msg.state in ("admitted", "downloading")
            ):
                # Admitted, or waiting on a download: its progress goes out in the stream.
                job.peeked.append(msg)
                return None
        return None

    @staticmethod
    async def next_message(job: Job) -> Event | None:
        """The request's next message, or None after KEEPALIVE_S of silence."""
        if job.peeked:
            return job.peeked.pop(0)
        try:
            return await asyncio.wait_for(job.queue.get(), KEEPALIVE_S)
        except TimeoutError:
            return None

    async def stream(self, job: Job, include_usage: bool) -> AsyncIterator[bytes]:
        finished = False
        try:
            yield sse(job.chunk("" if job.kind == "chat" else None, first=True))
            while True:
                msg = await self.next_message(job)
                if isinstance(msg, P.State) and msg.state == "admitted":
                    continue
                if msg is None or isinstance(msg, P.State):
                    # SSE comments keep proxies and clients from timing out while
                    # a model loads or a long prompt prefills.
                    state = msg.state if msg is not None else "working"
                    if msg is not None and msg.total is not None:
                        state += f" {msg.done}/{msg.total}"
                    yield f": {state}\n\n".encode()
                    continue
                if isinstance(msg, P.Fail):
                    finished = True
                    yield sse(error_body(msg.status, msg.message, msg.code))
                    yield b"data: [DONE]\n\n"
                    return
                if not isinstance(msg, P.Tokens):
                    continue
                if msg.text or (job.token_ids and msg.ids):
                    yield sse(job.chunk(msg.text, ids=msg.ids))
                if msg.finish:
                    finished = True
                    yield sse(job.chunk(None, msg.finish))
                    if include_usage:
                        yield sse({**job.chunk(None), "choices": [], "usage": msg.usage})
                    yield b"data: [DONE]\n\n"
                    return
        finally:
            if finished:
                self.client.done(job.rid)
            else:
                # The client went away (or the server is stopping): no one is listening.
                await self.client.cancel(job.rid, "disconnect")
                log.info("rid=%s stream closed early; cancelled", job.rid)

    async def collect(self, job: Job, headers: dict[str, str]) -> Any:
        parts: list[str] = []
        ids: list[int] = []
        try:
            while True:
                msg = await self.next_message(job)
                if isinstance(msg, Disconnected):
                    await self.client.cancel(job.rid, "disconnect")
                    log.info("rid=%s client left before the reply; cancelled", job.rid)
                    return None
                if isinstance(msg, P.Fail):
                    return failed(msg, headers)
                if not isinstance(msg, P.Tokens):
                    continue
                parts.append(msg.text)
                ids.extend(msg.ids)
                if msg.finish:
                    return JSONResponse(
                        job.whole("".join(parts), msg.finish, msg.usage, ids),
                        headers=headers,
                    )
        finally:
            self.client.done(job.rid)
