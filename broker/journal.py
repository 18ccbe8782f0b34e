"""The instances an operator placed, kept on disk: a restarted broker restores them.

Instances placed on demand are not kept: their nodes' stages are adopted when
the nodes report them (instances.adoptable), or placed again by the next
request. The file is rewritten whole (a temporary file renamed over it) each
time the set of live explicit instances changes; a file that does not parse is
set aside and said, never fatal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from exo.broker.instances import Instance
from exo.broker.placement import StageSpec
from exo.broker.reports import Layer
from exo.common.paths import write_private

log = logging.getLogger(__name__)


class Entry(msgspec.Struct):
    id: Annotated[str, Meta(max_length=256)]
    model: Annotated[str, Meta(max_length=256)]
    total: Layer
    stages: Annotated[list[tuple[str, Layer, Layer]], Meta(max_length=1024)]
    created: float = 0.0


class Journal:
    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: nothing is kept
        self.written: bytes | None = None

    def load(self) -> list[Instance]:
        if self.path is None or not self.path.is_file():
            return []
        try:
            entries = msgspec.json.decode(self.path.read_bytes(), type=list[Entry])
        except (OSError, msgspec.DecodeError) as e:
            aside = self.path.with_suffix(".bad")
            log.error("%s does not parse (%s): set aside as %s", self.path, e, aside)
            self.path.replace(aside)
            return []
        out = []
        for entry in entries:
            stages = [StageSpec(node, start, end) for node, start, end in entry.stages]
            out.append(Instance(entry.id, entry.model, stages, entry.total, created=entry.created))
        return out

    def save(self, instances: Iterable[Instance]) -> None:
        if self.path is None:
            return
        entries = [
            {
                "id": i.id,
                "model": i.model,
                "total": i.total,
                "stages": [[s.node, s.start, s.end] for s in i.stages],
                "created": i.created,
            }
            for i in instances
            if not i.auto and i.state != "failed"
        ]
        data = json.dumps(entries, indent=1).encode()
        if data == self.written:
            return
        write_private(self.path, data)
        self.written = data
