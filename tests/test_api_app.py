"""HTTP tier against the fake engine: response shapes, usage, SSE framing, stream == full, concurrency."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.fakes import FakeEngineCore, api_client, chat_body, sse_payloads  # noqa: F401 (fixture)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def template_ids(core: FakeEngineCore, content: str) -> list[int]:
    text = core.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                              add_generation_prompt=True)
    return core.tokenizer.encode(text, add_special_tokens=False)


async def stream(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[Any]:
    response = await client.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


async def test_chat_completion_shape_and_usage() -> None:
    core = FakeEngineCore()
    async with api_client(core) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat_body("Tell me a story."))
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "demo-llama" and isinstance(body["created"], int)
    [choice] = body["choices"]
    # The echo of "<|im_start|>user\nTell me a story.<|im_end|>" stops at EOS; specials are not text.
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "user\nTell me a story."},
                      "finish_reason": "stop", "logprobs": None}
    prompt = template_ids(core, "Tell me a story.")
    completion = prompt.index(core.tokenizer.eos_token_id) + 1
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": completion,
                             "total_tokens": len(prompt) + completion}


async def test_completion_length_finish_and_default_max_tokens() -> None:
    core = FakeEngineCore()
    async with api_client(core, default_max_tokens=3) as (client, _):
        capped = (await client.post("/v1/completions", json={"prompt": "one two three four five six"})).json()
        explicit = (await client.post("/v1/completions", json={"prompt": ["one two"], "max_tokens": 1})).json()
    assert capped["id"].startswith("cmpl-") and capped["object"] == "text_completion"
    assert capped["choices"][0] == {"index": 0, "text": "one two three", "finish_reason": "length", "logprobs": None}
    assert capped["usage"]["completion_tokens"] == 3
    assert explicit["choices"][0]["text"] == "one" and explicit["usage"]["prompt_tokens"] == 2


async def test_default_max_tokens_is_lowered_to_what_fits() -> None:
    core = FakeEngineCore(max_model_len=20)
    async with api_client(core) as (client, _):
        prompt = " ".join(["word"] * 18)
        body = (await client.post("/v1/completions", json={"prompt": prompt, "ignore_eos": True})).json()
    assert body["usage"]["total_tokens"] == 20 and body["choices"][0]["finish_reason"] == "length"


async def test_chat_stream_framing_and_include_usage() -> None:
    core = FakeEngineCore(tokens_per_step=2)
    body = chat_body("Streaming works nicely here.", stream_options={"include_usage": True})
    async with api_client(core) as (client, _):
        events = await stream(client, "/v1/chat/completions", body)
        full = (await client.post("/v1/chat/completions", json=chat_body("Streaming works nicely here."))).json()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])
    assert text == full["choices"][0]["message"]["content"]
    assert len(chunks) > 4  # really streamed in pieces


async def test_completion_stream_equals_full_and_no_usage_chunk_by_default() -> None:
    core = FakeEngineCore()
    request = {"prompt": "The quick brown fox jumps over the lazy dog", "stop": [" lazy"]}
    async with api_client(core) as (client, _):
        events = await stream(client, "/v1/completions", request)
        full = (await client.post("/v1/completions", json=request)).json()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0] == {"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert full["choices"][0]["text"] == "The quick brown fox jumps over the"


async def test_logprobs_chat_stream_equals_full_and_bytes_rebuild_the_text() -> None:
    core = FakeEngineCore(tokens_per_step=2)
    body = chat_body("Héllo — wörld", logprobs=True, top_logprobs=2)
    async with api_client(core) as (client, _):
        full = (await client.post("/v1/chat/completions", json=body)).json()
        events = await stream(client, "/v1/chat/completions", body)
        plain = (await client.post("/v1/chat/completions", json=chat_body("Héllo — wörld"))).json()
    content = full["choices"][0]["logprobs"]["content"]
    assert len(content) == full["usage"]["completion_tokens"]
    # The fake echoes the templated prompt up to EOS; specials are not message text but are tokens.
    assert b"".join(bytes(e["bytes"]) for e in content).decode() == "<|im_start|>user\nHéllo — wörld<|im_end|>"
    assert any(e["token"] == "\ufffd" for e in content)  # a token that holds half a character
    for e in content:
        assert [t["logprob"] for t in e["top_logprobs"]] == [e["logprob"], e["logprob"] - 1]
        assert e["top_logprobs"][0]["token"] == e["token"]
    streamed = [e for c in events[:-1] if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    assert plain["choices"][0]["logprobs"] is None


async def test_logprobs_completion_offsets_and_stream() -> None:
    core = FakeEngineCore(tokens_per_step=3)
    request = {"prompt": "one two three four", "logprobs": 1, "max_tokens": 4}
    async with api_client(core) as (client, _):
        full = (await client.post("/v1/completions", json=request)).json()
        events = await stream(client, "/v1/completions", request)
    logprobs = full["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]) == full["choices"][0]["text"] == "one two three four"
    assert logprobs["text_offset"] == [sum(map(len, logprobs["tokens"][:i])) for i in range(len(logprobs["tokens"]))]
    assert [list(top.values()) for top in logprobs["top_logprobs"]] == [[v] for v in logprobs["token_logprobs"]]
    parts = [c["choices"][0]["logprobs"] for c in events[:-1] if c["choices"][0]["logprobs"]]
    assert len(parts) > 1
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for part in parts for x in part[key]] == logprobs[key], key


async def test_stop_string_ends_with_stop() -> None:
    async with api_client(FakeEngineCore()) as (client, _):
        body = (await client.post("/v1/completions", json={"prompt": "alpha beta gamma", "stop": " gamma"})).json()
    assert body["choices"][0]["text"] == "alpha beta" and body["choices"][0]["finish_reason"] == "stop"


async def test_concurrent_requests_each_get_their_own_answer() -> None:
    core = FakeEngineCore(max_batch_size=3, tokens_per_step=2)
    prompts = [f"request number {i} says {'hello ' * i}" for i in range(10)]
    async with api_client(core) as (client, _):
        solo = [(await client.post("/v1/completions", json={"prompt": p})).json() for p in prompts]
        together = await asyncio.gather(*(client.post("/v1/completions", json={"prompt": p}) for p in prompts))
        streamed = await asyncio.gather(*(stream(client, "/v1/completions", {"prompt": p}) for p in prompts))
    for alone, response, events in zip(solo, together, streamed, strict=True):
        assert response.json()["choices"] == alone["choices"]
        assert "".join(c["choices"][0]["text"] for c in events[:-1]) == alone["choices"][0]["text"]


async def test_models_and_health() -> None:
    async with api_client(FakeEngineCore(), served_model_name="my-model") as (client, _):
        models = (await client.get("/v1/models")).json()
        health = await client.get("/health")
        ok = await client.post("/v1/chat/completions", json={**chat_body("hi"), "model": "my-model"})
        no_model = await client.post("/v1/completions", json={"prompt": "hi"})
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["my-model"]
    assert models["data"][0]["object"] == "model" and models["data"][0]["max_model_len"] == 1024
    assert health.status_code == 200 and ok.status_code == 200 and no_model.status_code == 200


async def test_request_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="server.api.serving")
    async with api_client(FakeEngineCore(tokens_per_step=3)) as (client, _):
        await client.post("/v1/completions", json={"prompt": "a b c d e f g h", "max_tokens": 6})
    [line] = [r.getMessage() for r in caplog.records if "finished" in r.getMessage()]
    assert "cmpl-" in line and "(length)" in line and "prompt_tokens=8" in line
    assert "completion_tokens=6" in line and "acceptance_length=3.00" in line and "latency=" in line
