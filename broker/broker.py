"""exo-broker's loop: one ROUTER for every peer, one PUB for cluster state.

Single-threaded, Majordomo style: every message in is handled to completion
before the next; liveness is checked and state published between polls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from exo.broker import probes, reports
from exo.broker import protocol as P
from exo.broker.cancels import Cancels
from exo.broker.deploy import Deployer
from exo.broker.hops import Topology
from exo.broker.journal import Journal
from exo.broker.placement import PlacementError
from exo.broker.registry import Peer, Registry
from exo.broker.requests import Requests
from exo.broker.sockets import DOMAIN, publisher, router
from exo.broker.topology import links
from exo.broker.versions import version_skew
from exo.common import keys

log = logging.getLogger(__name__)

PUBLISH_S = 1.0
RECONNECT_EVERY_S = 1.0


class Broker:
    def __init__(
        self,
        router_addr: str,
        pub_addr: str,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        request_timeout: float = P.DEFAULT_REQUEST_TIMEOUT_S,
        probe_every: float = probes.EVERY_S,
        cluster: keys.Cluster | None = None,
        journal: Path | None = None,
    ) -> None:
        self.request_timeout = request_timeout
        self.router_addr = router_addr
        self.ctx = ctx or zmq.Context.instance()
        # None: --insecure, anyone who reaches the ports may speak
        self.cluster_keys = cluster
        self.role_keys: dict[str, str] = {}
        if cluster is not None:  # (the ZAP handler must run before the sockets bind)
            assert cluster.frontend is not None, "the broker's machine holds every key"
            self.role_keys = {"node": cluster.node.public, "frontend": cluster.frontend.public}
            self.auth = keys.authenticator(self.ctx, {DOMAIN: set(self.role_keys.values())})
        self.router = router(self.ctx, router_addr, cluster)
        self.pub = publisher(self.ctx, pub_addr, cluster)
        self.pub_port = int(self.pub.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.reg = Registry()
        self.dropped = P.Counters()
        self.stats = P.Counters()
        self.cancels = Cancels(self.send_raw, self.pub, self.stats)
        self.deploy = Deployer(self.reg, self.send, self.topology, Journal(journal))
        self.requests = Requests(
            self.reg,
            self.deploy,
            self.cancels,
            self.send,
            self.send_raw,
            self.drop_peer,
            self.topology,
            self.stats,
            request_timeout,
        )
        self.deploy.on_ready = lambda: self.requests.tend_parked(time.monotonic())
        self.deploy.lost = self.requests.lost
        self.handlers = self._handlers()
        self.probes = probes.Prober(self.send, self.stats, probe_every)
        self.stop_event = threading.Event()
        self.started = time.time()
        # periodic work -> when it is next due
        self.due: dict[str, float] = {"beat": 0.0, "pub": 0.0}
        self.reconnects: dict[bytes, float] = {}  # identity -> when last told to RECONNECT

    def _handlers(self) -> dict[tuple[str, str], Callable[[Peer, Any, zmq.Frame], None]]:
        """(role, type) -> its handler, called with that message type (protocol.TYPES)."""
        r, c = self.requests, self.cancels
        return {
            ("node", "HEARTBEAT"): self.on_heartbeat,
            ("frontend", "HEARTBEAT"): self.on_heartbeat,
            ("node", "INFO"): self.on_info,
            ("node", "TOKENS"): r.on_node_reply,
            ("node", "FAIL"): r.on_node_reply,
            ("node", "STATE"): r.on_node_reply,
            ("frontend", "SUBMIT"): r.on_submit,
            ("frontend", "CANCEL"): r.on_cancel,
            ("node", "CANCEL_ACK"): lambda node, msg, _: c.acknowledged(msg.rid, node.identity),
            ("frontend", "QUERY"): self.on_query,
            ("frontend", "PULL"): r.on_pull,
            ("frontend", "INSTANCES"): self.on_instances,
        }

    # -- sending --------------------------------------------------------------------

    def send(self, identity: bytes, msg: P.Msg) -> bool:
        return self.send_raw(identity, P.encode(msg))

    def send_raw(self, identity: bytes, frame: bytes | zmq.Frame) -> bool:
        try:
            self.router.send_multipart([identity, frame], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as e:
            # EHOSTUNREACH: the peer is gone (ROUTER_MANDATORY); EAGAIN: it is not reading.
            self.stats[f"send_failed_{zmq.strerror(e.errno or 0)}"] += 1
            return False

    # -- the loop -------------------------------------------------------------------

    def run(self) -> None:
        log.info(
            "broker up: ROUTER %s, PUB %s",
            self.router.getsockopt_string(zmq.LAST_ENDPOINT),
            self.pub.getsockopt_string(zmq.LAST_ENDPOINT),
        )
        while not self.stop_event.is_set():
            if self.router.poll(int(P.HEARTBEAT_S * 1000 / 2)):
                for _ in range(1000):  # bounded, so liveness work is never starved
                    try:
                        parts = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.on_frames(parts)
            now = time.monotonic()
            for name, work in (
                ("cancels", self.cancels.resend),
                ("deadlines", self.requests.expire_deadlines),
                ("parked", self.requests.tick),
                ("beat", self.tick_beat),
                ("publish", self.tick_publish),
            ):
                try:
                    work(now)
                except Exception:
                    # One tick's bad state (from whatever got past the checks) must not
                    # stop the loop: the next tick tries again.
                    self.stats[f"tick_error_{name}"] += 1
                    log.exception("broker tick %s failed", name)
        self.router.close(linger=0)
        self.pub.close(linger=0)

    def tick_beat(self, now: float) -> None:
        if now < self.due["beat"]:
            return
        self.due["beat"] = now + P.HEARTBEAT_S
        self.expire(now)
        view = self.topology()  # once for the tick: instances and probes share it
        self.deploy.tend(view)
        self.probes.tend(now, view, self.reg.by_id())
        beat = P.encode(P.Heartbeat())
        for ident in list(self.reg.peers):
            self.send_raw(ident, beat)

    def tick_publish(self, now: float) -> None:
        if now >= self.due["pub"]:
            self.due["pub"] = now + PUBLISH_S
            self.pub.send_multipart(
                [P.TOPIC_CLUSTER, P.encode(P.Reply(qid="cluster", data=self.cluster()))]
            )

    def key_of(self, frame: zmq.Frame) -> str | None:
        """The CURVE key the frame came with (None: an insecure cluster)."""
        return str(frame.get("User-Id")) if self.cluster_keys is not None else None

    def refuse(self, ident: bytes, key: str | None, rid: str, why: str) -> None:
        """A SUBMIT whose fields did not decode (its sampling parameters out of
        bounds...): its frontend, if registered, is told, not left waiting."""
        peer = self.reg.peers.get(ident)
        if peer is not None and peer.role == "frontend" and peer.key == key:
            code = "invalid_params" if "$.params" in why else "invalid_request"
            self.send(ident, P.Fail(rid=rid, status=400, code=code, message=why))

    def on_frames(self, parts: list[zmq.Frame]) -> None:
        if len(parts) != 2:
            self.dropped["bad_framing"] += 1
            return
        ident, frame = parts[0].bytes, parts[1].buffer
        try:
            msg = P.decode(frame)
        except P.ProtocolError as e:
            self.dropped[e.reason] += 1
            log.debug("dropped frame from %r: %s", ident[:32], e)
            if e.rid is not None:
                self.refuse(ident, self.key_of(parts[1]), e.rid, e.detail)
            return
        peer = self.reg.peers.get(ident)
        key = self.key_of(parts[1])
        if isinstance(msg, P.Hello):
            self.on_hello(ident, msg, key)
            return
        if peer is not None and key != peer.key:
            self.dropped["wrong_key"] += 1  # a connection that took a known identity over
            return
        if peer is None:
            self.stats["unknown_peer"] += 1
            now = time.monotonic()
            if now - self.reconnects.get(ident, 0.0) >= RECONNECT_EVERY_S:
                # At most one a second per connection: a flood of frames from a peer
                # the broker forgot gets one answer, not one each.
                if len(self.reconnects) > 10_000:
                    self.reconnects.clear()
                self.reconnects[ident] = now
                self.send(ident, P.Reconnect(reason="unknown peer"))
            return
        peer.last_seen = time.monotonic()
        handler = self.handlers.get((peer.role, msg.type))
        if handler is None:
            self.dropped["wrong_role"] += 1
            return
        try:
            handler(peer, msg, parts[1])
        except reports.BadReport as e:
            self.dropped["bad_report"] += 1
            log.warning("%s %s sent a bad %s: %s", peer.role, peer.peer_id, msg.type, e)
        except Exception:
            # A message the checks let through and a handler choked on: it is dropped,
            # the broker goes on (and the traceback says what to check next time).
            self.dropped["handler_error"] += 1
            log.exception("%s from %s %s failed; dropped", msg.type, peer.role, peer.peer_id)

    # -- registration and liveness --------------------------------------------------

    def on_hello(self, ident: bytes, msg: P.Hello, key: str | None = None) -> None:
        role, peer_id = msg.role, msg.peer_id
        if self.cluster_keys is not None and self.role_keys.get(role) != key:
            # A peer's role is its key, never its claim.
            self.dropped["wrong_key"] += 1
            log.warning("refused %s %s: its key is not the cluster's %s key", role, peer_id, role)
            self.send(ident, P.Refused(reason=f"this connection's key is not a {role} key"))
            return
        if msg.version != P.VERSION:
            reason = f"protocol version {msg.version} is not the broker's {P.VERSION}"
            log.error("refused %s %s: %s", role, peer_id, reason)
            self.send(ident, P.Refused(reason=reason))
            return
        if role not in P.ROLES:
            self.send(ident, P.Refused(reason=f"unknown role {role!r}"))
            return
        info: dict[str, Any] = {}
        if role == "node":
            try:
                info = reports.node_info(msg.info or {})
            except reports.BadReport as e:
                self.dropped["bad_report"] += 1
                log.warning("refused node %s: %s", peer_id, e)
                self.send(ident, P.Refused(reason=f"bad info: {e}"))
                return
        known = self.reg.peers.get(ident)
        same = (peer_id, role, key)
        resumed = known is not None and (known.peer_id, known.role, known.key) == same
        if known is not None and not resumed:
            self.drop_peer(ident, "registered again")
        if known is not None and resumed:
            # Back over another link within its grace: the same node, stages and
            # requests; the routes it may have missed while away go again.
            silent = time.monotonic() - known.last_seen
            known.last_seen = time.monotonic()
            if info:
                known.report_info(info)
            self.stats["resumed"] += 1
            log.warning("%s %s is back after %.1fs; its work goes on", role, peer_id, silent)
            self.deploy.resend_routes(peer_id)
        else:
            peer = Peer(ident, peer_id, role, name=msg.name, info=info, key=key)
            self.reg.peers[ident] = peer
            log.info(
                "%s %s (%s) registered; models: %s", role, peer_id, msg.name, peer.models or "-"
            )
        self.reg.saw_models(self.reg.peers[ident].models)
        self.send(
            ident,
            P.Welcome(
                peer_id=peer_id,
                pub_port=self.pub_port,
                addresses=self.addresses(),
                resumed=resumed,
            ),
        )

    def addresses(self) -> list[str]:
        """The ROUTER's endpoint on each of this machine's addresses (bound to all)
        or the one it is bound to."""
        host, port = self.router_addr.removeprefix("tcp://").rsplit(":", 1)
        if host not in ("0.0.0.0", "*"):
            return [self.router_addr]
        from exo.common.discovery import my_addresses

        return [f"tcp://{ip}:{port}" for ip in my_addresses()]

    def expire(self, now: float) -> None:
        """A frontend silent past EXPIRY_S is gone; a node gets GRACE_S more to come
        back over another link (its requests wait, new ones are parked)."""
        for peer in self.reg.expired(now, P.EXPIRY_S):
            if peer.role != "node" or now - peer.last_seen > P.EXPIRY_S + P.GRACE_S:
                self.drop_peer(peer.identity, f"silent for {now - peer.last_seen:.1f}s")

    def drop_peer(self, ident: bytes, why: str) -> None:
        peer, gone = self.reg.remove(ident)
        if peer is None:
            return
        log.warning(
            "%s %s dropped: %s; %d requests end with it", peer.role, peer.peer_id, why, len(gone)
        )
        for r in gone:
            if r.node == ident:
                self.requests.lost(
                    r,
                    503,
                    "node_lost",
                    f"node {peer.peer_id} serving this request stopped responding ({why})",
                )
            else:
                self.cancels.stages(r)
                self.stats["cancelled_disconnect"] += 1
        self.cancels.forget(ident)
        for rid in [rid for rid, j in self.reg.parked.items() if j.frontend == ident]:
            del self.reg.parked[rid]
        if peer.role == "node":
            self.deploy.tend()

    def on_heartbeat(self, peer: Peer, msg: P.Heartbeat, frame: zmq.Frame) -> None:
        status = msg.status
        if status is not None and peer.role == "node":
            peer.report_status(reports.node_status(status))
            clock = peer.live.clock
            if clock is not None:
                # its clock less ours, as the heartbeat lands (off by the link's delay)
                peer.clock_skew = round(float(clock) - time.time(), 3)

    def on_info(self, peer: Peer, msg: P.Info, frame: zmq.Frame) -> None:
        peer.report_info(reports.node_info(msg.info))
        self.reg.saw_models(peer.models)

    # -- requests -------------------------------------------------------------------

    def on_instances(self, fe: Peer, msg: P.Instances, frame: zmq.Frame) -> None:
        status, body = 200, self.deploy.op(msg.op, msg.spec or {}, msg.id)
        if isinstance(body, PlacementError):
            status, body = body.status, {"code": body.code, "message": body.message}
        elif msg.op == "place":
            status = 201
        self.send(fe.identity, P.Reply(qid=msg.qid, data={"status": status, "body": body}))

    def on_query(self, fe: Peer, msg: P.Query, frame: zmq.Frame) -> None:
        what = msg.what
        data: dict[str, Any]
        if what == "models":
            data = {"models": list(self.reg.models().values())}
        elif what == "cluster":
            data = self.cluster()
        else:
            data = {"error": f"unknown query {what!r}"}
        self.send(fe.identity, P.Reply(qid=msg.qid, data=data))

    def topology(self) -> Topology:
        """Every node's public view, by id, and the links between them, measured."""
        publics = {p.peer_id: p.public() for p in self.reg.nodes()}
        nodes = list(publics.values())
        return publics, probes.attach(links(nodes), nodes)

    def cluster(self) -> dict[str, Any]:
        return {
            "protocol": P.VERSION,
            "uptime_s": round(time.time() - self.started, 1),
            "nodes": list((view := self.topology())[0].values()),
            "links": view[1],
            "version_skew": version_skew(list(view[0].values())),
            "instances": [i.public(self.reg.by_id()) for i in self.deploy.instances.values()],
            "frontends": [p.peer_id for p in self.reg.peers.values() if p.role == "frontend"],
            "requests_active": len(self.reg.requests),
            "requests": self.reg.in_flight(),
            "requests_waiting_for_download": len(self.reg.parked),
            "cancels_unacknowledged": len(self.cancels.pending),
            "dropped": self.dropped.snapshot(),
            "stats": self.stats.snapshot(),
        }
