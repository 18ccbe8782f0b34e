"""How many OpenBLAS threads a decode step runs with: measured, not assumed.

A decode step multiplies a handful of rows by every weight. With two threads,
OpenBLAS splits some of those products so that each thread reads the whole
weight, and which sizes gain from the second thread does not follow from the
shapes: SmolLM2's engine steps here (blocks alternating in one process, ms, two
threads / one) 1 row 97 / 112, 2 rows 113 / 120, 4 rows 154 / 141, 8 rows
198 / 184, 12 rows 302 / 244, while its matmuls alone said the opposite at 12
(BENCHMARKS.md). So the engine tries each choice on the first decode-only steps
of each batch size, alternating, and keeps the faster. One thread also leaves
the other core to the processes that carry the tokens out (broker, API).

Only decode-only steps are timed or steered: a step carrying a prompt chunk
gets every thread, and while the prefill lane works OpenBLAS is held to one
thread per caller (lane.py). On one thread a decode-only step's rows go through
the weight matmuls padded to a multiple of PAD_ROWS (forward.fused_step): there
OpenBLAS's sgemm is fastest at multiples of 4 rows (whole steps: 3 rows 150 ms,
4 rows 119; padded, 3 rows 132 -> 120, 5 rows 151 -> 134), so the choice of one
thread is one thread padded.
"""

from __future__ import annotations

import statistics

ALL = 0  # as many threads as OpenBLAS started with
OPTIONS = (1, ALL)
# Decode-only steps timed per choice before choosing: with 3, one of five sizes chose
# the slower (8 rows, by 7%): steps here vary by about that much.
SAMPLES = 5
PAD_ROWS = 4


def pick(times: dict[int, list[float]], options: tuple[int, ...] = OPTIONS) -> int:
    """The choice for one batch size, from the step times seen with each: while
    any is short of SAMPLES, the one with fewest (they alternate, so the machine's
    drift meets both alike), else the lowest median."""
    short = [t for t in options if len(times.get(t, [])) < SAMPLES]
    if short:
        return min(short, key=lambda t: len(times.get(t, [])))
    return min(options, key=lambda t: statistics.median(times[t]))


class ThreadChoice:
    """Decode-only step times by batch size and thread count, and the choice for
    each batch size once made. A choice stays made: what it turns on (how OpenBLAS
    splits a product of that many rows) does not change as the streams' context
    grows, while their steps do, and comparing old times with new ones would flip it."""

    def __init__(self, options: tuple[int, ...] = OPTIONS) -> None:
        self.options = options
        self.times: dict[int, dict[int, list[float]]] = {}
        self.chosen: dict[int, int] = {}  # batch size -> threads

    def pick(self, rows: int) -> int:
        if rows in self.chosen:
            return self.chosen[rows]
        return pick(self.times.get(rows, {}), self.options)

    def learn(self, rows: int, threads: int, seconds: float) -> None:
        if rows in self.chosen:
            return
        by = self.times.setdefault(rows, {})
        by.setdefault(threads, []).append(seconds)
        if all(len(by.get(t, ())) >= SAMPLES for t in self.options):
            self.chosen[rows] = pick(by, self.options)
            del self.times[rows]


def for_step(
    choice: ThreadChoice | None, rows: int, decodes_only: bool, lane_holds: bool, max_threads: int
) -> tuple[int | None, int]:
    """A step's OpenBLAS threads (None: leave them as they are, the lane's to say
    or nothing to choose) and the multiple its decode rows are padded to. `rows`:
    its decode rows; `decodes_only`: no prompt in it, all computed here;
    `max_threads`: OpenBLAS's threads as it started (0: no OpenBLAS)."""
    threads = None
    if choice is not None and not lane_holds:
        threads = choice.pick(rows) if decodes_only else ALL
    one = lane_holds or threads == 1 or max_threads == 1
    return threads, PAD_ROWS if decodes_only and one else 1
