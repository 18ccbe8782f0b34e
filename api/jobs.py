"""One request on its way through the cluster, as the API sees it, and the
OpenAI shapes its answer takes (whole, or as stream chunks)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from exo.broker import protocol as P


class Disconnected:
    """Put on a job's queue when its HTTP client goes away (never on the wire)."""


Event: TypeAlias = P.Msg | Disconnected


@dataclass
class Job:
    """One request on its way through the cluster, as the API sees it."""

    rid: str
    kind: str  # "chat" | "completion"
    model: str
    queue: asyncio.Queue[Event]
    created: int = field(default_factory=lambda: int(time.time()))
    peeked: list[Event] = field(default_factory=list)
    token_ids: bool = False
    # perf_counter: when it was submitted, its first text came, it ended
    submitted_at: float = field(default_factory=time.perf_counter)
    first_at: float | None = None
    last_at: float | None = None
    done_at: float | None = None

    def stats(self, finish: str | None, tokens: int) -> dict[str, Any]:
        """LM Studio's figures for an answer."""
        first, done = self.first_at or self.submitted_at, self.done_at or time.perf_counter()
        gen = max(done - first, 1e-9)
        return {
            "tokens_per_second": round(max(tokens - 1, 0) / gen, 3),
            "time_to_first_token": round(first - self.submitted_at, 4),
            "generation_time": round(done - first, 4),
            "stop_reason": {"stop": "eosFound", "length": "maxPredictedTokensReached"}.get(
                finish or "", finish or ""
            ),
        }

    @property
    def id(self) -> str:
        return f"chatcmpl-{self.rid}" if self.kind == "chat" else f"cmpl-{self.rid}"

    def chunk(
        self,
        text: str | None,
        finish: str | None = None,
        first: bool = False,
        ids: list[int] | None = None,
        reasoning: str = "",
        logprobs: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if reasoning:
                delta["reasoning_content"] = reasoning
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
        return self.envelope(obj, self.extras(choice, ids, logprobs))

    def extras(
        self, choice: dict[str, Any], ids: list[int] | None, logprobs: list[dict[str, Any]] | None
    ) -> dict[str, Any]:
        """A choice with its token ids (when asked) and log probabilities (when any)."""
        if self.token_ids and ids is not None:
            choice["token_ids"] = ids
        if logprobs:
            choice["logprobs"] = self.logprobs(logprobs)
        return choice

    def logprobs(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """OpenAI's logprobs: chat's `content` entries, or completions' columns."""
        if self.kind == "chat":
            return {"content": entries, "refusal": None}
        offsets, at = [], 0
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [
                None
                if e["top_logprobs"] is None  # (a prompt's first token: echo)
                else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
                for e in entries
            ],
            "text_offset": offsets,
        }

    def envelope(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "exo",
            "choices": [choice],
        }

    def calls_chunk(self, calls: list[dict[str, Any]]) -> dict[str, Any]:
        """A stream's tool calls, whole, in one delta (each with its index)."""
        delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return self.envelope("chat.completion.chunk", choice)

    def whole(
        self,
        text: str,
        finish: str | None,
        usage: dict[str, int] | None,
        ids: list[int],
        tool_calls: list[dict[str, Any]] | None = None,
        logprobs: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if tool_calls:
                message["tool_calls"] = tool_calls
                message["content"] = text or None
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {**self.envelope(obj, self.extras(choice, ids, logprobs)), "usage": usage}


def sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()
