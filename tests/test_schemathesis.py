"""schemathesis against the API: requests built from OpenAPI schemas, valid and
not, never get a 5xx, and error bodies on OpenAI's paths are OpenAI's shape.

Two documents: the one the API serves (every face's paths and parameters), and
OpenAI's own for the bodies of chat completions and completions (an extract:
tests/data/openai_subset.py), sent at a real model with small token limits so
that every generated field reaches the engine. Operations that would start work
beyond one answer (pulls, placements) and the live event stream are left out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from exo.tools.cluster import LocalCluster

LEFT_OUT = r"pull|instances|cancel|events|/api/(delete|copy|create|push)"
OPENAI = Path(__file__).parent / "data" / "openai-chat.json"
TINY = "test/tiny-llama"


def fuzz(
    cluster: LocalCluster,
    schema: Any,
    adapt: Callable[[Any], None],
    examples: int,
    openai_paths: str,
) -> int:
    """Each operation of `schema`, in both generation modes: the cases sent. Errors
    on paths under `openai_paths` must have OpenAI's body."""
    sent = 0
    operations = [r.ok() for r in schema.get_all_operations()]
    for op, mode in [(op, mode) for op in operations for mode in schemathesis.GenerationMode]:

        @given(case=op.as_strategy(mode))
        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def one(case: Any) -> None:
            nonlocal sent
            adapt(case)
            r = case.call(timeout=120, headers=cluster.api_headers())
            sent += 1
            where = f"{case.method} {case.formatted_path}"
            assert r.status_code < 500, (where, case.body, r.status_code, r.text[:300])
            if r.status_code >= 400 and case.path.startswith(openai_paths) and r.content:
                err = r.json().get("error")
                assert isinstance(err, dict) and {"message", "type"} <= set(err), (where, r.text)

        try:
            one()
        except Unsatisfiable:
            assert mode == schemathesis.GenerationMode.NEGATIVE  # nothing to get wrong
    return sent


def test_no_request_built_from_the_served_schema_gets_a_server_error(
    cluster: LocalCluster,
) -> None:
    served = schemathesis.openapi.from_url(f"{cluster.url}/openapi.json")
    schema = served.exclude(path_regex=LEFT_OUT)
    assert len(list(schema.get_all_operations())) >= 19  # every face's
    assert fuzz(cluster, schema, lambda case: None, 15, "/v1/") >= 40


def test_no_body_built_from_openais_schema_gets_a_server_error(cluster: LocalCluster) -> None:
    schema = schemathesis.openapi.from_path(OPENAI)
    schema.config.update(base_url=f"{cluster.url}/v1")

    def at_a_real_model(case: Any) -> None:
        body = case.body
        if isinstance(body, dict):
            body["model"] = TINY
            for k in ("max_tokens", "max_completion_tokens"):
                if isinstance(body.get(k), int):
                    body[k] = min(body[k], 4)
            body.setdefault("max_tokens", 4)
            if isinstance(body.get("n"), int):
                body["n"] = min(body["n"], 2)

    assert fuzz(cluster, schema, at_a_real_model, 25, "/") >= 60
