"""Schemathesis hooks for fuzzing ctc-serve (loaded with SCHEMATHESIS_HOOKS=tests.schemathesis_hooks).

Some rules of the API cannot be written in a schema: the prompt's tokens plus max_tokens must fit
the model's context (OpenAI's 400 `context_length_exceeded`), tool names must be unique
(`duplicate_tool_name`) and a named tool_choice must name an offered tool (`tool_not_found`). A
schema-valid request that breaks one gets that 400, which is right, so the positive-data check is
run in a form that allows exactly those answers and nothing else (run with `--exclude-checks
positive_data_acceptance`). The rules themselves are tested in tests/test_api_errors.py and
tests/test_api_features.py.
"""

from __future__ import annotations

import json

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance


UNSTATED_RULES = frozenset({"context_length_exceeded", "duplicate_tool_name", "tool_not_found"})


def _unstated_rule(response) -> bool:
    if response.status_code != 400:
        return False
    try:
        return json.loads(response.text)["error"]["code"] in UNSTATED_RULES
    except (ValueError, KeyError, TypeError):
        return False


@schemathesis.check
def positive_data_accepted_within_context(ctx, response, case):
    """positive_data_acceptance, except for a request that breaks a rule the schema cannot state."""
    if _unstated_rule(response):
        return None
    return positive_data_acceptance(ctx, response, case)
