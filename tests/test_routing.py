from exo.broker.registry import Peer
from exo.broker.routing import Refusal, choose_node


def node(pid: str, models: list[str], loaded: tuple[str, ...] = (), running: int = 0) -> Peer:
    return Peer(
        pid.encode(),
        pid,
        "node",
        info={"models": models},
        status={"loaded": list(loaded), "running": running},
    )


def test_prefers_a_node_with_the_model_loaded() -> None:
    a, b = node("a", ["m"]), node("b", ["m"], loaded=("m",), running=3)
    assert choose_node([a, b], "m", {"m"}) is b


def test_least_busy_among_equals() -> None:
    a, b = node("a", ["m"], ("m",), running=2), node("b", ["m"], ("m",), running=1)
    assert choose_node([a, b], "m", {"m"}) is b


def test_unknown_model_is_404_and_a_gone_one_is_503() -> None:
    r = choose_node([node("a", ["m"])], "x", {"m"})
    assert isinstance(r, Refusal) and r.status == 404
    r = choose_node([node("a", ["m"])], "gone", {"m", "gone"})
    assert isinstance(r, Refusal) and r.status == 503


def test_no_nodes_is_503() -> None:
    r = choose_node([], "m", set())
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
