"""From a request's messages to what every face of the API answers.

The broker's answer to a SUBMIT arrives on the job's queue: ACCEPTED, STATE
(admitted, downloading, prefill progress), TOKENS, and FAIL from the broker or a
node; `Disconnected` when the HTTP client left. `Replier.open` waits for the
request to be taken: a streamed answer holds its status line until the node
admits the request, so a refusal (a prompt too long...) is still a proper 4xx;
past KEEPALIVE_S (a model still loading) it starts streaming. `Replier.events`
then turns the rest into the events each face formats (OpenAI's, Ollama's,
Anthropic's): text, keep-alives, the end or a failure. Whatever ends early
cancels the request on the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from fastapi.responses import JSONResponse, Response

from exo.api.client import BrokerClient
from exo.api.errors import error_response
from exo.api.jobs import Disconnected, Event, Job
from exo.api.metrics import Metrics
from exo.broker import protocol as P

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0


@dataclass
class Text:
    text: str
    ids: list[int]
    reasoning: str = ""  # a thinking model's thoughts, apart from its text
    logprobs: list[dict[str, Any]] | None = None  # per token, when asked


@dataclass
class Done:
    finish: str
    usage: dict[str, Any] | None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning: str = ""  # collect(): all of the request's thoughts
    logprobs: list[dict[str, Any]] | None = None  # collect(): every token's, when asked


@dataclass
class Waiting:
    """Nothing new for a while: a keep-alive (a model loading, a long prefill)."""

    state: str


Reply: TypeAlias = Text | Done | Waiting | P.Fail
# What a face answers over HTTP: a response of its own, or a body FastAPI sends as JSON
Answer: TypeAlias = Response | dict[str, Any]


def failed(msg: P.Fail, headers: dict[str, str]) -> JSONResponse:
    """OpenAI's HTTP answer to a FAIL from the broker or a node."""
    param = {"model_not_found": "model", "context_length_exceeded": "messages"}.get(msg.code)
    return error_response(msg.status, msg.message, msg.code, param, headers=headers)


class Replier:
    def __init__(self, client: BrokerClient, metrics: Metrics | None = None) -> None:
        self.client = client
        self.metrics = metrics  # latencies as the client sees them

    async def open(self, job: Job, stream: bool) -> P.Fail | Disconnected | None:
        """Wait until the request is taken (streamed: admitted by its node, or
        KEEPALIVE_S passed) -> None, or why it will not be answered."""
        first = await job.queue.get()
        if isinstance(first, Disconnected):
            await self.client.cancel(job.rid, "disconnect")
            return first
        if isinstance(first, P.Fail):
            self.client.done(job.rid)
            return first
        if not stream:
            return None
        verdict = await self.admitted(job)
        if isinstance(verdict, Disconnected):
            await self.client.cancel(job.rid, "disconnect")
        elif verdict is not None:
            self.client.done(job.rid)
        return verdict

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

    async def events(self, job: Job) -> AsyncGenerator[Reply, None]:
        """The request's replies until it ends (Done or a FAIL). Ending early (the
        client left, or the consumer stopped) cancels it on the cluster."""
        finished = False
        try:
            while True:
                msg = await self.next_message(job)
                if isinstance(msg, Disconnected):
                    log.info("rid=%s client left before the reply; cancelled", job.rid)
                    return
                if isinstance(msg, P.State) and msg.state == "admitted":
                    continue
                if msg is None or isinstance(msg, P.State):
                    state = msg.state if msg is not None else "working"
                    if msg is not None and msg.total is not None:
                        state += f" {msg.done}/{msg.total}"
                    yield Waiting(state)
                    continue
                if isinstance(msg, P.Fail):
                    finished = True
                    yield msg
                    return
                if not isinstance(msg, P.Tokens):
                    continue
                self.timed(job, msg)
                if msg.text or msg.ids or msg.reasoning:
                    yield Text(msg.text, msg.ids, msg.reasoning, msg.logprobs)
                if msg.finish:
                    finished = True
                    yield Done(msg.finish, msg.usage, msg.tool_calls)
                    return
        finally:
            if finished:
                self.client.done(job.rid)
            else:
                # The client went away (or the server is stopping): no one is listening.
                await self.client.cancel(job.rid, "disconnect")

    def timed(self, job: Job, msg: P.Tokens) -> None:
        """When its tokens came: the job's figures, and the metrics'."""
        now = time.perf_counter()
        m = self.metrics
        if job.first_at is None:
            job.first_at = now
            if m is not None:
                m.first_token(job.model, now - job.submitted_at)
        elif m is not None and msg.ids:
            m.token_gap(job.model, now - (job.last_at or now), len(msg.ids))
        job.last_at = now
        if msg.finish:
            job.done_at = now
            if m is not None:
                m.done(job.model, now - job.submitted_at, msg.finish, msg.usage)

    async def answer(
        self,
        job: Job,
        stream: bool,
        fail: Callable[[P.Fail], Answer],
        streamed: Callable[[AsyncGenerator[Reply, None]], Answer],
        whole: Callable[[str, list[int], Done], Answer],
    ) -> Answer | None:
        """The request's HTTP answer in a face's own shapes: `fail` for a FAIL,
        `streamed` for the reply stream, `whole` for the collected answer (text,
        token ids, how it ended); None when the client left first."""
        bad = await self.open(job, stream)
        if isinstance(bad, Disconnected):
            return None
        if bad is not None:
            return fail(bad)
        if stream:
            return streamed(self.events(job))
        got = await self.collect(job)
        if got is None:
            return None
        if isinstance(got, P.Fail):
            return fail(got)
        return whole(*got)

    async def collect(self, job: Job) -> tuple[str, list[int], Done] | P.Fail | None:
        """The whole answer: text, token ids and how it ended; its FAIL; or None
        when the client left first."""
        parts: list[str] = []
        thoughts: list[str] = []
        ids: list[int] = []
        logprobs: list[dict[str, Any]] = []
        async for ev in self.events(job):
            if isinstance(ev, P.Fail):
                return ev
            if isinstance(ev, Text):
                parts.append(ev.text)
                thoughts.append(ev.reasoning)
                ids.extend(ev.ids)
                if ev.logprobs is not None:
                    logprobs.extend(ev.logprobs)
            elif isinstance(ev, Done):
                ev.reasoning = "".join(thoughts)
                ev.logprobs = logprobs or None
                return "".join(parts), ids, ev
        return None
