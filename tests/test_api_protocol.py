"""Request schemas: defaults, refusals with clear messages, and the request -> SamplingParams map."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.api.protocol import ChatCompletionRequest, CompletionRequest, to_sampling_params

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})


def refusal(model: type, body: dict) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return str(info.value)


def test_defaults_and_unknown_fields_refused() -> None:
    request = chat(tools=None, user="u1")
    assert request.temperature == 1.0 and request.top_p == 1.0 and request.speculative is True
    assert request.stream is False and request.include_usage is False and request.requested_max_tokens is None
    assert request.stop == [] and request.user == "u1" and request.n == 1 and request.grammar is None
    assert "some_future_field" in refusal(ChatCompletionRequest, {"messages": MESSAGES, "some_future_field": True})
    assert "Extra inputs" in refusal(CompletionRequest, {"prompt": "hi", "response_format": {"type": "text"}})


def test_stop_accepts_string_or_up_to_four() -> None:
    assert chat(stop="\n").stop == ["\n"]
    assert chat(stop=["a", "b", "c", "d"]).stop == ["a", "b", "c", "d"]
    assert "at most 4 stop sequences" in refusal(ChatCompletionRequest, {"messages": MESSAGES, "stop": list("abcde")})
    assert "non-empty" in refusal(ChatCompletionRequest, {"messages": MESSAGES, "stop": [""]})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n": 17}, "less than or equal to 16"),
        ({"top_logprobs": 3}, "top_logprobs needs logprobs set to true"),
        ({"logprobs": True, "top_logprobs": 21}, "less than or equal to 20"),
        ({"logprobs": 3}, "valid boolean"),
        ({"frequency_penalty": 2.5}, "less than or equal to 2"),
        ({"stream_options": {"include_usage": True}}, "only allowed when stream is true"),
        ({"temperature": 2.5}, "less than or equal to 2"),
        ({"top_p": 0}, "greater than 0"),
        ({"max_tokens": 0}, "greater than or equal to 1"),
    ],
)
def test_refusals_name_the_problem(fields: dict, message: str) -> None:
    assert message in refusal(ChatCompletionRequest, {"messages": MESSAGES, **fields})


def test_logprobs_fields_map_to_the_number_of_alternatives() -> None:
    assert chat(logprobs=False, top_logprobs=0).requested_logprobs is None
    assert chat().requested_logprobs is None
    assert chat(logprobs=True).requested_logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).requested_logprobs == 5
    assert to_sampling_params(chat(logprobs=True, top_logprobs=5), 8).logprobs == 5
    assert CompletionRequest.model_validate({"prompt": "x", "logprobs": 2}).requested_logprobs == 2
    assert CompletionRequest.model_validate({"prompt": "x"}).requested_logprobs is None
    assert "less than or equal to 20" in refusal(CompletionRequest, {"prompt": "x", "logprobs": 21})


def test_messages_content_parts_flatten_to_text_and_images_are_refused() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert chat(messages=[{"role": "user", "content": parts}]).messages[0].content == "ab"
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    assert "only text content" in refusal(ChatCompletionRequest, {"messages": [{"role": "user", "content": image}]})
    assert "at least 1 item" in refusal(ChatCompletionRequest, {"messages": []})


def test_prompt_is_one_string() -> None:
    assert CompletionRequest.model_validate({"prompt": "x"}).prompt == "x"
    assert CompletionRequest.model_validate({"prompt": ["x"]}).prompt == "x"
    assert "batched prompts are not supported" in refusal(CompletionRequest, {"prompt": ["a", "b"]})
    assert "token-id prompts are not supported" in refusal(CompletionRequest, {"prompt": [1, 2, 3]})
    assert "echo and suffix" in refusal(CompletionRequest, {"prompt": "x", "echo": True})


def test_to_sampling_params() -> None:
    request = chat(max_tokens=10, max_completion_tokens=20, temperature=0, top_p=0.9, top_k=0, stop="x", seed=7,
                   speculative=False, ignore_eos=True, stop_token_ids=[5])
    assert request.requested_max_tokens == 20  # the newer name wins
    params = to_sampling_params(request, max_tokens=20)
    assert params.max_tokens == 20 and params.greedy and params.top_p == 0.9
    assert params.top_k is None  # 0 (like -1) switches top-k off
    assert params.stop == ["x"] and params.seed == 7 and params.speculative is False
    assert params.ignore_eos is True and params.stop_token_ids == [5]
    assert to_sampling_params(chat(top_k=40), max_tokens=1).top_k == 40


def test_a_message_without_content_is_empty_text() -> None:
    """Found by the fuzzer: {"role": "tool"} reached the chat template without a content key (a 400)."""
    assert chat(messages=[{"role": "tool"}]).messages[0].model_dump(exclude_none=True) == {"role": "tool", "content": ""}


def test_integers_are_strict_but_follow_json_schema() -> None:
    """No strings or booleans as integers (OpenAI's rule); 10.0 is the integer 10, as JSON Schema counts it
    (the fuzzer sent `n: 1.0`, valid under the OpenAPI document, and got a 400)."""
    request = chat(n=1.0, max_tokens=10.0, seed=-3.0, top_k=5.0)
    assert (request.n, request.max_tokens, request.seed, request.top_k) == (1, 10, -3, 5)
    assert type(request.max_tokens) is int
    for bad in ({"max_tokens": "10"}, {"seed": False}, {"max_tokens": 10.5}, {"top_k": True}):
        assert "valid integer" in refusal(ChatCompletionRequest, {"messages": MESSAGES, **bad})
