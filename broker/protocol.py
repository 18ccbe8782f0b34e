"""The exo wire protocol: every message, in one place (the Structs below give
each one's fields and types; a frame that does not decode into its type is
dropped and counted by reason, never fatal).

Transport
    Nodes and API frontends each hold a DEALER connected to the broker's ROUTER
    (default port 52416). A message is ONE ZeroMQ frame: a msgpack map with `v`,
    the protocol version (checked at HELLO: a peer of another version is REFUSED),
    and `t`, its type. On the ROUTER side the frame is preceded by the peer's
    routing identity. The broker also binds a PUB (default 52417) for cluster
    state; nothing that must arrive travels on PUB alone. Request traffic carries
    `rid`, the request id.

Conversation
    peer -> broker  HELLO; broker -> peer WELCOME or REFUSED
    both ways       HEARTBEAT every heartbeat_s (a node's carries its status)
    broker -> peer  RECONNECT: the broker does not know this peer (it restarted or
                    expired it): send HELLO again
    node -> broker  INFO: the node's facts changed (models on disk...)

    frontend -> broker  SUBMIT; kind: chat | completion | count (a chat's prompt tokens
                        counted by stage 0's tokenizer and template, nothing run: one
                        TOKENS with usage); timeout_s: the client's deadline (the broker
                        applies the smaller of it and its own --request-timeout)
    broker -> frontend  ACCEPTED {rid, node} or FAIL {rid, status, code, message}
    broker -> node      GENERATE, to stage 0 of a ready instance
    node -> broker      TOKENS, one per engine step; FAIL; both relayed unchanged
    node -> broker      STATE: loading / admitted / prefill progress
    broker -> frontend  STATE downloading {done, total, node} while a request waits
                        for a model some node is downloading
    frontend -> broker  CANCEL {reason: disconnect | deadline | explicit}: only the
                        frontend that submitted a request may cancel it; with a qid
                        the broker answers REPLY {found} (POST /v1/cancel)
    broker -> node      CANCEL, point to point, resent every retry.CANCEL_RESEND_S until the
                        node answers CANCEL_ACK or is declared dead; also fanned out on
                        PUB (topic "cancel"), which may drop it: never relied on
    broker -> frontend  FAIL 504 deadline_exceeded past the deadline; FAIL 499
                        cancelled to the owner of an explicitly cancelled request
    frontend -> broker  QUERY {qid, what: models | cluster}, answered REPLY {qid, data}
    frontend -> broker  PULL (POST /v1/models/pull): the broker picks a node (or the
                        one named), sends it DOWNLOAD, answers REPLY {node} or {error}
    broker -> node      DOWNLOAD: from `source` (a peer node's weights server, hub
                        layout) when a node holds it, falling back to the hub; progress
                        travels in the node's HEARTBEAT status, completion in its INFO

Instances (a model placed on an ordered list of nodes, each holding a layer range)
    frontend -> broker  INSTANCES {op: place | preview | list | delete}, answered
                        REPLY {status, body}, status the HTTP one
    broker -> node      LOAD layers [start, end) of `total`, once every stage's node
                        holds the weights. next: the next stage's peer endpoint (not on
                        the last); stage0 (every later stage): stage 0's, where the last
                        stage sends tokens and any stage its STAGE_ERROR; kv_budgets
                        (stage 0): [layers, KV bytes] of each later stage, so stage 0
                        admits no more than any can hold; senders: the peer keys of the
                        only nodes whose steps (stage k > 0: stage k-1's) or tokens and
                        errors (stage 0: every later stage's) this stage takes. Progress
                        in the node's status ("stages": {instance: {state, error?}})
    broker -> node      UNLOAD: drop the stage and every request through it
    broker -> node      ROUTE: send the following steps to this endpoint instead (the
                        best link between two stages changed), senders as LOAD's

Link probes
    broker -> node  PROBE: measure the link from local address src to the peer's dst
                    (its probe_port) on a raw TCP socket (nodes/machine/prober.py), one
                    at a time (broker/probes.py); the result in its status ("probes").

Peer sockets (node to node, never through the broker)
    Each node binds a ROUTER (its INFO's peer_port) and connects one DEALER per
    peer endpoint it sends to. Messages are two frames: the header below, then
    the raw float32 hidden states [T, D] (none for RESULT and STAGE_ERROR).
    stage k -> k+1   ACT: one step (its fields below)
    last -> stage 0  RESULT: one token per decode row, then one per chunk that
                     finished its prompt; the log probabilities of those that ask
    any -> stage 0   STAGE_ERROR: a stage could not run the step

Liveness: a frontend silent for expiry_s is dead; a node gets GRACE_S more, in
which it may come back over another of the broker's addresses (WELCOME lists
them) and carry on where it was (WELCOME resumed). ZeroMQ's own heartbeats
(ZMQ_HEARTBEAT_*) also drop dead TCP connections.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, Union

import msgpack
import msgspec
from msgspec import Meta, Struct

from exo.common.sampling import SamplingParams

VERSION = 1
MAX_FRAME = 8 * 1024 * 1024

HEARTBEAT_S = 0.25
EXPIRY_S = 1.5
# A node silent past EXPIRY_S is kept this much longer, stages and requests included:
# one whose link died comes back over another (dialled after SILENT_S of silence).
GRACE_S = 3.0
SILENT_S = 1.0
DEFAULT_REQUEST_TIMEOUT_S = 600.0

# PUB topics (first frame); the second frame is a protocol message.
TOPIC_CLUSTER = b"cluster"  # REPLY {qid "cluster", data: the cluster's state}, once a second
TOPIC_CANCEL = b"cancel"  # CANCEL, a second path to the nodes

DEFAULT_ROUTER_PORT, DEFAULT_PUB_PORT, DEFAULT_API_PORT = 52416, 52417, 52415

# Ids a peer names (request, query, instance, peer): bounded like every other field.
MAX_ID = 256
Id = Annotated[str, Meta(max_length=MAX_ID)]
Payload = dict[str, Any] | list[Any] | str
PeerKey = Annotated[str, Meta(max_length=64)]  # a node's own CURVE public key, z85
Map = dict[str, Any]
# A sampled token's log probability and the likeliest tokens' (id, log probability)
Logprob = tuple[int, float, Annotated[list[tuple[int, float]], Meta(max_length=20)]]

ROLES = ("node", "frontend")


class ProtocolError(ValueError):
    """A frame that must be dropped; `reason` is the counter it goes to; `rid`: a
    SUBMIT's, whose frontend is told (FAIL 400) rather than left waiting."""

    def __init__(self, reason: str, detail: str = "", rid: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.rid = reason, detail, rid


class Msg(Struct, tag_field="t", kw_only=True):
    """The envelope: `v`, the protocol version, and `t`, the type (each subclass's
    tag). Fields a peer does not know are ignored; a field of the wrong type drops
    the frame."""

    v: int = VERSION

    @property
    def type(self) -> str:
        return str(self.__struct_config__.tag)

    @property
    def version(self) -> int:
        return self.v


# -- peers and the broker --------------------------------------------------------------


class Hello(Msg, tag="HELLO"):
    role: str
    peer_id: Id
    name: str = ""
    info: Map | None = None  # a node's facts (broker/reports.py checks them)


class Welcome(Msg, tag="WELCOME"):
    peer_id: Id
    heartbeat_s: float = HEARTBEAT_S
    expiry_s: float = EXPIRY_S
    pub_port: int = 0
    # the broker's ROUTER on each of its addresses: where to dial when the one in
    # use goes quiet (a link down)
    addresses: list[str] = []
    # the broker kept this peer through a silence (GRACE_S): its requests and
    # stages go on; False: it is new to the broker, which knows nothing of them
    resumed: bool = False


class Refused(Msg, tag="REFUSED"):
    reason: str


class Heartbeat(Msg, tag="HEARTBEAT"):
    status: Map | None = None  # a node's live status (broker/reports.py)


class Reconnect(Msg, tag="RECONNECT"):
    reason: str


class Info(Msg, tag="INFO"):
    info: Map


# -- requests ---------------------------------------------------------------------------


class Submit(Msg, tag="SUBMIT"):
    rid: Id
    model: Id
    kind: str
    payload: Payload
    params: SamplingParams
    timeout_s: float | None = None


class Accepted(Msg, tag="ACCEPTED"):
    rid: Id
    node: str


class Generate(Msg, tag="GENERATE"):
    rid: Id
    model: Id
    kind: str
    payload: Payload
    params: SamplingParams
    instance: Id | None = None


class Tokens(Msg, tag="TOKENS"):
    rid: Id
    ids: list[int]
    text: str
    finish: str | None = None
    usage: Map | None = None
    # 1, 2, ... per request: a node resends what a link may have lost after it
    # fails over, and the broker relays each seq once
    seq: int = 0
    tool_calls: list[Map] | None = None  # with the last: the calls, OpenAI's shape
    reasoning: str = ""  # a thinking model's thoughts, apart from its text
    logprobs: list[Map] | None = None  # per token, when asked: OpenAI's entries


class Fail(Msg, tag="FAIL"):
    rid: Id
    status: int
    code: str
    message: str


class Cancel(Msg, tag="CANCEL"):
    rid: Id
    reason: str | None = None
    qid: Id | None = None


class CancelAck(Msg, tag="CANCEL_ACK"):
    rid: Id


class State(Msg, tag="STATE"):
    rid: Id
    state: str
    done: int | None = None
    total: int | None = None
    node: Id | None = None


class Query(Msg, tag="QUERY"):
    qid: Id
    what: str


class Reply(Msg, tag="REPLY"):
    qid: Id
    data: Map


# -- models and instances ----------------------------------------------------------------


class Download(Msg, tag="DOWNLOAD"):
    model: Id
    revision: str | None = None
    source: str | None = None


class Pull(Msg, tag="PULL"):
    qid: Id
    model: Id
    node: Id | None = None
    revision: str | None = None


class Instances(Msg, tag="INSTANCES"):
    qid: Id
    op: str
    spec: Map | None = None
    id: Id | None = None


class Load(Msg, tag="LOAD"):
    instance: Id
    model: Id
    start: int
    end: int
    total: int
    stage: int = 0
    next: str | None = None
    stage0: str | None = None
    kv_budgets: list[tuple[int, int]] | None = None
    senders: list[PeerKey] | None = None


class Unload(Msg, tag="UNLOAD"):
    instance: Id


class Route(Msg, tag="ROUTE"):
    instance: Id
    next: str | None = None
    stage0: str | None = None
    senders: list[PeerKey] | None = None


class Probe(Msg, tag="PROBE"):
    key: str
    src: str
    dst: str
    port: int


# -- node to node (the peer sockets) ---------------------------------------------------

MAX_CHUNK_TOKENS = 1 << 16
ChunkTokens = Annotated[int, Meta(gt=0, le=MAX_CHUNK_TOKENS)]


class Act(Msg, tag="ACT"):
    """One step's header, stage k -> k+1; the hidden states follow in a frame."""

    instance: Id
    step: int
    decode: list[Id]  # requests decoding this step, in stage 0's row order
    chunks: list[tuple[Id, ChunkTokens, bool]]  # prompt chunks: rid, tokens, wants logits
    shape: list[int]  # of the hidden states: [rows, width]
    new: dict[Id, SamplingParams] = {}  # of the requests whose first chunk this is
    drops: list[Id] = []  # requests ended since the last step
    # The prefix cache, as stage 0 decides it (nodes/engine/prefix.py); each stage
    # keeps its own layers' part of every entry, under stage 0's key:
    reuse: dict[Id, tuple[Id, int]] = {}  # a new request starts from (entry, its first n)
    keep: list[tuple[Id, Id, int]] = []  # (request, entry, n): its first n keys, kept
    forget: list[Id] = []  # entries stage 0 let go


class Result(Msg, tag="RESULT"):
    instance: Id
    step: int
    ids: list[int]
    logprobs: dict[Id, list[Logprob]] = {}  # per request that asks: this step's token's


class StageError(Msg, tag="STAGE_ERROR"):
    instance: Id
    message: str


# Every message type by its tag: each Msg subclass above.
TYPES: dict[str, type[Msg]] = {str(c.__struct_config__.tag): c for c in Msg.__subclasses__()}
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Union[tuple(TYPES.values())])  # noqa: UP007
_encoder = msgspec.msgpack.Encoder()


def encode(msg: Msg | str, **fields: Any) -> bytes:
    """A message as one frame: a typed message, or a type's name and its fields
    (not checked here: tests send wrong types on purpose)."""
    if isinstance(msg, str):
        kind = TYPES.get(msg)
        if kind is None:
            raise ValueError(f"unknown message type {msg}")
        msg = kind(**fields)
    return _encoder.encode(msg)


def decode(frame: bytes | memoryview, max_frame: int = MAX_FRAME) -> Msg:
    """Parse one frame into its typed message or raise ProtocolError. The version
    is returned, not enforced: HELLO decides what to do with a peer of another
    version."""
    if len(frame) > max_frame:
        raise ProtocolError("oversize", f"{len(frame)} bytes > {max_frame}")
    try:
        return _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        reason, rid = _why(frame)
        raise ProtocolError(reason, str(e)[:120], rid) from None


def _why(frame: bytes | memoryview) -> tuple[str, str | None]:
    """The counter a frame that did not decode goes to, and a SUBMIT's rid."""
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises several unrelated types
        return "undecodable", None
    if not isinstance(obj, dict):
        return "undecodable", None
    if not isinstance(obj.get("v"), int) or not isinstance(obj.get("t"), str):
        return "no_envelope", None
    if obj["t"] not in TYPES:
        return "unknown_type", None
    rid = obj.get("rid") if obj["t"] == "SUBMIT" else None
    return "bad_fields", rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID else None


class Counters(Counter[str]):
    """Dropped-frame counts by reason, plus anything else worth counting."""

    def snapshot(self) -> dict[str, int]:
        return dict(self)
