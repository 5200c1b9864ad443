"""Serving logic of the OpenAI endpoints: request -> prompt ids -> engine deltas -> response.

No web framework here: the app hands in validated pydantic requests and gets back either a full
response model or an async iterator of SSE `data:` payloads. Both paths consume the same engine
delta stream (the full response drains it). The first delta is fetched before anything is
returned, so admission failures (queue full, shutting down, a prompt the engine refuses) become
proper HTTP errors even for streams. Mid-stream, an engine error or an abort by a shutdown becomes
an error event (then `[DONE]`); a client that hung up is simply gone. A request with n > 1 is one
engine request whose deltas carry their choice's index; usage counts its prompt once. With
`per_request_spec_decode_metrics`, the response (the last chunk of a stream) carries what
speculation did for it (`spec_decode`).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jinja2
from pydantic import BaseModel

from server.api.async_engine import AsyncEngine, EngineUnavailable, QueueFull
from server.api.formats import ChatFormat, CompletionFormat, ResponseFormat
from server.api.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    SamplingRequest,
    to_sampling_params,
)
from server.api.responses import ModelCard, ModelList, SpecDecodeStats, Usage
from server.engine.types import MAX_CHOICES, EngineError, FinishReason, RequestDelta, SamplingParams, TokenLogprob
from server.runtime.loader import chat_prompt_ids

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 tells clients to wait; the queue drains at step speed
SHUTDOWN_ABORT = "the request was aborted: the server is shutting down"


@dataclass
class Job:
    """One admitted request, as the response formats need it."""

    request_id: str
    created: int
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    include_usage: bool
    started: float = field(default_factory=time.monotonic)
    tool_names: list[str] | None = None  # the tools offered (chat): the output is parsed for calls
    parallel_tool_calls: bool = True
    forced_tool_call: bool = False  # a grammar forces one call: it is streamed as it is generated
    spec_metrics: bool = False  # report `spec_decode` (per_request_spec_decode_metrics)

    @property
    def n(self) -> int:
        return self.params.n


@dataclass
class Choice:
    """What one choice produced so far."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None


@dataclass
class Tally:
    """What a request produced so far, per choice, and what speculation did for it: for usage,
    `spec_decode` and the log line."""

    choices: list[Choice]
    steps: int = 0  # deltas that emitted tokens (per choice and engine step)
    drafts: int = 0  # of which verified a draft
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @classmethod
    def of(cls, job: Job) -> Tally:
        return cls([Choice() for _ in range(job.n)])

    def add(self, delta: RequestDelta) -> Choice:
        choice = self.choices[delta.index]
        choice.text.append(delta.text)
        if delta.logprobs is not None:
            if choice.logprobs is None:
                choice.logprobs = []
            choice.logprobs.extend(delta.logprobs)  # in place: a long answer has thousands of tokens
        if delta.token_ids:
            choice.completion_tokens += len(delta.token_ids)
            self.steps += 1
        if delta.speculated:
            self.drafts += 1
            self.draft_tokens += delta.num_draft_tokens
            self.accepted_tokens += delta.num_accepted_tokens
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            choice.error = delta.error
        return choice

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    @property
    def failure(self) -> Choice | None:
        """The first choice that did not end normally (error, abort, or no end at all), if any."""
        return next((c for c in self.choices if c.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH)), None)

    def usage(self, job: Job) -> Usage:
        prompt = len(job.prompt_ids)  # once, however many choices share it
        return Usage(prompt_tokens=prompt, completion_tokens=self.completion_tokens,
                     total_tokens=prompt + self.completion_tokens)

    def spec_decode(self, job: Job) -> SpecDecodeStats | None:
        if not job.spec_metrics:
            return None
        length = 1 + self.accepted_tokens / self.drafts if self.drafts else None
        return SpecDecodeStats(num_drafts=self.drafts, num_draft_tokens=self.draft_tokens,
                               num_accepted_tokens=self.accepted_tokens, acceptance_length=length)


class OpenAIServing:
    """Turns OpenAI requests into engine requests and engine deltas into OpenAI responses."""

    def __init__(self, engine: AsyncEngine, served_model_name: str, default_max_tokens: int,
                 spec_metrics: bool = False, max_batch_size: int = MAX_CHOICES) -> None:
        self.engine = engine
        self.spec_metrics = spec_metrics
        self.max_choices = min(MAX_CHOICES, max_batch_size)  # the n sequences of a request run in one batch
        self.tokenizer = engine.core.tokenizer
        self.vocab_size = len(self.tokenizer)  # every id the tokenizer knows, added tokens included
        self.max_model_len = engine.core.max_model_len
        self.model_name = served_model_name
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())

    def models(self) -> ModelList:
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_model_len)
        return ModelList(data=[card])

    async def chat(self, request: ChatCompletionRequest) -> BaseModel | AsyncIterator[str]:
        """A ChatCompletionResponse, or (stream) an async iterator of SSE `data:` payloads."""
        self._check_tools(request)
        prompt_ids = self._chat_prompt_ids(request)
        return await self._serve(request, prompt_ids, "chatcmpl", "messages", ChatFormat(self.tokenizer))

    async def completion(self, request: CompletionRequest) -> BaseModel | AsyncIterator[str]:
        """A CompletionResponse, or (stream) an async iterator of SSE data payloads."""
        prompt_ids = self.tokenizer.encode(request.prompt)
        if not prompt_ids:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        return await self._serve(request, prompt_ids, "cmpl", "prompt", CompletionFormat(self.tokenizer))

    # ------------------------------------------------------------ shared path

    async def _serve(
        self, request: SamplingRequest, prompt_ids: list[int], id_prefix: str, prompt_param: str,
        fmt: ResponseFormat,
    ) -> BaseModel | AsyncIterator[str]:
        if request.model is not None and request.model != self.model_name:
            raise ApiError(404, f"The model `{request.model}` does not exist; this server serves "
                           f"`{self.model_name}`.", param="model", code="model_not_found")
        if request.n > self.max_choices:
            raise ApiError(400, f"n: at most {self.max_choices} choices per request on this server (its batch holds "
                           f"{self.max_choices} sequences)", param="n")
        self._check_token_ids(request.stop_token_ids or [], "stop_token_ids")
        self._check_token_ids([int(t) for t in request.logit_bias or {}], "logit_bias")
        max_tokens = self._max_tokens(request.requested_max_tokens, len(prompt_ids), prompt_param)
        try:
            params = to_sampling_params(request, max_tokens)
        except EngineError as exc:
            raise ApiError(400, str(exc)) from exc
        job = Job(f"{id_prefix}-{uuid.uuid4().hex}", int(time.time()), self.model_name, prompt_ids, params,
                  request.include_usage, spec_metrics=self.spec_metrics)
        if isinstance(request, ChatCompletionRequest) and request.offered_tools:
            job.tool_names = [t.function.name for t in request.offered_tools]
            job.parallel_tool_calls = request.parallel_tool_calls is not False
            job.forced_tool_call = request.forces_tool_call
        deltas = await self._open(job)
        if request.stream:
            return self._events(job, deltas, fmt)
        return await self._drain(job, deltas, fmt)

    def _chat_prompt_ids(self, request: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        conversation = [m.model_dump(exclude_none=True) for m in request.messages]
        tools = [t.model_dump(exclude_none=True) for t in request.offered_tools] or None
        try:  # the same encoding the drafter's distillation data used
            return chat_prompt_ids(self.tokenizer, conversation, tools)
        except jinja2.TemplateError as exc:
            raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages") from exc

    def _check_token_ids(self, token_ids: list[int], param: str) -> None:
        """Token ids must be in the vocabulary: an id the model can never emit would never stop
        anything, and a bias on it would change nothing."""
        outside = [t for t in token_ids if t >= self.vocab_size]
        if outside:
            raise ApiError(400, f"{param}: {outside[0]} is not a token id of this model (its vocabulary "
                           f"has {self.vocab_size} tokens, ids 0 to {self.vocab_size - 1})", param=param)

    @staticmethod
    def _check_tools(request: ChatCompletionRequest) -> None:
        """What the schema cannot say: tool names are unique, and a named choice names one of them."""
        names = [t.function.name for t in request.tools or []]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ApiError(400, f"tools: the function name {twice[0]!r} is used more than once", param="tools",
                           code="duplicate_tool_name")
        if isinstance(request.tool_choice, NamedToolChoice) and request.tool_choice.function.name not in names:
            raise ApiError(400, f"tool_choice: no tool named {request.tool_choice.function.name!r} is offered in "
                           "tools", param="tool_choice", code="tool_not_found")

    def _max_tokens(self, requested: int | None, prompt_len: int, prompt_param: str) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens, but the "
                           f"prompt has {prompt_len} tokens, leaving no room to generate. Please shorten the "
                           f"{prompt_param}.", param=prompt_param, code="context_length_exceeded")
        if requested is None:
            return min(self.default_max_tokens, room)
        if requested > room:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                           f"you requested {prompt_len + requested} tokens ({prompt_len} in the {prompt_param}, "
                           f"{requested} for the completion). Please reduce the length of the {prompt_param} or "
                           f"max_tokens to at most {room}.", param="max_tokens", code="context_length_exceeded")
        return requested

    async def _open(self, job: Job) -> AsyncIterator[RequestDelta]:
        """Submit the job and wait for its first delta; map admission failures to API errors."""
        deltas = self.engine.generate(job.request_id, job.prompt_ids, job.params)
        try:
            first = await anext(deltas)
        except QueueFull as exc:
            raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except EngineUnavailable as exc:
            raise ApiError(503, str(exc), type="server_error", code="unavailable") from exc
        except EngineError as exc:
            raise ApiError(400, str(exc)) from exc
        return _prepend(first, deltas)

    async def _drain(self, job: Job, deltas: AsyncIterator[RequestDelta], fmt: ResponseFormat) -> BaseModel:
        tally = Tally.of(job)
        try:
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    tally.add(delta)
        finally:
            self._log_finished(job, tally)
        failed = tally.failure
        if failed is not None and failed.finish_reason is FinishReason.ERROR:
            raise ApiError(500, failed.error or "internal engine error", type="server_error")
        if failed is not None:  # aborted by a shutdown
            raise ApiError(503, SHUTDOWN_ABORT, type="server_error", code="unavailable")
        return fmt.full(job, tally.choices, tally.usage(job), tally.spec_decode(job))

    async def _events(self, job: Job, deltas: AsyncIterator[RequestDelta], fmt: ResponseFormat) -> AsyncIterator[str]:
        tally = Tally.of(job)
        try:
            for payload in fmt.stream_start(job):
                yield payload
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    choice = tally.add(delta)
                    if delta.text or delta.logprobs:
                        for payload in fmt.stream_text(job, delta.index, delta.text, delta.logprobs):
                            yield payload
                    if delta.finished and choice.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                        last = tally.finished and not job.include_usage  # the last chunk carries spec_decode
                        spec = tally.spec_decode(job) if last else None
                        for payload in fmt.stream_finish(job, delta.index, choice.finish_reason, spec):
                            yield payload
                    elif delta.finished:
                        break  # an error or an abort ends the whole response (closing the rest)
            failed = tally.failure
            if failed is None:
                if job.include_usage:
                    yield fmt.stream_usage(job, tally.usage(job), tally.spec_decode(job))
            elif failed.finish_reason is FinishReason.ERROR:
                yield fmt.error(failed.error or "internal engine error")
            else:  # aborted by a shutdown (a client that hung up reads nothing more)
                yield fmt.error(SHUTDOWN_ABORT)
            yield "[DONE]"
        except Exception:
            log.exception("stream %s failed", job.request_id)
            yield fmt.error("internal server error")
            yield "[DONE]"
        finally:
            self._log_finished(job, tally)

    def _log_finished(self, job: Job, tally: Tally) -> None:
        ends = [c.finish_reason.value if c.finish_reason else "disconnected" for c in tally.choices]
        reason = ", ".join(dict.fromkeys(ends))
        errors = [c.error for c in tally.choices if c.error]
        if errors:
            reason += f": {errors[0]}"
        log.info(
            "request %s finished (%s): prompt_tokens=%d completion_tokens=%d acceptance_length=%.2f latency=%.3fs",
            job.request_id, reason, len(job.prompt_ids), tally.completion_tokens,
            tally.completion_tokens / max(tally.steps, 1), time.monotonic() - job.started,
        )


async def _prepend(first: RequestDelta, rest: AsyncIterator[RequestDelta]) -> AsyncIterator[RequestDelta]:
    """`first`, then the rest of the engine stream (closing it when this iterator closes)."""
    async with contextlib.aclosing(rest):
        yield first
        async for delta in rest:  # ends at once if `first` was the last final delta
            yield delta
