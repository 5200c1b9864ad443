"""Every error is OpenAI-shaped with the right status: 400, 401, 404, 405, 429, 500, 503."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from server.api.app import create_app
from tests.fakes import (  # noqa: F401 (fixture)
    FakeEngineCore,
    api_client,
    chat_body,
    make_settings,
    sse_payloads,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize(
    ("path", "content", "message", "param"),
    [
        ("/v1/chat/completions", b"{not json", "not valid JSON", None),
        ("/v1/chat/completions", b"[1, 2]", "valid dictionary", None),
        ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "finite number", "temperature"),
        ("/v1/chat/completions", b"{}", "messages: Field required", "messages"),
        ("/v1/chat/completions", json.dumps(chat_body("x", n=17)), "less than or equal to 16", "n"),
        ("/v1/completions", json.dumps({"prompt": "x", "n": 2, "best_of": 3}), "best_of=3 is not supported", "best_of"),
        ("/v1/chat/completions", json.dumps(chat_body("x", wizardry=1)), "unknown field", "wizardry"),
        ("/v1/chat/completions", json.dumps(chat_body("x", audio={"voice": "x"})), "not supported", "audio"),
        ("/v1/chat/completions", json.dumps(chat_body("x", tool_choice="required")), "needs tools", None),
        ("/v1/chat/completions", json.dumps(chat_body("x", top_logprobs=2)), "needs logprobs", None),
        ("/v1/chat/completions", json.dumps(chat_body("x", presence_penalty=3)), "less than or equal to 2",
         "presence_penalty"),
        ("/v1/chat/completions", json.dumps(chat_body("x", stop=["a"] * 5)), "at most 4 stop", "stop"),
        ("/v1/chat/completions", json.dumps(chat_body("x", temperature="hot")), "temperature", "temperature"),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "role", None),
        ("/v1/completions", json.dumps({"prompt": ["a", "b"]}), "batched prompts", "prompt"),
        ("/v1/completions", json.dumps({"prompt": [[1, 2]]}), "token-id prompts", "prompt"),
        ("/v1/completions", json.dumps({"prompt": ""}), "must not be empty", "prompt"),
    ],
)
async def test_bad_requests_are_400(path: str, content: str | bytes, message: str, param: str | None) -> None:
    async with api_client(FakeEngineCore()) as (client, _):
        response = await client.post(path, content=content, headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert message in error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("path", "body", "message", "param"),
    [
        # Found by probing as an operator (issue 15): each was a 500 or was accepted.
        ("/v1/completions", {"prompt": "hi", "top_k": 2**63}, "less than or equal to 1048576", "top_k"),
        ("/v1/completions", {"prompt": "\ud800"}, "invalid Unicode: lone surrogate \\ud800", "prompt"),
        ("/v1/completions", {"prompt": ["a\udfff"]}, "invalid Unicode", "prompt"),
        ("/v1/completions", {"prompt": "hi", "model": "x\ud800"}, "invalid Unicode", "model"),
        ("/v1/completions", {"prompt": "hi", "stop": "\ud800"}, "invalid Unicode", "stop.0"),
        ("/v1/completions", {"prompt": "hi", "user": "\udc00"}, "invalid Unicode", "user"),
        ("/v1/chat/completions", chat_body("\ud800"), "invalid Unicode", "messages.0.content"),
        ("/v1/chat/completions", chat_body([{"type": "text", "text": "\ud800"}]), "invalid Unicode",
         "messages.0.content"),
        ("/v1/completions", {"prompt": "hi", "seed": False}, "valid integer, got a boolean", "seed"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "10"}, "valid integer, got a string", "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10.5}, "valid integer, got a number", "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "temperature": "1"}, "valid number, got a string", "temperature"),
        ("/v1/completions", {"prompt": "hi", "stream": "true"}, "valid boolean, got a string", "stream"),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [4096]}, "4096 is not a token id", "stop_token_ids"),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [-1]}, "greater than or equal to 0",
         "stop_token_ids.0"),
        ("/v1/completions", {"prompt": "hi", "seed": 2**63}, "less than or equal to", "seed"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2**64}, "less than or equal to", "max_tokens"),
        ("/v1/chat/completions", chat_body("x", logprobs=True, top_logprobs=True), "got a boolean", "top_logprobs"),
    ],
)
async def test_bad_values_are_400_naming_the_field(path: str, body: dict, message: str, param: str) -> None:
    async with api_client(FakeEngineCore()) as (client, _):
        # json.dumps writes lone surrogates as \ud800 escapes, as a client's JSON encoder would.
        response = await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert message in error["message"] and error["param"] == param


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "text/plain; charset=utf-8"])
async def test_a_body_that_is_not_json_is_a_clear_400(content_type: str) -> None:
    async with api_client(FakeEngineCore()) as (client, _):
        response = await client.post("/v1/completions", content=json.dumps({"prompt": "hi"}),
                                     headers={"content-type": content_type})
    error = error_of(response, 400)
    assert "must be JSON" in error["message"] and content_type in error["message"]
    assert error["code"] == "invalid_content_type"


async def test_missing_content_type_is_still_json() -> None:
    async with api_client(FakeEngineCore()) as (client, _):
        response = await client.post("/v1/completions", content=json.dumps({"prompt": "hi"}))
    assert response.status_code == 200


async def test_context_limits_are_400_with_the_numbers() -> None:
    async with api_client(FakeEngineCore(max_model_len=32)) as (client, _):
        too_long = await client.post("/v1/completions", json={"prompt": " ".join(["word"] * 40)})
        too_many = await client.post("/v1/completions", json={"prompt": "one two", "max_tokens": 31})
    error = error_of(too_long, 400)
    assert "32 tokens" in error["message"] and "prompt has 40 tokens" in error["message"]
    assert error["code"] == "context_length_exceeded"
    error = error_of(too_many, 400)
    assert "32 tokens" in error["message"] and "33 tokens (2 in the prompt, 31 for the completion)" in error["message"]
    assert "at most 30" in error["message"] and error["param"] == "max_tokens"


async def test_engine_refusal_is_400() -> None:
    core = FakeEngineCore()
    core.refuse_marker = "forbidden"
    async with api_client(core) as (client, _):
        error = error_of(await client.post("/v1/completions", json={"prompt": "forbidden"}), 400)
    assert "refuses" in error["message"]


async def test_unknown_model_route_and_method() -> None:
    async with api_client(FakeEngineCore()) as (client, _):
        model = error_of(await client.post("/v1/chat/completions", json=chat_body("x", model="gpt-9")), 404)
        route = error_of(await client.get("/v1/nothing"), 404)
        method = error_of(await client.get("/v1/chat/completions"), 405)
    assert model["code"] == "model_not_found" and "gpt-9" in model["message"] and model["param"] == "model"
    assert route["message"] == "Not Found" and method["message"] == "Method Not Allowed"


async def test_api_key() -> None:
    async with api_client(FakeEngineCore(), api_key="sekrit") as (client, _):
        missing = await client.post("/v1/completions", json={"prompt": "hi"})
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        bad_json = await client.post("/v1/completions", content=b"{", headers={"Authorization": "Bearer x"})
        right = await client.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer sekrit"})
        open_paths = [await client.get("/health"), await client.get("/metrics")]
    for response in (missing, wrong, bad_json):
        error = error_of(response, 401)
        assert error["code"] == "invalid_api_key" and response.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 200 and all(r.status_code == 200 for r in open_paths)


async def test_queue_full_is_429_with_retry_after() -> None:
    core = FakeEngineCore(max_batch_size=1)
    core.paused.set()
    async with api_client(core, max_queue=1) as (client, app):
        first = asyncio.create_task(client.post("/v1/completions", json={"prompt": "a"}))
        second = asyncio.create_task(client.post("/v1/completions", json={"prompt": "b"}))
        async with asyncio.timeout(10):  # both in: one in the batch, one in the queue
            while (app.state.engine.stats.num_running, app.state.engine.stats.num_waiting) != (1, 1):
                await asyncio.sleep(0.005)
        refused = await client.post("/v1/completions", json={"prompt": "c"})
        core.paused.clear()
        assert (await first).status_code == 200 and (await second).status_code == 200
    error = error_of(refused, 429)
    assert refused.headers["retry-after"] == "1" and error["code"] == "queue_full"


async def test_not_ready_and_shutting_down_are_503() -> None:
    app = create_app(make_settings(), FakeEngineCore())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/health")).status_code == 503  # lifespan not started: not loaded
        error_of(await client.post("/v1/completions", json={"prompt": "hi"}), 503)
        async with app.router.lifespan_context(app):
            assert (await client.get("/health")).status_code == 200
            await app.state.engine.shutdown()
            error_of(await client.get("/health"), 503)
            error = error_of(await client.post("/v1/completions", json={"prompt": "hi"}), 503)
    assert error["type"] == "server_error"


async def test_a_stream_cut_short_by_shutdown_ends_with_an_error_event() -> None:
    core = FakeEngineCore(tokens_per_step=1)
    core.pause_after = 2
    async with api_client(core) as (client, app):
        response = asyncio.create_task(client.post("/v1/completions", json={"prompt": "a b c d", "stream": True}))
        while not core.paused.is_set():
            await asyncio.sleep(0.01)
        await app.state.engine.drain(timeout_s=0.1)
        payloads = sse_payloads((await response).text)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert "shutting down" in error["message"] and error["type"] == "server_error"
    assert json.loads(payloads[0])["choices"][0]["text"]  # what came before the shutdown was sent


async def test_unexpected_error_is_a_generic_500(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def explode(*args: object) -> None:
        raise RuntimeError("secret internal detail")

    async with api_client(FakeEngineCore()) as (client, app):
        monkeypatch.setattr(app.state.serving, "completion", explode)
        response = await client.post("/v1/completions", json={"prompt": "hi"})
    error = error_of(response, 500)
    assert error["message"] == "internal server error" and "secret" not in response.text
    assert "secret internal detail" in caplog.text  # the traceback stays in the server log


async def test_failing_request_does_not_affect_others() -> None:
    core = FakeEngineCore(max_batch_size=8)
    core.fail_marker = "poison"
    async with api_client(core) as (client, _):
        good = [client.post("/v1/completions", json={"prompt": f"healthy request {i}"}) for i in range(4)]
        bad = client.post("/v1/completions", json={"prompt": "poison pill"})
        bad_stream = client.post("/v1/completions", json={"prompt": "poison pill", "stream": True})
        *good_responses, bad_response, stream_response = await asyncio.gather(*good, bad, bad_stream)
        after = await client.post("/v1/completions", json={"prompt": "still alive"})
    for i, response in enumerate(good_responses):
        assert response.json()["choices"][0]["text"] == f"healthy request {i}"
    assert error_of(bad_response, 500)["type"] == "server_error"
    payloads = sse_payloads(stream_response.text)
    assert payloads[-1] == "[DONE]" and json.loads(payloads[-2])["error"]["type"] == "server_error"
    assert json.loads(payloads[0])["choices"][0]["text"]  # it had streamed text before failing
    assert after.json()["choices"][0]["text"] == "still alive"


async def test_engine_crash_fails_the_batch_then_serving_resumes() -> None:
    core = FakeEngineCore()
    core.crash_marker = "crash"
    async with api_client(core) as (client, app):
        error_of(await client.post("/v1/completions", json={"prompt": "crash now"}), 500)
        after = await client.post("/v1/completions", json={"prompt": "next one"})
        assert (await client.get("/health")).status_code == 200
    assert after.json()["choices"][0]["text"] == "next one"
