"""OpenAI-compatible request schemas (pydantic), the error body, and the request -> SamplingParams map.

The chat and completion requests share one base class, so every sampling field is defined once
with its bounds and description. Nothing is silently dropped: an unknown field is refused (400,
naming it), and so is an OpenAI field this server does not implement (audio, predicted outputs,
`best_of`, `echo`, ...) unless it is left out or at its no-op value. Identifiers that change no
output (`user`, `metadata`, `prompt_cache_key`, `safety_identifier`) are accepted.

Types are strict, as OpenAI's are (fields.py). Each field's JSON schema states exactly what is
accepted (the OpenAPI document is built from these models), including the rules that tie fields
together (`top_logprobs` needs `logprobs`, `stream_options` needs `stream`, a forced tool call
needs tools and no JSON response format). Shapes follow the OpenAI API reference
(https://platform.openai.com/docs/api-reference/chat, .../completions); `speculative`,
`ignore_eos`, `stop_token_ids` and `repetition_penalty` are our extensions (the last three as in
vLLM). `tool_choice` and `response_format` become a `GrammarSpec` (tools.py has the tool schemas).
Responses are in responses.py.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from server.api.fields import (
    MAX_STOP_SEQUENCES,
    REQUEST_CONFIG,
    Choices,
    IntegralFloat,
    JsonObject,
    LogitBias,
    Name,
    Seed,
    Text,
    TokenCount,
    TokenId,
    TopK,
    TopLogprobs,
    Unsupported,
    valid_unicode,
    with_rules,
)
from server.api.tools import MAX_TOOLS, NamedToolChoice, Tool, ToolCall, forced_call_grammar
from server.engine.types import MAX_CHOICES, GrammarSpec, SamplingParams

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
class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool = Field(False, description="Send a last chunk with usage and no choices.")


class SamplingRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(**REQUEST_CONFIG, json_schema_extra=with_rules)
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
    n: Choices = Field(1, description=f"Choices to generate (up to {MAX_CHOICES}), from one prefill of the "
                       "prompt; with a seed, choice i samples with seed + i.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from the logit of every token "
                                    "already generated.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit once per "
                                     "time it was generated.")
    logit_bias: LogitBias | None = Field(None, description="Token id (as a string) -> bias in [-100, 100] added "
                                         "to its logit; ids must be in the model's vocabulary.")
    user: Text | None = Field(None, description="End-user id, for logs.")
    # Extensions.
    speculative: bool = Field(True, description="False decodes this request without speculation.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="vLLM's: the logits of tokens in the prompt or "
                                      "output are divided by it where positive, multiplied where negative; 1: off.")
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

    @property
    def grammar(self) -> GrammarSpec | None:
        """The constraint on the output (structured outputs, a forced tool call), if any."""
        return None


class TextPart(BaseModel):
    """A content part; only text parts are supported."""

    model_config = REQUEST_CONFIG
    type: Literal["text"]
    text: str


# Tool calls belong to assistant messages, tool_call_id to tool messages.
TOOL_CALLS_RULE = {
    "if": {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array"}}},
    "then": {"properties": {"role": {"const": "assistant"}}},
}
TOOL_CALL_ID_RULE = {
    "if": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}},
    "then": {"properties": {"role": {"const": "tool"}}},
}


class ChatMessage(BaseModel):
    model_config = ConfigDict(**REQUEST_CONFIG, json_schema_extra=with_rules)
    schema_rules: ClassVar[tuple[dict[str, Any], ...]] = (TOOL_CALLS_RULE, TOOL_CALL_ID_RULE)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, validate_default=True)  # None becomes ""
    name: Text | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant message's calls.")
    tool_call_id: Text | None = Field(None, description="A tool message: the call it answers.")
    refusal: Unsupported = None
    audio: Unsupported = None
    function_call: Unsupported = Field(None, description="Deprecated by OpenAI; use tool_calls.")

    @model_validator(mode="after")
    def _tool_fields_by_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages carry tool calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id: only tool messages answer a tool call")
        return self

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


class TextFormat(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = REQUEST_CONFIG
    name: Name
    description: Text | None = None
    schema_: JsonObject = Field(alias="schema", description="The JSON schema the output must be valid against.")
    strict: bool | None = Field(None, description="Accepted either way: the schema is always enforced.")


class JsonSchemaFormat(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]
ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
FORCING = {"anyOf": [{"const": "required"}, {"type": "object"}]}  # tool_choice values that force a call
FORCED_CALL_NEEDS_TOOLS_RULE = {
    "if": {"required": ["tool_choice"], "properties": {"tool_choice": FORCING}},
    "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
}
ONE_GRAMMAR_RULE = {"not": {
    "required": ["tool_choice", "response_format"],
    "properties": {"tool_choice": FORCING, "response_format": {
        "type": "object", "required": ["type"], "properties": {"type": {"enum": ["json_object", "json_schema"]}}}},
}}


class ChatCompletionRequest(SamplingRequest):
    schema_rules: ClassVar[tuple[dict[str, Any], ...]] = (
        STREAM_OPTIONS_RULE, TOP_LOGPROBS_RULE, FORCED_CALL_NEEDS_TOOLS_RULE, ONE_GRAMMAR_RULE)

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far.")
    logprobs: bool | None = Field(None, description="Return each output token's log-probability.")
    top_logprobs: TopLogprobs | None = Field(None, description="With logprobs: also the k likeliest tokens at each position.")
    response_format: ResponseFormat | None = Field(
        None, description="text (default), json_object (any JSON object) or json_schema: the output is forced to it.")
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS, description="Functions the model may call.")
    tool_choice: ToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or a named function: required and a "
        "named function force one call with arguments valid against the function's parameters.")
    parallel_tool_calls: bool | None = Field(
        None, description="false: at most the first call of an `auto` answer is returned (a forced call is one).")
    # No-op identifiers, as `user`.
    metadata: dict[str, Text] | None = Field(None, description="Accepted; no effect (nothing is stored).")
    prompt_cache_key: Text | None = Field(None, description="Accepted; no effect.")
    safety_identifier: Text | None = Field(None, description="Accepted; no effect.")
    store: bool | None = Field(None, description="Completions are never stored: false or null only.",
                               json_schema_extra={"anyOf": [{"const": False}, {"type": "null"}]})
    service_tier: Literal["auto", "default"] | None = Field(None, description="One tier: auto or default only.")
    modalities: list[Literal["text"]] | None = Field(None, description="Text only.")
    # OpenAI fields this server does not implement: refused unless null.
    audio: Unsupported = None
    prediction: Unsupported = None
    web_search_options: Unsupported = None
    reasoning_effort: Unsupported = None
    verbosity: Unsupported = None
    functions: Unsupported = Field(None, description="Deprecated by OpenAI; use tools.")
    function_call: Unsupported = Field(None, description="Deprecated by OpenAI; use tool_choice.")

    @field_validator("store")
    @classmethod
    def _never_stored(cls, store: bool | None) -> bool | None:
        if store:
            raise ValueError("this server stores no completions: leave store out, or send false")
        return store

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @model_validator(mode="after")
    def _forced_calls_need_tools_and_no_other_grammar(self) -> ChatCompletionRequest:
        if self.forces_tool_call:
            if not self.tools:
                raise ValueError("tool_choice: forcing a call (required or a named function) needs tools")
            if self.response_format is not None and self.response_format.type != "text":
                raise ValueError("response_format: a JSON response format and a forced tool call cannot both apply")
        return self

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def effective_tool_choice(self) -> ToolChoice:
        """OpenAI's default: auto with tools, none without."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def offered_tools(self) -> list[Tool]:
        """The tools the chat template shows the model: none with tool_choice none."""
        return [] if self.effective_tool_choice == "none" else list(self.tools or [])

    @property
    def grammar(self) -> GrammarSpec | None:
        if self.forces_tool_call:
            named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
            return forced_call_grammar([(t.function.name, t.function.parameters) for t in self.tools or []], named)
        if isinstance(self.response_format, JsonObjectFormat):
            return GrammarSpec(kind="json_object")
        if isinstance(self.response_format, JsonSchemaFormat):
            return GrammarSpec(kind="json_schema", schema=self.response_format.json_schema.schema_)
        return None


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str, WithJsonSchema(PROMPT_SCHEMA)] = Field(
        ..., description="A string, or a list holding exactly one string.")
    logprobs: TopLogprobs | None = Field(None, description="Return each token's log-probability and the k likeliest tokens.")
    best_of: Annotated[int, IntegralFloat] | None = Field(
        None, description="Not supported (every sequence generated is returned): 1 or null only.",
        json_schema_extra={"anyOf": [{"const": 1}, {"type": "null"}]})
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

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError(f"best_of={best_of} is not supported: this server returns every sequence it generates "
                             "(ask for n choices instead)")
        return best_of

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
        n=request.n,
        logit_bias={int(token): bias for token, bias in (request.logit_bias or {}).items()},
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        grammar=request.grammar,
    )
