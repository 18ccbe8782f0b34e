"""The exo wire protocol: every message, in one place.

Transport
    Nodes and API frontends each hold a DEALER connected to the broker's ROUTER
    (default port 52416). A message is ONE ZeroMQ frame: a msgpack map. On the
    ROUTER side the frame is preceded by the peer's routing identity. The broker
    also binds a PUB (default 52417) for cluster state; nothing that must arrive
    travels on PUB alone.

Envelope (every message)
    v    int   protocol version, VERSION below. Checked at HELLO: a peer of
               another version is refused (REFUSED) and both sides log why.
    t    str   message type, one of TYPES.
    rid  str   request id: present on all request traffic (SUBMIT, GENERATE,
               TOKENS, FAIL, CANCEL, ACCEPTED).

Conversation
    peer -> broker  HELLO {role: "node"|"frontend", peer_id, name, info?}
    broker -> peer  WELCOME {peer_id, heartbeat_s, expiry_s, pub_port} | REFUSED {reason}
    peer -> broker  HEARTBEAT {status?}      every heartbeat_s, both directions
    broker -> peer  HEARTBEAT {}
    broker -> peer  RECONNECT {reason}       the broker does not know this peer
                                             (it restarted or expired it): send HELLO again
    node -> broker  INFO {info}              the node's facts changed (models on disk...)

    frontend -> broker  SUBMIT {rid, model, kind, payload, params, timeout_s?}
                        timeout_s: the client's deadline; the broker applies the
                        smaller of it and its own --request-timeout.
    broker -> frontend  ACCEPTED {rid, node}  or FAIL {rid, status, code, message}
    broker -> node      GENERATE {rid, model, kind, payload, params}
    node -> broker      TOKENS {rid, ids, text, finish?, usage?}   one per engine step
    broker -> frontend  TOKENS (relayed unchanged)
    node -> broker      FAIL {rid, status, code, message}          relayed to the frontend
    frontend -> broker  CANCEL {rid, reason, qid?}   reason: disconnect | deadline | explicit.
                        Any frontend may cancel any rid; with a qid the broker
                        answers REPLY {qid, data: {found}} (POST /v1/cancel).
    broker -> node      CANCEL {rid}         point to point, resent every CANCEL_RESEND_S
                                             until the node answers CANCEL_ACK {rid} or is
                                             declared dead; also fanned out on PUB (topic
                                             "cancel"), which may drop it: never relied on.
    broker -> frontend  FAIL {rid, status: 504, code: "deadline_exceeded"} past the deadline;
                        FAIL {rid, status: 499, code: "cancelled"} to the owner of an
                        explicitly cancelled request.
    frontend -> broker  QUERY {qid, what}    broker answers REPLY {qid, data}
    node -> broker      STATE {rid, state, done?, total?}   loading / admitted / prefill progress
    broker -> frontend  STATE {rid, state: "downloading", done, total, node}  while a request
                                             waits for a model some node is downloading
    frontend -> broker  PULL {qid, model, node?}   POST /v1/models/pull: the broker picks a
                                             node (or takes the one named), sends it DOWNLOAD
                                             and answers REPLY {qid, data: {node} | {error}}
    broker -> node      DOWNLOAD {model, revision?, source?}   fetch a model: from `source`
                                             (a peer node's weights server, hub layout) when
                                             a node holds it, falling back to the hub; progress
                                             travels in the node's HEARTBEAT status
                                             ("downloads"), completion in its INFO

Instances (a model placed on an ordered list of nodes, each holding a layer range)
    frontend -> broker  INSTANCES {qid, op, spec?, id?}  op: place | preview | list | delete;
                        answered REPLY {qid, data: {status, body}}, status the HTTP one
    broker -> node      LOAD {instance, model, start, end, total, stage, next?, head?}
                        load layers [start, end) of `total`, once every stage's node holds
                        the weights. next: the next stage's peer endpoint (absent on the
                        last stage); head (every later stage): stage 0's endpoint, where the
                        last stage sends tokens and any stage its STAGE_ERROR. kv_budgets (stage 0 only): [[layers, KV bytes], ...] of the
                        later stages, so stage 0 admits no more than any of them can hold.
                        Progress travels in the node's HEARTBEAT status
                        ("stages": {instance: {state: loading|ready|failed, error?}}).
    broker -> node      UNLOAD {instance}   drop the stage and every request through it
    broker -> node      ROUTE {instance, next? | head?}  send the following steps to this
                        endpoint instead: the best link between two stages changed
    broker -> node      GENERATE {..., instance}  to stage 0 of a ready instance

Link probes
    broker -> node  PROBE {key, src, dst, port}   measure the link from local address src
                    to the peer's dst (its INFO's probe_port) on a raw TCP socket: RTT
                    and receiver-timed bandwidth (nodes/machine/prober.py); the result travels
                    in the node's HEARTBEAT status ("probes": {key: {rtt_s,
                    bandwidth_Bps, at, error?}}). One probe at a time (broker/probes.py).

Peer sockets (node to node, never through the broker)
    Each node binds a ROUTER (its INFO's peer_port) and connects one DEALER per
    peer endpoint it sends to. Messages are two frames: the msgpack header
    below, then the raw float32 hidden states [T, D] (none for RESULT/STAGE_ERROR).
    stage k -> k+1   ACT {instance, step, decode, chunks, new, drops, shape}
                     decode: rids decoding this step, in batch-row order; chunks:
                     [rid, tokens, wants_logits] prompt chunks, packed after the
                     decode rows; new: {rid: sampling params} for requests whose
                     first chunk this is; drops: rids that ended since the last step
    last -> stage 0  RESULT {instance, step, ids}   one token per decode row, then one
                     per chunk that finished its prompt
    any -> stage 0   STAGE_ERROR {instance, message}  a stage could not run the step

Robustness
    Frames that are not msgpack maps, lack v/t, carry an unknown type, miss a
    required field, or exceed MAX_FRAME bytes are dropped and counted by reason
    (Counters); none is fatal. Liveness: a peer silent for expiry_s is dead;
    ZeroMQ's own heartbeats (ZMQ_HEARTBEAT_*) also drop dead TCP connections.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgpack

VERSION = 1
MAX_FRAME = 8 * 1024 * 1024

HEARTBEAT_S = 0.25
EXPIRY_S = 1.5
CANCEL_RESEND_S = 0.2
DEFAULT_REQUEST_TIMEOUT_S = 600.0

# PUB topics (first frame); the second frame is a protocol message.
TOPIC_CLUSTER = b"cluster"
TOPIC_CANCEL = b"cancel"

DEFAULT_ROUTER_PORT = 52416
DEFAULT_PUB_PORT = 52417
DEFAULT_API_PORT = 52415

# Required fields per type, with their Python types.
TYPES: dict[str, dict[str, type | tuple[type, ...]]] = {
    "HELLO": {"role": str, "peer_id": str},
    "WELCOME": {"peer_id": str},
    "REFUSED": {"reason": str},
    "HEARTBEAT": {},
    "RECONNECT": {"reason": str},
    "INFO": {"info": dict},
    "SUBMIT": {"rid": str, "model": str, "kind": str, "payload": (dict, list, str), "params": dict},
    "ACCEPTED": {"rid": str, "node": str},
    "GENERATE": {
        "rid": str,
        "model": str,
        "kind": str,
        "payload": (dict, list, str),
        "params": dict,
    },
    "TOKENS": {"rid": str, "ids": list, "text": str},
    "FAIL": {"rid": str, "status": int, "code": str, "message": str},
    "CANCEL": {"rid": str},
    "CANCEL_ACK": {"rid": str},
    "DOWNLOAD": {"model": str},
    "PULL": {"qid": str, "model": str},
    "STATE": {"rid": str, "state": str},
    "QUERY": {"qid": str, "what": str},
    "INSTANCES": {"qid": str, "op": str},
    "LOAD": {"instance": str, "model": str, "start": int, "end": int, "total": int},
    "UNLOAD": {"instance": str},
    "ROUTE": {"instance": str},
    "PROBE": {"key": str, "src": str, "dst": str, "port": int},
    "ACT": {"instance": str, "step": int, "decode": list, "chunks": list, "shape": list},
    "RESULT": {"instance": str, "step": int, "ids": list},
    "STAGE_ERROR": {"instance": str, "message": str},
    "REPLY": {"qid": str, "data": (dict, list)},
}

# Optional fields: checked when present (a wrong type drops the frame like a
# missing required field would).
OPTIONAL: dict[str, dict[str, type | tuple[type, ...]]] = {
    "HELLO": {"name": str, "info": dict},
    "HEARTBEAT": {"status": dict},
    "SUBMIT": {"timeout_s": (int, float)},
    "TOKENS": {"finish": str, "usage": dict},
    "CANCEL": {"reason": str, "qid": str},
    "STATE": {"done": int, "total": int, "node": str},
    "PULL": {"node": str, "revision": str},
    "INSTANCES": {"spec": dict, "id": str},
    "DOWNLOAD": {"revision": str, "source": str},
    "LOAD": {"stage": int, "next": str, "head": str, "kv_budgets": list},
    "ROUTE": {"next": str, "head": str},
    "ACT": {"new": dict, "drops": list},
}

# Ids a peer names (request, query, instance, peer): bounded like every other field.
MAX_ID = 256
IDS = ("rid", "qid", "peer_id", "instance", "model")

ROLES = ("node", "frontend")


class ProtocolError(ValueError):
    """A frame that must be dropped; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(slots=True)
class Message:
    type: str
    fields: dict[str, Any]
    version: int = VERSION

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def encode(type_: str, **fields: Any) -> bytes:
    if type_ not in TYPES:
        raise ValueError(f"unknown message type {type_}")
    fields["v"] = VERSION
    fields["t"] = type_
    return msgpack.packb(fields, use_bin_type=True)


def decode(frame: bytes | memoryview, max_frame: int = MAX_FRAME) -> Message:
    """Parse one frame or raise ProtocolError. The version is returned, not enforced:
    HELLO decides what to do with a peer of another version."""
    if len(frame) > max_frame:
        raise ProtocolError("oversize", f"{len(frame)} bytes > {max_frame}")
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError("undecodable", type(e).__name__) from None
    if not isinstance(obj, dict):
        raise ProtocolError("undecodable", "not a map")
    version, type_ = obj.pop("v", None), obj.pop("t", None)
    if not isinstance(version, int) or not isinstance(type_, str):
        raise ProtocolError("no_envelope")
    spec = TYPES.get(type_)
    if spec is None:
        raise ProtocolError("unknown_type", type_[:40])
    for name, kind in spec.items():
        if not isinstance(obj.get(name), kind):
            raise ProtocolError("bad_fields", f"{type_}.{name}")
    for name, kind in OPTIONAL.get(type_, {}).items():
        if name in obj and obj[name] is not None and not isinstance(obj[name], kind):
            raise ProtocolError("bad_fields", f"{type_}.{name}")
    for name in IDS:
        if isinstance(v := obj.get(name), str) and len(v) > MAX_ID:
            raise ProtocolError("bad_fields", f"{type_}.{name} longer than {MAX_ID}")
    return Message(type_, obj, version)


class Counters(Counter[str]):
    """Dropped-frame counts by reason, plus anything else worth counting."""

    def snapshot(self) -> dict[str, int]:
        return dict(self)
