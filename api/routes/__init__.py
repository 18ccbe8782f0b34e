"""The API's routes by face: OpenAI's (openai.py) and the cluster's own (cluster.py)."""

from __future__ import annotations

from fastapi import Request

from exo.api.client import BrokerClient


def client_of(request: Request) -> BrokerClient:
    client: BrokerClient = request.app.state.client
    return client


def api_key(request: Request) -> str | None:
    """The caller's API key, as the Guard checked it (None with keys off)."""
    state = request.scope.get("state") or {}
    return state.get("api_key")
