"""A model folder's sha256 manifest: what its files must hash to.

Written when a model arrives (a download, from the hashes the source listed and
the bytes verified against them; an import; or, for a folder copied in by hand,
the first time the node looks at it), checked before the model is loaded and
before a file is served to a peer. So a file corrupted on disk is refused,
never loaded and never handed on as good.

Hashing a large model takes a while (about 1 GB/s), so each entry also keeps the
file's size and modification time as last verified: a file that still has them
is taken as verified, one that changed is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 1 << 20
NAME = ".exo-manifest.json"  # a dot file: never listed or served as a model file
_lock = threading.Lock()  # the node's loader and its weights server both update it


class Corrupt(ValueError):
    """A model folder whose files are not what its manifest says."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def files(folder: Path) -> list[Path]:
    """The model's own files: everything but dot files and partial downloads."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not p.name.endswith(".partial")
    )


def _stat(p: Path) -> dict[str, int]:
    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write(folder: Path, known: dict[str, str] | None = None) -> dict[str, Any]:
    """Hash every file of `folder` (or take its hash from `known`, name -> sha256,
    already verified) and write the manifest."""
    known = known or {}
    entries = {}
    for p in files(folder):
        name = str(p.relative_to(folder))
        entries[name] = {"sha256": known.get(name) or sha256_of(p), **_stat(p)}
    doc = {"version": 1, "files": entries}
    _save(folder, doc)
    return doc


def _save(folder: Path, doc: dict[str, Any]) -> None:
    """Write the manifest whole, or not at all; a read-only folder (a shared disk)
    keeps it in memory only, and is hashed again next time."""
    tmp = folder / (NAME + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        tmp.rename(folder / NAME)
    except OSError as e:
        log.info("could not write the manifest of %s: %s", folder, e)


def read(folder: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((folder / NAME).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("files"), dict) else None


def ensure(folder: Path) -> dict[str, Any]:
    """The folder's manifest, written now if it has none (trust on first sight)."""
    with _lock:
        doc = read(folder)
        if doc is None:
            log.info("writing the sha256 manifest of %s", folder)
            doc = write(folder)
        return doc


def verify(folder: Path, name: str | None = None) -> dict[str, Any]:
    """Check `folder` (or one file of it) against its manifest; Corrupt if a file
    is missing, unlisted, or hashes to something else. -> the manifest."""
    doc = ensure(folder)
    listed: dict[str, dict[str, Any]] = doc["files"]
    if name is None:
        on_disk = {str(p.relative_to(folder)): p for p in files(folder)}
        names = sorted(set(listed) | set(on_disk))
    else:  # one file (each request of the weights server): no walk of the folder
        on_disk = {name: folder / name} if (folder / name).is_file() else {}
        names = [name]
    changed = False
    for n in names:
        entry, p = listed.get(n), on_disk.get(n)
        if entry is None:
            raise Corrupt(f"{folder.name}/{n} is not in the model's manifest")
        if p is None:
            raise Corrupt(f"{folder.name}/{n} is missing")
        now = _stat(p)
        if now == {"size": entry.get("size"), "mtime_ns": entry.get("mtime_ns")}:
            continue
        if now["size"] != entry.get("size") or sha256_of(p) != entry.get("sha256"):
            raise Corrupt(f"{folder.name}/{n} does not match its sha256 in the manifest")
        entry.update(now)  # the same bytes, touched: verified as they are now
        changed = True
    if changed:
        with _lock:
            _save(folder, doc)
    return doc
