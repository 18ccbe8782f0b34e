"""The API's routes by face: OpenAI's (openai.py), Ollama's, Anthropic's, Responses',
LM Studio's, the dashboard's and the cluster's own (cluster.py). Handlers are typed
`-> Any`: FastAPI reads a return annotation as the response's model, and they return
a body or a Response of their own (replies.Answer)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from exo.api.client import BrokerClient
from exo.api.jobs import Disconnected, Job
from exo.api.replies import Replier
from exo.broker import protocol as P
from exo.common.sampling import SamplingParams


def client_of(request: Request) -> BrokerClient:
    client: BrokerClient = request.app.state.client
    return client


def replier(request: Request) -> Replier:
    """What turns a job's messages into replies, with the app's metrics."""
    return Replier(client_of(request), getattr(request.app.state, "metrics", None))


def api_key(request: Request) -> str | None:
    """The caller's API key, as the Guard checked it (None with keys off)."""
    state = request.scope.get("state") or {}
    return state.get("api_key")


@contextlib.asynccontextmanager
async def submitted(
    request: Request,
    kind: str,
    model: str,
    payload: P.Payload,
    params: SamplingParams,
    timeout_s: float | None = None,
) -> AsyncIterator[Job]:
    """The one internal request every face makes: SUBMIT to the broker, and the
    job its answer arrives on, watched for its HTTP client leaving."""
    client = client_of(request)
    rid = uuid.uuid4().hex[:24]
    queue = await client.submit(rid, model, kind, payload, params, timeout_s, api_key(request))
    job = Job(rid, kind, model, queue)
    # The ASGI disconnect event, not polling: a client that leaves ends its request.
    watcher = asyncio.create_task(watch_disconnect(request, job))
    try:
        yield job
    finally:
        # A streaming response watches for disconnect itself from here on.
        watcher.cancel()


async def watch_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.queue.put_nowait(Disconnected())
