"""The clients people already use, unchanged, against a real cluster: ollama-python
(Ollama's API) and the anthropic SDK (Messages). Greedy, so every face of one
request gives the tokens OpenAI's chat gives."""

from __future__ import annotations

import json
from typing import Any, Literal

import anthropic
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

TINY = "test/tiny-llama"
SYSTEM = "You are terse."
ASK = "What is the capital of France?"


def oai(cluster: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)


def claude(cluster: Any) -> anthropic.Anthropic:
    headers = cluster.api_headers()
    return anthropic.Anthropic(
        base_url=cluster.url, api_key="none", max_retries=0, default_headers=headers
    )


def ollama_client(cluster: Any) -> ollama.Client:
    return ollama.Client(host=cluster.url, headers=cluster.api_headers())


@pytest.fixture(scope="module")
def reference(cluster: Any) -> str:
    """OpenAI's chat for the same turns: what every face must say too."""
    client = oai(cluster)
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
    client = ollama_client(cluster)
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
    client = ollama_client(cluster)
    turns = [{"role": "user", "content": ASK}]
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=TINY, messages=turns, options={"mirostat": 2})
    assert e.value.status_code == 400 and "mirostat" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=TINY, messages=[{"role": "user", "content": "x", "images": ["aGk="]}])
    assert e.value.status_code == 400 and "images" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nobody/nothing", messages=turns)
    assert e.value.status_code == 404


def test_anthropic_messages_create_and_stream(cluster: Any, reference: str) -> None:
    client = claude(cluster)
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
    assert again.content[0].text == reference


def test_anthropic_count_tokens_counts_what_messages_would_read(cluster: Any) -> None:
    client = claude(cluster)
    turns: Any = [{"role": "user", "content": ASK}]
    msg = client.messages.create(model=TINY, max_tokens=1, system=SYSTEM, messages=turns)
    counted = client.messages.count_tokens(model=TINY, system=SYSTEM, messages=turns)
    assert counted.input_tokens == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)
    tool: Any = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
    with_tool = client.messages.count_tokens(model=TOOLS_MODEL, messages=turns, tools=[tool])
    without = client.messages.count_tokens(model=TOOLS_MODEL, messages=turns)
    assert with_tool.input_tokens > without.input_tokens > 0  # the template renders tools
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nobody/nothing", messages=turns)


def test_anthropic_errors_come_in_anthropics_shape(cluster: Any) -> None:
    client = claude(cluster)
    turns: Any = [{"role": "user", "content": ASK}]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model=TINY, max_tokens=8, messages=turns, extra_body={"thinking": {"type": "enabled"}}
        )
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "thinking" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as nf:
        client.messages.create(model="nobody/nothing", max_tokens=8, messages=turns)
    assert nf.value.body["error"]["type"] == "not_found_error"


# -- structured output: a random-weight model's output validates, every run ----------


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_openai_parse_gets_a_valid_object_from_a_random_model(cluster: Any, seed: int) -> None:
    client = oai(cluster)
    r = client.chat.completions.parse(
        model=TINY,
        messages=[{"role": "user", "content": "Who is it?"}],
        response_format=Person,
        max_tokens=300,
        temperature=1.0,
        seed=seed,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Person)  # parsed and validated by the SDK


def test_json_object_and_ollama_formats_always_parse(cluster: Any) -> None:
    client = oai(cluster)
    for seed in range(3):
        r = client.chat.completions.create(
            model=TINY,
            messages=[{"role": "user", "content": "JSON please"}],
            response_format={"type": "json_object"},
            max_tokens=400,
            seed=seed,
        )
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    streamed = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Who?"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": Person.model_json_schema(), "strict": True},
        },
        max_tokens=300,
        seed=7,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    Person.model_validate_json(text)
    ol = ollama_client(cluster)
    got = ol.chat(
        model=TINY,
        messages=[{"role": "user", "content": "Who?"}],
        format=Person.model_json_schema(),
        options={"num_predict": 300, "seed": 3},
    )
    Person.model_validate_json(got.message.content or "")


def test_a_schema_that_does_not_compile_is_a_400(cluster: Any) -> None:
    client = oai(cluster)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=TINY,
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nope"}},
            },
            max_tokens=5,
        )
    assert "response_format" in str(e.value)


# -- tool calls -------------------------------------------------------------------------

TOOLS_MODEL = "test/tiny-tools"
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK: Any = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_a_forced_tool_choice_gives_a_valid_call_even_from_a_random_model(
    cluster: Any, choice: Any
) -> None:
    client = oai(cluster)
    r = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, CLOCK],
        tool_choice=choice,
        max_tokens=200,
        seed=4,
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    (call,) = c.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(args) == {"city"} and isinstance(args["city"], str)
    else:
        assert choice == "required" and call.function.name == "get_time"


def test_tool_calls_stream_and_the_history_goes_back_to_the_model(cluster: Any) -> None:
    client = oai(cluster)
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(
        client.chat.completions.create(
            model=TOOLS_MODEL,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER],
            tool_choice=named,
            max_tokens=200,
            seed=5,
            stream=True,
        )
    )
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert [d.function.name for d in deltas if d.function] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    call = deltas[0]
    assert call.function is not None and call.function.arguments is not None
    history: Any = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    after = client.chat.completions.create(
        model=TOOLS_MODEL, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=5
    )
    assert after.choices[0].finish_reason in ("length", "stop")
    assert not after.choices[0].message.tool_calls  # "none": never a call


def test_a_tool_choice_naming_no_tool_is_a_400(cluster: Any) -> None:
    client = oai(cluster)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=TOOLS_MODEL,
            messages=[{"role": "user", "content": "x"}],
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
            max_tokens=5,
        )
    assert "tool_choice" in str(e.value)


def test_a_sampling_field_not_honoured_yet_is_refused_by_name_not_ignored(cluster: Any) -> None:
    client = oai(cluster)
    turns: Any = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as e:  # top_logprobs without logprobs
        client.chat.completions.create(model=TINY, messages=turns, max_tokens=2, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs", e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=TINY, prompt="x", max_tokens=2, suffix="end")
    assert e.value.body["param"] == "suffix", e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=TINY, prompt="x", max_tokens=2, best_of=3)
    assert e.value.body["param"] == "best_of", e.value.body
    # what asks for nothing is fine (LangChain sends penalties of 0)
    ok = client.chat.completions.create(
        model=TINY,
        messages=turns,
        max_tokens=2,
        presence_penalty=0,
        frequency_penalty=0,
        logprobs=False,
    )
    assert ok.choices[0].finish_reason == "length"


# -- OpenAI Responses ---------------------------------------------------------------------


def test_responses_create_stream_and_previous_response_id(cluster: Any, reference: str) -> None:
    client = oai(cluster)
    first = client.responses.create(
        model=TINY,
        input=ASK,
        instructions=SYSTEM,
        max_output_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert first.status == "completed" and first.output_text == reference
    assert first.usage is not None and first.usage.output_tokens == 8
    with client.responses.stream(
        model=TINY,
        input=ASK,
        instructions=SYSTEM,
        max_output_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == reference and final.output_text == reference
    # the server kept the turns: the next one sees them (a longer prompt)
    nxt = client.responses.create(
        model=TINY,
        input="And Spain?",
        previous_response_id=first.id,
        max_output_tokens=4,
        temperature=0,
    )
    alone = client.responses.create(
        model=TINY, input="And Spain?", max_output_tokens=4, temperature=0
    )
    assert nxt.usage is not None and alone.usage is not None
    assert nxt.usage.input_tokens > alone.usage.input_tokens
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=TINY, input="x", previous_response_id="resp_nope")


def test_responses_function_tools_round_trip(cluster: Any) -> None:
    client = oai(cluster)
    tool: Any = {"type": "function", **WEATHER["function"]}
    r = client.responses.create(
        model=TOOLS_MODEL,
        input="Weather?",
        tools=[tool],
        tool_choice="required",
        max_output_tokens=200,
    )
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}
    back: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    done = client.responses.create(
        model=TOOLS_MODEL, input=back, previous_response_id=r.id, tools=[tool], max_output_tokens=4
    )
    assert done.status == "completed"


def test_lm_studio_v0_models_and_chat_with_stats(cluster: Any, reference: str) -> None:
    import httpx

    h = cluster.api_headers()
    listed = httpx.get(f"{cluster.url}/api/v0/models", headers=h, timeout=10).json()["data"]
    (m,) = [m for m in listed if m["id"] == TINY]
    assert m["type"] == "llm" and m["arch"] == "llama" and m["max_context_length"] == 1024
    assert m["state"] in ("loaded", "not-loaded")
    body = {
        "model": TINY,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = httpx.post(f"{cluster.url}/api/v0/chat/completions", json=body, headers=h, timeout=60)
    got = r.json()
    assert got["choices"][0]["message"]["content"] == reference
    s = got["stats"]
    assert s["tokens_per_second"] > 0 and s["time_to_first_token"] > 0
    assert s["stop_reason"] == "maxPredictedTokensReached"


# -- thinking models ---------------------------------------------------------------------

THINK_MODEL = "test/tiny-think"


def test_a_thinking_models_thoughts_are_reasoning_never_content(cluster: Any) -> None:
    client = oai(cluster)
    turns: Any = [{"role": "user", "content": ASK}]
    r = client.chat.completions.create(
        model=THINK_MODEL,
        messages=turns,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    msg: Any = r.choices[0].message
    thoughts = msg.model_extra["reasoning_content"]
    assert thoughts and "<think>" not in (msg.content or "") + thoughts
    assert not msg.content  # (the block never closed in 8 tokens: all of it is thought)
    chunks = list(
        client.chat.completions.create(
            model=THINK_MODEL,
            messages=turns,
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    streamed = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        for c in chunks
        if c.choices
    )
    assert streamed == thoughts
    # thinking off (the template's own switch): the same tokens are content now
    off = client.chat.completions.create(
        model=THINK_MODEL,
        messages=turns,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}},
    )
    assert off.choices[0].message.content and not (off.choices[0].message.model_extra or {}).get(
        "reasoning_content"
    )
    ol = ollama_client(cluster)
    got = ol.chat(model=THINK_MODEL, messages=turns, options={"temperature": 0, "num_predict": 8})
    assert got.message.thinking and not got.message.content
    # Anthropic's thinking blocks, whole and streamed (thinking_delta, signature_delta)
    cl = claude(cluster)
    ask: Any = {"model": THINK_MODEL, "max_tokens": 8, "messages": turns}
    ask["extra_body"] = {"temperature": 0}
    enabled: Any = {"type": "enabled", "budget_tokens": 1024}
    whole = cl.messages.create(**ask, thinking=enabled)
    block = whole.content[0]
    assert block.type == "thinking" and block.thinking and "<think>" not in block.thinking
    with cl.messages.stream(**ask, thinking=enabled) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "thinking_delta" in kinds and "signature_delta" in kinds
    assert final.content[0].type == "thinking" and final.content[0].thinking == block.thinking
    # thoughts sent back in the history are taken (and left out of the prompt)
    back: Any = [*turns, {"role": "assistant", "content": [block.model_dump()]}, turns[0]]
    assert cl.messages.create(**{**ask, "messages": back}, thinking=enabled).content
    off = cl.messages.create(**ask, thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]


def test_metrics_in_prometheus_text_with_vllms_names_and_the_clusters(cluster: Any) -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    client = oai(cluster)
    client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "x"}], max_tokens=4, stream=False
    )
    r = httpx.get(f"{cluster.url}/metrics", headers=cluster.api_headers(), timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "exo_prefix_cache_bytes",
        "exo_memory_pressure_level",
        "exo_requests_active",
    ):
        assert name in families, (name, sorted(families))
    e2e = [
        s for s in families["vllm:e2e_request_latency_seconds"].samples if s.name.endswith("_count")
    ]
    assert any(s.labels["model_name"] == TINY and s.value >= 1 for s in e2e)
    generated = families["vllm:generation_tokens"].samples
    assert any(s.labels.get("model_name") == TINY and s.value >= 4 for s in generated)


def test_logit_bias_and_penalties_steer_the_tokens(cluster: Any) -> None:
    client = oai(cluster)
    r = client.completions.create(
        model=TINY,
        prompt="Once",
        max_tokens=6,
        temperature=0,
        logit_bias={"300": 100},
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert r.choices[0].model_extra["token_ids"] == [300] * 6
    # a frequency penalty as strong as it goes: greedy never repeats a token here
    r = client.completions.create(
        model=TINY,
        prompt="Once",
        max_tokens=12,
        temperature=0,
        frequency_penalty=2.0,
        extra_body={"return_token_ids": True, "ignore_eos": True, "top_k": 5, "min_p": 0.01},
    )
    ids = r.choices[0].model_extra["token_ids"]
    assert len(ids) == 12
    ol = ollama_client(cluster)
    got = ol.generate(model=TINY, prompt="Once", raw=True, options={"num_predict": 4, "top_k": 1})
    assert got.done


def test_logprobs_for_chat_and_completions_streamed_or_not(cluster: Any) -> None:
    import math

    client = oai(cluster)
    turns: Any = [{"role": "user", "content": ASK}]
    r = client.chat.completions.create(
        model=TINY,
        messages=turns,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert content is not None and len(content) == 5
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        # greedy: the sampled token is the likeliest one
        assert math.isclose(e.logprob, e.top_logprobs[0].logprob, abs_tol=1e-4)
        if "\ufffd" not in e.token:  # (part of a character: its own bytes)
            assert e.bytes == list(e.token.encode())
    # (a token may be part of a character: its text alone is not the content's)
    streamed = [
        e
        for c in client.chat.completions.create(
            model=TINY,
            messages=turns,
            max_tokens=5,
            temperature=0,
            logprobs=True,
            extra_body={"ignore_eos": True},
            stream=True,
        )
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    comp = client.completions.create(
        model=TINY,
        prompt="Once",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = comp.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 4
    assert lp.top_logprobs is not None and all(len(t) <= 2 for t in lp.top_logprobs)


def test_echo_returns_the_prompt_and_scores_it(cluster: Any) -> None:
    """Completions' echo, as lm-eval-harness scores text: the prompt's tokens and
    their log probabilities (the first has none), with max_tokens 0 nothing more."""
    client = oai(cluster)
    prompt = "Once upon a time there was"
    got = client.completions.create(
        model=TINY, prompt=prompt, max_tokens=3, echo=True, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    answer = got.choices[0].text
    assert answer.startswith(prompt) and len(answer) > len(prompt)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=TINY,
            prompt=prompt,
            max_tokens=3,
            echo=True,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        if c.choices
    )
    assert streamed == answer
    scored = client.completions.create(
        model=TINY, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    c = scored.choices[0]
    assert c.text == prompt and c.finish_reason == "length"
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    lp = c.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == prompt and lp.text_offset and lp.text_offset[0] == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) == 1 for t in lp.top_logprobs[1:] if t is not None)


def test_ollama_takes_tools_and_a_tool_history(cluster: Any) -> None:
    client = ollama_client(cluster)
    history: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    got = client.chat(
        model=TOOLS_MODEL, messages=history, tools=[WEATHER], options={"num_predict": 8, "seed": 1}
    )
    assert got.done and got.message.role == "assistant"
    for call in got.message.tool_calls or []:  # (a random model rarely calls)
        assert call.function.name in ("get_weather",) and isinstance(call.function.arguments, dict)


def test_anthropic_tool_use_forced_streamed_and_round_trip(cluster: Any) -> None:
    client = claude(cluster)
    tool: Any = {
        "name": "get_weather",
        "description": "The weather in a city",
        "input_schema": WEATHER["function"]["parameters"],
    }
    turns: Any = [{"role": "user", "content": "Weather in Paris?"}]
    forced: Any = {"type": "tool", "name": "get_weather"}
    msg = client.messages.create(
        model=TOOLS_MODEL, max_tokens=200, messages=turns, tools=[tool], tool_choice=forced
    )
    assert msg.stop_reason == "tool_use"
    (use,) = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city"}
    with client.messages.stream(
        model=TOOLS_MODEL, max_tokens=200, messages=turns, tools=[tool], tool_choice=forced
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content if b.type == "tool_use"] == ["tool_use"]
    history: Any = [
        *turns,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}],
        },
    ]
    after = client.messages.create(model=TOOLS_MODEL, max_tokens=4, messages=history, tools=[tool])
    assert after.stop_reason in ("max_tokens", "end_turn", "tool_use")
