import msgpack
import pytest

from exo.broker import protocol as P


def test_round_trip_keeps_fields_and_version() -> None:
    msg = P.decode(P.encode("TOKENS", rid="r1", ids=[1, 2], text="hi", finish="stop"))
    assert isinstance(msg, P.Tokens) and msg.type == "TOKENS"
    assert msg.version == P.VERSION
    assert msg.rid == "r1" and msg.ids == [1, 2] and msg.finish == "stop"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\xc1\xc1garbage", "undecodable"),
        (msgpack.packb([1, 2, 3]), "undecodable"),
        (msgpack.packb({"t": "HELLO"}), "no_envelope"),
        (msgpack.packb({"v": 1, "t": "NOPE"}), "unknown_type"),
        (msgpack.packb({"v": 1, "t": "TOKENS", "rid": "r", "ids": "x", "text": ""}), "bad_fields"),
        (msgpack.packb({"v": 1, "t": "CANCEL"}), "bad_fields"),
    ],
)
def test_bad_frames_raise_with_their_reason(frame: bytes, reason: str) -> None:
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frame)
    assert e.value.reason == reason


def test_oversize_frames_are_refused_before_decoding() -> None:
    big = P.encode("TOKENS", rid="r", ids=[], text="x" * 2000)
    with pytest.raises(P.ProtocolError) as e:
        P.decode(big, max_frame=1000)
    assert e.value.reason == "oversize"


def test_other_versions_decode_so_hello_can_refuse_them() -> None:
    frame = msgpack.packb({"v": 99, "t": "HELLO", "role": "node", "peer_id": "n"})
    assert P.decode(frame).version == 99


def test_every_request_message_carries_a_request_id() -> None:
    for t in ("SUBMIT", "GENERATE", "TOKENS", "FAIL", "CANCEL", "ACCEPTED", "STATE"):
        assert "rid" in P.TYPES[t].__struct_fields__, t
