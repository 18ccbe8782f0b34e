"""The HTTP API. It holds no model: every request becomes a SUBMIT to the
broker, and the tokens that come back are streamed out (replies.py). The routes
live by face in routes/; here the app is put together: the broker client, the
guards every request passes (body limit, keys, hosts, origins) and errors in
OpenAI's shape."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from exo.api.client import BrokerClient, BrokerUnavailable
from exo.api.errors import error_response
from exo.api.limits import BodyLimit
from exo.api.metrics import Metrics
from exo.api.routes import anthropic, cluster, dashboard, lmstudio, ollama, openai, responses
from exo.api.security import Guard, Policy, keys_from_env
from exo.common import keys

log = logging.getLogger(__name__)


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
    app.state.metrics = metrics = Metrics()
    app.add_middleware(BodyLimit)
    # outermost: before anything reads the body
    app.add_middleware(Guard, policy=policy, public=dashboard.public)

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

    @app.get("/metrics")
    async def prometheus() -> Response:
        state = await client.query("cluster")
        return Response(metrics.render(state), media_type=CONTENT_TYPE_LATEST)

    app.include_router(openai.router)
    app.include_router(ollama.router)
    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(lmstudio.router)
    app.include_router(cluster.router)
    app.include_router(dashboard.router)
    return app
