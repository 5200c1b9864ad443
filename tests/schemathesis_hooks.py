"""Schemathesis hooks for fuzzing ctc-serve (loaded with SCHEMATHESIS_HOOKS=tests.schemathesis_hooks).

One rule of the API cannot be written in a schema: the prompt's tokens plus max_tokens must fit
the model's context. A schema-valid request that breaks it gets OpenAI's 400
`context_length_exceeded`, which is right, so the positive-data check is run in a form that
allows exactly that answer and nothing else (run with `--exclude-checks positive_data_acceptance`).
The rule itself is tested in tests/test_api_errors.py.
"""

from __future__ import annotations

import json

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance


def _context_exceeded(response) -> bool:
    if response.status_code != 400:
        return False
    try:
        return json.loads(response.text)["error"]["code"] == "context_length_exceeded"
    except (ValueError, KeyError, TypeError):
        return False


@schemathesis.check
def positive_data_accepted_within_context(ctx, response, case):
    """positive_data_acceptance, except for a prompt plus max_tokens longer than the context."""
    if _context_exceeded(response):
        return None
    return positive_data_acceptance(ctx, response, case)
