"""Placement and memory pressure: pure functions over plain data."""

from __future__ import annotations

from pathlib import Path

import pytest

from exo.broker.placement import (
    Ask,
    ModelMeta,
    NodeView,
    PlacementError,
    candidates,
    place,
    split_layers,
)
from exo.nodes.machine import memory
from exo.nodes.machine.pressure import level_from_psi, parse_psi, read_pressure

DATA = Path(__file__).parent / "data" / "pressure"
GiB = 1 << 30
META = ModelMeta("m", 30, 6 * GiB)  # 7.2 GiB with headroom


def n(pid: str, gib: float, level: str = "normal", has: bool = False) -> NodeView:
    return NodeView(pid, pid, int(gib * GiB), level, has_model=has)


def test_split_is_proportional_contiguous_and_complete() -> None:
    assert split_layers(30, [1, 1]) == [(0, 15), (15, 30)]
    assert split_layers(30, [2, 1]) == [(0, 20), (20, 30)]
    assert split_layers(4, [100, 1, 1]) == [(0, 2), (2, 3), (3, 4)]  # at least one layer each
    for w in ([3, 5, 7], [1, 0, 0], [10**12, 1]):
        r = split_layers(30, w)
        assert r[0][0] == 0 and r[-1][1] == 30
        assert all(a < b for a, b in r) and all(r[i][1] == r[i + 1][0] for i in range(len(r) - 1))


def test_one_node_when_one_can_hold_it_preferring_the_one_with_the_weights() -> None:
    c = place(META, [n("a", 16), n("b", 12, has=True)], Ask())
    assert [(s.node, s.start, s.end) for s in c.stages] == [("b", 0, 30)]


def test_split_over_two_when_none_can_hold_it_alone() -> None:
    c = place(META, [n("a", 6), n("b", 3), n("c", 2)], Ask())
    assert [s.node for s in c.stages] == ["a", "b"]
    assert c.stages[0].end == 20  # 6:3 of the layers


def test_a_node_under_critical_pressure_gets_no_stage() -> None:
    nodes = [n("big", 64, "critical", has=True), n("a", 5), n("b", 5)]
    c = place(META, nodes, Ask())
    assert "big" not in [s.node for s in c.stages]
    with pytest.raises(PlacementError) as e:
        place(META, nodes, Ask(nodes=("big",)))
    assert e.value.status == 409 and "critical memory pressure" in e.value.message


def test_warn_pressure_counts_half() -> None:
    assert n("a", 10, "warn").usable == 5 * GiB
    with pytest.raises(PlacementError) as e:
        place(META, [n("a", 10, "warn")], Ask())
    assert "warn pressure" in e.value.message


def test_too_little_memory_says_how_much_is_missing() -> None:
    with pytest.raises(PlacementError) as e:
        place(META, [n("a", 2), n("b", 2)], Ask())
    assert e.value.status == 409 and "MiB" in e.value.message


def test_promised_memory_is_not_offered_twice() -> None:
    busy = NodeView("a", "a", 8 * GiB, promised=7 * GiB)
    assert busy.usable == 1 * GiB


def test_explicit_stages_are_checked() -> None:
    nodes = [n("a", 16), n("b", 16)]
    ok = place(META, nodes, Ask(stages=(("a", 0, 7), ("b", 7, 30))))
    assert [(s.node, s.start, s.end) for s in ok.stages] == [("a", 0, 7), ("b", 7, 30)]
    for stages, words in [
        ((("a", 0, 7), ("b", 8, 30)), "without gaps"),
        ((("a", 0, 7),), "has 30"),
        ((("zz", 0, 30),), "no node 'zz'"),
        ((("a", 0, 15), ("a", 15, 30)), "twice"),
    ]:
        with pytest.raises(PlacementError) as e:
            place(META, nodes, Ask(stages=stages))
        assert words in e.value.message


def test_preview_lists_every_candidate_best_first() -> None:
    found = candidates(META, [n("a", 8), n("b", 4), n("c", 1)], Ask(max_nodes=3))
    assert len(found) == 3 + 3 + 1
    assert found[0].ok and [s.node for s in found[0].stages] == ["a"]
    bad = [c for c in found if not c.ok]
    assert bad and all(c.reason for c in bad)


def test_psi_files_give_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    psi = parse_psi((DATA / "psi_critical.txt").read_text())
    assert psi["some"]["avg10"] == 62.31 and psi["full"]["total"] == 70123456
    assert level_from_psi(0.0) == "normal" and level_from_psi(17.5) == "warn"
    monkeypatch.delenv("EXO_MACOS_PRESSURE_LEVEL", raising=False)
    for name, level in [("idle", "normal"), ("warn", "warn"), ("critical", "critical")]:
        monkeypatch.setenv("EXO_PSI_FILE", str(DATA / f"psi_{name}.txt"))
        got = read_pressure()
        assert got["level"] == level and "psi_some_avg10" in got


def test_macos_sysctl_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXO_PSI_FILE", str(DATA / "psi_idle.txt"))
    for raw, level in [("1", "normal"), ("2", "warn"), ("4", "critical")]:
        monkeypatch.setenv("EXO_MACOS_PRESSURE_LEVEL", raw)
        got = read_pressure()
        assert got["macos_level"] == int(raw) and got["level"] == level


def test_mlx_limits_follow_everything_held_not_the_last_model() -> None:
    big, small = 8 * GiB, 1 * GiB
    after_both = memory.limits([big, small], kv_budget=2 * GiB, memory_total=64 * GiB)
    assert after_both.weights == 9 * GiB and after_both.wired == 11 * GiB
    assert after_both.cache == 2 * GiB
    # capped below the machine's memory
    assert memory.limits([60 * GiB], 2 * GiB, 64 * GiB).wired == 48 * GiB


def test_a_model_its_nodes_cannot_split_is_placed_whole_or_refused_with_the_reason() -> None:
    whole_only = ModelMeta("m", 30, 6 * GiB, "mamba", split=False)
    c = place(whole_only, [n("a", 16), n("b", 12)], Ask())
    assert len(c.stages) == 1
    for ask in (Ask(nodes=("a", "b")), Ask(min_nodes=2), Ask(stages=(("a", 0, 9), ("b", 9, 30)))):
        with pytest.raises(PlacementError) as e:
            place(whole_only, [n("a", 16), n("b", 12)], ask)
        assert e.value.status == 400 and e.value.code == "model_not_splittable"
        assert "mamba" in e.value.message
    # Too big for any one node: no split is tried.
    with pytest.raises(PlacementError) as e:
        place(whole_only, [n("a", 5), n("b", 5)], Ask())
    assert e.value.status == 409 and all(
        len(c.stages) == 1 for c in candidates(whole_only, [n("a", 5), n("b", 5)], Ask())
    )


def test_no_pipeline_across_nodes_whose_mlx_versions_differ_and_the_skew_is_shown() -> None:
    from dataclasses import replace

    from exo.broker.versions import answer_versions, version_skew
    from exo.tools.linkstat import skew

    new = answer_versions({"mlx": "0.32.4", "mlx_lm": "0.32.2", "protocol": "1"})
    old = answer_versions({"mlx": "0.31.0", "mlx_lm": "0.32.2", "protocol": "1"})
    a, b = replace(n("a", 5), answer=new), replace(n("b", 5), answer=old)
    with pytest.raises(PlacementError) as e:
        place(META, [a, b], Ask())
    assert "versions differ" in e.value.message and "0.31.0" in e.value.message
    assert len(place(META, [a, replace(n("c", 5), answer=new)], Ask()).stages) == 2
    nodes = [
        {"id": "a", "name": "a", "info": {"versions": {"mlx": "0.32.4", "os": "Linux 6"}}},
        {"id": "b", "name": "b", "info": {"versions": {"mlx": "0.31.0", "os": "Linux 5"}}},
    ]
    assert version_skew(nodes) == {"mlx": {"0.32.4": ["a"], "0.31.0": ["b"]}}  # not os
    assert skew({"version_skew": version_skew(nodes)}) == "mlx differs: 0.32.4 on a, 0.31.0 on b"
