"""The API's connection to the broker: an asyncio DEALER, one queue per request.

A broker that restarts forgets what it was doing: the requests it had not
answered yet go to the new one (common/retry.py, rule 4); the others fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from exo.api.feed import ClusterFeed
from exo.api.jobs import Event
from exo.broker import protocol as P
from exo.common import keys
from exo.common.dealer import Session
from exo.common.retry import BROKER_RETURN_S, may_place_again
from exo.common.sampling import SamplingParams

log = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    pass


@dataclass
class Unanswered:
    """A request no token of which has come back yet: it may go to the broker again."""

    submit: P.Submit
    deadline: float  # monotonic
    placements: int = 1  # SUBMITs sent
    lost_at: float | None = None  # when its broker went away (None: in its hands)


class BrokerClient:
    def __init__(self, broker: str, cluster: keys.Cluster | None = None) -> None:
        self.broker = broker
        self.cluster = cluster  # None: an insecure cluster
        self.peer_id = peer_id = f"api-{uuid.uuid4().hex[:8]}"
        self.session = Session(
            broker,
            peer_id,
            lambda: P.Hello(role="frontend", peer_id=peer_id, name="api"),
            cluster,
            cluster.frontend if cluster else None,
        )
        self.ctx = zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self.streams: dict[str, asyncio.Queue[Event]] = {}
        # rid -> the API key that submitted it (None: keys off), while it runs
        self.owners: dict[str, str | None] = {}
        self.unanswered: dict[str, Unanswered] = {}
        self.queries: dict[str, asyncio.Future[P.Map]] = {}
        self.registered = asyncio.Event()  # the session's, to wait on
        self.tasks: list[asyncio.Task[None]] = []
        self.dropped = P.Counters()
        self.closing = False
        self.feed = ClusterFeed()  # the state the broker publishes, for live views

    async def start(self) -> None:
        self._connect()
        self.tasks = [
            asyncio.create_task(self._recv_loop()),
            asyncio.create_task(self._beat_loop()),
        ]

    async def close(self) -> None:
        self.closing = True
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.feed.close()
        if self.sock is not None:
            self.sock.close(linger=0)

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self.session.dial(self.ctx)
        self._hello()

    def _hello(self) -> None:
        assert self.sock is not None
        self.registered.clear()
        self.sock.send(self.session.hello())

    async def _recv_loop(self) -> None:
        while True:
            sock = self.sock
            assert sock is not None
            try:
                frame = await sock.recv()
            except zmq.ZMQError:
                await asyncio.sleep(0.05)  # the socket was replaced under us
                continue
            except asyncio.CancelledError:
                # Closing a socket cancels the recv waiting on it: when _connect
                # replaced it (the broker restarted), go on with the new one; only
                # close() ends this loop.
                if self.closing or sock is self.sock:
                    raise
                continue
            self.session.heard()
            try:
                msg = P.decode(frame)
            except P.ProtocolError as e:
                self.dropped[e.reason] += 1
                continue
            try:
                self._on_message(msg)
            except Exception:
                self.dropped["handler_error"] += 1
                log.exception("a %s from the broker could not be handled", msg.type)

    def _on_message(self, msg: P.Msg) -> None:
        if isinstance(msg, P.Tokens | P.Fail | P.State | P.Accepted):
            if isinstance(msg, P.Tokens | P.Fail):
                self.unanswered.pop(msg.rid, None)
            q = self.streams.get(msg.rid)
            if q is not None:
                q.put_nowait(msg)
        elif isinstance(msg, P.Reply):
            fut = self.queries.pop(msg.qid, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.data)
        else:
            what = self.session.on(msg)
            if what in ("welcome", "again", "resumed"):
                self.registered.set()
                if self.session.pub_port:
                    self.feed.attach(self.session.subscribe(self.ctx, P.TOPIC_CLUSTER))
                if what == "again":
                    self._submit_again()
                else:
                    for u in self.unanswered.values():
                        u.lost_at = None  # the broker kept them
            elif what == "reconnect":
                self._lost("the broker restarted; the request was lost")
                self._hello()

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(P.HEARTBEAT_S)
            assert self.sock is not None
            if self.session.silent(time.monotonic()):
                if self.registered.is_set() or self.streams:
                    log.warning("broker %s silent; reconnecting", self.broker)
                self._lost("lost contact with the broker")
                self._connect()
            self._give_up(time.monotonic())
            with contextlib.suppress(zmq.Again):
                await self.sock.send(P.encode(P.Heartbeat()), flags=zmq.NOBLOCK)

    def _lost(self, why: str) -> None:
        """The broker went away: requests it had answered fail; the others wait for
        it to come back, to be submitted again."""
        now = time.monotonic()
        for rid, q in self.streams.items():
            u = self.unanswered.get(rid)
            if u is not None and may_place_again("broker_lost", 0, u.placements, now, u.deadline):
                u.lost_at = u.lost_at or now
                continue
            self.unanswered.pop(rid, None)
            q.put_nowait(P.Fail(rid=rid, status=503, code="broker_lost", message=why))

    def shutting_down(self) -> None:
        """This process is stopping: every request ends now, with an error its client
        reads (not a reset connection), and is cancelled at the broker."""
        for rid, q in list(self.streams.items()):
            why = "the server is shutting down; the request did not finish"
            q.put_nowait(P.Fail(rid=rid, status=503, code="shutting_down", message=why))
            if self.sock is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self.sock.send(P.encode(P.Cancel(rid=rid, reason="disconnect")), zmq.NOBLOCK)
        self.unanswered.clear()

    def _submit_again(self) -> None:
        """A broker that forgot this frontend: what it had not answered goes to it
        again, with what is left of each one's deadline."""
        assert self.sock is not None
        now = time.monotonic()
        for rid, u in list(self.unanswered.items()):
            if u.lost_at is None or rid not in self.streams:
                continue
            u.placements, u.lost_at = u.placements + 1, None
            u.submit.timeout_s = max(0.001, u.deadline - now)
            log.warning("rid=%s submitted again to the restarted broker", rid)
            self.sock.send(P.encode(u.submit))

    def _give_up(self, now: float) -> None:
        """Requests whose broker stayed away BROKER_RETURN_S, or past their deadline."""
        for rid, u in list(self.unanswered.items()):
            if u.lost_at is not None and (now - u.lost_at > BROKER_RETURN_S or now >= u.deadline):
                del self.unanswered[rid]
                q = self.streams.get(rid)
                if q is not None:
                    why = f"the broker did not come back within {now - u.lost_at:.0f}s"
                    q.put_nowait(P.Fail(rid=rid, status=503, code="broker_lost", message=why))

    async def _ready(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self.registered.wait(), timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"the broker at {self.broker} is not answering") from None

    async def submit(
        self,
        rid: str,
        model: str,
        kind: str,
        payload: P.Payload,
        params: SamplingParams,
        timeout_s: float | None = None,
        owner: str | None = None,
    ) -> asyncio.Queue[Event]:
        await self._ready()
        q: asyncio.Queue[Event] = asyncio.Queue()
        self.streams[rid] = q
        self.owners[rid] = owner
        assert self.sock is not None
        submit = P.Submit(
            rid=rid, model=model, kind=kind, payload=payload, params=params, timeout_s=timeout_s
        )
        self.unanswered[rid] = Unanswered(
            submit, time.monotonic() + (timeout_s or P.DEFAULT_REQUEST_TIMEOUT_S)
        )
        await self.sock.send(P.encode(submit))
        return q

    def done(self, rid: str) -> None:
        self.streams.pop(rid, None)
        self.owners.pop(rid, None)
        self.unanswered.pop(rid, None)

    async def cancel(self, rid: str, reason: str) -> None:
        """Fire and forget: this frontend no longer wants the request."""
        self.streams.pop(rid, None)
        self.owners.pop(rid, None)
        self.unanswered.pop(rid, None)
        if self.sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                await self.sock.send(P.encode(P.Cancel(rid=rid, reason=reason)), flags=zmq.NOBLOCK)

    async def cancel_explicit(self, rid: str) -> bool:
        """Cancel any request by id; True if the broker knew it."""
        data = await self.ask("CANCEL", rid=rid, reason="explicit")
        return bool(data.get("found"))

    async def pull(self, model: str, node: str | None) -> dict[str, Any]:
        if node:
            return await self.ask("PULL", model=model, node=node)
        return await self.ask("PULL", model=model)

    async def ask(self, type_: str, timeout: float = 5.0, **fields: Any) -> P.Map:
        """Send a message carrying a fresh qid and wait for the broker's REPLY."""
        await self._ready()
        qid = uuid.uuid4().hex
        fut: asyncio.Future[P.Map] = asyncio.get_running_loop().create_future()
        self.queries[qid] = fut
        assert self.sock is not None
        await self.sock.send(P.encode(type_, qid=qid, **fields))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"the broker at {self.broker} did not answer") from None
        finally:
            self.queries.pop(qid, None)

    async def query(self, what: str, timeout: float = 5.0) -> P.Map:
        return await self.ask("QUERY", timeout, what=what)

    async def models(self) -> list[P.Map]:
        """Every model some node holds, with where it is and whether it is loaded."""
        models: list[P.Map] = (await self.query("models")).get("models", [])
        return models
