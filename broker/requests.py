"""What frontends ask of the cluster, from SUBMIT to the last TOKENS.

A request goes to stage 0 of a ready instance of its model (routing.py picks
the instance, deploy.py places one when there is none), or waits, parked, while
an instance is on its way (placed, downloading, loading), until its deadline:
the smaller of the client's and the broker's --request-timeout. Cancels end it
wherever it is; its node's replies are relayed to its frontend unchanged. Model
pulls (PULL) live here too: a request may wait on the download one started.
A request that loses its placement before its first token is placed again
(`lost`: common/retry.py, rule 4).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from exo.broker import protocol as P
from exo.broker.cancels import Cancels
from exo.broker.deploy import Deployer
from exo.broker.hops import Topology, weights_source
from exo.broker.registry import InFlight, Parked, Peer, Registry, downloading, failed_download
from exo.broker.reports import Download
from exo.broker.routing import Refusal, choose_instance
from exo.common.digests import chain
from exo.common.retry import LOSSES, may_place_again

log = logging.getLogger(__name__)

PARKED_S = 0.5
PULL_GRACE_S = 5.0


class Requests:
    def __init__(
        self,
        reg: Registry,
        deploy: Deployer,
        cancels: Cancels,
        send: Callable[[bytes, P.Msg], bool],
        send_raw: Callable[[bytes, bytes | zmq.Frame], bool],
        drop_peer: Callable[[bytes, str], None],
        topology: Callable[[], Topology],
        stats: P.Counters,
        request_timeout: float,
    ) -> None:
        self.reg, self.deploy, self.cancels = reg, deploy, cancels
        self.send, self.send_raw, self.drop_peer = send, send_raw, drop_peer
        self.topology, self.stats, self.request_timeout = topology, stats, request_timeout
        # model -> (node asked to download it, when): covers the heartbeat before
        # the node's status shows the download
        self.pulls: dict[str, tuple[bytes, float]] = {}
        self.next_parked = 0.0

    def fail(self, identity: bytes, rid: str, status: int, code: str, message: str) -> None:
        """End a request at its frontend with the status the API answers."""
        self.send(identity, P.Fail(rid=rid, status=status, code=code, message=message))

    def tick(self, now: float) -> None:
        if now >= self.next_parked:
            self.next_parked = now + PARKED_S
            self.tend_parked(now)
            # a pull's entry only bridges the heartbeat before its node shows it
            for model in [m for m, (_, t) in self.pulls.items() if now - t > PULL_GRACE_S]:
                del self.pulls[model]

    def on_submit(self, fe: Peer, msg: P.Submit, frame: zmq.Frame) -> None:
        rid = msg.rid
        held = self.reg.requests.get(rid) or self.reg.parked.get(rid)
        if held is not None and held.frontend == fe.identity:
            # The same request sent again (common/retry.py: idempotency): it runs once.
            self.stats["submit_duplicate"] += 1
            return
        if held is not None:
            self.fail(
                fe.identity, rid, 409, "duplicate_request", f"request id {rid} is already in flight"
            )
            return
        timeout = self.request_timeout
        if msg.timeout_s is not None and msg.timeout_s > 0:
            timeout = min(timeout, msg.timeout_s)
        self.dispatch(Parked(rid, fe.identity, msg, time.monotonic() + timeout), first=True)

    def lost(self, r: InFlight, status: int, code: str, message: str) -> None:
        """A request in flight whose placement failed under it (its node lost, its
        instance ended, a stage lost): placed again while common/retry.py's rule 4
        allows, else ended with the failure."""
        self.reg.requests.pop(r.rid, None)
        now = time.monotonic()
        if r.submit is None or not may_place_again(code, r.relayed, r.placements, now, r.deadline):
            self.fail(r.frontend, r.rid, status, code, message)
            return
        self.stats["placed_again"] += 1
        log.warning("rid=%s lost its placement (%s): placing it again", r.rid, message)
        # Its old stages drop it with their instance (UNLOAD) or were lost with
        # their node; a CANCEL could overtake its next GENERATE to the same node.
        self.reg.parked[r.rid] = Parked(
            r.rid, r.frontend, r.submit, r.deadline, r.started, r.placements, message, r.instance
        )

    def dispatch(self, waiting: Parked, first: bool = False) -> bool:
        """Send a waiting to the first stage of a ready instance of its model, or park it
        while an instance is on its way (placed, downloading, loading). True when
        the waiting left the parking lot (sent, or failed)."""
        rid, model, nodes = waiting.rid, waiting.submit.model, self.reg.by_id()
        wanted = chain(waiting.submit.kind, waiting.submit.payload)
        instances = list(self.deploy.instances.values())
        others = [i for i in instances if i.id != waiting.avoid]
        inst = choose_instance(others, nodes, model, wanted) or choose_instance(
            instances, nodes, model, wanted
        )
        if inst is None:
            return self.no_instance(waiting, first, list(nodes.values()))
        s = waiting.submit
        node0 = nodes[inst.first_node]
        if node0.silent() > P.EXPIRY_S:
            # Away, maybe failing over to another link: the waiting waits for it (or
            # for its instance to fail when its grace runs out).
            return self.park(waiting, first, node0.peer_id)
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
        if not self.send_raw(node0.identity, frame):
            if node0.silent() <= P.EXPIRY_S + P.GRACE_S:
                return self.park(waiting, first, node0.peer_id)
            self.drop_peer(node0.identity, "unreachable")
            self.fail(
                waiting.frontend,
                rid,
                503,
                "node_lost",
                "the chosen node could not be reached; retry",
            )
            return True
        self.reg.requests[rid] = InFlight(
            rid,
            waiting.frontend,
            node0.identity,
            model,
            deadline=waiting.deadline,
            started=waiting.started,
            instance=inst.id,
            stages=tuple(nodes[n].identity for n in inst.nodes),
            submit=s,
            placements=waiting.placements + 1,
        )
        node0.placed += 1  # (its load until its next heartbeat counts it)
        if first:
            self.send(waiting.frontend, P.Accepted(rid=rid, node=node0.peer_id))
        log.info("rid=%s model=%s -> instance %s on %s", rid, model, inst.id, node0.peer_id)
        return True

    def no_instance(self, waiting: Parked, first: bool, nodes: list[Peer]) -> bool:
        """No ready instance: wait for one on its way (placed now if need be, or a
        download), or fail with why there can be none."""
        model = waiting.submit.model
        refusal = self.deploy.provide(model)
        pending = downloading(nodes, model) or self.recently_pulled(model)
        if refusal is None or pending:
            return self.park(waiting, first, pending[0][0].peer_id if pending else "")
        failed = failed_download(nodes, model)
        if not first and failed is not None:
            node, d = failed
            refusal = Refusal(
                503,
                "download_failed",
                f"node {node.peer_id} could not download {model}: {d.error}",
            )
        elif waiting.lost:
            refusal = Refusal(
                503, "node_lost", f"{waiting.lost}; it cannot be placed again: {refusal.message}"
            )
        self.fail(waiting.frontend, waiting.rid, refusal.status, refusal.code, refusal.message)
        return True

    def park(self, waiting: Parked, first: bool, where: str) -> bool:
        """Keep a waiting until its instance can take it (tend_parked tries again)."""
        if first:
            self.reg.parked[waiting.rid] = waiting
            self.send(waiting.frontend, P.Accepted(rid=waiting.rid, node=where))
            log.info("rid=%s waits for an instance of %s", waiting.rid, waiting.submit.model)
        return False

    def recently_pulled(self, model: str) -> list[tuple[Peer, Download]]:
        """A node just asked to download `model`, whose status does not show it yet."""
        asked = self.pulls.get(model)
        if asked is None or time.monotonic() - asked[1] > PULL_GRACE_S:
            return []
        node = self.reg.peers.get(asked[0])
        if node is None or any(d.model == model for d in node.live.downloads):
            return []
        return [(node, Download(model))]

    def tend_parked(self, now: float) -> None:
        """Dispatch parked jobs whose model arrived; tell the others how the download goes."""
        for rid, waiting in list(self.reg.parked.items()):
            if now >= waiting.deadline:
                del self.reg.parked[rid]
                self.stats["cancelled_deadline"] += 1
                self.fail(
                    waiting.frontend,
                    rid,
                    504,
                    "deadline_exceeded",
                    f"request {rid} passed its deadline waiting for {waiting.submit.model}",
                )
                continue
            if self.dispatch(waiting):
                del self.reg.parked[rid]
                continue
            for node, d in downloading(self.reg.nodes(), waiting.submit.model)[:1]:
                self.send(
                    waiting.frontend,
                    P.State(
                        rid=rid,
                        state="downloading",
                        node=node.peer_id,
                        done=d.done,
                        total=d.total,
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
                    key=lambda n: n.facts.disk_free or n.facts.memory_available,
                )
            ]
        )[0]
        if not have and not busy:
            self.send(
                node.identity,
                P.Download(
                    model=model,
                    revision=msg.revision or "main",
                    source=weights_source(model, node, self.reg.nodes(), self.topology()),
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
            self.cancels.stages(running)
        self.stats[f"cancelled_{reason}"] += 1
        if reason == "explicit":
            # Whoever is waiting on this request learns why it ended.
            self.fail(owner.frontend, rid, 499, "cancelled", f"request {rid} was cancelled")
        log.info("rid=%s cancelled (%s)", rid, reason)

    def expire_deadlines(self, now: float) -> None:
        for r in [r for r in self.reg.requests.values() if now >= r.deadline]:
            del self.reg.requests[r.rid]
            self.cancels.stages(r)
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
                self.cancels.on_node(msg.rid, node.identity)
            return
        if isinstance(msg, P.Tokens):
            if msg.seq and msg.seq <= r.seq:
                # Resent by a node that failed over to another link: relayed once.
                self.stats["tokens_duplicate"] += 1
                return
            r.seq = msg.seq or r.seq
            r.tokens += len(msg.ids)
            r.relayed += 1
        elif isinstance(msg, P.Fail) and msg.code in LOSSES:
            self.lost(r, msg.status, msg.code, msg.message)
            return
        ended = isinstance(msg, P.Fail) or (isinstance(msg, P.Tokens) and msg.finish)
        if ended:
            del self.reg.requests[r.rid]
        if not self.send_raw(r.frontend, frame) and r.rid in self.reg.requests:
            del self.reg.requests[r.rid]
            self.cancels.stages(r)
            self.stats["cancelled_disconnect"] += 1
