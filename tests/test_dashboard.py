"""The dashboard, in a real browser (Debian's chromium driven by Playwright)
against real clusters: one node on loopback, and two nodes in the network-
namespace test bed joined by a `wifi` and an `ethernet` link. Screenshots of each
state are saved under the test's tmp dir."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from exo.api.routes import dashboard
from exo.tools.cluster import LocalCluster
from tests.helpers import wait_until
from tests.hub import Hub
from tests.netbed import Bed, need_root

TINY = "test/tiny-llama"
TALKER = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a real model: a long, real answer


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make install` installs it on Debian")
        pytest.skip("no chromium on this machine")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    path = chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A page of the dashboard, with what went wrong in it: console errors,
    uncaught exceptions, and any request to another origin."""

    def __init__(self, browser: Any, url: str, shots: Path, scheme: str = "dark") -> None:
        self.url, self.shots = url.rstrip("/"), shots
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.page = browser.new_page(viewport={"width": 1440, "height": 900}, color_scheme=scheme)
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on(
            "request",
            lambda r: r.url.startswith(self.url) or self.foreign.append(r.url),
        )
        self.page.goto(self.url + "/")
        self.page.wait_for_selector("#live[data-state=live]", timeout=20_000)

    def until(self, js: str, timeout: float = 60.0) -> None:
        """Wait until the expression `js` is true in the page (polled from here:
        the page's policy forbids the eval that wait_for_function needs)."""
        wait_until(lambda: self.page.evaluate(js), timeout=timeout)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.page.close()


@pytest.fixture(scope="module")
def one(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster.on_free_ports(models_dir, log_dir=tmp_path_factory.mktemp("dash-logs"))
    with c:
        yield c


# -- the files and the stream, without a browser -----------------------------------------


def test_the_page_ships_every_file_it_loads_and_loads_nothing_from_elsewhere() -> None:
    files = dashboard.FILES
    html = files["index.html"].decode()
    wanted = set(re.findall(r'(?:src|href)="/ui/([^"]+)"', html))
    for name, body in files.items():
        if name.endswith(".js"):
            wanted |= set(re.findall(r'from "\./([^"]+)"', body.decode()))
    assert wanted and wanted <= set(files), wanted - set(files)
    for name, body in files.items():
        # the SVG namespace is a name, not a place anything is loaded from
        text = body.decode().replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


def test_the_page_loads_without_a_key_and_its_data_needs_one(
    browser: Any, models_dir: Path, tmp_path: Path
) -> None:
    c = LocalCluster.on_free_ports(
        models_dir, log_dir=tmp_path / "logs", nodes=0, broker_args=["--api-key", "sesame"]
    )
    with c:
        page = httpx.get(f"{c.url}/", timeout=10)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        js = httpx.get(f"{c.url}/ui/app.js", timeout=10)
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        for bad in ("/ui/..%2Fapp.py", "/ui/nothing.js", "/ui/%2e%2e/dashboard.py"):
            r = httpx.get(f"{c.url}{bad}", timeout=10)
            assert r.status_code == 404 and r.json()["error"]["message"], bad
        assert httpx.get(f"{c.url}/v1/cluster/events", timeout=10).status_code == 401
        auth = {"authorization": "Bearer sesame"}
        with httpx.stream("GET", f"{c.url}/v1/cluster/events", headers=auth, timeout=10) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "text/event-stream"
            )
            states = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    states.append(json.loads(line[6:]))
                if len(states) == 2:  # the state now, then one the broker published
                    break
        assert all(s["protocol"] and "requests" in s for s in states)
        assert states[1]["uptime_s"] >= states[0]["uptime_s"]
        # In the browser: the page asks for the key, keeps it, and goes live with it.
        page = browser.new_page()
        try:
            page.goto(f"{c.url}/")
            page.wait_for_selector("#key-dialog[open]", timeout=10_000)
            page.fill("#key-input", "sesame")
            page.click("#key-form button.primary")
            page.wait_for_selector("#live[data-state=live]", timeout=20_000)
            assert page.evaluate("localStorage.getItem('exo.apiKey')") == "sesame"
        finally:
            page.close()


def test_requests_in_flight_are_listed_and_marked_for_their_owner_only(
    one: LocalCluster,
) -> None:
    body = {"model": TINY, "prompt": "hi", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{one.url}/v1/completions", json=body, timeout=60) as r:
        rid = r.headers["x-request-id"]
        with httpx.stream("GET", f"{one.url}/v1/cluster/events", timeout=10) as ev:
            for line in ev.iter_lines():
                if not line.startswith("data: "):
                    continue
                listed = [x for x in json.loads(line[6:])["requests"] if x["id"] == rid]
                if listed:
                    break
        (mine,) = listed
        assert mine["model"] == TINY and mine["state"] == "running" and mine["mine"] is True
        assert set(mine) == {"id", "model", "state", "instance", "node", "tokens", "age_s", "mine"}
        assert httpx.post(f"{one.url}/v1/cancel/{rid}", timeout=10).status_code == 200


# -- in the browser ------------------------------------------------------------------------


def node_status(c: LocalCluster) -> dict[str, Any]:
    return c.cluster_state()["nodes"][0]["status"]


def test_one_node_chat_streams_and_stop_ends_the_request_on_the_node(
    browser: Any, one: LocalCluster, tmp_path: Path
) -> None:
    p = Page(browser, one.url, tmp_path, scheme="light")
    page = p.page
    try:
        page.wait_for_selector("#nodes .node")
        assert page.inner_text("#nodes .node h3").startswith("node0")
        page.wait_for_selector(f"#chat-model option[value='{TALKER}']", state="attached")
        page.select_option("#chat-model", TALKER)
        page.fill("#chat-max", "12")
        page.fill("#chat-input", "Say hello to the cluster.")
        page.click("#chat-send")
        page.wait_for_selector(".msg.assistant .meta:has-text('TTFT')", timeout=120_000)
        answer = page.inner_text(".msg.assistant .body")
        meta = page.inner_text(".msg.assistant .meta")
        assert answer.strip(), "no answer streamed"
        assert re.search(r"TTFT [\d.]+ ms · \d+ tokens", meta), meta
        p.shot("chat-answered")

        # A long answer, stopped: the node drops it (its cancel list says so). (The
        # first answer's row gone first: the row that appears next is this one's.)
        page.wait_for_selector("#requests tbody tr[data-request]", state="detached")
        page.fill("#chat-max", "4000")
        page.fill("#chat-input", "Tell me a very long story about a lighthouse keeper.")
        page.click("#chat-send")
        page.wait_for_selector("#requests tbody tr[data-request]", timeout=60_000)
        rid = page.get_attribute("#requests tbody tr[data-request]", "data-request")
        p.until(
            "document.querySelectorAll('.msg.assistant')[1]?.querySelector('.body')"
            "?.textContent.length > 10"
        )
        p.shot("chat-streaming")
        page.click("#chat-stop")
        page.wait_for_selector(".msg.assistant.stopped .meta:has-text('stopped')", timeout=30_000)
        wait_until(lambda: any(x[0] == rid for x in node_status(one)["recent_cancels"]))
        wait_until(lambda: node_status(one)["running"] == 0, timeout=30)
        assert one.cluster_state()["stats"].get("cancelled_explicit", 0) >= 1
        page.wait_for_selector("#requests tbody tr[data-request]", state="detached")
        p.shot("chat-stopped")
        assert p.errors == [] and p.foreign == []
        # A request the cluster refuses: the page says why.
        page.select_option("#chat-model", TINY)
        page.fill("#chat-input", "many words " * 1200)  # past the tiny model's context
        page.click("#chat-send")
        page.wait_for_selector(".msg.assistant.failed .meta", timeout=30_000)
        why = page.inner_text(".msg.assistant.failed .meta")
        assert "the cluster failed the request" in why and "context" in why, why
        assert page.is_visible("#chat-send") and not page.is_visible("#chat-stop")
    finally:
        p.close()


def test_a_request_in_flight_is_cancelled_from_its_row(
    browser: Any, one: LocalCluster, tmp_path: Path
) -> None:
    body = {
        "model": TALKER,
        "prompt": "Once upon a time",
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    p = Page(browser, one.url, tmp_path)
    page = p.page
    ended: list[str] = []
    try:
        with httpx.stream("POST", f"{one.url}/v1/completions", json=body, timeout=120) as r:
            rid = r.headers["x-request-id"]
            row = f"#requests tr[data-request='{rid}']"
            page.wait_for_selector(f"{row} button:not([disabled])", timeout=30_000)
            p.shot("request-in-flight")
            page.click(f"{row} button")
            page.wait_for_selector("#requests-notice:has-text('cancelled')")
            ended += [line for line in r.iter_lines() if '"cancelled"' in line]
        assert ended, "the stream did not end as cancelled"
        wait_until(lambda: any(x[0] == rid for x in node_status(one)["recent_cancels"]))
        page.wait_for_selector(row, state="detached")
        assert p.errors == [] and p.foreign == []
    finally:
        p.close()


def test_placing_and_deleting_an_instance_from_the_page(
    browser: Any, one: LocalCluster, tmp_path: Path
) -> None:
    model = "test/tiny-gemma3_text"

    def instances() -> list[dict[str, Any]]:
        r = httpx.get(f"{one.url}/v1/instances", timeout=10)
        return [i for i in r.json()["data"] if i["model"] == model]

    assert instances() == []
    p = Page(browser, one.url, tmp_path)
    page = p.page
    try:
        page.wait_for_selector(f"#place-model option[value='{model}']", state="attached")
        page.select_option("#place-model", model)
        page.fill("#place-nodes", "1")
        page.click("#place-form button[type=submit]")
        page.wait_for_selector("#preview .candidate button")
        assert "needs" in page.inner_text("#preview .candidate")
        p.shot("placement-preview")
        page.click("#preview .candidate button")
        (inst,) = wait_until(instances)
        row = f"#instances tr[data-instance='{inst['id']}']"
        page.wait_for_selector(f"{row} .pill:has-text('ready')", timeout=60_000)
        p.shot("instance-placed")
        page.click(f"{row} button")
        wait_until(lambda: instances() == [])
        page.wait_for_selector(row, state="detached", timeout=10_000)
        assert p.errors == [] and p.foreign == []
        # a placement that cannot be (three nodes of one): the reason, and no button
        page.fill("#place-nodes", "3")
        page.click("#place-form button[type=submit]")
        page.wait_for_selector("#models-notice.bad")
        assert "node" in page.inner_text("#models-notice")
        assert page.query_selector("#preview .candidate button") is None
    finally:
        p.close()


def test_a_pull_from_the_page_shows_its_progress_and_a_chat_waits_for_it(
    browser: Any, tiny_path: Path, tmp_path: Path
) -> None:
    repo = "hubtest/tiny-llama"
    with Hub({repo: tiny_path}) as hub:
        hub.faults.rate = (tiny_path / "model.safetensors").stat().st_size / 10  # about 10 s
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        logs = tmp_path / "logs"
        with LocalCluster.on_free_ports(tmp_path / "models", log_dir=logs, env=env) as c:
            p = Page(browser, c.url, tmp_path)
            page = p.page
            try:
                page.fill("#pull-model", repo)
                page.click("#pull-form button")
                page.wait_for_selector("#models-notice:has-text('pulling')")
                page.wait_for_selector(f"#nodes .download[data-model='{repo}'] .progress")
                # asked while it downloads: the request waits, and the chat says why
                option = f"#chat-model option[value='{repo}']"
                page.wait_for_selector(option, state="attached")
                assert "downloading" in page.inner_text(option)
                page.select_option("#chat-model", repo)
                page.fill("#chat-max", "5")
                page.fill("#chat-input", "hi")
                page.click("#chat-send")
                page.wait_for_selector("#chat-status:has-text('downloading')", timeout=30_000)
                # (the node's own rate and ETA, as soon as it has measured them)
                row = f"#nodes .download[data-model='{repo}']"
                page.wait_for_selector(f"{row}:has-text(' left')", timeout=30_000)
                p.shot("downloading")
                page.wait_for_selector(".msg.assistant .meta:has-text('TTFT')", timeout=120_000)
                page.wait_for_selector(f"#models tr[data-model='{repo}']")
                assert p.errors == [] and p.foreign == []
            finally:
                p.close()


def test_two_nodes_show_their_links_and_a_link_going_down(
    browser: Any, models_dir: Path, tmp_path: Path
) -> None:
    need_root()
    bed = Bed()
    try:
        wifi, eth = bed.two_hosts()
        # the broker on host a; node1 reaches it over the ethernet link
        logs = tmp_path / "logs"
        with bed.cluster(models_dir, broker_in="a", via={"b": eth[0]}, log_dir=logs) as c:
            p = Page(browser, c.url, tmp_path)
            page = p.page
            try:
                p.until("document.querySelectorAll('#topology .node-g').length === 2")
                for kind in ("wifi", "ethernet"):
                    row = f"#links tr[data-type={kind}]"
                    page.wait_for_selector(row, timeout=30_000)
                    # measured by the link prober: a figure, then, not a dash
                    p.until(
                        f"document.querySelector('{row} .bandwidth')?.textContent"
                        ".includes('bit/s')",
                        timeout=90,
                    )
                texts = {
                    k: page.inner_text(f"#links tr[data-type={k}]") for k in ("wifi", "ethernet")
                }
                assert "WiFi" in texts["wifi"] and "Ethernet" in texts["ethernet"], texts
                assert "Mbit/s" in texts["wifi"], texts  # 100 Mbit/s, shaped
                assert re.search(r"\d(\.\d)? ?[GM]bit/s", texts["ethernet"]), texts
                svg = page.text_content("#topology") or ""
                assert "node0" in svg and "node1" in svg and "WiFi" in svg and "Ethernet" in svg
                # a model split over both: its steps ride the ethernet link, highlighted
                ids = {n["name"]: n["id"] for n in c.cluster_state()["nodes"]}
                stages = [
                    {"node": ids["node0"], "layers": [0, 2]},
                    {"node": ids["node1"], "layers": [2, 4]},
                ]
                r = httpx.post(
                    f"{c.url}/v1/instances", json={"model": TINY, "stages": stages}, timeout=30
                )
                assert r.status_code == 201, r.text
                iid = r.json()["id"]
                carries = '#links tr[data-type={}] td.carries:has-text("{}")'
                page.wait_for_selector(carries.format("ethernet", iid), timeout=60_000)
                page.wait_for_selector(carries.format("ethernet", "node1's broker link"))
                page.wait_for_selector("#topology path.link.route.t-ethernet", state="attached")
                p.shot("two-nodes")

                def down() -> None:
                    bed.set_link("a", eth[0], up=False)
                    bed.set_link("b", eth[1], up=False)

                threading.Thread(target=down).start()
                page.wait_for_selector(
                    "#links tr[data-type=ethernet][data-up=false]", timeout=10_000
                )
                page.wait_for_selector("#topology path.link.down", state="attached")
                # and the stage traffic's new route, over WiFi
                page.wait_for_selector(carries.format("wifi", iid), timeout=20_000)
                page.wait_for_selector(carries.format("wifi", "node1's broker link"))
                assert "failed over from" in page.inner_text("#nodes .node[data-node*=node1]")
                p.shot("ethernet-down")
                assert p.errors == [] and p.foreign == []
            finally:
                p.close()
    finally:
        bed.close()
