"""What nodes report about themselves, typed and bounded where it enters the broker.

A node's facts travel in HELLO and INFO (`NodeInfo`), its live status in every
HEARTBEAT (`NodeStatus`). The broker decides with what it reads here (placement,
routing, downloads, probes), so every field it reads has a type and a range, and
a report that does not fit is refused whole (`BadReport`), counted, and the peer
keeps what it had. Fields the broker only passes on (to `/v1/cluster`, PUB and
the tools) must still be plain data: strings, finite numbers, booleans, lists
and string-keyed maps, at most MAX_DEPTH deep, so that nothing a peer sends can
break the JSON answers built from them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta, Struct

from exo.broker.protocol import PeerKey

MAX_DEPTH = 8
MAX_ITEMS = 4096  # any list or map in a report

Text = Annotated[str, Meta(max_length=1024)]
Count = Annotated[int, Meta(ge=0, le=2**62)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Seconds = Annotated[float, Meta(ge=0.0, le=1e12)]
Items = Meta(max_length=MAX_ITEMS)


class BadReport(ValueError):
    pass


class Interface(Struct, forbid_unknown_fields=False):
    name: Text
    type: Text = "other"
    up: bool = True
    mtu: Count = 0
    addresses: Annotated[list[Text], Meta(max_length=64)] = []
    source: Text = "detected"
    networks: Annotated[list[Text], Meta(max_length=64)] = []


Layer = Annotated[int, Meta(ge=0, le=100_000)]  # a layer index or count


class ModelMeta(Struct, forbid_unknown_fields=False):
    layers: Layer = 0
    bytes: Count = 0
    type: Text = ""
    split: bool = True  # whether the node runs stages of it (nodes/engine/span.py)
    context: Count = 0  # its context length, from its config


class Pressure(Struct, forbid_unknown_fields=False):
    level: Text = "normal"


class NodeInfo(Struct, forbid_unknown_fields=False):
    """HELLO's and INFO's `info`: the node's facts (nodes/machine/info.py and worker.info)."""

    models: Annotated[list[Text], Items] = []
    model_meta: Annotated[dict[Text, ModelMeta], Items] = {}
    interfaces: Annotated[list[Interface], Meta(max_length=256)] = []
    memory_total: Count = 0
    memory_available: Count = 0
    memory_pressure: Pressure = msgspec.field(default_factory=Pressure)
    disk_free: Count = 0
    cores: Count = 1
    peer_port: Port | None = None
    peer_key: PeerKey | None = None  # its stage traffic's key
    probe_port: Port | None = None
    weights_port: Port | None = None
    loading: Text | None = None
    versions: Annotated[dict[Text, Text], Meta(max_length=32)] = {}


class Download(Struct, forbid_unknown_fields=False):
    model: Text
    state: Text = "listing"
    total: Count = 0
    done: Count = 0
    error: Text | None = None


class StageState(Struct, forbid_unknown_fields=False):
    state: Text = "loading"
    model: Text = ""
    error: Text | None = None
    # what a restarted broker adopts it by (instances.adoptable)
    layers: Annotated[list[Layer], Meta(max_length=2)] = []
    total: Layer = 0
    next: Text | None = None
    stage0: Text | None = None


class Probe(Struct, forbid_unknown_fields=False):
    at: Seconds = 0.0
    rtt_s: Seconds | None = None
    bandwidth_Bps: Annotated[float, Meta(ge=0.0)] | None = None
    error: Text | None = None


Digest = Annotated[str, Meta(max_length=64)]


class PrefixReport(Struct, forbid_unknown_fields=False):
    """What a node's prefix cache holds, as digests per model (common/digests.py)."""

    digests: Annotated[dict[Text, Annotated[list[Digest], Items]], Meta(max_length=256)] = {}


class NodeStatus(Struct, forbid_unknown_fields=False):
    """HEARTBEAT's `status`: what the node is doing now (worker.status)."""

    running: Count = 0
    prefilling: Count = 0
    queued: Count = 0
    kv_budget: Count = 0
    loaded: Annotated[list[Text], Items] = []
    downloads: Annotated[list[Download], Meta(max_length=256)] = []
    stages: Annotated[dict[Text, StageState], Items] = {}
    probes: Annotated[dict[Text, Probe], Items] = {}
    prefix_cache: PrefixReport | None = None
    clock: Annotated[float, Meta(ge=0.0, le=1e11)] | None = None  # its time.time()


def plain(obj: object, depth: int = 0) -> None:
    """Raise BadReport unless `obj` is JSON-safe plain data within the bounds."""
    if depth > MAX_DEPTH:
        raise BadReport("nested too deep")
    if obj is None or isinstance(obj, bool | int | str):
        return
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise BadReport("a number that is not finite")
        return
    if isinstance(obj, list):
        if len(obj) > MAX_ITEMS:
            raise BadReport("a list too long")
        for x in obj:
            plain(x, depth + 1)
        return
    if isinstance(obj, dict):
        if len(obj) > MAX_ITEMS:
            raise BadReport("a map too large")
        for k, v in obj.items():
            if not isinstance(k, str):
                raise BadReport("a map key that is not a string")
            plain(v, depth + 1)
        return
    raise BadReport(f"a value of type {type(obj).__name__}")


def _checked(obj: Any, kind: type[Struct]) -> dict[str, Any]:
    """`obj` itself once it fits `kind` (the broker reads it with defaults where a
    field is absent), or BadReport."""
    if not isinstance(obj, dict):
        raise BadReport(f"{kind.__name__} is not a map")
    plain(obj)
    try:
        msgspec.convert(obj, kind, strict=True)
    except msgspec.ValidationError as e:
        raise BadReport(f"{kind.__name__}: {e}") from None
    return obj


S = TypeVar("S", bound=Struct)


def typed(obj: dict[str, Any], kind: type[S]) -> S:
    """A checked report (or a test's partial one) as the broker reads it: `kind`,
    with defaults where a field is absent."""
    return msgspec.convert(obj, kind)


def node_info(obj: Any) -> dict[str, Any]:
    """A node's facts as the broker keeps them, or BadReport."""
    return _checked(obj, NodeInfo)


def node_status(obj: Any) -> dict[str, Any]:
    """A node's status as the broker keeps it, or BadReport."""
    return _checked(obj, NodeStatus)
