"""LM Studio's REST API v0: its model list (with state, type, architecture,
quantization and context) and its chat and completions, which are OpenAI's
answer plus `stats` (tokens per second, time to first token, generation time,
stop reason) and `model_info`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from exo.api.errors import error_response
from exo.api.jobs import Job
from exo.api.replies import Done
from exo.api.routes import openai
from exo.api.routes.ollama import catalogue

router = APIRouter()


def describe(name: str, e: dict[str, Any]) -> dict[str, Any]:
    meta = e["meta"]
    return {
        "id": name,
        "object": "model",
        "type": "llm",
        "publisher": name.split("/", 1)[0],
        "arch": meta.get("type", ""),
        "compatibility_type": "mlx",
        "quantization": "",
        "state": "loaded" if e["loaded"] else "not-loaded",
        "max_context_length": int(meta.get("context", 0)),
    }


@router.get("/api/v0/models")
async def models(request: Request) -> dict[str, Any]:
    found = sorted((await catalogue(request)).items())
    return {"object": "list", "data": [describe(m, e) for m, e in found]}


@router.get("/api/v0/models/{model_id:path}")
async def model(model_id: str, request: Request) -> Any:
    e = (await catalogue(request)).get(model_id)
    if e is None:
        return error_response(404, f"The model '{model_id}' does not exist", "model_not_found")
    return describe(model_id, e)


def stats(job: Job, done: Done) -> dict[str, Any]:
    tokens = int((done.usage or {}).get("completion_tokens", 0))
    return {
        "stats": job.stats(done.finish, tokens),
        "model_info": {"arch": "", "quant": "", "format": "mlx", "context_length": 0},
        "runtime": {"name": "exo", "version": "0", "supported_formats": ["safetensors"]},
    }


@router.post("/api/v0/chat/completions")
async def chat(request: Request) -> Any:
    return await openai.chat_as(request, stats)


@router.post("/api/v0/completions")
async def completions(request: Request) -> Any:
    return await openai.completions_as(request, stats)
