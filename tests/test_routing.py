from exo.broker.instances import Instance
from exo.broker.placement import StageSpec
from exo.broker.registry import Peer
from exo.broker.routing import Refusal, choose_instance, no_holder


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
    n.status["downloads"] = [{"model": "m", "state": "done"}]
    assert [p.peer_id for p, _ in downloading([n], "m")] == ["a"]  # its INFO has not come yet
    n.info["models"] = ["m"]
    assert downloading([n], "m") == []
    n.status["downloads"] = [{"model": "m", "state": "failed"}]
    n.info["models"] = []
    assert downloading([n], "m") == []
