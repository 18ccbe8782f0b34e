"""Downloads from a Hugging Face-compatible hub, that never look complete until they are.

huggingface_hub does what it is good at: the hub's API (file list, sizes, the
LFS sha256, auth, HF_ENDPOINT). The bytes we move ourselves, so that the same
discipline serves copies from peers: each file is written as `NAME.partial`,
resumed with an HTTP Range request, checked for size and sha256, and renamed to
`NAME` only then. The model folder carries a `.exo-download.partial` marker
until every file is in place, so a folder mid-download is never a model.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from exo.common.names import valid_model_id
from exo.common.retry import DOWNLOAD
from exo.nodes.store import manifest
from exo.nodes.store.manifest import sha256_of

if TYPE_CHECKING:
    from exo.nodes.store.store import ModelStore

log = logging.getLogger(__name__)

MARKER = ".exo-download.partial"


class DownloadError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None


@dataclass
class Progress:
    """What a node publishes about one download."""

    model: str
    state: str = "listing"  # listing | downloading | done | failed
    total: int = 0
    done: int = 0
    file: str = ""
    rate: float = 0.0  # bytes/s over the last few seconds
    eta_s: float | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    source: str = ""  # the hub, or a peer node's weights server

    def public(self) -> dict[str, Any]:
        return asdict(self)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def list_files(
    repo_id: str, revision: str = "main", token: str | None = None, hub: str | None = None
) -> list[RemoteFile]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi(endpoint=hub or endpoint(), token=token or os.environ.get("HF_TOKEN"))
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except RepositoryNotFoundError as e:
        raise DownloadError(f"{repo_id} is not on the hub at {api.endpoint}") from e
    except (HfHubHTTPError, httpx.HTTPError, OSError) as e:
        raise DownloadError(f"could not list {repo_id} on {api.endpoint}: {e}") from e
    out = []
    for s in info.siblings or []:
        size = s.lfs.size if s.lfs else s.size
        if size is None:
            raise DownloadError(f"the hub gave no size for {repo_id}/{s.rfilename}")
        if not safe_name(s.rfilename):
            raise DownloadError(f"{api.endpoint} listed a file {s.rfilename!r} outside the model")
        if not 0 <= int(size) <= MAX_FILE:
            raise DownloadError(f"{api.endpoint} listed {s.rfilename!r} at {size} bytes")
        out.append(RemoteFile(s.rfilename, int(size), s.lfs.sha256 if s.lfs else None))
    return out


MAX_FILE = 1 << 40
REVISION = re.compile(r"[\w./-]{1,128}", re.ASCII)  # no model file is a terabyte


def safe_name(name: str) -> bool:
    """Whether a listed file name stays inside the model's folder wherever it lands:
    relative, forward slashes only, no empty, "." or ".." part, no NUL, no ".partial"
    (the store's own marker of a file in progress)."""
    if not isinstance(name, str) or not name or len(name) > 512:
        return False
    parts = name.split("/")
    return (
        "\\" not in name
        and "\0" not in name
        and ":" not in parts[0]
        and all(p not in ("", ".", "..") for p in parts)
        and not name.endswith(".partial")
    )


def inside(dest: Path, name: str) -> Path:
    """dest/name, checked to resolve inside dest (a link in the folder could point out)."""
    target = (dest / name).resolve()
    if not safe_name(name) or not target.is_relative_to(dest.resolve()):
        raise DownloadError(f"{name!r} would land outside {dest}")
    return dest / name


@dataclass
class Downloader:
    hub: str = field(default_factory=endpoint)
    token: str | None = field(default_factory=lambda: os.environ.get("HF_TOKEN"))
    stall_timeout: float = 60.0  # give up after this long without a byte of progress
    max_corrupt: int = 3  # checksum failures of one file before giving up
    on_progress: Callable[[Progress], None] | None = None

    def download(self, repo_id: str, dest: Path, revision: str = "main") -> Path:
        prog = Progress(repo_id, source=self.hub)
        try:
            self._download(repo_id, dest, revision, prog)
        except Exception as e:
            prog.state, prog.error = "failed", str(e)
            self._report(prog)
            raise
        prog.state, prog.eta_s, prog.rate = "done", 0.0, 0.0
        self._report(prog)
        return dest

    def _report(self, prog: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(prog)

    def _download(self, repo_id: str, dest: Path, revision: str, prog: Progress) -> None:
        self._report(prog)
        if not valid_model_id(repo_id):
            raise DownloadError(f"{repo_id!r} is not a model id (ORG/NAME, as on the hub)")
        if not REVISION.fullmatch(revision) or ".." in revision:
            raise DownloadError(f"{revision!r} is not a revision")
        # Dot files (a hub's .gitattributes) are never model files.
        files = [
            f
            for f in list_files(repo_id, revision, self.token, self.hub)
            if not any(part.startswith(".") for part in f.name.split("/"))
        ]
        if not files:
            raise DownloadError(f"{repo_id} has no files")
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MARKER).touch()
        prog.total = sum(f.size for f in files)
        prog.done = sum(self._have(dest, f) for f in files)
        need = prog.total - prog.done
        free = shutil.disk_usage(dest).free
        if need > free:
            raise DownloadError(
                f"{repo_id} needs {need >> 20} MiB more; {free >> 20} MiB free on {dest}"
            )
        prog.state = "downloading"
        for f in files:
            target = inside(dest, f.name)
            if target.is_file() and target.stat().st_size == f.size:
                continue
            self._fetch(repo_id, revision, f, target, prog)
        # What the bytes were checked against, kept: the model is verified again
        # before it is loaded or served (manifest.py).
        manifest.write(dest, known={f.name: f.sha256 for f in files if f.sha256})
        (dest / MARKER).unlink()
        log.info(
            "downloaded %s (%d files, %d MiB) into %s", repo_id, len(files), prog.total >> 20, dest
        )

    @staticmethod
    def _have(dest: Path, f: RemoteFile) -> int:
        target = inside(dest, f.name)
        if target.is_file() and target.stat().st_size == f.size:
            return f.size
        part = target.with_name(target.name + ".partial")
        return min(part.stat().st_size, f.size) if part.is_file() else 0

    def _fetch(
        self, repo_id: str, revision: str, f: RemoteFile, target: Path, prog: Progress
    ) -> None:
        url = f"{self.hub}/{repo_id}/resolve/{revision}/{f.name}"
        part = target.with_name(target.name + ".partial")
        part.parent.mkdir(parents=True, exist_ok=True)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        prog.file = f.name
        last_progress = time.monotonic()
        backoff, corrupt = DOWNLOAD.first, 0
        window: list[tuple[float, int]] = []
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have > f.size:
                part.unlink()
                have = 0
            if have == f.size:
                if self._verified(part, f):
                    part.rename(target)
                    return
                corrupt += 1
                part.unlink()
                prog.done -= f.size
                log.warning("%s: checksum mismatch (attempt %d), fetching again", f.name, corrupt)
                if corrupt >= self.max_corrupt:
                    raise DownloadError(f"{repo_id}/{f.name}: sha256 mismatch {corrupt} times")
                continue
            if time.monotonic() - last_progress > self.stall_timeout:
                raise DownloadError(
                    f"{repo_id}/{f.name}: no progress for {self.stall_timeout:.0f}s"
                )
            before = prog.done
            wait = 0.0
            try:
                self._stream(
                    url,
                    {**headers, **({"Range": f"bytes={have}-"} if have else {})},
                    part,
                    have,
                    f.size,
                    prog,
                    window,
                )
            except _RetryAfter as e:
                wait = e.seconds
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DownloadError(f"disk full writing {target}: {e}") from None
                log.info("%s: %s; retrying in %.2fs", f.name, e, backoff)
                wait, backoff = backoff, DOWNLOAD.next(backoff)
            except (httpx.HTTPError, _Retry) as e:
                log.info("%s: %s; retrying in %.2fs", f.name, e, backoff)
                wait, backoff = backoff, DOWNLOAD.next(backoff)
            if prog.done > before:
                last_progress, backoff = time.monotonic(), DOWNLOAD.first
            time.sleep(min(wait, max(0.0, self.stall_timeout - (time.monotonic() - last_progress))))

    def _verified(self, part: Path, f: RemoteFile) -> bool:
        return f.sha256 is None or sha256_of(part) == f.sha256

    def _stream(
        self,
        url: str,
        headers: dict[str, str],
        part: Path,
        have: int,
        size: int,
        prog: Progress,
        window: list[tuple[float, int]],
    ) -> None:
        timeout = httpx.Timeout(30.0, read=min(30.0, self.stall_timeout))
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=timeout) as r:
            if r.status_code == 429:
                raise _RetryAfter(float(r.headers.get("retry-after", "1")))
            if r.status_code >= 500:
                raise _Retry(f"HTTP {r.status_code}")
            if r.status_code == 416:
                return
            if r.status_code not in (200, 206):
                raise DownloadError(f"{url}: HTTP {r.status_code}")
            mode = "ab" if r.status_code == 206 else "wb"
            if mode == "wb" and have:
                prog.done -= have  # the server ignored the range: start over
                have = 0
            with part.open(mode) as out:
                for chunk in r.iter_bytes():
                    if have + len(chunk) > size:
                        # A source that sends more than it listed is lying; what it
                        # sent past the listed size never reaches the disk.
                        raise DownloadError(f"{url} sent more than the {size} bytes it listed")
                    have += len(chunk)
                    out.write(chunk)
                    prog.done += len(chunk)
                    now = time.monotonic()
                    window.append((now, prog.done))
                    while window and now - window[0][0] > 3.0:
                        window.pop(0)
                    if len(window) > 1 and now > window[0][0]:
                        prog.rate = (window[-1][1] - window[0][1]) / (now - window[0][0])
                        prog.eta_s = (prog.total - prog.done) / prog.rate if prog.rate else None
                    self._report(prog)


class _Retry(Exception):
    pass


class _RetryAfter(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"retry after {seconds}s")
        self.seconds = seconds


class Downloads:
    """The node's downloads, each on a thread of its own while the engine serves:
    one per model at a time, with its progress (reported in every heartbeat).
    With a `source` (a peer's weights server, which takes `token`) the peer is
    tried first, then the hub. `done` is called when one ends, either way."""

    def __init__(
        self,
        store: ModelStore,
        downloader: Downloader,
        token: str | None,
        done: Callable[[], None],
    ) -> None:
        self.store, self.downloader, self.token, self.done = store, downloader, token, done
        self.progress: dict[str, Progress] = {}

    def public(self) -> list[dict[str, Any]]:
        return [p.public() for p in list(self.progress.values())]

    def start(self, model_id: str, revision: str, source: str | None = None) -> None:
        if not valid_model_id(model_id):
            self.progress[model_id[:256]] = Progress(
                model_id[:256], state="failed", error="not a model id (ORG/NAME, as on the hub)"
            )
            return
        current = self.progress.get(model_id)
        if (
            current and current.state in ("listing", "downloading")
        ) or model_id in self.store.scan():
            return
        self.progress[model_id] = Progress(model_id)
        threading.Thread(
            target=self._run,
            args=(model_id, revision, source),
            name=f"download-{model_id}",
            daemon=True,
        ).start()

    def _run(self, model_id: str, revision: str, source: str | None) -> None:
        def progress(p: Progress) -> None:
            self.progress[model_id] = p

        dest = self.store.path(model_id)
        try:
            if source:
                try:
                    peer = replace(
                        self.downloader, hub=source, token=self.token, on_progress=progress
                    )
                    peer.download(model_id, dest, revision)
                    return
                except DownloadError as e:
                    log.warning(
                        "peer %s could not give %s (%s); trying the hub", source, model_id, e
                    )
            replace(self.downloader, on_progress=progress).download(model_id, dest, revision)
        except Exception as e:
            log.error("download of %s failed: %s", model_id, e)
        finally:
            self.done()
