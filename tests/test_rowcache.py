"""A group's decode cache: rows join into spare rows and leave by swap-remove,
in place, and every row keeps seeing exactly its own keys."""

from __future__ import annotations

import numpy as np

from exo.nodes.engine.mlxenv import mx  # before mlx_lm: it loads OpenBLAS for MLX (mlxenv.py)

# isort: split
from mlx_lm.models.cache import KVCache

from exo.nodes.engine.rowcache import RowCache

HEADS, DIM = 2, 4


def prompt(n: int, seed: int) -> KVCache:
    mx.random.seed(seed)
    c = KVCache()
    c.update_and_fetch(mx.random.normal((1, HEADS, n, DIM)), mx.random.normal((1, HEADS, n, DIM)))
    return c


def seen(cache: RowCache, row: int) -> np.ndarray:
    """The keys row `row` attends to, in column order."""
    valid = np.array(cache.valid[row, : cache._idx])
    return np.array(cache.keys[row, :, : cache._idx])[:, valid]


def own(kv: KVCache, extra: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.array(kv.keys[0, :, : kv.offset]), *extra], axis=1)


def test_rows_join_in_place_and_each_sees_only_its_own_keys() -> None:
    a, b, c = prompt(10, 1), prompt(4, 2), prompt(13, 3)
    g = RowCache.of(a)
    assert g.keys is a.keys  # the first row's buffers, not a copy
    g.grow_rows(2)
    g.grow_columns(20)
    shape = g.keys.shape
    g.insert(b)  # shorter: right-aligned, the columns before it masked
    g.insert(c)  # longer: columns from 0; the rows already there skip its 3 extra
    assert g.keys.shape == shape  # written into spare room: nothing reallocated
    assert g._idx == 13 and g.offset.tolist() == [10, 4, 13]
    # A decode step: one new key per row, each at its own position.
    mx.random.seed(4)
    new = mx.random.normal((3, HEADS, 1, DIM))
    g.update_and_fetch(new, new)
    assert g.offset.tolist() == [11, 5, 14]
    for row, kv in enumerate((a, b, c)):
        assert np.allclose(seen(g, row), own(kv, [np.array(new[row])])), row
    mask = g.make_mask(1)
    assert mask.shape == (3, 1, 1, 15)
    assert np.array_equal(np.array(mask[:, 0, 0, :14]), np.array(g.valid[:3, :14]))


def test_a_row_leaving_is_replaced_by_the_last_row_and_nothing_else_moves() -> None:
    kvs = [prompt(n, i) for i, n in enumerate((6, 9, 7, 8))]
    g = RowCache.of(kvs[0])
    g.grow_rows(4)
    for kv in kvs[1:]:
        g.insert(kv)
    shape = g.keys.shape
    g.remove(1)  # the last row (index 3) takes its place
    assert g.rows == 3 and g.keys.shape == shape
    assert g.offset.tolist() == [6, 8, 7]
    for row, kv in enumerate((kvs[0], kvs[3], kvs[2])):
        assert np.allclose(seen(g, row), own(kv, [])), row
    g.remove(2)  # the last row itself: nothing moves
    assert g.rows == 2 and g.offset.tolist() == [6, 8]
    assert np.allclose(seen(g, 1), own(kvs[3], []))


def test_a_group_with_no_masked_keys_takes_no_mask() -> None:
    g = RowCache.of(prompt(5, 0))
    g.grow_rows(1)
    g.insert(prompt(5, 1))
    assert g.make_mask(1) is None
    g.insert(prompt(3, 2))
    assert g.make_mask(1) is not None


def test_columns_no_row_sees_any_more_are_dropped_when_their_rows_leave() -> None:
    from exo.nodes.engine.batch import Batch

    kvs = {"a": prompt(300, 0), "b": prompt(20, 1), "c": prompt(10, 2)}
    batch = Batch()
    for rid, kv in kvs.items():
        batch.join(rid, [kv, kv])  # two layers
    g = batch.groups[0].cache[1]
    assert g._idx == 300 and g.starts == [0, 280, 290]
    batch.leave({"b"})  # c moves into b's row; a still sees column 0 on
    assert g._idx == 300 and batch.rids == ["a", "c"]
    batch.leave({"a"})  # c alone: it sees only its last 10 columns
    assert batch.rids == ["c"]
    for g in batch.groups[0].cache:
        assert g._idx == 10 and g.starts == [0] and g.offset.tolist() == [10]
        assert np.allclose(seen(g, 0), own(kvs["c"], []))


def test_a_group_gives_memory_back_once_most_of_its_rows_are_gone() -> None:
    from exo.nodes.engine.batch import Batch

    kvs = {f"r{i}": prompt(50 + i, i) for i in range(12)}
    batch = Batch()
    for rid, kv in kvs.items():
        batch.join(rid, [kv])
    full = batch.nbytes()
    batch.leave({f"r{i}" for i in range(10)})
    g = batch.groups[0].cache[0]
    assert g.rows == 2 and g.capacity <= 6 and batch.nbytes() < full / 2
    for row, rid in enumerate(batch.rids):
        assert np.allclose(seen(g, row), own(kvs[rid], [])), rid


def test_rows_joining_in_one_step_make_room_for_each_other_at_once() -> None:
    kvs = [prompt(5 + i % 3, i) for i in range(16)]
    g = RowCache.of(kvs[0])
    g.insert(kvs[1], coming=14)  # the buffers grow here, for all 16
    shape = g.keys.shape
    assert g.capacity >= 16
    for i in range(2, 16):
        g.insert(kvs[i], coming=15 - i)
    assert g.keys.shape == shape and g.rows == 16  # no growing one row at a time
    for row, kv in enumerate(kvs):
        assert np.allclose(seen(g, row), own(kv, [])), row
    alone = RowCache.of(prompt(5, 0))
    alone.insert(prompt(6, 1))
    assert alone.capacity == 2  # without `coming`: a quarter of the rows spare, at least one
