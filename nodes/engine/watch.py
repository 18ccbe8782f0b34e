"""The engine's eye on the prefill lane: its progress guarantee, once a step.

- **The floor**: a lane that holds work and has finished no layer for FLOOR_STEPS
  of the engine's steps is hurried: its pass goes on, from its next layer, on the
  lane's thread at the step loop's own priority (lane.py) until it runs dry.
- **The TTFT bound**: a prompt whose wait is past `max_ttft_ratio` times its time
  alone (whole passes at the lane's best pass rate) is hurried too; still behind
  once hurried, each step waits up to YIELD_S for the lane's next layer: the
  streams' stall bound gives, said in the log and in node status (`gives`).

Counted in steps and passes, not seconds, so the rules hold on any machine.
"""

from __future__ import annotations

import logging
from typing import Any

from exo.nodes.engine.lane import Lane

log = logging.getLogger(__name__)

# Engine steps the lane may hold work without finishing a layer before its pass
# moves to the nice-0 thread. A layer of a CHUNK-token pass costs a fraction of a
# decode step on a CPU (about 0.3 of a 4-stream step for a 30-layer model), so 4
# steps without one is a lane getting a small part of its share.
FLOOR_STEPS = 4
# A prompt's first token beside streams may take this many times what it takes
# alone; behind that pace the lane is hurried, then the streams give.
DEFAULT_MAX_TTFT_RATIO = 3.0
YIELD_S = 0.5  # the longest a step waits for the lane's next layer


class Watch:
    """The engine's eye on the lane, once a step: the floor (a layer within
    FLOOR_STEPS steps, else `hurry`) and the TTFT bound (a prompt behind the pace
    of `max_ttft_ratio` times its time alone hurries the lane; still behind once
    hurried, each step waits for the lane's next layer: the streams' stall bound
    gives, said in the log and in node status)."""

    def __init__(self, lane: Lane, max_ttft_ratio: float = DEFAULT_MAX_TTFT_RATIO) -> None:
        self.lane = lane
        self.max_ttft_ratio = max_ttft_ratio
        self.seen = 0  # lane.layers at the last step
        self.steps = 0  # steps since the lane last finished a layer, while it held work
        self.gives: str | None = None  # "max_stall" while the streams give for a prompt
        self.behind: set[str] = set()  # prompts logged as behind their bound

    def check(self) -> bool:
        """Once a step, before it runs. True: the step should wait for the lane."""
        lane = self.lane
        if lane.idle() or lane.paused:
            # (a lane held on purpose, as `bench lane` does, is not falling behind)
            self.steps, self.gives = 0, None
            self.behind.clear()
            return False
        if lane.layers != self.seen:
            self.seen, self.steps = lane.layers, 0
        else:
            self.steps += 1
        if self.steps >= FLOOR_STEPS and not lane.urgent:
            log.warning(
                "prefill lane: no layer done in %d steps; its pass goes on at the step "
                "loop's priority",
                self.steps,
            )
            lane.hurry()
        # A prompt behind its TTFT pace: first the lane goes to the step loop's
        # priority; if it is still behind there, the streams give (each step waits
        # for the lane's next layer).
        late = self.late()
        if late and not lane.urgent:
            log.warning(
                "prefill lane: %d prompt(s) behind %.1fx their time alone; its pass goes on "
                "at the step loop's priority",
                len(late),
                self.max_ttft_ratio,
            )
            lane.hurry()
            late = set()  # this step: the lane's new priority first
        self.gives = "max_stall" if late else None
        for rid in late - self.behind:
            log.warning(
                "rid=%s: its prefill is still behind %.1fx its time alone at the lane's "
                "top priority; the streams' steps wait for the lane (max stall gives)",
                rid,
                self.max_ttft_ratio,
            )
        self.behind |= late
        return bool(late)

    def late(self) -> set[str]:
        """Prompts whose wait is past the bound's pace: `max_ttft_ratio` times their
        time alone for the passes they have had, plus one. Alone, a pass of CHUNK
        tokens runs at the lane's best rate; a short prompt's pass costs about as
        much as a full one (per-op costs), so a prompt is never due sooner than
        one full pass allows."""
        lane = self.lane
        if lane.best_rate <= 0:
            return set()
        out = set()
        for p in lane.progress():
            full_pass = lane.chunk * p["layers"] / lane.best_rate
            passes = -(-p["done"] // lane.chunk) + 1
            if p["waited_s"] > self.max_ttft_ratio * full_pass * passes:
                out.add(p["rid"])
        return out

    def status(self) -> dict[str, Any]:
        lane = self.lane
        return {
            "prompts": [
                {**p, "rate_tok_s": round(lane.rate / p["layers"], 1)} for p in lane.progress()
            ],
            "passes": lane.passes,
            "layers": lane.layers,
            "urgent": lane.urgent,
            "hurried": lane.hurried,
            "steps_since_layer": self.steps,
            "gives": self.gives,
        }
