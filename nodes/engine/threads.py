"""How many OpenBLAS threads a decode step runs with: measured, not assumed.

A decode step multiplies a handful of rows by every weight. With two threads,
OpenBLAS splits some of those products so that each thread reads the whole
weight, and which sizes gain from the second thread does not follow from the
shapes: SmolLM2's engine steps here (blocks alternating in one process, ms, two
threads / one) 1 row 97 / 112, 2 rows 113 / 120, 4 rows 154 / 141, 8 rows
198 / 184, 12 rows 302 / 244, while its matmuls alone said the opposite at 12
(BENCHMARKS.md). So the engine tries each choice on decode-only steps of each
batch size, alternating, and keeps the faster; a size it has no choice for yet
runs as a size within NEAR rows that has one, until it has stayed SETTLE steps.
One thread also leaves the other core to the processes that carry the tokens out
(broker, API).

Only decode-only steps are timed or steered: a step carrying a prompt chunk
gets every thread, and while the prefill lane works OpenBLAS is held to one
thread per caller (lane.py). A choice is a thread count and the multiple its
decode rows are padded to through the weight matmuls (zero rows, forward.fused_step):
on one thread OpenBLAS's sgemm here is fastest at multiples of 4 rows (whole steps:
3 rows 150 ms, 4 rows 119; padded, 3 rows 132 -> 120, 5 rows 151 -> 134); on two,
16 rows cost less than 12 or 14 (engine steps, blocks alternating: 12 rows 175 ms
on one thread, 226 on two, 158 on two padded to 16; 14 rows 189, 198, 171).
"""

from __future__ import annotations

import statistics
from typing import NamedTuple

ALL = 0  # as many threads as OpenBLAS started with
PAD_ROWS = 4  # one thread's multiple, also while the lane holds OpenBLAS to one


class Option(NamedTuple):
    threads: int  # 1 or ALL
    pad: int  # decode rows go through the weight matmuls as a multiple of this

    def rows(self, n: int) -> int:
        return -(-n // self.pad) * self.pad


OPTIONS = (Option(1, PAD_ROWS), Option(ALL, 1), Option(ALL, 8))
# Decode-only steps timed per choice before choosing: with 3, one of five sizes chose
# the slower (8 rows, by 7%): steps here vary by about that much.
SAMPLES = 5
# Samples each before an option far slower than the best is dropped (contenders).
EARLY = 2
DROP = 1.3
# Decode-only steps a batch size runs on its nearest chosen neighbour's choice before
# it is explored: an exploration's steps run on the slower choices too, and a size
# that comes and goes (a short prompt decoding beside four streams) never earns that
# back (docs/NOTES.md).
SETTLE = 32
# How near (in rows) a chosen size must be to stand in for a new one: beyond it, how
# OpenBLAS splits the products differs (12 rows can cost more than 16), and the new
# size is explored at once.
NEAR = 2


def distinct(options: tuple[Option, ...], rows: int) -> tuple[Option, ...]:
    """The options that differ for `rows` (padding 16 rows to 8s changes nothing)."""
    out: list[Option] = []
    for o in options:
        if all((o.threads, o.rows(rows)) != (k.threads, k.rows(rows)) for k in out):
            out.append(o)
    return tuple(out)


def contenders(times: dict[Option, list[float]], options: tuple[Option, ...]) -> tuple[Option, ...]:
    """The options still worth timing: all, until each has EARLY samples; then those
    whose fastest step is within DROP of the best median. A slower option shows in
    every one of its steps, the machine's spikes in one: one row on two threads
    padded to 8 costs ~1.6x, and five of its steps were five stalls of a lone stream."""
    if any(len(times.get(o, [])) < EARLY for o in options):
        return options
    best = min(statistics.median(times[o]) for o in options)
    return tuple(o for o in options if min(times[o]) <= DROP * best)


def pick(times: dict[Option, list[float]], options: tuple[Option, ...]) -> Option:
    """The choice for one batch size, from the step times seen with each: while
    any contender is short of SAMPLES, the one with fewest (they alternate, so the
    machine's drift meets all alike), else the lowest median."""
    options = contenders(times, options)
    short = [o for o in options if len(times.get(o, [])) < SAMPLES]
    if short:
        return min(short, key=lambda o: len(times.get(o, [])))
    return min(options, key=lambda o: statistics.median(times[o]))


def nearest(chosen: dict[int, Option], rows: int) -> Option | None:
    """The choice of the chosen batch size closest to `rows` (the smaller on a tie),
    if one is within NEAR rows of it."""
    near = [n for n in chosen if abs(n - rows) <= NEAR]
    return chosen[min(near, key=lambda n: (abs(n - rows), n))] if near else None


class ThreadChoice:
    """Decode-only step times by batch size and option, and the choice for each
    batch size once made. A choice stays made: what it turns on (how OpenBLAS
    splits a product of that many rows) does not change as the streams' context
    grows, while their steps do, and comparing old times with new ones would flip it.
    A size new to it takes the choice of a chosen size within NEAR rows for its first
    SETTLE steps, and is explored once it has stayed that long (at once with none near)."""

    def __init__(self, options: tuple[Option, ...] = OPTIONS, settle: int = SETTLE) -> None:
        self.options = options
        self.settle = settle
        self.times: dict[int, dict[Option, list[float]]] = {}
        self.seen: dict[int, int] = {}  # batch size -> decode-only steps before exploring
        self.chosen: dict[int, Option] = {}

    def _stand_in(self, rows: int) -> Option | None:
        """The near size's choice `rows` runs on while it settles, else None."""
        if rows in self.times or self.seen.get(rows, 0) >= self.settle:
            return None
        return nearest(self.chosen, rows)

    def pick(self, rows: int) -> Option:
        if rows in self.chosen:
            return self.chosen[rows]
        return self._stand_in(rows) or pick(self.times.get(rows, {}), distinct(self.options, rows))

    def learn(self, rows: int, option: Option, seconds: float) -> None:
        if rows in self.chosen:
            return
        if self._stand_in(rows) is not None:
            self.seen[rows] = self.seen.get(rows, 0) + 1
            return
        self.seen.pop(rows, None)
        by = self.times.setdefault(rows, {})
        by.setdefault(option, []).append(seconds)
        options = distinct(self.options, rows)
        live = contenders(by, options)
        if len(live) == 1 or all(len(by.get(o, ())) >= SAMPLES for o in live):
            self.chosen[rows] = pick(by, options)
            del self.times[rows]


def for_step(
    choice: ThreadChoice | None, rows: int, decodes_only: bool, lane_holds: bool, max_threads: int
) -> tuple[Option | None, int]:
    """A step's option (None: leave OpenBLAS's threads as they are, the lane's to say
    or nothing to choose) and the multiple its decode rows are padded to. `rows`:
    its decode rows; `decodes_only`: no prompt in it, all computed here;
    `max_threads`: OpenBLAS's threads as it started (0: no OpenBLAS)."""
    if choice is not None and not lane_holds:
        if not decodes_only:
            return Option(ALL, 1), 1
        option = choice.pick(rows)
        return option, option.pad
    one = lane_holds or max_threads == 1
    return None, PAD_ROWS if decodes_only and one else 1
