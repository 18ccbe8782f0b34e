"""A token as OpenAI's log probabilities show it: its text and its bytes (a
token may hold part of a character: its text alone would lose them)."""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

HEX_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece's byte fallback


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, back to bytes: printable bytes stand for
    themselves, the others are the characters from U+0100 on."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def raw_bytes(piece: str) -> bytes:
    """A vocabulary entry's bytes: a byte-level BPE piece, a sentencepiece byte
    (<0x0A>) or word piece (▁ for a space)."""
    if m := HEX_BYTE.match(piece):
        return bytes([int(m.group(1), 16)])
    decode = byte_decoder()
    if all(c in decode for c in piece):
        return bytes(decode[c] for c in piece)
    return piece.replace("\u2581", " ").encode()


def entry(tokenizer: TokenizerWrapper, token: int, hidden: frozenset[int]) -> dict[str, Any]:
    """{"token": its text, "bytes": its bytes (None for a special token)}."""
    text = tokenizer.decode([token])
    if token in hidden:
        return {"token": text, "bytes": None}
    if "\ufffd" not in text:
        return {"token": text, "bytes": list(text.encode())}
    piece = tokenizer._tokenizer.convert_ids_to_tokens(token)
    return {"token": text, "bytes": list(raw_bytes(str(piece)))}
