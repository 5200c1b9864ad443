"""End to end, issue 16: n choices, logit_bias and penalties, tools, structured outputs and
per-request acceptance, against a real `ctc-serve` on the demo model through the official client.

Speculation must not change any output: each feature is checked with and without it (the
`speculative` extension). The grammar of forced tool calls and response formats is enforced by
the engine (its logits processing); these tests check what a client sees: every forced call
parses, names an offered function and has arguments valid against its parameters, and every
structured output validates against its schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from tests.test_e2e_server import MODEL, NAME, Server, start_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason=f"{MODEL} has no weights"),
]

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                              "b": {"type": "integer", "minimum": 0, "maximum": 99}},
             "required": ["a", "b"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
PLAIN = {"speculative": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Every step drafts (no governor), so acceptance figures are non-zero for sure.
    running = start_server(tmp_path_factory.mktemp("e2e-features") / "server.log", "--governor", "false",
                           "--per-request-spec-decode-metrics", "true")
    yield running
    running.stop()


def create(client: openai.OpenAI, **kwargs: Any):
    return client.chat.completions.create(model=NAME, **{"messages": ASK, "max_tokens": 24, **kwargs})


def texts(response) -> list[str]:
    return [c.message.content for c in sorted(response.choices, key=lambda c: c.index)]


def test_n_greedy_choices_are_identical_and_the_prompt_is_counted_once(server: Server) -> None:
    client = server.client()
    one = create(client, temperature=0)
    three = create(client, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert texts(three) == texts(one) * 3
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.total_tokens == three.usage.prompt_tokens + three.usage.completion_tokens


def test_n_seeded_choices_differ_each_is_seed_plus_i_and_speculation_changes_nothing(server: Server) -> None:
    client = server.client()
    ask = dict(temperature=1.0, seed=7, n=3)
    spec = create(client, **ask)
    plain = create(client, **ask, extra_body=PLAIN)
    singles = [create(client, temperature=1.0, seed=7 + i).choices[0].message.content for i in range(3)]
    assert texts(spec) == texts(plain) == singles
    assert len(set(singles)) == 3
    assert spec.usage.prompt_tokens == create(client, temperature=0, max_tokens=1).usage.prompt_tokens
    streamed: dict[int, str] = {}
    for chunk in create(client, **ask, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
        if chunk.usage is not None:
            assert chunk.usage.model_dump() == spec.usage.model_dump()
    assert [streamed[i] for i in range(3)] == singles


def test_logit_bias_and_penalties_apply_and_speculation_changes_nothing(server: Server) -> None:
    client = server.client()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)

    def tokens(response) -> list[str]:
        return [e.token for e in response.choices[0].logprobs.content]

    greedy = tokens(create(client, temperature=0, logprobs=True))
    [first] = tokenizer.encode(greedy[0], add_special_tokens=False)  # the greedy answer's first token
    assert tokenizer.decode([first]) == greedy[0]
    banned = dict(temperature=0, logprobs=True, logit_bias={str(first): -100})
    biased = create(client, **banned)
    assert tokens(biased) == tokens(create(client, **banned, extra_body=PLAIN))
    assert tokens(biased)[0] != greedy[0]
    forced = create(client, temperature=0, max_tokens=4, logprobs=True, logit_bias={str(first): 100})
    assert tokens(forced) == [greedy[0]] * 4
    penalised = dict(temperature=0.8, seed=3, presence_penalty=1.5, frequency_penalty=0.5,
                     extra_body={"repetition_penalty": 1.3})
    assert texts(create(client, **penalised)) == \
        texts(create(client, **{**penalised, "extra_body": {**penalised["extra_body"], **PLAIN}}))
    repeated = create(client, temperature=0, max_tokens=48, frequency_penalty=2.0).choices[0].message.content
    assert repeated != create(client, temperature=0, max_tokens=48).choices[0].message.content


def calls(response) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in response.choices[0].message.tool_calls or []]


def valid_call(call, tools=TOOLS) -> dict:
    """The call's arguments, after checking it names an offered function and they fit its schema."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in schemas
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schemas[call.function.name])
    return arguments


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_are_valid_with_and_without_speculation(server: Server, choice: Any) -> None:
    client = server.client()
    ask = dict(tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=128)  # room for any valid call
    responses = [create(client, **ask), create(client, **ask, extra_body=PLAIN),
                 create(client, **{**ask, "temperature": 1.0, "seed": 5, "n": 2})]
    assert calls(responses[0]) == calls(responses[1])  # speculation changes nothing (ids are fresh)
    for response in responses:
        for c in response.choices:
            assert c.finish_reason == "tool_calls", c
            [call] = c.message.tool_calls
            valid_call(call)
            if isinstance(choice, dict):
                assert call.function.name == "add"
    head, arguments, finish = None, "", None
    for chunk in create(client, **ask, stream=True):
        for c in chunk.choices:
            for delta in c.delta.tool_calls or []:
                head = head or delta
                arguments += delta.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and head.id and head.function.name == responses[0].choices[0].message.tool_calls[0].function.name
    assert json.loads(arguments) == json.loads(responses[0].choices[0].message.tool_calls[0].function.arguments)


def test_auto_and_none_and_a_history_with_tool_results(server: Server) -> None:
    client = server.client()
    bare = create(client, temperature=0)
    none = create(client, temperature=0, tools=TOOLS, tool_choice="none")
    assert none.usage.prompt_tokens == bare.usage.prompt_tokens  # the template was not shown the tools
    assert texts(none) == texts(bare) and none.choices[0].message.tool_calls is None
    auto = create(client, temperature=0, tools=TOOLS, max_tokens=64)
    assert auto.usage.prompt_tokens > bare.usage.prompt_tokens  # it was
    choice = auto.choices[0]
    if choice.message.tool_calls:  # the demo model never learned tools: it rarely calls
        assert choice.finish_reason == "tool_calls" and all(valid_call(c) is not None for c in choice.message.tool_calls)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C."},
    ]
    answer = create(client, messages=history, tools=TOOLS, tool_choice="none", temperature=0)
    assert answer.choices[0].message.content and answer.usage.prompt_tokens > bare.usage.prompt_tokens


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "mood": {"enum": ["happy", "sad"]}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                  "maxItems": 3}},
    "required": ["name", "age", "mood", "tags"], "additionalProperties": False}


@pytest.mark.parametrize("speculative", [True, False])
def test_structured_outputs_parse_and_validate(server: Server, speculative: bool) -> None:
    client = server.client()
    extra = {"speculative": speculative}
    person = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    # SCHEMA bounds every string and array, so a valid answer fits in max_tokens and must end.
    response = create(client, temperature=0, max_tokens=200, response_format=person, extra_body=extra)
    assert response.choices[0].finish_reason == "stop", response
    jsonschema.validate(json.loads(response.choices[0].message.content), SCHEMA)
    # Any JSON object has no bound: one cut by max_tokens ends with "length" (and is an object's start).
    response = create(client, temperature=0, max_tokens=200, response_format={"type": "json_object"}, extra_body=extra)
    content = response.choices[0].message.content
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:
        assert response.choices[0].finish_reason == "length" and content.lstrip().startswith("{")
    plain = create(client, temperature=0, max_tokens=200, response_format=person, extra_body=PLAIN)
    assert texts(create(client, temperature=0, max_tokens=200, response_format=person)) == texts(plain)


def test_per_request_acceptance_equals_the_counters_deltas(server: Server) -> None:
    client = server.client()
    prompt = "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3,"  # repetitive: drafts get accepted
    before = server.metrics()
    full = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=32)
    after = server.metrics()
    spec = full.model_extra["spec_decode"]
    for field in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert spec[field] == after[f"ctc_spec_decode_{field}_total"] - before[f"ctc_spec_decode_{field}_total"], field
    assert spec["num_drafts"] > 0 and spec["num_accepted_tokens"] > 0
    assert spec["acceptance_length"] == pytest.approx(1 + spec["num_accepted_tokens"] / spec["num_drafts"])
    chunks = list(client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=32, stream=True))
    assert [(c.model_extra or {}).get("spec_decode") for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].model_extra["spec_decode"] == spec  # the same request again: the same drafts
    plain = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=32, extra_body=PLAIN)
    assert plain.model_extra["spec_decode"]["num_drafts"] == 0 and plain.choices[0].text == full.choices[0].text


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"extra_body": {"min_p": 0.1}}, "min_p"),
    ({"extra_body": {"audio": {"voice": "alloy", "format": "wav"}}}, "audio"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"n": 17}, "n"),
])
def test_what_is_not_supported_is_refused_naming_the_field(server: Server, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        create(server.client(), **kwargs)
    assert refused.value.body["param"] == param


def test_best_of_is_refused(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        server.client().completions.create(model=NAME, prompt="hi", max_tokens=4, n=2, best_of=2)
    assert refused.value.body["param"] == "best_of" and "not supported" in refused.value.body["message"]
