"""One layer's keys and values for a group of decode rows, joined and left in place.

mlx-lm's BatchKVCache joins a row by concatenating the whole batch and drops one
by gathering the rows that stay: every join and every finish copied the group's
cache, in the step that did it (68-121 ms to join one row to 4-8 rows of 300-1k
tokens here, 32-92 ms for one to leave: a stall every time a chat starts or ends).
Here the buffers have rows to spare and columns to grow into (`Batch.grow_ahead`
adds both a layer per step, ahead of need):
- a row joins by writing its prompt's keys into a free row: its own bytes only;
- a row leaves by moving the group's last row into its place (swap-remove): one
  row's bytes, not the group's;
- rows need not line up. RoPE is applied before keys are cached, so where a key
  sits in the buffer does not matter, only which keys a row may see: a mask per
  row. A row shorter than the group sits right-aligned with masked columns before
  it (as left padding); a longer one takes columns from 0 and the rows already
  there get its extra columns masked, in place of shifting them all right.
Writes go through MLX's slice update, which reuses the buffer when nothing else
holds it; a row moved within the buffer is copied out first, else the source view
would hold the buffer and the update would copy it whole (0.4-0.7 s measured).
Columns no live row sees any more, at the front, are dropped with one copy once
there are STEP of them (`Batch.leave`); masked columns in the middle (where a
longer row joined) stay until the group empties: the split rule (batch.py) keeps
them under SPLIT_KEYS per group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from exo.nodes.engine.mlxenv import Mask, mx

if TYPE_CHECKING:
    from mlx_lm.models.cache import KVCache

STEP = 256  # columns added at a time, as BatchKVCache


def spare_rows(rows: int) -> int:
    """Rows a group of `rows` keeps free for the next joins: a quarter, at least one."""
    return max(1, rows // 4)


class RowCache:
    """Rows [0, rows) of `keys`/`values` ([capacity, heads, columns, dim]) are live;
    columns [0, idx) are filled. `offset` [rows]: each row's position (RoPE);
    `valid` [capacity, columns]: which keys each row attends to."""

    step = STEP

    def __init__(self, keys: mx.array, values: mx.array, length: int) -> None:
        """A group of one row over a prompt's own buffers (not copied)."""
        self.keys, self.values = keys, values
        self.rows = 1
        self._idx = length
        self.offset = mx.array([length])
        self.valid = mx.ones((1, keys.shape[2]), dtype=mx.bool_)
        # Per live row, in row order: its first visible column, and whether columns
        # after that are masked too (a longer row joined after it).
        self.starts = [0]
        self.gaps = [False]

    @classmethod
    def of(cls, kv: KVCache) -> RowCache:
        """From a request's prefilled KVCache."""
        return cls(kv.keys, kv.values, int(kv.offset))

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    @property
    def columns(self) -> int:
        return int(self.keys.shape[2])

    # -- as a cache mlx-lm's attention calls ----------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        if self._idx + n > self.columns:
            self.grow_columns(self._idx + n)
        a, b = self._idx, self._idx + n
        self.keys[: self.rows, :, a:b, :] = keys
        self.values[: self.rows, :, a:b, :] = values
        self._idx = b
        self.offset = self.offset + n
        return self.keys[: self.rows, :, :b, :], self.values[: self.rows, :, :b, :]

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None) -> Mask:
        """Which keys each of N new queries sees: [rows, 1, N, idx + N], or as
        mlx-lm's plain caches when no row has masked columns and no window limits
        them. `window_size`: a query sees only the keys less than that many
        positions before it (a sliding-window layer)."""
        if (
            window_size is None
            and not any(s or g for s, g in zip(self.starts, self.gaps, strict=True))
            and not return_array
        ):
            return None if N == 1 else "causal"
        valid = self.valid[: self.rows, : self._idx]
        past = mx.broadcast_to(valid[:, None, None, :], (self.rows, 1, N, self._idx))
        new = mx.tril(mx.ones((N, N), dtype=mx.bool_))
        if window_size is not None:
            # A row's keys are its valid columns, in order: a key's distance back
            # from the row's next position is 1 + the row's keys after it.
            ones = valid.astype(mx.int32)
            after = mx.cumsum(ones[:, ::-1], axis=1)[:, ::-1] - ones
            j = mx.arange(N)[:, None]
            past = past & (after[:, None, None, :] < (window_size - 1 - j)[None, None])
            new = new & (j - mx.arange(N)[None, :] < window_size)
        new = mx.broadcast_to(new, (self.rows, 1, N, N))
        return mx.concatenate([past, new], axis=-1)

    @property
    def state(self) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        return self.keys, self.values, self.offset, self.valid

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes + self.valid.nbytes)

    # -- rows joining and leaving -----------------------------------------------------

    def insert(self, kv: KVCache, coming: int = 0) -> None:
        """Add a request's prefilled KVCache as the last row. `coming`: rows about to
        join after it, in the same step: room for them too, in one copy (16 rows
        joining one by one grew the buffers a dozen times: a 0.77 s step)."""
        length = int(kv.offset)
        if self.rows == self.capacity:
            self.grow_rows(spare_rows(self.rows) + coming)
        if length > self._idx:
            if length + 1 > self.columns:
                self.grow_columns(length + 1)
            # The rows already here skip the new row's extra columns.
            self.valid[: self.rows, self._idx : length] = False
            self.gaps = [g or self._idx < length for g in self.gaps]
            self._idx = length
        start = self._idx - length
        r = self.rows
        self.keys[r : r + 1, :, start : self._idx, :] = kv.keys[..., :length, :]
        self.values[r : r + 1, :, start : self._idx, :] = kv.values[..., :length, :]
        self.valid[r] = mx.arange(self.columns) >= start
        self.offset = mx.concatenate([self.offset, mx.array([length])])
        self.starts.append(start)
        self.gaps.append(False)
        self.rows += 1

    def moving(self, row: int) -> tuple[mx.array, mx.array, mx.array] | None:
        """What `remove(row)` moves: the last row's keys, values and mask, copied
        out (lazily; evaluate before `remove`), from its first column on (those
        before it are masked anyway). None when `row` is the last."""
        last = self.rows - 1
        if row == last:
            return None
        a, b = self.starts[last], self._idx
        return (
            mx.contiguous(self.keys[last : last + 1, :, a:b]),
            mx.contiguous(self.values[last : last + 1, :, a:b]),
            mx.contiguous(self.valid[last]),
        )

    def remove(self, row: int, moved: tuple[mx.array, mx.array, mx.array] | None = None) -> None:
        """Drop row `row`: the last row moves into its place. `moved`: `moving(row)`,
        evaluated (a caller removing from every layer evaluates them all at once)."""
        last = self.rows - 1
        keep = list(range(last))
        if row != last:
            if moved is None:
                moved = self.moving(row)
                mx.eval(moved)
            assert moved is not None
            k, v, ok = moved
            a, b = self.starts[last], self._idx
            self.keys[row : row + 1, :, a:b] = k
            self.values[row : row + 1, :, a:b] = v
            self.valid[row] = ok
            self.starts[row], self.gaps[row] = self.starts[last], self.gaps[last]
            keep[row] = last
        self.offset = self.offset[mx.array(keep)] if keep else self.offset[:0]
        self.starts.pop()
        self.gaps.pop()
        self.rows = last

    def row(self, row: int) -> tuple[mx.array, mx.array]:
        """Row `row`'s keys and values, [1, heads, its tokens, dim]: the columns it
        sees, in order (skipping those a longer row's join masked for it)."""
        a, b = self.starts[row], self._idx
        keys, values = self.keys[row : row + 1, :, a:b], self.values[row : row + 1, :, a:b]
        if not self.gaps[row]:
            return keys, values
        import numpy as np

        seen = mx.array(np.flatnonzero(np.array(self.valid[row, a:b])).astype(np.int32))
        return mx.take(keys, seen, axis=2), mx.take(values, seen, axis=2)

    def dead_front(self) -> int:
        """Columns no live row sees, from column 0: left when the rows that began
        there are gone, and attended (masked) by every row at every step."""
        return min(self.starts, default=0)

    def trim_front(self, n: int) -> None:
        """Drop the first `n` columns: one copy of the group (a view would be
        copied whole on the next write anyway)."""
        self.keys = mx.contiguous(self.keys[:, :, n:])
        self.values = mx.contiguous(self.values[:, :, n:])
        self.valid = mx.contiguous(self.valid[:, n:])
        self._idx -= n
        self.starts = [s - n for s in self.starts]

    def shrink_rows(self, keep: int) -> None:
        """Give back the rows past `keep` (all free): one copy of the rows kept."""
        assert keep >= self.rows
        self.keys = mx.contiguous(self.keys[:keep])
        self.values = mx.contiguous(self.values[:keep])
        self.valid = mx.contiguous(self.valid[:keep])

    # -- room -------------------------------------------------------------------------

    def short(self, columns: int, spare_rows: int) -> bool:
        return self.columns < columns or self.capacity < self.rows + spare_rows

    def grow_columns(self, columns: int) -> None:
        more = -(-(columns - self.columns) // self.step) * self.step
        if more <= 0:
            return
        k, v = self.keys, self.values
        self.keys = mx.concatenate([k, mx.zeros((*k.shape[:2], more, k.shape[3]), k.dtype)], 2)
        self.values = mx.concatenate([v, mx.zeros((*v.shape[:2], more, v.shape[3]), v.dtype)], 2)
        self.valid = mx.concatenate([self.valid, mx.ones((self.capacity, more), mx.bool_)], 1)

    def grow_rows(self, spare: int | None = None) -> None:
        """Room for `spare` more rows (default: spare_rows)."""
        more = spare if spare is not None else spare_rows(self.rows)
        more -= self.capacity - self.rows
        if more <= 0:
            return
        k, v = self.keys, self.values
        self.keys = mx.concatenate([k, mx.zeros((more, *k.shape[1:]), k.dtype)])
        self.values = mx.concatenate([v, mx.zeros((more, *v.shape[1:]), v.dtype)])
        self.valid = mx.concatenate([self.valid, mx.ones((more, self.columns), mx.bool_)])
