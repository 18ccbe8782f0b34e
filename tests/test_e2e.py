"""Broker, node and API as separate processes on loopback, driven by the official openai client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from exo.tools.default_model import DEFAULT_MODEL

TINY = "test/tiny-llama"


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0, timeout=120)


def reference_ids(path: Path, prompt: list[int], n: int) -> list[int]:
    """mlx-lm's own greedy generation, stopping at EOS like the server does."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    from exo.nodes.engine.mlxenv import mx

    model, tok = load(str(path))[:2]
    out = []
    for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, sampler=make_sampler(0.0)):
        if int(t) in tok.eos_token_ids:
            break
        out.append(int(t))
    return out


def chat_prompt(path: Path, messages: list[dict]) -> list[int]:
    from mlx_lm import load

    _, tok = load(str(path), lazy=True)[:2]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True))


def test_models_lists_every_model_on_disk(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {TINY, DEFAULT_MODEL} <= ids


def test_smollm2_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.created > 0
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_smollm2_streams_paris_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_tiny_chat_matches_mlx_lm_generate(client: openai.OpenAI, tiny_path: Path) -> None:
    messages: list[Any] = [{"role": "user", "content": "Once upon a time"}]
    r = client.chat.completions.create(
        model=TINY,
        messages=messages,
        max_tokens=40,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    ids = r.choices[0].model_extra["token_ids"]
    assert ids == reference_ids(tiny_path, chat_prompt(tiny_path, messages), 40)
    assert r.usage.completion_tokens == len(ids)


def test_tiny_streamed_completion_matches_mlx_lm_generate(
    client: openai.OpenAI, tiny_path: Path
) -> None:
    prompt = [5, 77, 300, 12, 90]
    stream = client.completions.create(
        model=TINY,
        prompt=prompt,
        max_tokens=30,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    ids: list[int] = []
    for c in stream:
        ids.extend(c.choices[0].model_extra.get("token_ids") or [])
    assert ids == reference_ids(tiny_path, prompt, 30)


def test_completion_text_prompt_and_stop(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=DEFAULT_MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"]
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert "5" in r.choices[0].text and " 7" not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


def test_max_completion_tokens_limits_output(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        return (
            client.completions.create(
                model=TINY,
                prompt="The",
                max_tokens=20,
                temperature=1.0,
                top_p=0.9,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_p_zero_is_greedy_as_openai_allows(client: openai.OpenAI) -> None:
    def run(**sampling: float) -> str:
        r = client.completions.create(
            model=TINY, prompt="The", max_tokens=12, extra_body={"ignore_eos": True}, **sampling
        )
        return r.choices[0].text

    assert run(top_p=0.0, temperature=1.5) == run(temperature=0.0)


def test_a_separate_api_process_serves_through_the_broker(cluster) -> None:
    import subprocess
    import sys
    import time

    import httpx

    from exo.tools.cluster import free_port

    port = free_port()
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exo.tools.main",
            "api",
            "--broker",
            cluster.broker_addr,
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    timeout=60,
                    json={"model": TINY, "prompt": "Once", "max_tokens": 3},
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert len(cluster.cluster_state()["frontends"]) == 2
    finally:
        p.terminate()
        p.wait(10)
