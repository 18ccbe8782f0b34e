"""The clients people already use, unchanged, against a real cluster: ollama-python
(Ollama's API) and the anthropic SDK (Messages). Greedy, so every face of one
request gives the tokens OpenAI's chat gives."""

from __future__ import annotations

from typing import Any

import anthropic
import ollama
import openai
import pytest

TINY = "test/tiny-llama"
SYSTEM = "You are terse."
ASK = "What is the capital of France?"


@pytest.fixture(scope="module")
def reference(cluster: Any) -> str:
    """OpenAI's chat for the same turns: what every face must say too."""
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason == "length"
    return text


def test_ollama_python_lists_shows_chats_and_generates(cluster: Any, reference: str) -> None:
    client = ollama.Client(host=cluster.url, headers=cluster.api_headers())
    assert client._client.get("/api/version").json()["version"]
    (m,) = [m for m in client.list().models if m.model == TINY]
    assert m.details is not None and m.details.family == "llama" and (m.size or 0) > 0
    shown = client.show(TINY)
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}]
    options = {"temperature": 0, "num_predict": 8, "num_ctx": 4096}
    whole = client.chat(model=TINY, messages=turns, options=options)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 8
    assert whole.message.role == "assistant" and whole.message.content == reference
    parts = list(client.chat(model=TINY, messages=turns, options=options, stream=True))
    assert "".join(p.message.content or "" for p in parts) == reference
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    gen = client.generate(model=TINY, prompt=ASK, system=SYSTEM, options=options)
    assert gen.response == reference and gen.done_reason == "length"
    assert TINY in [p.model for p in client.ps().models]  # loaded now


def test_ollama_refuses_what_it_cannot_honour_and_unknown_models(cluster: Any) -> None:
    client = ollama.Client(host=cluster.url, headers=cluster.api_headers())
    turns = [{"role": "user", "content": ASK}]
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=TINY, messages=turns, options={"top_k": 5})
    assert e.value.status_code == 400 and "top_k" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=TINY, messages=turns, format="json")
    assert e.value.status_code == 400 and "format" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nobody/nothing", messages=turns)
    assert e.value.status_code == 404


def test_anthropic_messages_create_and_stream(cluster: Any, reference: str) -> None:
    client = anthropic.Anthropic(
        base_url=cluster.url, api_key="none", max_retries=0, default_headers=cluster.api_headers()
    )
    turns: Any = [{"role": "user", "content": ASK}]
    msg = client.messages.create(
        model=TINY, max_tokens=8, system=SYSTEM, messages=turns, extra_body={"temperature": 0}
    )
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "text" and msg.content[0].text == reference
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 8
    assert msg.usage.input_tokens > 0
    with client.messages.stream(
        model=TINY, max_tokens=8, system=SYSTEM, messages=turns, extra_body={"temperature": 0}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == reference and final.stop_reason == "max_tokens"
    # text blocks as content, and a stop sequence
    blocks: Any = [{"role": "user", "content": [{"type": "text", "text": ASK}]}]
    again = client.messages.create(
        model=TINY, max_tokens=8, system=SYSTEM, messages=blocks, extra_body={"temperature": 0}
    )
    assert again.content[0].text == reference  # type: ignore[union-attr]


def test_anthropic_errors_come_in_anthropics_shape(cluster: Any) -> None:
    client = anthropic.Anthropic(
        base_url=cluster.url, api_key="none", max_retries=0, default_headers=cluster.api_headers()
    )
    turns: Any = [{"role": "user", "content": ASK}]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=TINY, max_tokens=8, messages=turns, extra_body={"top_k": 5})
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "top_k" in e.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as nf:
        client.messages.create(model="nobody/nothing", max_tokens=8, messages=turns)
    assert nf.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
