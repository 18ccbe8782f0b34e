"""Request bodies the API accepts, validated strictly: a wrong type is a 400, not a guess."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from exo.broker import protocol as P
from exo.common.json_schema import closed
from exo.common.sampling import SamplingParams

NonNegFloat = Annotated[float, Field(ge=0.0)]
# Beyond any model's context; a node refuses what its model cannot hold.
MAX_TOKENS = (1 << 31) - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(default="schema", max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or a JSON schema."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    def schema_text(self) -> str | None:
        """The schema the output must follow, as text (None: free text)."""
        import json

        if self.type == "text":
            return None
        if self.type == "json_object":
            return '{"type": "object"}'
        if self.json_schema is None:
            raise ValueError("response_format json_schema needs its json_schema")
        schema = self.json_schema.schema_ or {"type": "object"}
        text = json.dumps(closed(schema) if self.json_schema.strict else schema)
        if len(text) > 64 * 1024:
            raise ValueError("response_format: a schema is at most 64 KiB")
        return text


# OpenAI's (and vLLM's) sampling fields the engine does not honour yet, with the
# values that ask for nothing.
NOT_YET: dict[str, tuple[Any, ...]] = {
    "best_of": (1,),
    "suffix": ("",),
}


class Sampling(BaseModel):
    """Fields shared by chat and completions."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    # 0 is OpenAI's too: the nucleus holds only the likeliest token (greedy)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), le=(1 << 63) - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: the generated token ids beside the text, per choice.
    return_token_ids: bool | None = False
    # vLLM's extension: keep generating past the end-of-sequence token (benchmarks).
    ignore_eos: bool | None = False
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # vLLM's extensions
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    top_k: int | None = Field(default=None, ge=-1, le=1 << 20)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=300)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(len(s) > 1024 for s in ([v] if isinstance(v, str) else v or [])):
            raise ValueError("a stop sequence is at most 1024 characters")
        return v

    def wanted_logprobs(self) -> int | None:
        """How many likeliest tokens' log probabilities to return beside the
        sampled one's (None: none at all). Chat and completions ask differently."""
        return None

    def echoed(self) -> bool:
        """The prompt back before the answer (completions' echo)."""
        return False

    def parallel_calls(self) -> bool:
        """More than one tool call per answer allowed (chat's parallel_tool_calls)."""
        return True

    def bias(self) -> dict[int, float]:
        """OpenAI's logit_bias (token ids as strings, -100..100)."""
        out: dict[int, float] = {}
        for k, v in (self.logit_bias or {}).items():
            if not k.isdigit() or not -100 <= v <= 100:
                raise ValueError("logit_bias maps token ids to biases in [-100, 100]")
            out[int(k)] = v
        return out

    def unsupported(self) -> str | None:
        """A field asking for what this server does not do yet (set to anything
        but its no-op value): it is refused by name, never silently ignored."""
        given = self.model_extra or {}
        for name, noop in NOT_YET.items():
            value = given.get(name)
            if value is not None and value not in noop:
                return name
        return None

    def params(self, max_tokens: int | None) -> SamplingParams:
        """The request's sampling, as it travels to the node (common/sampling.py)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        sp = SamplingParams(
            temperature=0.0 if self.top_p == 0 else temperature,  # (top_p 0: greedy)
            top_p=self.top_p or 1.0,
            seed=self.seed,
            ignore_eos=bool(self.ignore_eos),
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            json_schema=self.response_format.schema_text() if self.response_format else None,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=self.bias(),
            logprobs=self.wanted_logprobs(),
            echo=self.echoed(),
            parallel_tool_calls=self.parallel_calls(),
        )
        if max_tokens is not None:
            sp.max_tokens = max_tokens
        return sp


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class Function(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: FunctionName
    description: str | None = Field(default=None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: Function


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    arguments: str = "{}"


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    id: str = Field(default="", max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class NamedChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: dict[Literal["name"], FunctionName]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = Field(default=None, max_length=256)

    def plain(self) -> dict[str, Any]:
        """The message as chat templates take it: text content, and the tool history
        (calls with their arguments as objects, as templates render them)."""
        import json

        if isinstance(self.content, list):
            parts = [p for p in self.content if p.type == "text"]
            if len(parts) != len(self.content):
                raise ValueError("only text content parts are supported")
            text = "".join(p.text or "" for p in parts)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": text}
        if self.name:
            out["name"] = self.name
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                try:
                    args = json.loads(c.function.arguments or "{}")
                except ValueError:
                    raise ValueError("a tool call's arguments are not JSON") from None
                calls.append(
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": args},
                    }
                )
            out["tool_calls"] = calls
        return out


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def wanted_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise ValueError("top_logprobs needs logprobs: true")
            return None
        return self.top_logprobs or 0

    def parallel_calls(self) -> bool:
        return self.parallel_tool_calls is not False

    # vLLM's extension: the chat template's own switches (`enable_thinking`...)
    chat_template_kwargs: dict[str, bool | int | float | str] | None = Field(
        default=None, max_length=16
    )

    def payload(self) -> P.Payload:
        """What the node's chat template takes: the messages, the tools, its switches."""
        messages = [m.plain() for m in self.messages]
        if not self.tools and not self.chat_template_kwargs:
            return messages
        out: dict[str, Any] = {"messages": messages}
        if self.tools:
            out["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        if self.chat_template_kwargs:
            out["template"] = self.chat_template_kwargs
        return out

    def choice(self) -> str | None:
        """tool_choice as the node takes it: none | auto | required | a name."""
        if self.tool_choice is None or not self.tools:
            return None
        if isinstance(self.tool_choice, NamedChoice):
            name = self.tool_choice.function["name"]
            if name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {name!r}, which is not in tools")
            return name
        return self.tool_choice

    def limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int]
    # 0 with echo: the prompt scored, nothing generated (as OpenAI's legacy models did)
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    # the prompt back before the answer; with logprobs, its tokens' too
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    def echoed(self) -> bool:
        return bool(self.echo)

    def payload(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
            return self.prompt[0]
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return cast("str | list[int]", self.prompt)


def first_error(e: ValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending parameter, from pydantic's report."""
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return f"We could not parse the JSON body of your request: {err['msg']}", None
    loc = [str(x) for x in err["loc"] if not isinstance(x, int)]
    # Union members add their type names to the location; keep the field path only.
    path = [
        x for x in loc if not x.startswith(("str", "list[", "int", "float", "bool", "function"))
    ]
    param = ".".join(path) or None
    if err["type"] == "missing":
        return f"Missing required parameter: '{param}'.", param
    if err["type"] == "model_type" and not path:
        return "The request body must be a JSON object.", None
    return f"Invalid value for '{param}': {err['msg']}.", param


class StageIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    node: str
    layers: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=1)]]


class PlaceRequest(BaseModel):
    """POST /v1/instances and /v1/instances/preview: every field but model optional."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    nodes: list[str] | None = None
    stages: list[StageIn] | None = Field(default=None, min_length=1)
    min_nodes: Annotated[int, Field(ge=1)] | None = None
    max_nodes: Annotated[int, Field(ge=1)] | None = None

    def spec(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)
