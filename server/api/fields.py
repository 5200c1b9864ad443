"""Field types shared by the request schemas (protocol.py, tools.py): strict, bounded, valid Unicode.

Types are strict, as OpenAI's are: no numeric strings, no booleans as numbers, no NaN or infinity;
every integer has a range, so nothing reaches torch as an int64 overflow; text must be valid
Unicode (JSON's `\\ud800` escape decodes to a lone surrogate, which no tokenizer can encode). Each
type's JSON schema states exactly what it accepts: the OpenAPI document is built from them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, WithJsonSchema

from server.engine.types import MAX_CHOICES, MAX_TOP_LOGPROBS

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
# Bound of token counts, ids and top_k: above any context length or vocabulary in use (the largest
# vocabularies have ~262k tokens), far below where an int64 tensor would overflow.
MAX_TOKEN_COUNT = 1 << 20
# seed: an integer that every JSON parser reads exactly. Beyond 2**53 - 1, parsers and schema
# validators that read numbers as doubles (JavaScript's, many others: RFC 7493) round them, so a
# bound there is not one that clients can check.
MAX_SAFE_INTEGER = (1 << 53) - 1
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, 100 forces it
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # function and schema names, as OpenAI allows them
TOKEN_ID_KEY = r"^(0|[1-9][0-9]{0,6})$"  # a token id as a JSON object key (the served vocabulary narrows it)


def valid_unicode(text: str) -> str:
    """`text`, if it is valid Unicode; else a ValueError naming the first lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid Unicode: lone surrogate \\u{ord(text[exc.start]):04x} at character {exc.start} "
                         "(a JSON \\uXXXX escape of half a surrogate pair)") from None
    return text


def _integral(value: Any) -> Any:
    """10.0 is the integer 10, as in JSON Schema (the OpenAPI document's language); 10.5 stays a number."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def valid_json_text(value: Any) -> Any:
    """`value` (a JSON value, e.g. a JSON schema), if every string in it is valid Unicode."""
    if isinstance(value, str):
        valid_unicode(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            valid_unicode(key)
            valid_json_text(item)
    elif isinstance(value, list):
        for item in value:
            valid_json_text(item)
    return value


def _not_supported(value: Any) -> Any:
    if value is not None:
        raise ValueError("not supported by this server; leave it out (or send null)")
    return value


Text = Annotated[str, AfterValidator(valid_unicode)]
JsonObject = Annotated[dict[str, Any], AfterValidator(valid_json_text)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
# An OpenAI field this server does not implement: only null (or leaving it out) is accepted.
Unsupported = Annotated[Any, WithJsonSchema({"type": "null"}), AfterValidator(_not_supported)]
IntegralFloat = BeforeValidator(_integral)  # strict otherwise: no strings, no booleans as integers


# Integer fields: the bounds go before the validator, so that the JSON schema states them.
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKEN_COUNT), IntegralFloat]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_COUNT), IntegralFloat]
TopK = Annotated[int, Field(ge=-1, le=MAX_TOKEN_COUNT), IntegralFloat]
Seed = Annotated[int, Field(ge=-MAX_SAFE_INTEGER, le=MAX_SAFE_INTEGER), IntegralFloat]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), IntegralFloat]
Choices = Annotated[int, Field(ge=1, le=MAX_CHOICES), IntegralFloat]
LOGIT_BIAS_SCHEMA = {"type": "object", "propertyNames": {"pattern": TOKEN_ID_KEY},
                     "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS, "maximum": MAX_LOGIT_BIAS}}
LogitBias = Annotated[dict[Annotated[str, Field(pattern=TOKEN_ID_KEY)],
                           Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
                      WithJsonSchema(LOGIT_BIAS_SCHEMA)]


def with_rules(schema: dict[str, Any], cls: type) -> None:
    """JSON schema hook: a request class's `schema_rules` become its schema's `allOf`."""
    rules = getattr(cls, "schema_rules", ())
    if rules:
        schema["allOf"] = list(rules)
