from exo.broker.instances import Instance
from exo.broker.placement import StageSpec
from exo.broker.registry import Peer
from exo.broker.routing import PREFIX_SLACK, Refusal, choose_instance, no_holder
from exo.common.digests import chain, held


def node(pid: str, models: list[str], loaded: tuple[str, ...] = (), running: int = 0) -> Peer:
    return Peer(
        pid.encode(),
        pid,
        "node",
        info={"models": models},
        status={"loaded": list(loaded), "running": running},
    )


def inst(iid: str, head: str, state: str = "ready", model: str = "m") -> Instance:
    i = Instance(iid, model, [StageSpec(head, 0, 4)], 4)
    i.enter(state)
    return i


def test_the_least_loaded_ready_instance() -> None:
    a, b = node("a", ["m"], running=3), node("b", ["m"], running=1)
    nodes = {"a": a, "b": b}
    found = [
        inst("i1", "a"),
        inst("i2", "b"),
        inst("i3", "b", "loading"),
        inst("i4", "a", model="x"),
    ]
    chosen = choose_instance(found, nodes, "m")
    assert chosen is not None and chosen.id == "i2"
    assert choose_instance([inst("i3", "b", "loading")], nodes, "m") is None
    assert choose_instance([inst("i5", "gone")], nodes, "m") is None  # its first stage left


def chat(*turns: str) -> dict:
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]}


def test_prefix_digests_cover_every_part_before_them() -> None:
    first = chain("chat", chat("sys", "hi"))
    # the node's entry after answering: the prompt's digests and the answer's
    after = chain("chat", chat("sys", "hi"), answer="hello")
    assert after[:2] == first and len(after) == 3
    nxt = chain("chat", chat("sys", "hi", "hello", "more?"))
    assert held(nxt, set(after)) == 3  # all but the new question
    assert held(chain("chat", chat("other", "hi", "hello")), set(after)) == 0
    # the tools offered change everything after them
    tools = {**chat("sys", "hi"), "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert held(chain("chat", tools), set(after)) == 0
    text = "x" * 1300  # two whole blocks, then part of one: not a digest of its own
    assert len(chain("completion", text)) == 2
    assert held(chain("completion", text + "y" * 400), set(chain("completion", text))) == 2
    assert chain("completion", list(range(300)))[:2] == chain("completion", list(range(256)))
    assert chain("chat", "not a chat") == [] and chain("embedding", "x") == []


def test_a_request_goes_where_its_prefix_is_cached_unless_that_is_much_busier() -> None:
    convo = chat("sys", "hi", "hello", "more?")
    a, b = node("a", ["m"], running=2), node("b", ["m"], running=0)
    a.report_status(
        {**a.status, "prefix_cache": {"digests": {"m": chain("chat", chat("sys", "hi"), "hello")}}}
    )
    nodes = {"a": a, "b": b}
    found = [inst("i1", "a"), inst("i2", "b")]
    wanted = chain("chat", convo)
    chosen = choose_instance(found, nodes, "m", wanted)
    assert chosen is not None and chosen.id == "i1"  # the cache, though busier
    assert choose_instance(found, nodes, "m").id == "i2"
    other = chain("chat", chat("other", "x"))
    assert choose_instance(found, nodes, "m", other).id == "i2"
    a.report_status({**a.status, "running": PREFIX_SLACK + 1})
    assert choose_instance(found, nodes, "m", wanted).id == "i2"


def test_unknown_model_is_404_and_a_gone_one_is_503() -> None:
    r = no_holder([node("a", ["m"])], "x", {"m"})
    assert isinstance(r, Refusal) and r.status == 404
    r = no_holder([node("a", ["m"])], "gone", {"m", "gone"})
    assert isinstance(r, Refusal) and r.status == 503


def test_no_nodes_is_503() -> None:
    r = no_holder([], "m", set())
    assert isinstance(r, Refusal) and r.status == 503


def test_a_finished_download_counts_until_the_node_lists_the_model() -> None:
    from exo.broker.registry import downloading

    n = node("a", [])
    n.report_status({"downloads": [{"model": "m", "state": "done"}]})
    assert [p.peer_id for p, _ in downloading([n], "m")] == ["a"]  # its INFO has not come yet
    n.report_info({"models": ["m"]})
    assert downloading([n], "m") == []
    n.report_status({"downloads": [{"model": "m", "state": "failed"}]})
    n.report_info({"models": []})
    assert downloading([n], "m") == []
