"""How one finished or streaming request is rendered for each endpoint.

`ChatFormat` (/v1/chat/completions) and `CompletionFormat` (/v1/completions) build the OpenAI
objects from a job and its text; serving.py drives both through the same calls. Stream payloads
are the JSON strings that follow `data: ` in the SSE stream. Stream shape (as OpenAI sends it):
chat opens with a chunk carrying the assistant role (one per choice), then one chunk per text
delta, then a chunk with an empty delta and the finish_reason, then, if asked
(stream_options.include_usage), a chunk with `usage` and no choices, then `[DONE]` (added by
serving). With n > 1 the choices' chunks interleave, each with its `index`. Requests that ask for
log-probabilities get them on each chunk, one entry per token of the chunk. With tools offered,
the chat text goes through a `ToolCallParser`: a call is sent as a chunk with its index, id and
name, then chunks with its arguments, and its choice finishes with "tool_calls".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel

from server.api.protocol import ErrorInfo, ErrorResponse
from server.api.responses import (
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
    FunctionCallDelta,
    FunctionCallOut,
    SpecDecodeStats,
    TokenLogprobEntry,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from server.api.tools import ParsedCall, Piece, ToolCallParser
from server.engine.detokenizer import token_bytes
from server.engine.types import FinishReason, TokenLogprob

MIN_LOGPROB = -9999.0  # JSON has no -inf: a probability that underflows is reported as this

if TYPE_CHECKING:
    from server.api.serving import Choice, Job


class ResponseFormat(Protocol):
    def stream_start(self, job: Job) -> list[str]: ...

    def stream_text(self, job: Job, index: int, text: str, logprobs: list[TokenLogprob] | None) -> list[str]: ...

    def stream_finish(self, job: Job, index: int, reason: FinishReason, spec: SpecDecodeStats | None) -> list[str]: ...

    def stream_usage(self, job: Job, usage: Usage, spec: SpecDecodeStats | None) -> str: ...

    def full(self, job: Job, choices: list[Choice], usage: Usage, spec: SpecDecodeStats | None) -> BaseModel: ...

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


def _finish_reason(reason: FinishReason, calls: int) -> str:
    """A choice that ended on its own after making calls finished to have them run."""
    return "tool_calls" if calls and reason is FinishReason.STOP else reason.value


class ChatFormat(_Format):
    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self._parsers: dict[int, ToolCallParser] = {}  # per choice, with tools offered
        self._calls: dict[int, int] = {}  # per choice: calls sent so far

    def _parser(self, job: Job, index: int) -> ToolCallParser | None:
        if job.tool_names is None:
            return None
        if index not in self._parsers:
            self._parsers[index] = ToolCallParser(job.tool_names, job.parallel_tool_calls, job.forced_tool_call)
        return self._parsers[index]

    def _chunk(self, job: Job, choices: list[ChatChunkChoice], usage: Usage | None = None,
               spec: SpecDecodeStats | None = None) -> str:
        return ChatCompletionChunk(
            id=job.request_id, created=job.created, model=job.model, choices=choices, usage=usage, spec_decode=spec,
        ).model_dump_json()

    def stream_start(self, job: Job) -> list[str]:
        return [self._chunk(job, [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(job.n)]

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

    def stream_text(self, job: Job, index: int, text: str, logprobs: list[TokenLogprob] | None) -> list[str]:
        parser = self._parser(job, index)
        pieces = parser.push(text) if parser else [Piece(text)]
        if logprobs is not None and not pieces:  # the text is held back; its tokens' logprobs are not
            pieces = [Piece("")]
        chunks = []
        for k, piece in enumerate(pieces):
            lp = self._logprobs(logprobs) if k == 0 else None
            chunks += self._piece(job, index, piece, lp)
        return chunks

    def _piece(self, job: Job, index: int, piece: Piece, logprobs: ChatLogprobs | None = None) -> list[str]:
        """A content chunk; or a call's head (index, id, name) and its arguments so far; or more of
        the arguments of the choice's last call."""
        if piece.call is None and not piece.arguments:
            return [self._chunk(job, [ChatChunkChoice(index=index, delta=DeltaMessage(content=piece.content),
                                                      logprobs=logprobs)])]
        deltas = []
        if piece.call is not None:
            call = piece.call
            self._calls[index] = self._calls.get(index, 0) + 1
            deltas.append(ToolCallDelta(index=self._calls[index] - 1, id=call.id, type="function",
                                        function=FunctionCallDelta(name=call.name, arguments="")))
        arguments = piece.call.arguments if piece.call is not None else piece.arguments
        if arguments:
            deltas.append(ToolCallDelta(index=self._calls[index] - 1, function=FunctionCallDelta(arguments=arguments)))
        return [self._chunk(job, [ChatChunkChoice(index=index, delta=DeltaMessage(tool_calls=[d]),
                                                  logprobs=logprobs if k == 0 else None)])
                for k, d in enumerate(deltas)]

    def stream_finish(self, job: Job, index: int, reason: FinishReason, spec: SpecDecodeStats | None) -> list[str]:
        parser = self._parser(job, index)
        chunks = [c for p in (parser.flush() if parser else []) for c in self._piece(job, index, p)]
        finish = _finish_reason(reason, self._calls.get(index, 0))
        return chunks + [self._chunk(job, [ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=finish)],
                                     spec=spec)]

    def stream_usage(self, job: Job, usage: Usage, spec: SpecDecodeStats | None) -> str:
        return self._chunk(job, [], usage, spec)

    def full(self, job: Job, choices: list[Choice], usage: Usage, spec: SpecDecodeStats | None) -> ChatCompletionResponse:
        out = []
        for i, choice in enumerate(choices):
            text, calls = "".join(choice.text), []
            if job.tool_names is not None:
                text, calls = ToolCallParser(job.tool_names, job.parallel_tool_calls, job.forced_tool_call).parse(text)
            message = AssistantMessage(content=None if calls and not text.strip() else text,
                                       tool_calls=[_call_out(c) for c in calls] or None)
            out.append(ChatChoice(index=i, message=message, finish_reason=_finish_reason(choice.finish_reason, len(calls)),
                                  logprobs=self._logprobs(choice.logprobs)))
        return ChatCompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=out, usage=usage, spec_decode=spec,
        )


def _call_out(call: ParsedCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))


class CompletionFormat(_Format):
    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self._offsets: dict[int, int] = {}  # per choice: characters of token text rendered so far

    def _chunk(self, job: Job, choices: list[CompletionChoice], usage: Usage | None = None,
               spec: SpecDecodeStats | None = None) -> str:
        return CompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=choices, usage=usage, spec_decode=spec,
        ).model_dump_json()

    def stream_start(self, job: Job) -> list[str]:
        return []

    def _logprobs(self, index: int, logprobs: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        """Offsets count characters of the whole completion, so they run on across stream chunks."""
        if logprobs is None:
            return None
        tokens = self._tokens(logprobs)
        strings = [_text(tokens[lp.token_id]) for lp in logprobs]
        offsets = []
        for string in strings:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(string)
        return CompletionLogprobs(
            tokens=strings,
            token_logprobs=[max(lp.logprob, MIN_LOGPROB) for lp in logprobs],
            top_logprobs=[{_text(tokens[t]): max(v, MIN_LOGPROB) for t, v in lp.top} for lp in logprobs],
            text_offset=offsets,
        )

    def stream_text(self, job: Job, index: int, text: str, logprobs: list[TokenLogprob] | None) -> list[str]:
        return [self._chunk(job, [CompletionChoice(index=index, text=text, logprobs=self._logprobs(index, logprobs))])]

    def stream_finish(self, job: Job, index: int, reason: FinishReason, spec: SpecDecodeStats | None) -> list[str]:
        return [self._chunk(job, [CompletionChoice(index=index, text="", finish_reason=reason.value)], spec=spec)]

    def stream_usage(self, job: Job, usage: Usage, spec: SpecDecodeStats | None) -> str:
        return self._chunk(job, [], usage, spec)

    def full(self, job: Job, choices: list[Choice], usage: Usage, spec: SpecDecodeStats | None) -> CompletionResponse:
        out = [CompletionChoice(index=i, text="".join(c.text), finish_reason=c.finish_reason.value,
                                logprobs=self._logprobs(i, c.logprobs)) for i, c in enumerate(choices)]
        return CompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=out, usage=usage, spec_decode=spec,
        )
