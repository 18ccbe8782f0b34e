"""LangChain's ChatOpenAI, unchanged, against a real cluster: chat, streaming with
usage, tools bound and called, history with tool results, structured output by
its schema and tool methods (the random-weight models' output still validates)."""

from __future__ import annotations

from typing import Any, Literal

import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

TINY = "test/tiny-llama"
TOOLS_MODEL = "test/tiny-tools"


def chat(cluster: Any, model: str = TINY, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=f"{cluster.url}/v1",
        api_key="none",  # type: ignore[arg-type]
        model=model,
        max_retries=0,
        default_headers=cluster.api_headers(),
        **kw,
    )


TURNS = [SystemMessage("You are terse."), HumanMessage("What is the capital of France?")]


def test_invoke_and_stream_say_what_openai_says(cluster: Any) -> None:
    ref = openai.OpenAI(
        base_url=f"{cluster.url}/v1", api_key="none", default_headers=cluster.api_headers()
    ).chat.completions.create(
        model=TINY,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=8,
        temperature=0,
    )
    expected = ref.choices[0].message.content
    llm = chat(cluster, temperature=0, max_completion_tokens=8, stream_usage=True)
    got = llm.invoke(TURNS)
    assert isinstance(got, AIMessage) and got.content == expected
    assert got.usage_metadata and got.usage_metadata["output_tokens"] == ref.usage.completion_tokens
    chunks = list(llm.stream(TURNS))
    assert "".join(str(c.content) for c in chunks) == expected
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage and usage[-1]["output_tokens"] == ref.usage.completion_tokens


class City(BaseModel):
    # bounded: a random-weight model writes a string until its bound or its budget
    city: str = Field(max_length=20)


@tool(args_schema=City)
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def test_bind_tools_with_a_forced_choice_gives_a_call_and_its_result_goes_back(
    cluster: Any,
) -> None:
    llm = chat(cluster, TOOLS_MODEL, temperature=1.0, seed=3, max_completion_tokens=200)
    ask = HumanMessage("Weather in Paris?")
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([ask])
    assert isinstance(msg, AIMessage)
    assert msg.response_metadata["finish_reason"] == "tool_calls", msg
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = llm.bind_tools([get_weather]).invoke([ask, msg, result])
    assert isinstance(answer, AIMessage)
    assert answer.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


class Person(BaseModel):
    """Someone."""

    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_gives_a_valid_object(cluster: Any, method: str) -> None:
    # (json_mode, any JSON object, is OpenAI's json_object: a random-weight model
    # rarely closes an unconstrained object; test_clients checks it parses)
    model = TOOLS_MODEL if method == "function_calling" else TINY
    llm = chat(cluster, model, temperature=1.0, seed=2, max_completion_tokens=300)
    out = llm.with_structured_output(Person, method=method).invoke("Who is it?")  # type: ignore[arg-type]
    assert isinstance(out, Person)
