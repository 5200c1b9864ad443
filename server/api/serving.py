"""Serving logic of the OpenAI endpoints: request -> prompt ids -> engine deltas -> response.

No web framework here: the app hands in validated pydantic requests and gets back either a full
response model or an async iterator of SSE `data:` payloads. Both paths consume the same engine
delta stream (the full response drains it). The first delta is fetched before anything is
returned, so admission failures (queue full, shutting down, a prompt the engine refuses) become
proper HTTP errors even for streams. Mid-stream, an engine error or an abort by a shutdown becomes
an error event (then `[DONE]`); a client that hung up is simply gone.
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
    ModelCard,
    ModelList,
    SamplingRequest,
    Usage,
    to_sampling_params,
)
from server.engine.types import EngineError, FinishReason, RequestDelta, SamplingParams, TokenLogprob
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
    text_offset: int = 0  # characters of token text rendered so far (completions' logprobs)


@dataclass
class Tally:
    """What a request produced so far: text, token counts, steps; for usage and the log line."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them
    completion_tokens: int = 0
    steps: int = 0  # engine steps that emitted tokens for this request
    finish_reason: FinishReason | None = None
    error: str | None = None

    def add(self, delta: RequestDelta) -> None:
        self.text.append(delta.text)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)  # in place: a long answer has thousands of tokens
        if delta.token_ids:
            self.completion_tokens += len(delta.token_ids)
            self.steps += 1
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.error = delta.error

    def usage(self, job: Job) -> Usage:
        prompt = len(job.prompt_ids)
        return Usage(prompt_tokens=prompt, completion_tokens=self.completion_tokens,
                     total_tokens=prompt + self.completion_tokens)


class OpenAIServing:
    """Turns OpenAI requests into engine requests and engine deltas into OpenAI responses."""

    def __init__(self, engine: AsyncEngine, served_model_name: str, default_max_tokens: int) -> None:
        self.engine = engine
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
        self._check_token_ids(request.stop_token_ids or [])
        max_tokens = self._max_tokens(request.requested_max_tokens, len(prompt_ids), prompt_param)
        try:
            params = to_sampling_params(request, max_tokens)
        except EngineError as exc:
            raise ApiError(400, str(exc)) from exc
        job = Job(f"{id_prefix}-{uuid.uuid4().hex}", int(time.time()), self.model_name, prompt_ids, params,
                  request.include_usage)
        deltas = await self._open(job)
        if request.stream:
            return self._events(job, deltas, fmt)
        return fmt.full(job, *await self._drain(job, deltas))

    def _chat_prompt_ids(self, request: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        conversation = [m.model_dump(exclude_none=True) for m in request.messages]
        try:  # the same encoding the drafter's distillation data used
            return chat_prompt_ids(self.tokenizer, conversation)
        except jinja2.TemplateError as exc:
            raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages") from exc

    def _check_token_ids(self, token_ids: list[int]) -> None:
        """Token ids must be in the vocabulary: an id the model can never emit would never stop anything."""
        outside = [t for t in token_ids if t >= self.vocab_size]
        if outside:
            raise ApiError(400, f"stop_token_ids: {outside[0]} is not a token id of this model (its vocabulary "
                           f"has {self.vocab_size} tokens, ids 0 to {self.vocab_size - 1})", param="stop_token_ids")

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

    async def _drain(self, job: Job, deltas: AsyncIterator[RequestDelta]
                     ) -> tuple[str, FinishReason, Usage, list[TokenLogprob] | None]:
        tally = Tally()
        try:
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    tally.add(delta)
        finally:
            self._log_finished(job, tally)
        if tally.finish_reason is FinishReason.ERROR:
            raise ApiError(500, tally.error or "internal engine error", type="server_error")
        if tally.finish_reason in (FinishReason.ABORT, None):
            raise ApiError(503, SHUTDOWN_ABORT, type="server_error", code="unavailable")
        return "".join(tally.text), tally.finish_reason, tally.usage(job), tally.logprobs

    async def _events(self, job: Job, deltas: AsyncIterator[RequestDelta], fmt: ResponseFormat) -> AsyncIterator[str]:
        tally = Tally()
        try:
            for payload in fmt.stream_start(job):
                yield payload
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    tally.add(delta)
                    if delta.text or delta.logprobs:
                        yield fmt.stream_text(job, delta.text, delta.logprobs)
            if tally.finish_reason is FinishReason.ERROR:
                yield fmt.error(tally.error or "internal engine error")
            elif tally.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                yield fmt.stream_finish(job, tally.finish_reason)
                if job.include_usage:
                    yield fmt.stream_usage(job, tally.usage(job))
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
        reason = tally.finish_reason.value if tally.finish_reason else "disconnected"
        if tally.error:
            reason += f": {tally.error}"
        log.info(
            "request %s finished (%s): prompt_tokens=%d completion_tokens=%d acceptance_length=%.2f latency=%.3fs",
            job.request_id, reason, len(job.prompt_ids), tally.completion_tokens,
            tally.completion_tokens / max(tally.steps, 1), time.monotonic() - job.started,
        )


async def _prepend(first: RequestDelta, rest: AsyncIterator[RequestDelta]) -> AsyncIterator[RequestDelta]:
    """`first`, then the rest of the engine stream (closing it when this iterator closes)."""
    async with contextlib.aclosing(rest):
        yield first
        if not first.finished:
            async for delta in rest:
                yield delta
