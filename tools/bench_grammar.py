"""bench grammar: what holding output to a JSON schema costs.

- libraries: the grammar libraries side by side on the model's own tokenizer and
  one schema, stepping through a valid document token by token: the time to
  compile the schema and, per token, to compute the mask of allowed tokens and
  accept the sampled one. llguidance is the engine's; outlines-core is measured
  when installed (a dev dependency); xgrammar is not (its matcher takes torch
  tensors: its wheel requires torch and, on Linux, triton).
- decode: 1 and 8 streams through a cluster, each asking for a long list under a
  `json_schema` response format, beside the same streams unconstrained
  (ignore_eos, the same length); decode tokens/s per stream, alternated rounds.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from exo.tools.cluster import api_headers

# A long answer under a schema: the streams keep decoding until max_tokens.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "steps": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "n": {"type": "integer"},
                    "action": {"type": "string", "maxLength": 80},
                    "done": {"type": "boolean"},
                },
                "required": ["n", "action", "done"],
                "additionalProperties": False,
            },
            "minItems": 12,
        },
    },
    "required": ["title", "steps"],
    "additionalProperties": False,
}
DOC = {
    "title": "Set up a cluster of three machines",
    "steps": [
        {
            "n": i,
            "action": f"connect machine {i} to the switch and start its node",
            "done": i % 2 == 0,
        }
        for i in range(12)
    ],
}
PROMPT = "List the steps to set up a home cluster of Macs for running language models, as JSON."


def _bytes_vocab(tok: Any) -> dict[bytes, list[int]]:
    """Each token's bytes (outlines-core's vocabulary), special tokens left out."""
    from exo.nodes.engine.tokens import raw_bytes

    special = set(tok.all_special_ids)
    out: dict[bytes, list[int]] = {}
    for text, i in tok.get_vocab().items():
        if i not in special:
            out.setdefault(raw_bytes(text), []).append(i)
    return out


def _per_token(step: Any, ids: list[int]) -> list[float]:
    times = []
    for t in ids:
        t0 = time.perf_counter()
        step(t)
        times.append((time.perf_counter() - t0) * 1e6)
    return times


def _llguidance(tok: Any, vocab: int, ids: list[int]) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lln

    t0 = time.perf_counter()
    view = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    t1 = time.perf_counter()
    spec = {**SCHEMA, "x-guidance": {"whitespace_flexible": False}}
    matcher = llguidance.LLMatcher(
        view, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec))
    )
    bits = lln.allocate_token_bitmask(1, vocab)
    lln.fill_next_token_bitmask(matcher, bits, 0)
    t2 = time.perf_counter()

    def step(t: int) -> None:
        lln.fill_next_token_bitmask(matcher, bits, 0)
        assert matcher.consume_token(t), "llguidance refused a token of a valid document"

    return _row("llguidance", t1 - t0, t2 - t1, _per_token(step, ids))


def _outlines(tok: Any, vocab: int, ids: list[int]) -> dict[str, Any]:
    import numpy as np
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    words = _bytes_vocab(tok)
    words.pop(tok.decode([tok.eos_token_id]).encode(), None)
    voc = Vocabulary(tok.eos_token_id, words)
    t1 = time.perf_counter()
    # compact, as the engine holds llguidance to
    guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA), r""), voc))
    mask = np.zeros((vocab + 31) // 32, dtype=np.int32)
    guide.write_mask_into(mask.ctypes.data, mask.size, 4)
    t2 = time.perf_counter()

    def step(t: int) -> None:
        guide.write_mask_into(mask.ctypes.data, mask.size, 4)
        guide.advance(t)

    return _row("outlines-core", t1 - t0, t2 - t1, _per_token(step, ids))


def _row(name: str, view_s: float, compile_s: float, times: list[float]) -> dict[str, Any]:
    times = sorted(times)
    return {
        "library": name,
        "tokenizer_s": round(view_s, 3),
        "compile_s": round(compile_s, 3),
        "tokens": len(times),
        "median_us": round(statistics.median(times), 1),
        "p99_us": round(times[min(len(times) - 1, int(len(times) * 0.99))], 1),
        "max_us": round(times[-1], 1),
    }


def libraries(path: Path) -> list[dict[str, Any]]:
    """Each grammar library on the model's tokenizer, the same schema and document."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    vocab = len(tok)
    ids = tok.encode(json.dumps(DOC, separators=(",", ":")), add_special_tokens=False)
    rows = [_llguidance(tok, vocab, ids)]
    try:
        rows.append(_outlines(tok, vocab, ids))
    except ImportError as e:
        rows.append({"library": "outlines-core", "skipped": f"does not import: {e}"})
    # xgrammar's matcher fills torch tensors: its wheel requires torch (and triton on
    # Linux), gigabytes a node would carry for this alone; not a dependency here.
    rows.append({"library": "xgrammar", "skipped": "its matcher needs torch (not installed)"})
    return rows


def _stream(base: str, model: str, constrained: bool, max_tokens: int, out: list[float]) -> None:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": 7,
        "stream": True,
        "return_token_ids": True,
    }
    if constrained:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "steps", "schema": SCHEMA, "strict": True},
        }
    else:
        body["ignore_eos"] = True
    times: list[float] = []
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers=api_headers(), timeout=600
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
                times.extend([time.perf_counter()] * len(ids))
    if len(times) > 8:
        out.append((len(times) - 1) / (times[-1] - times[0]))


def decode(base: str, model: str, streams: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    """Per-stream decode tokens/s, constrained and free, `rounds` alternated pairs."""
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for constrained in (False, True):
            got: list[float] = []
            threads = [
                threading.Thread(target=_stream, args=(base, model, constrained, max_tokens, got))
                for _ in range(streams)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rates[constrained].extend(got)
    free, held = statistics.median(rates[False]), statistics.median(rates[True])
    return {
        "streams": streams,
        "free_tok_s": round(free, 2),
        "schema_tok_s": round(held, 2),
        "ratio": round(held / free, 3),
    }


def report(res: dict[str, Any]) -> None:
    print(f"machine: {res['machine']}   model: {res['model']}")
    print(f"{'library':<14} {'tokenizer s':>11} {'compile s':>9} {'mask+accept us':>22}")
    for r in res["libraries"]:
        if "skipped" in r:
            print(f"{r['library']:<14} skipped: {r['skipped']}")
            continue
        per = f"{r['median_us']} median, {r['p99_us']} p99"
        print(f"{r['library']:<14} {r['tokenizer_s']:>11} {r['compile_s']:>9} {per:>22}")
    print(f"{'streams':>7} {'free tok/s':>11} {'schema tok/s':>13} {'ratio':>6}  (per stream)")
    for d in res["decode"]:
        print(f"{d['streams']:>7} {d['free_tok_s']:>11} {d['schema_tok_s']:>13} {d['ratio']:>6}")
