"""OpenAI-compatible request and response schemas (pydantic), and the request -> SamplingParams map.

The chat and completion requests share one base class, so every sampling field is defined once
with its bounds and description. Unknown fields are ignored (clients send many optional OpenAI
fields); fields we know but do not implement (n > 1, penalties, echo, ...) are refused with a
clear message instead of being silently dropped.

Types are strict, as OpenAI's are: no numeric strings ("10" is not a max_tokens), no booleans as
numbers (`seed: false` is not seed 0), no NaN or infinity; every integer
has a range, so nothing reaches torch as an int64 overflow; text must be valid Unicode (JSON's
`\ud800` escape decodes to a lone surrogate, which no tokenizer can encode). Each field's JSON
schema states exactly what is accepted (the OpenAPI document is built from these models), including
the two rules that tie fields together (`top_logprobs` needs `logprobs`, `stream_options` needs
`stream`). Shapes follow the OpenAI API reference
(https://platform.openai.com/docs/api-reference/chat, .../completions); `speculative`,
`ignore_eos` and `stop_token_ids` are our extensions (the last two as in vLLM).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from server.engine.types import MAX_TOP_LOGPROBS, SamplingParams

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
# Bound of token counts, ids and top_k: above any context length or vocabulary in use (the largest
# vocabularies have ~262k tokens), far below where an int64 tensor would overflow.
MAX_TOKEN_COUNT = 1 << 20
# seed: an integer that every JSON parser reads exactly. Beyond 2**53 - 1, parsers and schema
# validators that read numbers as doubles (JavaScript's, many others: RFC 7493) round them, so a
# bound there is not one that clients can check.
MAX_SAFE_INTEGER = (1 << 53) - 1
REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


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


Text = Annotated[str, AfterValidator(valid_unicode)]
IntegralFloat = BeforeValidator(_integral)  # strict otherwise: no strings, no booleans as integers


class ApiError(Exception):
    """An error with an HTTP status, rendered as OpenAI's {"error": {...}} body by the app."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
        self.headers = headers or {}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------- requests

# The rules that tie two fields together, in JSON Schema (the validators below enforce them).
STREAM_OPTIONS_RULE = {
    "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}
TOP_LOGPROBS_RULE = {
    "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
    "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
}
NON_EMPTY_TEXT = {"type": "string", "minLength": 1}
STOP_SCHEMA = {"anyOf": [NON_EMPTY_TEXT, {"type": "array", "items": NON_EMPTY_TEXT, "maxItems": MAX_STOP_SEQUENCES},
                         {"type": "null"}]}
PROMPT_SCHEMA = {"anyOf": [NON_EMPTY_TEXT, {"type": "array", "items": NON_EMPTY_TEXT, "minItems": 1, "maxItems": 1}]}
# Integer fields: the bounds go before the validator, so that the JSON schema states them.
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKEN_COUNT), IntegralFloat]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_COUNT), IntegralFloat]
TopK = Annotated[int, Field(ge=-1, le=MAX_TOKEN_COUNT), IntegralFloat]
Seed = Annotated[int, Field(ge=-MAX_SAFE_INTEGER, le=MAX_SAFE_INTEGER), IntegralFloat]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), IntegralFloat]


def _with_rules(schema: dict[str, Any], cls: type) -> None:
    """JSON schema hook: a request class's `schema_rules` become its schema's `allOf`."""
    rules = getattr(cls, "schema_rules", ())
    if rules:
        schema["allOf"] = list(rules)


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool = Field(False, description="Send a last chunk with usage and no choices.")


class SamplingRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(**REQUEST_CONFIG, json_schema_extra=_with_rules)
    schema_rules: ClassVar[tuple[dict[str, Any], ...]] = (STREAM_OPTIONS_RULE,)

    model: Text | None = Field(None, description="Served model name; defaults to the only model served.")
    max_tokens: TokenCount | None = Field(None, description="Most tokens to generate.")
    max_completion_tokens: TokenCount | None = Field(None, description="Newer name of max_tokens; wins if both.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 decodes greedily.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 switches it off.")
    top_k: TopK | None = Field(None, description="Keep the k likeliest tokens; 0, -1 or unset: off.")
    stop: Annotated[list[Text], WithJsonSchema(STOP_SCHEMA)] = Field(
        default_factory=list, description=f"A stop string, or a list of up to {MAX_STOP_SEQUENCES}.")
    seed: Seed | None = Field(None, description="Seed for sampling, for reproducible outputs.")
    stream: bool = Field(False, description="Stream chunks as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Only with stream set to true.")
    n: Annotated[int, IntegralFloat] = Field(1, description="Choices per request; only 1 is supported.", json_schema_extra={"const": 1})
    presence_penalty: float = Field(0.0, description="Not supported; must be 0.", json_schema_extra={"const": 0})
    frequency_penalty: float = Field(0.0, description="Not supported; must be 0.", json_schema_extra={"const": 0})
    user: Text | None = Field(None, description="End-user id, for logs.")
    # Extensions.
    speculative: bool = Field(True, description="False decodes this request without speculation.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks).")
    stop_token_ids: list[TokenId] | None = Field(
        None, description="Extra token ids that end generation; each must be in the model's vocabulary.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else [] if stop is None else stop

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stops: list[str]) -> list[str]:
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n} is not supported: this server returns exactly one choice (n=1)")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value: float) -> float:
        if value:
            raise ValueError("presence_penalty and frequency_penalty are not implemented by this server")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def requested_logprobs(self) -> int | None:
        """None: no log-probabilities; k: each token's, with the k likeliest alternatives."""
        return None


class TextPart(BaseModel):
    """A content part; only text parts are supported."""

    model_config = REQUEST_CONFIG
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = REQUEST_CONFIG

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, validate_default=True)  # None becomes ""
    name: Text | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """Refuse images, audio and other non-text parts by name (not as a schema mismatch)."""
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") != "text":
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
        return content

    @field_validator("content")
    @classmethod
    def _flatten(cls, content: str | list[TextPart] | None) -> str:
        """Content parts joined to one text."""
        text = content if isinstance(content, str) else "".join(part.text for part in content or ())
        return valid_unicode(text)


class ChatCompletionRequest(SamplingRequest):
    schema_rules: ClassVar[tuple[dict[str, Any], ...]] = (STREAM_OPTIONS_RULE, TOP_LOGPROBS_RULE)

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far.")
    logprobs: bool | None = Field(None, description="Return each output token's log-probability.")
    top_logprobs: TopLogprobs | None = Field(None, description="With logprobs: also the k likeliest tokens at each position.")

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str, WithJsonSchema(PROMPT_SCHEMA)] = Field(
        ..., description="A string, or a list holding exactly one string.")
    logprobs: TopLogprobs | None = Field(None, description="Return each token's log-probability and the k likeliest tokens.")
    echo: bool = Field(False, description="Not supported; must be false.", json_schema_extra={"const": False})
    suffix: Text | None = Field(None, description="Not supported; must be empty.", json_schema_extra={"maxLength": 0})

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_text_prompt(cls, prompt: Any) -> str:
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ValueError(f"batched prompts are not supported: send one prompt, got a list of {len(prompt)}")
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string (or a list of one string); token-id prompts are not supported")
        if not prompt:
            raise ValueError("prompt must not be empty")
        return valid_unicode(prompt)

    @property
    def requested_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("echo", "suffix")
    @classmethod
    def _no_echo_or_suffix(cls, value: bool | str | None) -> bool | str | None:
        if value:
            raise ValueError("echo and suffix are not implemented by this server")
        return value


def to_sampling_params(request: SamplingRequest, max_tokens: int) -> SamplingParams:
    """The one place an API request becomes engine SamplingParams (max_tokens resolved by serving)."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k if request.top_k and request.top_k > 0 else None,
        stop=list(request.stop),
        stop_token_ids=list(request.stop_token_ids or []),
        ignore_eos=request.ignore_eos,
        seed=request.seed,
        speculative=request.speculative,
        logprobs=request.requested_logprobs,
    )


# ---------------------------------------------------------------- responses

FinishReasonName = Literal["stop", "length"]


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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


class DeltaMessage(BaseModel):
    """A stream delta; unset fields are left out (`{}` on the finishing chunk), as OpenAI sends them."""

    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)


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
