"""The request surface of issue 16 in the API layer: each field's mapping, its refusals, n choices,
tool calls (parser, response and stream shapes) and per-request spec_decode, over the fake engine.

The fake engine echoes the prompt, so a conversation whose system message holds a tool-call block
makes the "model" answer with that call: the parser and the stream shapes are tested on it.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from server.api.protocol import ChatCompletionRequest, CompletionRequest, to_sampling_params
from server.api.tools import CALL_END, CALL_START, ToolCallParser, forced_call_grammar
from server.engine.types import GrammarSpec
from tests.fakes import FakeEngineCore, api_client, chat_body, sse_payloads

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

MESSAGES = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]
CALL = CALL_START + '{"name": "get_weather", "arguments": {"city": "Paris"}}' + CALL_END


def params(**fields: Any):
    return to_sampling_params(ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields}), 16)


def refused(model: type, body: dict) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return str(info.value)


# ---------------------------------------------------------------- mapping


def test_sampling_fields_map_to_sampling_params() -> None:
    p = params(n=3, logit_bias={"5": -100, "17": 2.5}, presence_penalty=0.5, frequency_penalty=-1,
               repetition_penalty=1.2)
    assert p.n == 3 and p.logit_bias == {5: -100.0, 17: 2.5}
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2)
    assert params().logit_bias == {} and params().n == 1 and params().grammar is None
    completion = to_sampling_params(CompletionRequest.model_validate(
        {"prompt": "x", "n": 2, "best_of": 1, "logit_bias": {"0": 1}, "presence_penalty": 1}), 8)
    assert completion.n == 2 and completion.logit_bias == {0: 1.0} and completion.presence_penalty == 1.0


def test_response_format_maps_to_a_grammar() -> None:
    assert params(response_format={"type": "text"}).grammar is None
    assert params(response_format={"type": "json_object"}).grammar == GrammarSpec(kind="json_object")
    spec = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}}
    assert params(response_format=spec).grammar == GrammarSpec(kind="json_schema", schema=WEATHER)


def test_forced_tool_choices_map_to_a_call_grammar_and_auto_and_none_to_none() -> None:
    required = params(tools=TOOLS, tool_choice="required").grammar
    assert required.prefix == CALL_START and required.suffix == CALL_END and required.kind == "json_schema"
    weather, now = required.schema["anyOf"]
    assert weather["properties"] == {"name": {"const": "get_weather"}, "arguments": WEATHER}
    assert now["properties"]["arguments"] == {"type": "object"}  # no parameters: any object
    assert weather["required"] == ["name", "arguments"] and weather["additionalProperties"] is False
    named = params(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}).grammar
    assert named == forced_call_grammar([("get_weather", WEATHER)]) and named.schema == weather
    for choice in ("auto", "none", None):
        request = ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": TOOLS, "tool_choice": choice})
        assert request.grammar is None
        assert [t.function.name for t in request.offered_tools] == ([] if choice == "none" else ["get_weather", "now"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"logit_bias": {"abc": 1}}, "should match pattern"),
        ({"logit_bias": {"1": 101}}, "less than or equal to 100"),
        ({"presence_penalty": -2.5}, "greater than or equal to -2"),
        ({"repetition_penalty": 0}, "greater than 0"),
        ({"n": 0}, "greater than or equal to 1"),
        ({"response_format": {"type": "xml"}}, "does not match any of the expected tags"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, "pattern"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "schema"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot both apply"),
        ({"tools": [{"type": "retrieval"}]}, "function"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "JSON object"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"\ud800": 1}}}]}, "invalid Unicode"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "only assistant messages"),
        ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "only tool messages"),
        ({"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]}, "not supported"),
        ({"prediction": {"type": "content", "content": "x"}}, "not supported"),
        ({"functions": [{"name": "f"}]}, "not supported"),
        ({"store": True}, "stores no completions"),
        ({"store": 0}, "valid boolean"),
        ({"service_tier": "flex"}, "'auto' or 'default'"),
        ({"modalities": ["audio"]}, "'text'"),
        ({"seed_of_doubt": 1}, "Extra inputs are not permitted"),
    ],
)
def test_refusals_name_the_field(fields: dict, message: str) -> None:
    assert message in refused(ChatCompletionRequest, {"messages": MESSAGES, **fields})


def test_accepted_no_ops_and_history_with_tool_calls() -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    request = ChatCompletionRequest.model_validate({
        "messages": history, "tools": TOOLS, "parallel_tool_calls": False, "metadata": {"a": "b"}, "store": False,
        "service_tier": "auto", "modalities": ["text"], "prompt_cache_key": "k", "safety_identifier": "s",
        "audio": None})
    assert request.messages[1].tool_calls[0].function.name == "get_weather"
    assert "best_of=2" in refused(CompletionRequest, {"prompt": "x", "best_of": 2})


# ---------------------------------------------------------------- the parser


def test_parser_finds_calls_and_leaves_everything_else_as_text() -> None:
    parser = ToolCallParser(["get_weather"])
    text = "Let me check. " + CALL + "\n" + CALL_START + "{not json}" + CALL_END + \
        CALL_START + '{"name": "unknown", "arguments": {}}' + CALL_END + " <tool_c"
    content, calls = parser.parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")
    assert content == "Let me check. \n" + CALL_START + "{not json}" + CALL_END + CALL_START + \
        '{"name": "unknown", "arguments": {}}' + CALL_END + " <tool_c"


def test_parser_on_a_stream_holds_back_only_what_may_be_a_block() -> None:
    text = "a<b " + CALL + " tail " + CALL
    whole_content, whole_calls = ToolCallParser(["get_weather"]).parse(text)
    parser = ToolCallParser(["get_weather"])
    pieces = [p for ch in text for p in parser.push(ch)] + parser.flush()
    assert "".join(p.content for p in pieces) == whole_content == "a<b  tail "
    assert [c.arguments for c in (p.call for p in pieces) if c] == [c.arguments for c in whole_calls]
    assert len(whole_calls) == 2
    held = ToolCallParser(["get_weather"])
    assert [p.content for p in held.push("x <tool")] == ["x "]  # "<tool" may start a block
    assert [p.content for p in held.flush()] == ["<tool"]


@pytest.mark.parametrize("forced", [False, True])
def test_a_stream_in_any_pieces_parses_as_the_whole_output(forced: bool) -> None:
    outputs = [
        "hi " + CALL_START + '{"name": "get_weather", "arguments": {"city": "Paris", "x": {"a": 1} } }' + CALL_END + " bye",
        CALL_START + ' {"name": "now" , "arguments" : {"q": "}"}  }\n' + CALL_END + CALL_START +
        '{"name":"now","arguments":{}}' + CALL_END,
        CALL_START + '{"arguments": {"a": 1}, "name": "now"}' + CALL_END + "\n" + CALL_START + '{"name": "now", "ar',
        "x <tool_c",
    ]
    rng = random.Random(0)
    for text in outputs:
        content, calls = ToolCallParser(["get_weather", "now"], forced=forced).parse(text)
        for _ in range(20):
            parser, pieces, i = ToolCallParser(["get_weather", "now"], forced=forced), [], 0
            while i < len(text):
                step = rng.randint(1, 6)
                pieces += parser.push(text[i : i + step])
                i += step
            pieces += parser.flush()
            streamed: list[list[str]] = []
            for piece in pieces:
                if piece.call:
                    streamed.append([piece.call.name, piece.call.arguments])
                elif piece.arguments:
                    streamed[-1][1] += piece.arguments
            assert "".join(p.content for p in pieces) == content
            assert streamed == [[c.name, c.arguments] for c in calls]
    # the arguments are the text the model wrote; a forced call streams them as they come
    assert [c.arguments for c in ToolCallParser(["now"]).parse(outputs[1])[1]] == ['{"q": "}"}', "{}"]
    extra = CALL_START + '{"name": "now", "arguments": {"a": 1}, "why": 2}' + CALL_END
    assert ToolCallParser(["now"]).parse(extra)[1][0].arguments == '{"a": 1}'
    parser = ToolCallParser(["get_weather"], forced=True)
    head = parser.push(CALL_START + '{"name": "get_weather", "arguments": {"ci')
    assert head[0].call.name == "get_weather" and head[0].call.arguments == "" and head[1].arguments == '{"ci'


def test_parser_without_parallel_calls_keeps_only_the_first() -> None:
    content, calls = ToolCallParser(["get_weather"], parallel=False).parse(CALL + CALL)
    assert len(calls) == 1 and content == CALL


# ---------------------------------------------------------------- over HTTP (fake engine)


async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    return await client.post(path, json=body)


async def events(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[dict]:
    response = await client.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


async def test_n_choices_full_and_streamed_with_usage_counting_the_prompt_once() -> None:
    core = FakeEngineCore()
    async with api_client(core) as (client, _):
        one = (await post(client, "/v1/chat/completions", chat_body("Tell me a story."))).json()
        three = (await post(client, "/v1/chat/completions", chat_body("Tell me a story.", n=3))).json()
        chunks = await events(client, "/v1/chat/completions",
                              chat_body("Tell me a story.", n=3, stream_options={"include_usage": True}))
        completions = await events(client, "/v1/completions", {"prompt": "one two three", "n": 2, "max_tokens": 3})
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert all(c["message"] == one["choices"][0]["message"] for c in three["choices"])
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert three["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    for i in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == one["choices"][0]["message"]["content"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == three["usage"]
    for i in range(2):
        assert "".join(c["choices"][0]["text"] for c in completions if c["choices"] and c["choices"][0]["index"] == i) \
            == "one two three"


async def test_vocabulary_and_tool_rules_the_schema_cannot_state() -> None:
    async with api_client(FakeEngineCore()) as (client, _):
        bias = await post(client, "/v1/completions", {"prompt": "x", "logit_bias": {"4096": 1}})
        twice = await post(client, "/v1/chat/completions", chat_body("x", tools=[TOOLS[0], TOOLS[0]]))
        missing = await post(client, "/v1/chat/completions", chat_body(
            "x", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}))
        unknown = await post(client, "/v1/chat/completions", chat_body("x", frobnicate=True))
    assert bias.status_code == 400 and bias.json()["error"]["param"] == "logit_bias"
    assert "4096 is not a token id" in bias.json()["error"]["message"]
    assert twice.json()["error"]["code"] == "duplicate_tool_name"
    assert missing.json()["error"]["code"] == "tool_not_found" and missing.json()["error"]["param"] == "tool_choice"
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "frobnicate"
    assert "unknown field" in unknown.json()["error"]["message"]


def calling_conversation(**extra: Any) -> dict[str, Any]:
    """The fake echoes the first turn: the system message, i.e. the call, then the template's tool list."""
    return {"model": "demo-llama", "messages": [{"role": "system", "content": "Sure. " + CALL},
                                                {"role": "user", "content": "Weather in Paris?"}], **extra}


async def test_auto_tool_calls_in_the_response_and_the_stream() -> None:
    async with api_client(FakeEngineCore()) as (client, _):
        full = (await post(client, "/v1/chat/completions", calling_conversation(tools=TOOLS))).json()
        chunks = await events(client, "/v1/chat/completions", calling_conversation(tools=TOOLS))
        off = (await post(client, "/v1/chat/completions", calling_conversation(tools=TOOLS, tool_choice="none"))).json()
    [choice] = full["choices"]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    content = choice["message"]["content"]
    assert content.startswith("system\nSure. \n\n# Tools") and '"name": "now"' in content  # the echoed tool list
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(c["function"].get("arguments", "") for c in calls) == '{"city": "Paris"}'
    assert "".join(d.get("content", "") for d in deltas) == content
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["tool_calls"]
    # none: the template shows no tools and nothing is parsed
    assert off["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in off["choices"][0]["message"]
    assert off["choices"][0]["message"]["content"] == "system\nSure. " + CALL
    assert off["usage"]["prompt_tokens"] < full["usage"]["prompt_tokens"]


async def test_a_forced_call_streams_its_arguments_as_they_are_generated() -> None:
    body = calling_conversation(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    async with api_client(FakeEngineCore(tokens_per_step=1)) as (client, _):
        full = (await post(client, "/v1/chat/completions", body)).json()
        chunks = await events(client, "/v1/chat/completions", body)
    [call] = full["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and calls[0]["id"].startswith("call_")
    fragments = [c["function"]["arguments"] for c in calls[1:]]
    assert len(fragments) > 2 and "".join(fragments) == call["function"]["arguments"]  # token by token
    assert all(set(c) == {"index", "function"} and c["index"] == 0 for c in calls[1:])


def counters(text: str) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


async def test_spec_decode_stats_are_the_sums_of_the_requests_deltas() -> None:
    core = FakeEngineCore(tokens_per_step=3)
    async with api_client(core, per_request_spec_decode_metrics=True) as (client, _):
        before = counters((await client.get("/metrics")).text)
        full = (await post(client, "/v1/chat/completions", chat_body("Tell me a story, a long one.", n=2))).json()
        after = counters((await client.get("/metrics")).text)
        chunks = await events(client, "/v1/completions", {"prompt": "one two three four five six seven", "max_tokens": 7})
        plain = (await post(client, "/v1/completions", {"prompt": "one two", "speculative": False})).json()
    spec = full["spec_decode"]
    for field in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert spec[field] == after[f"ctc_spec_decode_{field}_total"] - before[f"ctc_spec_decode_{field}_total"] > 0
    assert spec["acceptance_length"] == pytest.approx(1 + spec["num_accepted_tokens"] / spec["num_drafts"])
    assert [("spec_decode" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]  # on the last chunk only
    assert chunks[-1]["spec_decode"]["num_drafts"] == 3  # 7 tokens, 3 per step
    assert plain["spec_decode"] == {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0,
                                    "acceptance_length": None}
    async with api_client(FakeEngineCore()) as (client, _):
        assert "spec_decode" not in (await post(client, "/v1/completions", {"prompt": "x"})).json()  # off by default


async def test_the_openapi_document_states_the_served_limits() -> None:
    async with api_client(FakeEngineCore(max_batch_size=4)) as (client, _):
        document = (await client.get("/openapi.json")).json()
        too_many = await post(client, "/v1/chat/completions", chat_body("x", n=5))
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        properties = document["components"]["schemas"][request]["properties"]
        assert properties["n"]["maximum"] == 4
        pattern = properties["logit_bias"]["anyOf"][0]["propertyNames"]["pattern"]
        assert re.match(pattern, "4095") and not re.match(pattern, "4096") and not re.match(pattern, "01")
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"


def test_the_demo_chat_template_renders_tool_free_conversations_as_the_model_was_trained(monkeypatch) -> None:
    """The tool format is an addition: without tools, the prompt is the builder's template's, token
    for token (what the model and its drafter were trained on)."""
    import importlib.util
    import sys

    from tests.fakes import DEMO_MODEL, demo_tokenizer

    spec = importlib.util.spec_from_file_location("build_demo_model", DEMO_MODEL.parent / "build_demo_model.py")
    build = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "build_demo_model", build)  # its dataclasses look their module up
    spec.loader.exec_module(build)
    tokenizer = demo_tokenizer()
    conversations = [MESSAGES, [{"role": "system", "content": "Be brief."}, *MESSAGES,
                                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": ""}]]
    for conversation in conversations:
        for generation in (True, False):
            assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation) == \
                tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation,
                                              chat_template=build.CHAT_TEMPLATE)
    history = [{"role": "system", "content": "Be brief."}, *MESSAGES, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}]
    text = tokenizer.apply_chat_template(history, tools=TOOLS, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '\n{"type": "function", "function": {"name": "now"}}\n</tools><|im_end|>\n' in text
    assert text.endswith("<|im_start|>assistant\n" + CALL + "<|im_end|>\n")
