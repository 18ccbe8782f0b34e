"""Tool calls: the model's own tool-call syntax, out of its text and into calls.

The chat template renders the request's tools; the tokenizer knows the model's
markers and parser (mlx-lm's `tool_parsers`, picked from the chat template).
While a request with tools generates, text from a start marker on is held back
(`ToolText`) and parsed into calls at the end: the client gets them as calls,
never as content. A forced choice (`tool_choice` required, or a named function)
is held by constrained decoding (`forced_grammar`): the output is one call of
an allowed function whose arguments follow its parameters' schema.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

from exo.broker.protocol import Payload
from exo.common.json_schema import closed

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger(__name__)


def chat_parts(payload: Payload) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A chat payload: a list of messages, or {messages, tools?, template?}."""
    if isinstance(payload, dict):
        return list(payload.get("messages") or []), payload.get("tools") or None
    return list(payload), None


def template_kwargs(payload: Payload) -> dict[str, Any]:
    """The chat template's own switches a request sets (`enable_thinking`...):
    plain values only."""
    given = payload.get("template") if isinstance(payload, dict) else None
    if not isinstance(given, dict):
        return {}
    return {
        str(k)[:64]: v
        for k, v in list(given.items())[:16]
        if isinstance(v, bool | int | float | str) and k not in ("messages", "tools")
    }


class ToolText:
    """Holds back a tool call's text from the content and parses it at the end."""

    def __init__(self, tokenizer: TokenizerWrapper, tools: list[dict[str, Any]]) -> None:
        self.start = tokenizer.tool_call_start
        self.end: str = getattr(tokenizer, "tool_call_end", None) or ""
        self.parse = tokenizer._tool_parser
        self.tools = tools
        self.held = ""  # from the first start marker on
        self.tail = ""  # content that may be the beginning of a start marker

    def feed(self, text: str) -> str:
        """Content safe to emit now."""
        if self.held:
            self.held += text
            return ""
        text = self.tail + text
        at = text.find(self.start)
        if at >= 0:
            self.held, self.tail = text[at:], ""
            return text[:at]
        keep = next(
            (n for n in range(min(len(self.start) - 1, len(text)), 0, -1)
             if self.start.startswith(text[-n:])),
            0,
        )  # fmt: skip
        self.tail = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def calls(self) -> tuple[list[dict[str, Any]], str]:
        """-> the calls parsed out of the held text (OpenAI's shape), and any text
        left over that was no call (emitted as content after all)."""
        out: list[dict[str, Any]] = []
        rest = self.held
        while rest.startswith(self.start):
            body = rest[len(self.start) :]
            cut = body.find(self.end) if self.end else -1
            segment, rest = (
                (body[:cut], body[cut + len(self.end) :].lstrip()) if cut >= 0 else (body, "")
            )
            try:
                got = self.parse(segment, self.tools)
            except Exception as e:  # parsers raise what json and regexes raise
                log.info("a tool call that did not parse: %s", e)
                return out, self.held if not out else rest
            for call in got if isinstance(got, list) else [got]:
                out.append(
                    {
                        "id": f"call_{uuid.uuid4().hex[:24]}",
                        "type": "function",
                        "function": {
                            "name": str(call.get("name", "")),
                            "arguments": json.dumps(call.get("arguments", {})),
                        },
                    }
                )
        return out, self.tail + rest


def forced_grammar(
    tokenizer: TokenizerWrapper, tools: list[dict[str, Any]], choice: str
) -> str | None:
    """A lark grammar holding the output to one call (tool_choice "required": of
    any tool; else the named one), in the model's own syntax; None when the model's
    syntax is not the JSON one (`<tool_call>{"name", "arguments"}</tool_call>`)."""
    if getattr(tokenizer, "tool_call_start", None) != "<tool_call>":
        return None
    names = [t["function"]["name"] for t in tools if "function" in t]
    wanted = names if choice == "required" else [choice]
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                # closed: a function takes the arguments it declares (a weak model
                # would add keys until max_tokens cut the call)
                "arguments": closed(t["function"].get("parameters") or {"type": "object"}),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
        if t.get("function", {}).get("name") in wanted
    ]
    if not options:
        raise ValueError(f"tool_choice: no tool named {choice!r}")
    schema = {"anyOf": options, "x-guidance": {"whitespace_flexible": False}}
    return f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {json.dumps(schema)}\n'
