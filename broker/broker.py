"""exo-broker's loop: one ROUTER for every peer, one PUB for cluster state.

Single-threaded, Majordomo style: every message in is handled to completion
before the next; liveness is checked and state published between polls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from exo.broker import probes, reports
from exo.broker import protocol as P
from exo.broker.deploy import Deployer, Topology
from exo.broker.placement import (
    PlacementError,
)
from exo.broker.registry import InFlight, Parked, Peer, Registry, downloading, failed_download
from exo.broker.routing import Refusal, choose_instance
from exo.broker.topology import links
from exo.common import keys

log = logging.getLogger(__name__)

DOMAIN = "exo-broker"  # the ZAP domain of the broker's sockets
PUBLISH_S = 1.0
RECONNECT_EVERY_S = 1.0
PARKED_S = 0.5
PULL_GRACE_S = 5.0


class Broker:
    def __init__(
        self,
        router_addr: str,
        pub_addr: str,
        ctx: zmq.Context | None = None,
        request_timeout: float = P.DEFAULT_REQUEST_TIMEOUT_S,
        probe_every: float = probes.EVERY_S,
        cluster: keys.Cluster | None = None,
    ) -> None:
        self.request_timeout = request_timeout
        self.probe_every = probe_every
        self.ctx = ctx or zmq.Context.instance()
        # None: --insecure, anyone who reaches the ports may speak
        self.cluster_keys = cluster
        self.role_keys: dict[str, str] = {}
        self.router = self.ctx.socket(zmq.ROUTER)
        if cluster is not None:  # (the ZAP handler must run before the sockets bind)
            assert cluster.frontend is not None, "the broker's machine holds every key"
            self.role_keys = {"node": cluster.node.public, "frontend": cluster.frontend.public}
            self.auth = keys.authenticator(self.ctx, {DOMAIN: set(self.role_keys.values())})
            keys.serve(self.router, cluster.broker, DOMAIN)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.setsockopt(zmq.SNDHWM, 100_000)
        self.router.setsockopt(zmq.RCVHWM, 100_000)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.HEARTBEAT_IVL, int(P.HEARTBEAT_S * 1000))
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(P.EXPIRY_S * 1000))
        # A hard ceiling: larger frames cost a reconnect; ones under it but over
        # MAX_FRAME are dropped and counted by decode().
        self.router.setsockopt(zmq.MAXMSGSIZE, 4 * P.MAX_FRAME)
        self.router.bind(router_addr)
        self.pub = self.ctx.socket(zmq.PUB)
        if cluster is not None:
            keys.serve(self.pub, cluster.broker, DOMAIN)
        self.pub.setsockopt(zmq.SNDHWM, 10_000)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(pub_addr)
        self.pub_port = int(self.pub.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        # (rid, node identity) -> when to resend the CANCEL if no CANCEL_ACK came
        self.pending_cancels: dict[tuple[str, bytes], float] = {}
        # model -> (node asked to download it, when): covers the heartbeat before
        # the node's status shows the download
        self.pulls: dict[str, tuple[bytes, float]] = {}
        self.reg = Registry()
        self.deploy = Deployer(self)
        self.probed: dict[str, probes.Probed] = {}
        # (link key, probing node id, sent at monotonic, sent at wall clock)
        self.probing: tuple[str, str, float, float] | None = None
        self.dropped = P.Counters()
        self.stats = P.Counters()
        self.stop_event = threading.Event()
        self.started = time.time()
        # periodic work -> when it is next due
        self.due: dict[str, float] = {"beat": 0.0, "pub": 0.0, "tend": 0.0}
        self.reconnects: dict[bytes, float] = {}  # identity -> when last told to RECONNECT

    # -- sending --------------------------------------------------------------------

    def send(self, identity: bytes, msg: P.Msg) -> bool:
        return self.send_raw(identity, P.encode(msg))

    def fail(self, identity: bytes, rid: str, status: int, code: str, message: str) -> None:
        """End a request at its frontend with the status the API answers."""
        self.send(identity, P.Fail(rid=rid, status=status, code=code, message=message))

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
            self.router.getsockopt(zmq.LAST_ENDPOINT).decode(),
            self.pub.getsockopt(zmq.LAST_ENDPOINT).decode(),
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
                ("cancels", self.resend_cancels),
                ("deadlines", self.expire_deadlines),
                ("parked", self.tick_parked),
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

    def tick_parked(self, now: float) -> None:
        if now >= self.due["tend"]:
            self.due["tend"] = now + PARKED_S
            self.tend_parked(now)

    def tick_beat(self, now: float) -> None:
        if now < self.due["beat"]:
            return
        self.due["beat"] = now + P.HEARTBEAT_S
        self.expire(now)
        view = self.topology()  # once for the tick: instances and probes share it
        self.deploy.tend(view)
        self.tend_probes(now, view)
        beat = P.encode(P.Heartbeat())
        for ident in list(self.reg.peers):
            self.send_raw(ident, beat)

    def tick_publish(self, now: float) -> None:
        if now >= self.due["pub"]:
            self.due["pub"] = now + PUBLISH_S
            self.pub.send_multipart(
                [P.TOPIC_CLUSTER, P.encode(P.Reply(qid="cluster", data=self.cluster()))]
            )

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
            return
        peer = self.reg.peers.get(ident)
        key = str(parts[1].get("User-Id")) if self.cluster_keys is not None else None
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
        handler = self.HANDLERS.get((peer.role, msg.type))
        if handler is None:
            self.dropped["wrong_role"] += 1
            return
        try:
            handler(self, peer, msg, parts[1])
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
        if ident in self.reg.peers:
            self.drop_peer(ident, "registered again")
        peer = Peer(ident, peer_id, role, name=msg.name, info=info, key=key)
        self.reg.peers[ident] = peer
        self.reg.seen_models.update(peer.models)
        self.send(
            ident,
            P.Welcome(
                peer_id=peer_id,
                heartbeat_s=P.HEARTBEAT_S,
                expiry_s=P.EXPIRY_S,
                pub_port=self.pub_port,
            ),
        )
        log.info("%s %s (%s) registered; models: %s", role, peer_id, peer.name, peer.models or "-")

    def expire(self, now: float) -> None:
        for peer in self.reg.expired(now, P.EXPIRY_S):
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
                self.fail(
                    r.frontend,
                    r.rid,
                    503,
                    "node_lost",
                    f"node {peer.peer_id} serving this request stopped responding ({why})",
                )
            else:
                self.cancel_stages(r)
                self.stats["cancelled_disconnect"] += 1
        for key in [k for k in self.pending_cancels if k[1] == ident]:
            del self.pending_cancels[key]
        for rid in [rid for rid, j in self.reg.parked.items() if j.frontend == ident]:
            del self.reg.parked[rid]
        if peer.role == "node":
            self.deploy.tend()

    def on_heartbeat(self, peer: Peer, msg: P.Heartbeat, frame: zmq.Frame) -> None:
        status = msg.status
        if status is not None and peer.role == "node":
            peer.status = reports.node_status(status)

    def on_info(self, peer: Peer, msg: P.Info, frame: zmq.Frame) -> None:
        peer.info = reports.node_info(msg.info)
        self.reg.seen_models.update(peer.models)

    # -- requests -------------------------------------------------------------------

    def on_submit(self, fe: Peer, msg: P.Submit, frame: zmq.Frame) -> None:
        rid = msg.rid
        if rid in self.reg.requests or rid in self.reg.parked:
            self.fail(
                fe.identity, rid, 409, "duplicate_request", f"request id {rid} is already in flight"
            )
            return
        timeout = self.request_timeout
        if msg.timeout_s is not None and msg.timeout_s > 0:
            timeout = min(timeout, msg.timeout_s)
        self.dispatch(Parked(rid, fe.identity, msg, time.monotonic() + timeout), first=True)

    def dispatch(self, job: Parked, first: bool = False) -> bool:
        """Send a job to the first stage of a ready instance of its model, or park it
        while an instance is on its way (placed, downloading, loading). True when
        the job left the parking lot (sent, or failed)."""
        rid, model, nodes = job.rid, job.submit.model, self.reg.by_id()
        inst = choose_instance(list(self.deploy.instances.values()), nodes, model)
        if inst is None:
            refusal = self.deploy.provide(model)
            pending = downloading(list(nodes.values()), model) or self.recently_pulled(model)
            if refusal is None or pending:
                if first:
                    self.reg.parked[rid] = job
                    where = pending[0][0].peer_id if pending else ""
                    self.send(job.frontend, P.Accepted(rid=rid, node=where))
                    log.info("rid=%s waits for an instance of %s", rid, model)
                return False
            failed = failed_download(list(nodes.values()), model)
            if not first and failed is not None:
                node, d = failed
                refusal = Refusal(
                    503,
                    "download_failed",
                    f"node {node.peer_id} could not download {model}: {d.get('error')}",
                )
            self.fail(job.frontend, rid, refusal.status, refusal.code, refusal.message)
            return True
        s = job.submit
        head = nodes[inst.head]
        frame = P.encode(
            P.Generate(
                rid=rid,
                model=model,
                kind=s.kind,
                payload=s.payload,
                params=s.params,
                instance=inst.id,
            )
        )
        if not self.send_raw(head.identity, frame):
            self.drop_peer(head.identity, "unreachable")
            self.fail(
                job.frontend, rid, 503, "node_lost", "the chosen node could not be reached; retry"
            )
            return True
        self.reg.requests[rid] = InFlight(
            rid,
            job.frontend,
            head.identity,
            model,
            deadline=job.deadline,
            instance=inst.id,
            stages=tuple(nodes[n].identity for n in inst.nodes),
        )
        # Count it now so a burst spreads over instances before their next heartbeat.
        head.status["prefilling"] = int(head.status.get("prefilling", 0)) + 1
        if first:
            self.send(job.frontend, P.Accepted(rid=rid, node=head.peer_id))
        log.info("rid=%s model=%s -> instance %s on %s", rid, model, inst.id, head.peer_id)
        return True

    def tend_probes(self, now: float, view: Topology) -> None:
        """Start the next link probe when one is due (broker/probes.py decides)."""
        nodes = self.reg.by_id()
        if self.probing is not None:
            k, node_id, sent, wall = self.probing
            node = nodes.get(node_id)
            got = node.status.get("probes", {}).get(k) if node else None
            if (
                node is None
                or (got and got.get("at", 0) >= wall - 1)
                or now - sent > probes.TIMEOUT_S
            ):
                self.probing = None
        link = probes.due(view[1], self.probed, now, self.probing is not None, self.probe_every)
        if link is None:
            return
        a, b = nodes.get(link["a"]["node"]), nodes.get(link["b"]["node"])
        if a is None or b is None or not b.info.get("probe_port"):
            return
        k = probes.key(link)
        self.send(
            a.identity,
            P.Probe(
                key=k,
                src=link["a"]["address"],
                dst=link["b"]["address"],
                port=int(b.info["probe_port"]),
            ),
        )
        self.probing = (k, a.peer_id, now, time.time())
        self.probed[k] = probes.Probed(now, probes.signature(link))
        self.stats["probes_sent"] += 1

    def on_instances(self, fe: Peer, msg: P.Instances, frame: zmq.Frame) -> None:
        status, body = 200, self.deploy.op(msg.op, msg.spec or {}, msg.id)
        if isinstance(body, PlacementError):
            status, body = body.status, {"code": body.code, "message": body.message}
        elif msg.op == "place":
            status = 201
        self.send(fe.identity, P.Reply(qid=msg.qid, data={"status": status, "body": body}))

    def recently_pulled(self, model: str) -> list[tuple[Peer, dict[str, Any]]]:
        """A node just asked to download `model`, whose status does not show it yet."""
        asked = self.pulls.get(model)
        if asked is None or time.monotonic() - asked[1] > PULL_GRACE_S:
            return []
        node = self.reg.peers.get(asked[0])
        if node is None or any(d.get("model") == model for d in node.status.get("downloads", [])):
            return []
        return [(node, {"model": model, "done": 0, "total": 0})]

    def tend_parked(self, now: float) -> None:
        """Dispatch parked jobs whose model arrived; tell the others how the download goes."""
        for rid, job in list(self.reg.parked.items()):
            if now >= job.deadline:
                del self.reg.parked[rid]
                self.stats["cancelled_deadline"] += 1
                self.fail(
                    job.frontend,
                    rid,
                    504,
                    "deadline_exceeded",
                    f"request {rid} passed its deadline waiting for {job.submit.model}",
                )
                continue
            if self.dispatch(job):
                del self.reg.parked[rid]
                continue
            for node, d in downloading(self.reg.nodes(), job.submit.model)[:1]:
                self.send(
                    job.frontend,
                    P.State(
                        rid=rid,
                        state="downloading",
                        node=node.peer_id,
                        done=int(d.get("done", 0)),
                        total=int(d.get("total", 0)),
                    ),
                )

    def on_pull(self, fe: Peer, msg: P.Pull, frame: zmq.Frame) -> None:
        model, wanted = msg.model, msg.node
        nodes = [n for n in self.reg.nodes() if wanted in (None, n.peer_id, n.name)]
        if not nodes:
            self.send(fe.identity, P.Reply(qid=msg.qid, data={"error": f"no node {wanted!r}"}))
            return
        have = [n for n in nodes if model in n.models]
        busy = downloading(nodes, model)
        node = (
            have
            or [b for b, _ in busy]
            or [
                max(
                    nodes,
                    key=lambda n: (
                        int(n.info.get("disk_free", 0)) or int(n.info.get("memory_available", 0))
                    ),
                )
            ]
        )[0]
        if not have and not busy:
            self.send(
                node.identity,
                P.Download(
                    model=model,
                    revision=msg.revision or "main",
                    **self.deploy.weights_source(model, node, self.topology()),
                ),
            )
            self.pulls[model] = (node.identity, time.monotonic())
            log.info("asked node %s to download %s", node.peer_id, model)
        self.send(
            fe.identity,
            P.Reply(
                qid=msg.qid,
                data={"node": node.peer_id, "state": "present" if have else "downloading"},
            ),
        )

    def on_cancel(self, fe: Peer, msg: P.Cancel, frame: zmq.Frame) -> None:
        rid, reason, qid = msg.rid, msg.reason or "explicit", msg.qid
        # Parked (waiting for a download) or running on a node: either way it ends here.
        owner = self.reg.parked.get(rid) or self.reg.requests.get(rid)
        if owner is not None and owner.frontend != fe.identity:
            # Only the frontend that submitted a request may cancel it.
            self.stats["cancel_not_owner"] += 1
            owner = None
        if qid is not None:
            self.send(fe.identity, P.Reply(qid=qid, data={"found": owner is not None}))
        if owner is None:
            return
        parked = self.reg.parked.pop(rid, None)
        running = None if parked else self.reg.requests.pop(rid, None)
        if running is not None:
            self.cancel_stages(running)
        self.stats[f"cancelled_{reason}"] += 1
        if reason == "explicit":
            # Whoever is waiting on this request learns why it ended.
            self.fail(owner.frontend, rid, 499, "cancelled", f"request {rid} was cancelled")
        log.info("rid=%s cancelled (%s)", rid, reason)

    def cancel_stages(self, r: InFlight) -> None:
        """Every stage's node learns of it; stage 0 frees the later stages' state
        in-band at its next step, the others just acknowledge."""
        for node in r.stages or (r.node,):
            self.cancel_on_node(r.rid, node)

    def cancel_on_node(self, rid: str, node: bytes) -> None:
        """Point to point until acknowledged, and on PUB for fan-out."""
        frame = P.encode(P.Cancel(rid=rid))
        self.send_raw(node, frame)
        self.pub.send_multipart([P.TOPIC_CANCEL, frame])
        self.pending_cancels[(rid, node)] = time.monotonic() + P.CANCEL_RESEND_S

    def on_cancel_ack(self, node: Peer, msg: P.CancelAck, frame: zmq.Frame) -> None:
        self.pending_cancels.pop((msg.rid, node.identity), None)

    def resend_cancels(self, now: float) -> None:
        for (rid, node), due in list(self.pending_cancels.items()):
            if now >= due:
                self.stats["cancel_resent"] += 1
                self.send(node, P.Cancel(rid=rid))
                self.pending_cancels[(rid, node)] = now + P.CANCEL_RESEND_S

    def expire_deadlines(self, now: float) -> None:
        for r in [r for r in self.reg.requests.values() if now >= r.deadline]:
            del self.reg.requests[r.rid]
            self.cancel_stages(r)
            self.stats["cancelled_deadline"] += 1
            timeout = now - r.started
            self.fail(
                r.frontend,
                r.rid,
                504,
                "deadline_exceeded",
                f"request {r.rid} passed its deadline after {timeout:.1f}s",
            )
            log.info("rid=%s deadline passed after %.1fs", r.rid, timeout)

    def on_node_reply(self, node: Peer, msg: P.Tokens | P.Fail | P.State, frame: zmq.Frame) -> None:
        r = self.reg.requests.get(msg.rid)
        if r is None or r.node != node.identity:
            if isinstance(msg, P.Tokens) and not msg.finish:
                # Nobody wants these tokens any more: make sure the node stops.
                self.cancel_on_node(msg.rid, node.identity)
            return
        if isinstance(msg, P.Tokens):
            r.tokens += len(msg.ids)
        ended = isinstance(msg, P.Fail) or (isinstance(msg, P.Tokens) and msg.finish)
        if ended:
            del self.reg.requests[r.rid]
        if not self.send_raw(r.frontend, frame) and r.rid in self.reg.requests:
            del self.reg.requests[r.rid]
            self.cancel_stages(r)
            self.stats["cancelled_disconnect"] += 1

    def on_query(self, fe: Peer, msg: P.Query, frame: zmq.Frame) -> None:
        what = msg.what
        data: dict[str, Any] | list[Any]
        if what == "models":
            data = list(self.reg.models().values())
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
            "instances": [i.public(self.reg.by_id()) for i in self.deploy.instances.values()],
            "frontends": [p.peer_id for p in self.reg.peers.values() if p.role == "frontend"],
            "requests_active": len(self.reg.requests),
            "requests_waiting_for_download": len(self.reg.parked),
            "cancels_unacknowledged": len(self.pending_cancels),
            "dropped": self.dropped.snapshot(),
            "stats": self.stats.snapshot(),
        }

    # Each handler is called with the message type of its key (protocol.TYPES).
    HANDLERS: dict[tuple[str, str], Callable[[Broker, Peer, Any, zmq.Frame], None]] = {
        ("node", "HEARTBEAT"): on_heartbeat,
        ("frontend", "HEARTBEAT"): on_heartbeat,
        ("node", "INFO"): on_info,
        ("node", "TOKENS"): on_node_reply,
        ("node", "FAIL"): on_node_reply,
        ("node", "STATE"): on_node_reply,
        ("frontend", "SUBMIT"): on_submit,
        ("frontend", "CANCEL"): on_cancel,
        ("node", "CANCEL_ACK"): on_cancel_ack,
        ("frontend", "QUERY"): on_query,
        ("frontend", "PULL"): on_pull,
        ("frontend", "INSTANCES"): on_instances,
    }
