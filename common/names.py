"""Names that arrive from outside and become paths or keys: checked in one place."""

from __future__ import annotations

import re

# The hub's rules for a repo id (huggingface_hub's validate_repo_id): an optional
# namespace and a name of word characters, "-" and ".", no "--" or "..", at most
# 96 characters each. So no id is a path: it cannot leave the models folder.
REPO_ID = re.compile(r"(?:[\w.-]{1,96}/)?[\w.-]{1,96}", re.ASCII)


def valid_model_id(model_id: str) -> bool:
    return (
        isinstance(model_id, str)
        and REPO_ID.fullmatch(model_id) is not None
        and "--" not in model_id
        and ".." not in model_id
        and not model_id.startswith((".", "-"))
        and not model_id.endswith((".", "-", ".git"))
        and "/." not in model_id
    )
