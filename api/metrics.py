"""`GET /metrics`: Prometheus' text format (prometheus-client).

Request latencies are timed here, as clients see them, under the names vLLM's
users already chart (`vllm:time_to_first_token_seconds`, `vllm:e2e_request_
latency_seconds`, `vllm:inter_token_latency_seconds`, token counters), labelled
by model. Everything else is read from the broker's cluster state at scrape time:
requests running and waiting, KV cache use, and the cluster's own (`exo_*`):
per-node memory pressure and downloads, per-link bandwidth, RTT and use, cancels
by reason, dropped frames.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from tens of milliseconds (a short prompt) to minutes (a long one).
LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
STEP = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
PRESSURE = {"normal": 0, "warn": 1, "critical": 2}


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token", labels, registry=r,
            buckets=LATENCY,
        )  # fmt: skip
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between tokens", labels, registry=r,
            buckets=STEP,
        )  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency", labels, registry=r,
            buckets=LATENCY,
        )  # fmt: skip
        self.prompt = Counter("vllm:prompt_tokens", "Prompt tokens", labels, registry=r)
        self.generated = Counter("vllm:generation_tokens", "Generated tokens", labels, registry=r)
        self.finished = Counter(
            "vllm:request_success", "Requests finished, by reason", [*labels, "finished_reason"],
            registry=r,
        )  # fmt: skip

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def token_gap(self, model: str, seconds: float, tokens: int) -> None:
        for _ in range(max(tokens, 1)):
            self.itl.labels(model).observe(seconds / max(tokens, 1))

    def done(self, model: str, seconds: float, finish: str, usage: dict[str, Any] | None) -> None:
        self.e2e.labels(model).observe(seconds)
        self.finished.labels(model, finish).inc()
        u = usage or {}
        self.prompt.labels(model).inc(int(u.get("prompt_tokens", 0)))
        self.generated.labels(model).inc(int(u.get("completion_tokens", 0)))

    def render(self, state: dict[str, Any]) -> bytes:
        """The request metrics, and the cluster's read from its state now."""
        return generate_latest(self.registry) + generate_latest(cluster_registry(state))


def cluster_registry(state: dict[str, Any]) -> CollectorRegistry:
    """The cluster's figures for one scrape: per node, per link, and the broker's."""
    r = CollectorRegistry()
    nodes_into(r, state.get("nodes", []))
    links_into(r, state.get("links", []))
    broker_into(r, state)
    return r


def nodes_into(r: CollectorRegistry, nodes: list[dict[str, Any]]) -> None:
    node = ["node"]
    running = Gauge("vllm:num_requests_running", "Requests decoding", node, registry=r)
    waiting = Gauge("vllm:num_requests_waiting", "Requests queued or prefilling", node, registry=r)
    kv = Gauge("vllm:kv_cache_usage_perc", "KV cache in use, of the budget", node, registry=r)
    pressure = Gauge("exo_memory_pressure_level", "0 normal, 1 warn, 2 critical", node, registry=r)
    available = Gauge("exo_memory_available_bytes", "Memory available", node, registry=r)
    downloads = Gauge("exo_downloads_active", "Downloads in progress", node, registry=r)
    # (counters the nodes keep: set here, on a registry made for this scrape)
    queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up", node, registry=r)
    hits = Counter("vllm:prefix_cache_hits", "Prompt tokens from the cache", node, registry=r)
    cached = Gauge("exo_prefix_cache_bytes", "Prefix cache memory", node, registry=r)
    for n in nodes:
        name = str(n.get("name") or n.get("id"))
        st, info = n.get("status", {}), n.get("info", {})
        running.labels(name).set(st.get("running", 0))
        waiting.labels(name).set(st.get("queued", 0) + st.get("prefilling", 0))
        budget = st.get("kv_budget") or 0
        kv.labels(name).set(st.get("kv_bytes", 0) / budget if budget else 0)
        level = (info.get("memory_pressure") or {}).get("level", "normal")
        pressure.labels(name).set(PRESSURE.get(level, 0))
        available.labels(name).set(info.get("memory_available", 0))
        active = [
            d for d in st.get("downloads", []) if d.get("state") in ("listing", "downloading")
        ]
        downloads.labels(name).set(len(active))
        prefix = st.get("prefix_cache") or {}
        queries.labels(name).inc(max(0, prefix.get("queried_tokens", 0)))
        hits.labels(name).inc(max(0, prefix.get("reused_tokens", 0)))
        cached.labels(name).set(prefix.get("bytes", 0))


def links_into(r: CollectorRegistry, links: list[dict[str, Any]]) -> None:
    link = ["a", "b", "type"]
    bandwidth = Gauge("exo_link_bandwidth_bytes_per_second", "Measured capacity", link, registry=r)
    rtt = Gauge("exo_link_rtt_seconds", "Measured round trip", link, registry=r)
    use = Gauge("exo_link_use_bytes_per_second", "Live use", [*link, "direction"], registry=r)
    up = Gauge("exo_link_up", "1 up, 0 down", link, registry=r)
    for lk in links:
        a = f"{lk['a'].get('name') or lk['a'].get('node')}:{lk['a'].get('address')}"
        b = f"{lk['b'].get('name') or lk['b'].get('node')}:{lk['b'].get('address')}"
        key = (a, b, str(lk.get("type", "")))
        up.labels(*key).set(1 if lk.get("up") else 0)
        if lk.get("bandwidth_Bps") is not None:
            bandwidth.labels(*key).set(lk["bandwidth_Bps"])
        if lk.get("rtt_s") is not None:
            rtt.labels(*key).set(lk["rtt_s"])
        use.labels(*key, "a_to_b").set(lk.get("a_to_b_Bps") or 0)
        use.labels(*key, "b_to_a").set(lk.get("b_to_a_Bps") or 0)


def broker_into(r: CollectorRegistry, state: dict[str, Any]) -> None:
    cancels = Gauge("exo_cancels", "Requests cancelled, by reason", ["reason"], registry=r)
    for k, v in (state.get("stats") or {}).items():
        if k.startswith("cancelled_"):
            cancels.labels(k.removeprefix("cancelled_")).set(v)
    retries = Gauge(
        "exo_retries",
        "What the broker retried or took once (common/retry.py)",
        ["what"],
        registry=r,
    )
    for what in ("placed_again", "cancel_resent", "submit_duplicate", "tokens_duplicate"):
        retries.labels(what).set((state.get("stats") or {}).get(what, 0))
    dropped = Gauge(
        "exo_dropped_frames", "Frames the broker dropped, by reason", ["reason"], registry=r
    )
    for k, v in (state.get("dropped") or {}).items():
        dropped.labels(k).set(v)
    Gauge("exo_requests_active", "Requests in flight", registry=r).set(
        state.get("requests_active", 0)
    )
