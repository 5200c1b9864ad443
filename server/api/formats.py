"""How one finished or streaming request is rendered for each endpoint.

`ChatFormat` (/v1/chat/completions) and `CompletionFormat` (/v1/completions) build the OpenAI
objects from a job and its text; serving.py drives both through the same calls. Stream payloads
are the JSON strings that follow `data: ` in the SSE stream. Stream shape (as OpenAI sends it):
chat opens with a chunk carrying the assistant role, then one chunk per text delta, then a chunk
with an empty delta and the finish_reason, then, if asked (stream_options.include_usage), a chunk
with `usage` and no choices, then `[DONE]` (added by serving).
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
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    Usage,
)
from server.engine.types import FinishReason

if TYPE_CHECKING:
    from server.api.serving import Job


class ResponseFormat(Protocol):
    def stream_start(self, job: Job) -> list[str]: ...

    def stream_text(self, job: Job, text: str) -> str: ...

    def stream_finish(self, job: Job, reason: FinishReason) -> str: ...

    def stream_usage(self, job: Job, usage: Usage) -> str: ...

    def full(self, job: Job, text: str, reason: FinishReason, usage: Usage) -> BaseModel: ...

    def error(self, message: str) -> str: ...


class _ErrorEvent:
    def error(self, message: str) -> str:
        """A mid-stream server error, in OpenAI's error shape (the openai client raises APIError on it)."""
        return ErrorResponse(error=ErrorInfo(message=message, type="server_error")).model_dump_json()


class ChatFormat(_ErrorEvent):
    def _chunk(self, job: Job, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return ChatCompletionChunk(
            id=job.request_id, created=job.created, model=job.model, choices=choices, usage=usage
        ).model_dump_json()

    def stream_start(self, job: Job) -> list[str]:
        return [self._chunk(job, [ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))])]

    def stream_text(self, job: Job, text: str) -> str:
        return self._chunk(job, [ChatChunkChoice(delta=DeltaMessage(content=text))])

    def stream_finish(self, job: Job, reason: FinishReason) -> str:
        return self._chunk(job, [ChatChunkChoice(delta=DeltaMessage(), finish_reason=reason.value)])

    def stream_usage(self, job: Job, usage: Usage) -> str:
        return self._chunk(job, [], usage)

    def full(self, job: Job, text: str, reason: FinishReason, usage: Usage) -> ChatCompletionResponse:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=reason.value)
        return ChatCompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=[choice], usage=usage
        )


class CompletionFormat(_ErrorEvent):
    def _chunk(self, job: Job, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return CompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=choices, usage=usage
        ).model_dump_json()

    def stream_start(self, job: Job) -> list[str]:
        return []

    def stream_text(self, job: Job, text: str) -> str:
        return self._chunk(job, [CompletionChoice(text=text)])

    def stream_finish(self, job: Job, reason: FinishReason) -> str:
        return self._chunk(job, [CompletionChoice(text="", finish_reason=reason.value)])

    def stream_usage(self, job: Job, usage: Usage) -> str:
        return self._chunk(job, [], usage)

    def full(self, job: Job, text: str, reason: FinishReason, usage: Usage) -> CompletionResponse:
        choice = CompletionChoice(text=text, finish_reason=reason.value)
        return CompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=[choice], usage=usage
        )
