"""Ollama's face: what ollama-python, OpenWebUI's Ollama connection and LiteLLM's
`ollama_chat/` speak. Models by the cluster's own ids (`ORG/NAME`, a `:latest`
suffix ignored); chat and generate stream NDJSON, one object per line, the last
with `done` and the counts. Bodies become the one internal request (ollama_body.py):
an option the engine cannot honour (or images, for now) is a 400 naming it,
never ignored. Pull downloads onto a node of the cluster (weights from a peer
when one holds them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from exo.api.jobs import Job
from exo.api.replies import Answer, Done, Reply, Text
from exo.api.routes import client_of, replier, submitted
from exo.api.routes.ollama_body import Refused, body_of, messages, model_name, params, tools_of
from exo.broker import protocol as P
from exo.common.names import valid_model_id
from exo.common.sampling import SamplingParams

router = APIRouter()

VERSION = "0.6.3"  # the Ollama API this face follows
PULL_POLL_S = 0.5  # how often a pull's progress is read from the cluster's state


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# -- models -------------------------------------------------------------------------


async def catalogue(request: Request) -> dict[str, dict[str, Any]]:
    """Every model some node holds: its meta, and whether it is loaded anywhere."""
    state = await client_of(request).query("cluster")
    out: dict[str, dict[str, Any]] = {}
    for n in state.get("nodes", []):
        loaded = set(n.get("status", {}).get("loaded", []))
        for m in n.get("info", {}).get("models", []):
            meta = n.get("info", {}).get("model_meta", {}).get(m, {})
            e = out.setdefault(m, {"meta": meta, "loaded": False, "since": n.get("age_s", 0)})
            e["loaded"] = e["loaded"] or m in loaded
    return out


def describe(name: str, e: dict[str, Any]) -> dict[str, Any]:
    meta = e["meta"]
    kind = str(meta.get("type", ""))
    return {
        "name": name,
        "model": name,
        "modified_at": now_iso(),
        "size": int(meta.get("bytes", 0)),
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "safetensors",
            "family": kind,
            "families": [kind] if kind else [],
            "parameter_size": "",
            "quantization_level": "",
        },
    }


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": VERSION}


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    return {"models": [describe(m, e) for m, e in sorted((await catalogue(request)).items())]}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    loaded = [(m, e) for m, e in sorted((await catalogue(request)).items()) if e["loaded"]]
    far = datetime(2100, 1, 1, tzinfo=UTC).isoformat().replace("+00:00", "Z")
    return {
        "models": [
            {**describe(m, e), "expires_at": far, "size_vram": 0, "context_length": 0}
            for m, e in loaded
        ]
    }


@router.post("/api/show")
async def show(request: Request) -> Any:
    try:
        name = model_name(await body_of(request))
    except Refused as bad:
        return error(400, str(bad))
    found = (await catalogue(request)).get(name)
    if found is None:
        return error(404, f"model '{name}' not found")
    d = describe(name, found)
    kind = d["details"]["family"]
    return {
        "modelfile": f"FROM {name}\n",
        "parameters": "",
        "template": "",
        "details": d["details"],
        "model_info": {
            "general.architecture": kind,
            f"{kind}.block_count": found["meta"].get("layers"),
        },
        "capabilities": ["completion"],
        "modified_at": d["modified_at"],
    }


@router.post("/api/pull")
async def pull(request: Request) -> Any:
    """Ollama's pull onto the cluster's model store: a node downloads the hub
    repository (from a peer that holds it when one does); its progress streams
    as Ollama's statuses, NDJSON, ending with "success" or an error."""
    try:
        body = await body_of(request)
        name = model_name({"model": body.get("model") or body.get("name")})  # (either, in Ollama)
    except Refused as bad:
        return error(400, str(bad))
    if "/" not in name or not valid_model_id(name):
        return error(400, f"'{name}' is not a hub id ORG/NAME")
    client = client_of(request)
    asked = await client.pull(name, None)
    if "error" in asked:
        return error(404, str(asked["error"]))

    async def statuses() -> AsyncIterator[dict[str, Any]]:
        yield {"status": "pulling manifest"}
        while asked.get("state") != "present":
            nodes = (await client.query("cluster")).get("nodes", [])
            node = next((n for n in nodes if n.get("id") == asked.get("node")), None)
            if node is None:
                yield {"error": f"node {asked.get('node')} left while pulling {name}"}
                return
            if name in node.get("info", {}).get("models", []):
                break
            mine = [
                d for d in node.get("status", {}).get("downloads", []) if d.get("model") == name
            ]
            if mine and mine[0].get("state") == "failed":
                yield {"error": f"pulling {name} failed: {mine[0].get('error')}"}
                return
            if mine and mine[0].get("total"):
                total, done = int(mine[0]["total"]), int(mine[0].get("done", 0))
                yield {
                    "status": f"pulling {name}",
                    "digest": name,
                    "total": total,
                    "completed": done,
                }
            await asyncio.sleep(PULL_POLL_S)
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            yield {"status": status}

    if body.get("stream", True) is False:
        seen = [s async for s in statuses()]
        return error(502, seen[-1]["error"]) if "error" in seen[-1] else seen[-1]

    async def ndjson() -> AsyncIterator[bytes]:
        async for s in statuses():
            yield json.dumps(s).encode() + b"\n"

    return StreamingResponse(ndjson(), media_type="application/x-ndjson")


# -- chat and generate ------------------------------------------------------------------


@router.post("/api/chat")
async def chat(request: Request) -> Any:
    payload: P.Payload
    try:
        body = await body_of(request)
        name, p, payload = model_name(body), params(body), messages(body)
    except Refused as e:
        return error(400, str(e))
    try:
        tools = tools_of(body)
    except Refused as e:
        return error(400, str(e))
    if tools or isinstance(body.get("think"), bool):
        payload = {"messages": payload}
        if tools:
            payload["tools"] = tools
        if isinstance(body.get("think"), bool):  # the template's switch, where it has one
            payload["template"] = {"enable_thinking": body["think"]}
    return await answer(request, body, "chat", name, payload, p, "message")


@router.post("/api/generate")
async def generate(request: Request) -> Any:
    try:
        body = await body_of(request)
        name, p = model_name(body), params(body)
        prompt, system = body.get("prompt", ""), body.get("system")
        if not isinstance(prompt, str) or not isinstance(system, str | None):
            raise Refused("prompt and system are strings")
    except Refused as e:
        return error(400, str(e))
    if not prompt:  # Ollama's way to load a model: nothing to generate
        return {"model": name, "created_at": now_iso(), "response": "", "done": True}
    payload: P.Payload
    if body.get("raw"):
        kind, payload = "completion", prompt
    else:
        turns = [{"role": "system", "content": system}] if system else []
        kind, payload = "chat", [*turns, {"role": "user", "content": prompt}]
    return await answer(request, body, kind, name, payload, p, "response")


async def answer(
    request: Request,
    body: dict[str, Any],
    kind: str,
    name: str,
    payload: P.Payload,
    p: SamplingParams,
    field: str,
) -> Answer | None:
    """One internal request, answered as Ollama does: NDJSON lines, or one object."""
    stream = body.get("stream", True) is not False
    async with submitted(request, kind, name, payload, p) as job:
        t0 = job.submitted_at  # (Ollama's durations count the whole request)
        return await replier(request).answer(
            job,
            stream,
            lambda f: error(f.status, f.message),
            lambda events: StreamingResponse(
                lines(job, events, field, t0), media_type="application/x-ndjson"
            ),
            lambda text, _, done: {
                **piece(job, field, text, done.reasoning, done.tool_calls),
                **last(done, t0),
            },
        )


def piece(
    job: Job, field: str, text: str, thinking: str = "", calls: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """One line: the text, a thinking model's thoughts as Ollama's `thinking`, and
    tool calls as Ollama gives them (arguments as objects)."""
    out: dict[str, Any] = {"model": job.model, "created_at": now_iso(), "done": False}
    if field == "message":
        out["message"] = {"role": "assistant", "content": text}
        if thinking:
            out["message"]["thinking"] = thinking
        if calls:
            out["message"]["tool_calls"] = [
                {
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": json.loads(c["function"]["arguments"]),
                    }
                }
                for c in calls
            ]
    else:
        out["response"] = text
        if thinking:
            out["thinking"] = thinking
    return out


def last(done: Done, t0: float) -> dict[str, Any]:
    usage = done.usage or {}
    total = int((time.perf_counter() - t0) * 1e9)
    return {
        "done": True,
        "done_reason": done.finish,
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": int(usage.get("prompt_tokens", 0)),
        "prompt_eval_duration": 0,
        "eval_count": int(usage.get("completion_tokens", 0)),
        "eval_duration": total,
    }


async def lines(
    job: Job, events: AsyncGenerator[Reply, None], field: str, t0: float
) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(events) as replies:  # (closed with us: a cancel)
        async for ev in replies:
            if isinstance(ev, Text) and (ev.text or ev.reasoning):
                line = piece(job, field, ev.text, ev.reasoning)
                yield (json.dumps(line) + "\n").encode()
            elif isinstance(ev, P.Fail):
                yield (json.dumps({"error": ev.message}) + "\n").encode()
            elif isinstance(ev, Done):
                out = {**piece(job, field, "", calls=ev.tool_calls), **last(ev, t0)}
                yield (json.dumps(out) + "\n").encode()
