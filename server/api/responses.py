"""OpenAI-compatible response schemas (pydantic): full responses, stream chunks, models, health.

Shapes follow the OpenAI API reference (https://platform.openai.com/docs/api-reference/chat,
.../completions); fields that may be absent are left out of the JSON rather than sent as null
where OpenAI leaves them out. `spec_decode` is our extension (per-request acceptance, serving.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

FinishReasonName = Literal["stop", "length", "tool_calls"]


def _absent(value: Any) -> bool:
    return value is None


class SpecDecodeStats(BaseModel):
    """Our extension (with --per-request-spec-decode-metrics): what speculation did for this request,
    all choices together, with the meaning of the ctc_spec_decode_* counters."""

    num_drafts: int = Field(description="Verification steps in which a draft was checked.")
    num_draft_tokens: int = Field(description="Draft tokens verified.")
    num_accepted_tokens: int = Field(description="Draft tokens accepted (the base model's own token excluded).")
    acceptance_length: float | None = Field(description="1 + accepted / drafts: tokens per speculative step; "
                                            "null without drafts.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=_absent)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReasonName | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    spec_decode: SpecDecodeStats | None = Field(None, exclude_if=_absent)


class FunctionCallDelta(BaseModel):
    name: str | None = Field(None, exclude_if=_absent)
    arguments: str | None = Field(None, exclude_if=_absent)


class ToolCallDelta(BaseModel):
    """A call as OpenAI streams it: a chunk with index, id, type and name, then argument fragments."""

    index: int
    id: str | None = Field(None, exclude_if=_absent)
    type: Literal["function"] | None = Field(None, exclude_if=_absent)
    function: FunctionCallDelta


class DeltaMessage(BaseModel):
    """A stream delta; unset fields are left out (`{}` on the finishing chunk), as OpenAI sends them."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_absent)
    content: str | None = Field(None, exclude_if=_absent)
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=_absent)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReasonName | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    spec_decode: SpecDecodeStats | None = Field(None, exclude_if=_absent)  # on the last chunk


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReasonName | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    """Both the full response and each stream chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    spec_decode: SpecDecodeStats | None = Field(None, exclude_if=_absent)  # on the last chunk when streaming


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ctc-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
