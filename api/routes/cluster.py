"""The cluster's own face: instances, the cluster's state, model pulls, cancels."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from exo.api.errors import error_response
from exo.api.routes import api_key, client_of
from exo.api.schemas import PlaceRequest, first_error
from exo.common.names import valid_model_id

router = APIRouter()


@router.post("/v1/models/pull")
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
    data = await client_of(request).pull(model, node)
    if "error" in data:
        return error_response(404, data["error"], "node_not_found", "node")
    return JSONResponse({"model": model, **data}, status_code=202)


@router.post("/v1/cancel/{request_id}")
async def cancel(request_id: str, request: Request) -> Any:
    client = client_of(request)
    rid = request_id.removeprefix("chatcmpl-").removeprefix("cmpl-")
    # Only whoever submitted it may cancel it (its API key, when keys are on).
    mine = rid in client.owners and client.owners[rid] == api_key(request)
    if not mine or not await client.cancel_explicit(rid):
        return error_response(404, f"no request {request_id} is in flight", "request_not_found")
    return {"id": rid, "object": "cancellation", "cancelled": True}


@router.post("/v1/instances")
async def place(request: Request) -> Any:
    return await place_or_preview(request, "place")


@router.post("/v1/instances/preview")
async def preview(request: Request) -> Any:
    return await place_or_preview(request, "preview")


async def place_or_preview(request: Request, op: str) -> Any:
    try:
        body = PlaceRequest.model_validate_json(await request.body())
    except ValidationError as e:
        msg, param = first_error(e)
        return error_response(400, msg, param=param)
    return instances_reply(await client_of(request).ask("INSTANCES", op=op, spec=body.spec()))


@router.get("/v1/instances")
async def list_instances(request: Request) -> Any:
    reply = await client_of(request).ask("INSTANCES", op="list")
    return {"object": "list", "data": reply["body"]}


@router.delete("/v1/instances/{instance_id}")
async def delete_instance(instance_id: str, request: Request) -> Any:
    return instances_reply(await client_of(request).ask("INSTANCES", op="delete", id=instance_id))


def instances_reply(reply: dict[str, Any]) -> Any:
    status, body = int(reply["status"]), reply["body"]
    if status >= 400:
        return error_response(status, body["message"], body["code"])
    return JSONResponse(body, status_code=status)


@router.get("/v1/cluster")
async def cluster(request: Request) -> Any:
    return await client_of(request).query("cluster")
