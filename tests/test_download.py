"""Downloads from a real HTTP hub on loopback: .partial files, resume, verification, faults."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exo.nodes.store.download import MARKER, Downloader, DownloadError
from exo.nodes.store.store import ModelStore, incomplete_reason
from exo.tools.cluster import LocalCluster, free_port
from tests.helpers import stream_while
from tests.hub import Hub

REPO = "hubtest/tiny-llama"
WEIGHTS = "model.safetensors"


@pytest.fixture()
def hub(tiny_path: Path) -> Iterator[Hub]:
    with Hub({REPO: tiny_path}) as h:
        yield h


def same_files(a: Path, b: Path) -> bool:
    def names(d: Path) -> list[str]:  # the model's files, not the node's own dot files
        return sorted(p.name for p in d.iterdir() if p.is_file() and not p.name.startswith("."))

    return names(a) == names(b) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names(a)
    )


def test_a_download_verifies_every_file_and_leaves_no_partial(
    hub: Hub, tiny_path: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "hubtest--tiny-llama"
    seen: list[str] = []
    Downloader(hub=hub.url, on_progress=lambda p: seen.append(p.state)).download(REPO, dest)
    assert incomplete_reason(dest) is None
    assert same_files(dest, tiny_path)
    assert not list(dest.rglob("*.partial")) and not (dest / MARKER).exists()
    assert seen[0] == "listing" and "downloading" in seen and seen[-1] == "done"


def test_a_cut_connection_resumes_with_a_range_request(
    hub: Hub, tiny_path: Path, tmp_path: Path
) -> None:
    size = (tiny_path / WEIGHTS).stat().st_size
    hub.faults.cut_after[WEIGHTS] = size // 3
    dest = tmp_path / "m"
    Downloader(hub=hub.url).download(REPO, dest)
    assert same_files(dest, tiny_path)
    ranges = [r for p, r in hub.requests if p.endswith(WEIGHTS)]
    assert ranges[0] is None and ranges[1] == f"bytes={size // 3}-"
    assert hub.served[WEIGHTS] == size  # nothing fetched twice


def test_corrupted_bytes_are_fetched_again_and_never_renamed_into_place(
    hub: Hub, tiny_path: Path, tmp_path: Path
) -> None:
    hub.faults.corrupt[WEIGHTS] = 1
    dest = tmp_path / "m"
    Downloader(hub=hub.url).download(REPO, dest)
    assert same_files(dest, tiny_path)
    assert hub.served[WEIGHTS] == 2 * (tiny_path / WEIGHTS).stat().st_size
    hub.faults.corrupt[WEIGHTS] = 10
    with pytest.raises(DownloadError, match="sha256"):
        Downloader(hub=hub.url, max_corrupt=2).download(REPO, tmp_path / "bad")
    assert not (tmp_path / "bad" / WEIGHTS).exists()
    assert incomplete_reason(tmp_path / "bad") is not None


def test_429_with_retry_after_and_500_are_retried(
    hub: Hub, tiny_path: Path, tmp_path: Path
) -> None:
    hub.faults.statuses[WEIGHTS] = [429, 500, 503]
    hub.faults.retry_after = 1
    dest = tmp_path / "m"
    t0 = time.monotonic()
    Downloader(hub=hub.url).download(REPO, dest)
    assert time.monotonic() - t0 >= 1.0  # Retry-After was honoured
    assert same_files(dest, tiny_path)
    assert sum(1 for p, _ in hub.requests if p.endswith(WEIGHTS)) == 4


def test_no_progress_gives_up_with_a_clear_error(hub: Hub, tmp_path: Path) -> None:
    hub.faults.statuses[WEIGHTS] = [500] * 1000
    with pytest.raises(DownloadError, match=f"{WEIGHTS}: no progress for 1s"):
        Downloader(hub=hub.url, stall_timeout=1.0).download(REPO, tmp_path / "m")
    assert incomplete_reason(tmp_path / "m") is not None


def test_an_unknown_repository_is_a_clear_error(hub: Hub, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="not on the hub"):
        Downloader(hub=hub.url).download("nobody/nothing", tmp_path / "x")


def pull_command(models_dir: Path) -> list[str]:
    """`exo-tools models pull REPO`, as an operator runs it."""
    return [
        sys.executable,
        "-m",
        "exo.tools.main",
        "models",
        "pull",
        REPO,
        "--models-dir",
        str(models_dir),
    ]


def test_a_killed_pull_resumes_from_its_partial_file(
    hub: Hub, tiny_path: Path, tmp_path: Path
) -> None:
    size = (tiny_path / WEIGHTS).stat().st_size
    hub.faults.rate = size / 4  # about four seconds for the weights
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    p = subprocess.Popen(
        pull_command(tmp_path), env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    part = tmp_path / "hubtest--tiny-llama" / (WEIGHTS + ".partial")
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size > size // 4) and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert incomplete_reason(tmp_path / "hubtest--tiny-llama") is not None
    first = hub.served[WEIGHTS]
    hub.faults.rate = None
    subprocess.run(pull_command(tmp_path), env=env, check=True, capture_output=True)
    assert same_files(tmp_path / "hubtest--tiny-llama", tiny_path)
    assert 0 < hub.served[WEIGHTS] - first < size  # the second run fetched only the rest


def test_offline_complete_folders_serve_and_incomplete_ones_are_not_models(
    tiny_path: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_path, models / "copied--tiny")
    half = models / "copied--half"
    shutil.copytree(tiny_path, half)
    (half / WEIGHTS).rename(half / (WEIGHTS + ".partial"))
    (models / "copied--empty").mkdir()
    extra = tmp_path / "readonly"
    shutil.copytree(tiny_path, extra / "shared--tiny")
    assert set(ModelStore(models, [extra]).scan()) == {"copied/tiny", "shared/tiny"}
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "1"}
    with LocalCluster.on_free_ports(
        models, log_dir=tmp_path / "logs", env=env, node_args=["--extra-models-dir", str(extra)]
    ) as c:
        listed = {m["id"] for m in httpx.get(f"{c.url}/v1/models", timeout=10).json()["data"]}
        assert listed == {"copied/tiny", "shared/tiny"}
        for model in ("copied/tiny", "shared/tiny"):
            r = httpx.post(
                f"{c.url}/v1/completions",
                timeout=60,
                json={"model": model, "prompt": "Once", "max_tokens": 4},
            )
            assert r.status_code == 200, r.text
        r = httpx.post(
            f"{c.url}/v1/completions", timeout=60, json={"model": "copied/half", "prompt": "x"}
        )
        assert r.status_code == 404


def test_a_request_waits_for_a_download_and_sees_its_progress(
    hub: Hub, tiny_path: Path, tmp_path: Path
) -> None:
    size = (tiny_path / WEIGHTS).stat().st_size
    hub.faults.rate = size / 3
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    with LocalCluster.on_free_ports(tmp_path / "models", log_dir=tmp_path / "logs", env=env) as c:
        r = httpx.post(f"{c.url}/v1/models/pull", json={"model": REPO}, timeout=10)
        assert r.status_code == 202 and r.json()["state"] == "downloading"
        seen_download = False

        def watch() -> None:
            nonlocal seen_download
            for n in c.cluster_state()["nodes"]:
                seen_download |= any(
                    d["model"] == REPO and d["state"] == "downloading" and d["total"] > 0
                    for d in n["status"].get("downloads", [])
                )

        body = {
            "model": REPO,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "stream": True,
        }
        lines = stream_while(c, "/v1/chat/completions", body, watch)
        assert seen_download, lines
        assert any(line.startswith(": downloading") for line in lines)  # keep-alives carry progress
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
        deadline = time.monotonic() + 10  # node status travels with its next heartbeat
        while True:
            models = httpx.get(f"{c.url}/v1/models", timeout=10).json()["data"]
            if (models and models[0]["loaded"]) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert [m["id"] for m in models] == [REPO] and models[0]["loaded"]
        logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
        bad = [
            line
            for line in logs.splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        ]
        assert not [line for line in bad if "time" in line.lower()], bad


def test_a_download_that_fails_fails_its_waiting_requests_naming_node_and_file(
    hub: Hub, tmp_path: Path
) -> None:
    hub.faults.statuses[WEIGHTS] = [500] * 10_000
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    with LocalCluster.on_free_ports(
        tmp_path / "models",
        log_dir=tmp_path / "logs",
        env=env,
        node_args=["--download-stall-timeout", "2"],
    ) as c:
        assert (
            httpx.post(f"{c.url}/v1/models/pull", json={"model": REPO}, timeout=10).status_code
            == 202
        )
        time.sleep(0.5)
        r = httpx.post(f"{c.url}/v1/completions", json={"model": REPO, "prompt": "x"}, timeout=60)
        assert r.status_code == 503
        msg = r.json()["error"]["message"]
        assert "node0" in msg and WEIGHTS in msg and "no progress" in msg


@contextlib.contextmanager
def split_across_holder_and_downloader(
    tiny_path: Path,
    tmp_path: Path,
    hub_url: str,
    node_args: list[str] | None = None,
    holder_serves: bool = False,
) -> Iterator[tuple[LocalCluster, dict[str, str], httpx.Response]]:
    """Two nodes, node0 holding REPO and node1 without it, and an instance placed
    across both: node1 must fetch its stage's weights, from the hub (unless
    node0 serves them to its peers)."""
    holder = tmp_path / "holder"
    shutil.copytree(tiny_path, ModelStore(holder).path(REPO))
    env = {"HF_ENDPOINT": hub_url, "HF_HUB_OFFLINE": "0"}
    serve = [] if holder_serves else ["--no-serve-weights"]
    with LocalCluster.on_free_ports(
        tmp_path / "models",
        nodes=2,
        log_dir=tmp_path / "logs",
        env=env,
        node_args=node_args or [],
        node_extra={0: ["--models-dir", str(holder), *serve]},
    ) as c:
        ids = {n["name"]: n["id"] for n in c.cluster_state()["nodes"]}
        stages = [
            {"node": ids["node0"], "layers": [0, 2]},
            {"node": ids["node1"], "layers": [2, 4]},
        ]
        r = httpx.post(f"{c.url}/v1/instances", json={"model": REPO, "stages": stages}, timeout=10)
        assert r.status_code == 201, r.text
        yield c, ids, r


def test_an_instance_waits_for_one_nodes_download_while_the_other_holds_the_weights(
    hub: Hub, tiny_path: Path, tmp_path: Path
) -> None:
    """Node0 holds the model, node1 downloads it slowly: a request sent meanwhile
    succeeds when the download ends, nobody times out, and the instance goes
    downloading -> loading -> ready."""
    size = (tiny_path / WEIGHTS).stat().st_size
    hub.faults.rate = size / 3
    with split_across_holder_and_downloader(tiny_path, tmp_path, hub.url) as (c, ids, r):
        iid = r.json()["id"]
        assert r.json()["state"] == "downloading"
        progress: list[dict] = []

        def watch() -> None:
            for inst in c.cluster_state()["instances"]:
                if inst["id"] == iid and inst["state"] == "downloading":
                    progress.extend(d for d in inst.get("downloads", []) if d["total"] > 0)

        body = {"model": REPO, "prompt": "Once", "max_tokens": 5, "stream": True}
        lines = stream_while(c, "/v1/completions", body, watch)
        assert progress and all(d["node"] == ids["node1"] for d in progress)
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines), lines
        assert sum(line.startswith("data: {") for line in lines) >= 2
        (inst,) = [i for i in c.cluster_state()["instances"] if i["id"] == iid]
        assert inst["history"] == ["downloading", "loading", "ready"]
        logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
        bad = [line for line in logs.splitlines() if " WARNING " in line or " ERROR " in line]
        assert not [line for line in bad if "time" in line.lower()], bad


def test_too_little_disk_is_refused_before_any_byte_is_fetched(hub: Hub, tmp_path: Path) -> None:
    """A real small filesystem (tmpfs), not a patched disk_usage."""
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("needs root to mount a tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        dest = small / "hubtest--tiny-llama"
        with pytest.raises(DownloadError) as e:
            Downloader(hub=hub.url).download(REPO, dest)
        assert "MiB more" in str(e.value) and "free on" in str(e.value)
        assert not [p for p, _ in hub.requests if p.endswith(WEIGHTS)]  # nothing fetched
        assert incomplete_reason(dest) is not None  # never looks complete
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_models_pull_on_a_terminal_draws_a_progress_bar(
    hub: Hub, tiny_path: Path, tmp_path: Path
) -> None:
    import pty

    hub.faults.rate = (tiny_path / WEIGHTS).stat().st_size / 2
    master, slave = pty.openpty()
    p = subprocess.Popen(
        pull_command(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "COLUMNS": "120"},
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    out, _ = p.communicate(timeout=60)
    os.close(master)
    assert p.returncode == 0
    text = seen.decode(errors="replace")
    assert "━" in text and REPO in text  # rich's bar, with the model being fetched
    assert out.decode().strip().endswith("hubtest--tiny-llama")
    assert incomplete_reason(tmp_path / "hubtest--tiny-llama") is None


def test_a_stalled_download_fails_the_instance_and_its_waiting_request_naming_node_and_file(
    hub: Hub, tiny_path: Path, tmp_path: Path
) -> None:
    hub.faults.statuses[WEIGHTS] = [500] * 10_000
    stall = ["--download-stall-timeout", "2"]
    with split_across_holder_and_downloader(tiny_path, tmp_path, hub.url, stall) as (c, ids, _):
        r = httpx.post(f"{c.url}/v1/completions", json={"model": REPO, "prompt": "x"}, timeout=60)
        assert r.status_code == 503, r.text
        msg = r.json()["error"]["message"]
        assert ids["node1"] in msg and WEIGHTS in msg, msg
        (inst,) = c.cluster_state()["instances"]
        assert inst["state"] == "failed" and WEIGHTS in inst["error"]


def test_a_node_fetches_weights_from_a_peer_that_holds_them_not_the_hub(
    tiny_path: Path, tmp_path: Path
) -> None:
    """The hub is unreachable; node1 gets node0's copy over the cluster, verified the same way."""
    closed = f"http://127.0.0.1:{free_port()}"
    with split_across_holder_and_downloader(tiny_path, tmp_path, closed, holder_serves=True) as (
        c,
        ids,
        r,
    ):
        iid = r.json()["id"]
        (holder,) = [n for n in c.cluster_state()["nodes"] if n["id"] == ids["node0"]]
        r = httpx.post(
            f"{c.url}/v1/completions",
            json={"model": REPO, "prompt": "Once", "max_tokens": 5},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        state = c.cluster_state()
        (inst,) = [i for i in state["instances"] if i["id"] == iid]
        assert inst["history"] == ["downloading", "loading", "ready"]
        by_name = {n["name"]: n for n in state["nodes"]}
        (d,) = [d for d in by_name["node1"]["status"]["downloads"] if d["model"] == REPO]
        assert d["state"] == "done" and d["source"].endswith(f":{holder['info']['weights_port']}")
        assert (
            by_name["node0"]["status"]["weights_bytes_served"]
            >= (tiny_path / WEIGHTS).stat().st_size
        )
    assert same_files(ModelStore(tmp_path / "models").path(REPO), tiny_path)


def test_ollama_pull_downloads_onto_a_node_and_streams_its_progress(
    hub: Hub, tiny_path: Path, tmp_path: Path
) -> None:
    import ollama

    size = (tiny_path / WEIGHTS).stat().st_size
    hub.faults.rate = size / 3  # a few seconds: progress shows
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    with LocalCluster.on_free_ports(tmp_path / "models", log_dir=tmp_path / "logs", env=env) as c:
        client = ollama.Client(host=c.url, headers=c.api_headers())
        with pytest.raises(ollama.ResponseError):
            client.pull("not a hub id")
        seen = list(client.pull(REPO, stream=True))
        assert seen[0].status == "pulling manifest" and seen[-1].status == "success"
        progress = [s for s in seen if s.total]
        assert progress and all(s.total >= size for s in progress), seen
        assert [s.completed for s in progress] == sorted(s.completed or 0 for s in progress)
        names = [m.model for m in client.list().models]
        assert REPO in names
        assert client.pull(REPO, stream=False).status == "success"  # present: at once
