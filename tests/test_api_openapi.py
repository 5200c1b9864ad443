"""The OpenAPI document is a contract: real responses of every kind validate against it.

Each response the app sends (JSON bodies, each SSE event of a stream and the JSON inside it, and
every error status) is checked with jsonschema against the schema that the document declares for
that path, status and media type; a status the document does not declare fails the test. The
fuzzing of the whole document against a real server is tests/test_api_fuzz.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.fakes import FakeEngineCore, api_client, chat_body, sse_payloads

jsonschema = pytest.importorskip("jsonschema")

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}


def validate(doc: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    """Validate `instance` against `schema`, with the document's components for its $refs."""
    jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(instance)


def check(doc: dict[str, Any], method: str, path: str, response: httpx.Response) -> None:
    """The response's status, content type and body (every event of a stream) conform to `doc`."""
    responses = doc["paths"][path][method]["responses"]
    assert str(response.status_code) in responses, f"{method} {path}: undocumented {response.status_code}"
    declared = responses[str(response.status_code)]
    media = response.headers["content-type"].split(";")[0]
    assert media in declared["content"], f"{media} not among {list(declared['content'])}"
    for header, spec in declared.get("headers", {}).items():
        assert not spec.get("required") or header.lower() in response.headers
    schema = declared["content"][media]["schema"]
    if media == "application/json":
        validate(doc, schema, response.json())
    elif media == "text/event-stream":
        payloads = sse_payloads(response.text)
        assert payloads[-1] == "[DONE]"
        payload_schema = schema["properties"]["data"]["anyOf"][1]["contentSchema"]
        for payload in payloads:
            validate(doc, schema, {"data": payload})
            if payload != "[DONE]":
                validate(doc, payload_schema, json.loads(payload))
    else:
        assert isinstance(response.text, str)


async def test_the_document_states_what_the_server_does() -> None:
    async with api_client(FakeEngineCore(), api_key=KEY) as (client, _):
        doc = (await client.get("/openapi.json", headers=AUTH)).json()
    assert doc["openapi"].startswith("3.1")
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)  # the server answers bad input with 400
            assert ("security" in operation) == (path not in ("/health", "/metrics"))
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(chat) == {"200", "400", "401", "404", "408", "413", "429", "500", "503"}
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["429"]["headers"]["Retry-After"]["required"]
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    request = schemas["CompletionRequest"]["properties"]
    assert {s["type"] for s in request["stop"]["anyOf"]} == {"string", "array", "null"}  # a string is accepted
    assert request["model"]["anyOf"][0]["enum"] == ["demo-llama"]  # the one model served
    assert request["stop_token_ids"]["anyOf"][0]["items"]["maximum"] == 4095  # its vocabulary
    assert request["top_k"]["anyOf"][0]["maximum"] == 1 << 20
    assert schemas["ChatCompletionRequest"]["allOf"]  # top_logprobs needs logprobs; stream_options, stream


async def test_real_responses_validate_against_the_document() -> None:
    core = FakeEngineCore(max_batch_size=1)
    async with api_client(core, api_key=KEY, max_queue=0, max_request_bytes=4096) as (client, app):
        doc = (await client.get("/openapi.json", headers=AUTH)).json()

        async def post(path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
            response = await client.post(path, json=body, headers={**AUTH, **headers})
            check(doc, "post", path, response)
            return response

        logprobs = dict(logprobs=True, top_logprobs=2)
        for stream in (False, True):
            await post("/v1/chat/completions", chat_body("hello there", stream=stream, **logprobs))
            await post("/v1/chat/completions", chat_body("hi", stream=stream, stop="e", max_tokens=3,
                                                         **({"stream_options": {"include_usage": True}} if stream else {})))
            await post("/v1/completions", {"prompt": "one two", "stream": stream, "logprobs": 3})
        statuses = {
            (await post("/v1/completions", {"prompt": "hi", "max_tokens": 0})).status_code,
            (await post("/v1/completions", {"prompt": "hi", "model": "gpt-9"})).status_code,
            (await post("/v1/completions", {"prompt": "hi"}, Authorization="Bearer nope")).status_code,
            (await post("/v1/completions", {"prompt": "x" * 5000})).status_code,  # over max_request_bytes
        }
        core.fail_marker = "poison"
        statuses.add((await post("/v1/completions", {"prompt": "poison"})).status_code)
        await post("/v1/completions", {"prompt": "poison", "stream": True})  # an error event, then [DONE]
        core.paused.set()  # one request holds the only slot; with no queue, the next is refused
        held = asyncio.create_task(client.post("/v1/completions", json={"prompt": "a"}, headers=AUTH))
        while app.state.engine.stats.num_running != 1:
            await asyncio.sleep(0.005)
        statuses.add((await post("/v1/completions", {"prompt": "b"})).status_code)
        core.paused.clear()
        await held
        for path in ("/v1/models", "/health", "/metrics"):
            check(doc, "get", path, await client.get(path, headers=AUTH))
        await app.state.engine.shutdown()
        statuses.add((await post("/v1/completions", {"prompt": "late"})).status_code)
        check(doc, "get", "/health", await client.get("/health"))
    assert statuses == {400, 404, 401, 413, 500, 429, 503}  # 408 needs a socket: test_api_limits.py


async def test_docs_need_the_api_key() -> None:
    async with api_client(FakeEngineCore(), api_key=KEY) as (client, _):
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert (await client.get(path)).status_code == 401
            assert (await client.get(path, headers=AUTH)).status_code == 200
        assert (await client.get("/nowhere")).status_code == 401  # no route is shown without the key
    async with api_client(FakeEngineCore()) as (client, _):
        assert (await client.get("/openapi.json")).status_code == 200
