"""What the cluster retries, how often, and what it never does.

Every retry in exo is one of the rules below, and the code that retries takes
its numbers from here. A fault outside these rules ends the request with an
error that says which fault it was: nothing else is retried.

1. Connects. A DEALER (node or API to the broker) reconnects by itself after
   CONNECT.first, backing off to CONNECT.cap, for ever; a broker silent for its
   session's limit is dialled again at its next address (common/dealer.py). A
   peer the broker refuses (wrong key, wrong protocol) stops: retrying cannot
   help it.
2. Downloads. A file's fetch is retried after DOWNLOAD.first, backing off to
   DOWNLOAD.cap, on connection errors and 5xx; after the server's Retry-After on
   429; resumed from its partial file by a range request. It gives up only when
   no byte has arrived for the node's --download-stall-timeout, or when the
   file's checksum failed --max-corrupt times (nodes/store/download.py).
3. Control messages until acknowledged. A CANCEL goes to each stage's node
   every CANCEL_RESEND_S until it answers CANCEL_ACK or is declared gone
   (broker/cancels.py). A pipeline step out without its tokens goes again after
   STEP_RESEND_X of its measured round trips, never under STEP_RESEND_MIN_S;
   the stage after acts on a step once and answers a repeat with what it sent
   (nodes/pipeline). LOAD, ROUTE and DOWNLOAD are acknowledged by the node's
   next status; a node back over another link is sent its routes again.
4. Placement after a loss. A request whose node (any stage of it) is lost,
   whose stage timed out, or whose broker restarted, is placed again while no
   token of it has been relayed to its client, at most MAX_PLACEMENTS times in
   all, and only before its deadline (`may_place_again`). It waits for an
   instance as a new request would; with no node left to serve it, it fails
   saying what was lost. A broker that has just started gives its nodes
   BROKER_WARMUP_S to register before it refuses a request for want of a node.
   An API whose broker went silent keeps such requests up to BROKER_RETURN_S
   (and their deadline), then fails them.

Never retried:
- a request after its first token: the client has part of an answer, and a
  second placement would write a different one after it. It fails (503
  node_lost, or the stage's error) and the client decides;
- any request past its deadline (504 deadline_exceeded wherever it is);
- a request its client cancelled or left;
- a refusal (4xx: a bad request, a context overflow, placement impossible),
  which would only be refused again.

Idempotency by request id: one id names one request end to end. The broker
takes a SUBMIT for an id it holds from the same frontend as that request (a
resend, ignored and counted) and refuses one from another frontend (409); it
relays TOKENS only from the node it placed the request on, each seq once; a
node sent GENERATE for an id it is running keeps running that one (counted),
so a retried message never runs twice.
"""

from __future__ import annotations

from dataclasses import dataclass

# Why a request may be placed again (the codes of the failures that say so).
LOSSES = frozenset({"node_lost", "stage_lost", "stage_timeout", "broker_lost"})


@dataclass(frozen=True)
class Backoff:
    """Waits that double from `first` up to `cap`."""

    first: float
    cap: float

    def after(self, attempt: int) -> float:
        """The wait before retry number `attempt` (0: the first retry)."""
        return min(self.cap, self.first * 2 ** max(0, attempt))

    def next(self, wait: float) -> float:
        """The wait after one of `wait`."""
        return min(self.cap, max(self.first, wait * 2))


CONNECT = Backoff(first=0.1, cap=1.0)
DOWNLOAD = Backoff(first=0.25, cap=8.0)
CANCEL_RESEND_S = 0.2
STEP_RESEND_X = 4.0
STEP_RESEND_MIN_S = 0.5
MAX_PLACEMENTS = 3
BROKER_WARMUP_S = 5.0
BROKER_RETURN_S = 30.0


def may_place_again(code: str, tokens: int, placements: int, now: float, deadline: float) -> bool:
    """Rule 4: a request that failed with `code` after `placements` placements and
    `tokens` tokens relayed goes to another placement."""
    return code in LOSSES and tokens == 0 and placements < MAX_PLACEMENTS and now < deadline
