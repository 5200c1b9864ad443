"""The OpenAPI document: a contract that clients can generate code from and fuzzers can check.

FastAPI derives most of it from the routes and the pydantic models in protocol.py; this module
adds what it cannot know and removes what is not true:
- every status the server sends, each with the OpenAI error schema (and the headers that come
  with 401 and 429), and not FastAPI's 422, which this server never sends (bad input is a 400);
- the two POST endpoints answer either JSON or, with `stream: true`, `text/event-stream`. Under
  OpenAPI 3.1 the schema of an event stream describes one event (as parsed by the SSE spec: the
  `data` field holds the payload); its `data` is the literal `[DONE]` or a JSON text whose schema,
  `contentSchema` (JSON Schema 2020-12), is the endpoint's chunk or an error object;
- facts of the served model, known once the engine is loaded: the one model id accepted, the
  vocabulary that `stop_token_ids` and `logit_bias` must come from, and the most choices (`n`)
  its batch holds;
- with an API key: the bearer scheme, on every operation that needs it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.api.protocol import ErrorResponse
from server.api.responses import ChatCompletionChunk, CompletionResponse

SCHEMAS = "#/components/schemas/"
OPEN_PATHS = frozenset({"/health", "/metrics"})  # probes and Prometheus scrape without credentials
SSE_DONE = "[DONE]"

ERROR_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON, a field out of range or of the wrong type, invalid Unicode, a "
         "prompt that does not fit the context.",
    401: "Missing or wrong API key.",
    404: "The model requested is not the one served.",
    408: "The request body did not arrive in full within the server's --request-body-timeout; the "
         "connection is closed.",
    413: "The request body is larger than the server's --max-request-bytes; the connection is closed.",
    429: "The queue is full; retry after `Retry-After` seconds.",
    500: "The engine failed on this request (a stream reports it as an error event instead).",
    503: "Not ready yet, or shutting down.",
}
ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string", "const": "Bearer"}}},
    429: {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 0},
                          "description": "Seconds to wait before retrying."}},
}
# Statuses each operation sends, besides 200 (401 is added to every protected operation with a key).
OPERATION_ERRORS = {
    ("/v1/chat/completions", "post"): (400, 404, 408, 413, 429, 500, 503),
    ("/v1/completions", "post"): (400, 404, 408, 413, 429, 500, 503),
    ("/v1/models", "get"): (503,),
    ("/health", "get"): (503,),
    ("/metrics", "get"): (),
}
STREAMS = {"/v1/chat/completions": ChatCompletionChunk, "/v1/completions": CompletionResponse}


def install_openapi(app: FastAPI, *, protected: bool) -> None:
    """Replace `app.openapi` by `build_openapi`; cached once the served model is known."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build_openapi(app, protected=protected)
            if getattr(app.state, "serving", None) is None:
                return document  # not loaded yet: the model's facts are missing, build again later
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_openapi(app: FastAPI, *, protected: bool) -> dict[str, Any]:
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(_component_schemas(ErrorResponse, *STREAMS.values()))
    if protected:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            errors = OPERATION_ERRORS[path, method]
            secured = protected and path not in OPEN_PATHS
            if secured:
                operation["security"] = [{"bearer": []}]
                errors = (401, *errors)
            operation["responses"] = {"200": operation["responses"]["200"],
                                      **{str(status): _error_response(status) for status in sorted(errors)}}
            if path in STREAMS:
                operation["responses"]["200"]["content"]["text/event-stream"] = _event_stream(STREAMS[path])
    _add_served_model(app, schemas)
    return document


def _component_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    _, top = models_json_schema([(m, "serialization") for m in models], ref_template=SCHEMAS + "{model}")
    return top.get("$defs", {})


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": SCHEMAS + ErrorResponse.__name__}}},
    }
    if status in ERROR_HEADERS:
        response["headers"] = ERROR_HEADERS[status]
    return response


def _event_stream(chunk: type[BaseModel]) -> dict[str, Any]:
    payload = {"oneOf": [{"$ref": SCHEMAS + chunk.__name__}, {"$ref": SCHEMAS + ErrorResponse.__name__}]}
    return {"schema": {
        "description": f"With `stream: true`: one event per chunk, then an event whose data is `{SSE_DONE}`. A failure "
                       "after the stream has started is an event holding an error object, then `[DONE]`.",
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"type": "string", "const": SSE_DONE},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
        ]}},
    }}


def _add_served_model(app: FastAPI, schemas: dict[str, Any]) -> None:
    """The served model's id and vocabulary bound the request fields that name them."""
    serving = getattr(app.state, "serving", None)
    if serving is None:
        return
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        properties = schemas[request]["properties"]
        properties["model"]["anyOf"][0]["enum"] = [serving.model_name]
        properties["stop_token_ids"]["anyOf"][0]["items"]["maximum"] = serving.vocab_size - 1
        properties["logit_bias"]["anyOf"][0]["propertyNames"]["pattern"] = decimal_below(serving.vocab_size)
        properties["n"]["maximum"] = serving.max_choices


def decimal_below(n: int) -> str:
    """A regular expression for the decimal integers 0 to n - 1 (no leading zeros), n >= 1."""
    digits = str(n - 1)
    options = ["0"] if len(digits) > 1 else []
    if len(digits) > 2:
        options.append(f"[1-9][0-9]{{0,{len(digits) - 2}}}")  # every shorter number
    elif len(digits) == 2:
        options.append("[1-9]")
    for i, d in enumerate(digits):  # same length: equal up to digit i, then smaller there
        low = "1" if i == 0 and len(digits) > 1 else "0"
        if int(d) > int(low):
            options.append(f"{digits[:i]}[{low}-{int(d) - 1}][0-9]{{{len(digits) - i - 1}}}")
    options.append(digits)
    return "^(" + "|".join(options) + ")$"
