"""How one finished or streaming request is rendered for each endpoint.

`ChatFormat` (/v1/chat/completions) and `CompletionFormat` (/v1/completions) build the OpenAI
objects from a job and its text; serving.py drives both through the same calls. Stream payloads
are the JSON strings that follow `data: ` in the SSE stream. Stream shape (as OpenAI sends it):
chat opens with a chunk carrying the assistant role, then one chunk per text delta, then a chunk
with an empty delta and the finish_reason, then, if asked (stream_options.include_usage), a chunk
with `usage` and no choices, then `[DONE]` (added by serving). Requests that ask for
log-probabilities get them on each chunk, one entry per token of the chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel

from server.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)
from server.engine.detokenizer import token_bytes
from server.engine.types import FinishReason, TokenLogprob

MIN_LOGPROB = -9999.0  # JSON has no -inf: a probability that underflows is reported as this

if TYPE_CHECKING:
    from server.api.serving import Job


class ResponseFormat(Protocol):
    def stream_start(self, job: Job) -> list[str]: ...

    def stream_text(self, job: Job, text: str, logprobs: list[TokenLogprob] | None) -> str: ...

    def stream_finish(self, job: Job, reason: FinishReason) -> str: ...

    def stream_usage(self, job: Job, usage: Usage) -> str: ...

    def full(self, job: Job, text: str, reason: FinishReason, usage: Usage,
             logprobs: list[TokenLogprob] | None) -> BaseModel: ...

    def error(self, message: str) -> str: ...


class _Format:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def error(self, message: str) -> str:
        """A mid-stream server error, in OpenAI's error shape (the openai client raises APIError on it)."""
        return ErrorResponse(error=ErrorInfo(message=message, type="server_error")).model_dump_json()

    def _tokens(self, logprobs: list[TokenLogprob]) -> dict[int, bytes]:
        """The bytes of every token named in `logprobs`, chosen and alternatives, by token id."""
        ids = sorted({lp.token_id for lp in logprobs} | {t for lp in logprobs for t, _ in lp.top})
        return dict(zip(ids, token_bytes(self.tokenizer, ids)))


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


class ChatFormat(_Format):
    def _chunk(self, job: Job, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return ChatCompletionChunk(
            id=job.request_id, created=job.created, model=job.model, choices=choices, usage=usage
        ).model_dump_json()

    def stream_start(self, job: Job) -> list[str]:
        return [self._chunk(job, [ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))])]

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> ChatLogprobs | None:
        if logprobs is None:
            return None
        tokens = self._tokens(logprobs)

        def top(token_id: int, logprob: float) -> TopLogprob:
            return TopLogprob(token=_text(tokens[token_id]), logprob=max(logprob, MIN_LOGPROB),
                              bytes=list(tokens[token_id]))

        return ChatLogprobs(content=[
            TokenLogprobEntry(**top(lp.token_id, lp.logprob).model_dump(), top_logprobs=[top(*t) for t in lp.top])
            for lp in logprobs
        ])

    def stream_text(self, job: Job, text: str, logprobs: list[TokenLogprob] | None) -> str:
        return self._chunk(job, [ChatChunkChoice(delta=DeltaMessage(content=text), logprobs=self._logprobs(logprobs))])

    def stream_finish(self, job: Job, reason: FinishReason) -> str:
        return self._chunk(job, [ChatChunkChoice(delta=DeltaMessage(), finish_reason=reason.value)])

    def stream_usage(self, job: Job, usage: Usage) -> str:
        return self._chunk(job, [], usage)

    def full(self, job: Job, text: str, reason: FinishReason, usage: Usage,
             logprobs: list[TokenLogprob] | None) -> ChatCompletionResponse:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=reason.value,
                            logprobs=self._logprobs(logprobs))
        return ChatCompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=[choice], usage=usage
        )


class CompletionFormat(_Format):
    def _chunk(self, job: Job, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return CompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=choices, usage=usage
        ).model_dump_json()

    def stream_start(self, job: Job) -> list[str]:
        return []

    def _logprobs(self, job: Job, logprobs: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        """Offsets count characters of the whole completion, so they run on across stream chunks."""
        if logprobs is None:
            return None
        tokens = self._tokens(logprobs)
        strings = [_text(tokens[lp.token_id]) for lp in logprobs]
        offsets = []
        for string in strings:
            offsets.append(job.text_offset)
            job.text_offset += len(string)
        return CompletionLogprobs(
            tokens=strings,
            token_logprobs=[max(lp.logprob, MIN_LOGPROB) for lp in logprobs],
            top_logprobs=[{_text(tokens[t]): max(v, MIN_LOGPROB) for t, v in lp.top} for lp in logprobs],
            text_offset=offsets,
        )

    def stream_text(self, job: Job, text: str, logprobs: list[TokenLogprob] | None) -> str:
        return self._chunk(job, [CompletionChoice(text=text, logprobs=self._logprobs(job, logprobs))])

    def stream_finish(self, job: Job, reason: FinishReason) -> str:
        return self._chunk(job, [CompletionChoice(text="", finish_reason=reason.value)])

    def stream_usage(self, job: Job, usage: Usage) -> str:
        return self._chunk(job, [], usage)

    def full(self, job: Job, text: str, reason: FinishReason, usage: Usage,
             logprobs: list[TokenLogprob] | None) -> CompletionResponse:
        choice = CompletionChoice(text=text, finish_reason=reason.value, logprobs=self._logprobs(job, logprobs))
        return CompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=[choice], usage=usage
        )
