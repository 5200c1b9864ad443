"""A deterministic fake `EngineCore` and helpers for the API test tier.

`FakeEngineCore` answers every request by echoing its prompt tokens back, `tokens_per_step`
tokens per step when the request speculates (1 otherwise), and stops like a real engine: on EOS
(unless ignore_eos), on a stop string (text cut before it), on max_tokens or the context limit.
Knobs let tests make one request fail inside the engine (isolated), make `step()` itself raise
(the worker's last line of defence), refuse a request at admission, or pause decoding so that
requests pile up. It uses the real demo tokenizer, so chat templates and detokenization are real.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from transformers import AutoTokenizer

from server.api.app import create_app
from server.engine.types import EngineError, EngineStats, FinishReason, RequestDelta, SamplingParams, TokenLogprob
from server.settings import Settings

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo-llama"
PAUSED_STEP_S = 0.002  # how long a paused step sleeps, so a paused worker does not spin hot


@functools.cache
def demo_tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@dataclass
class _Seq:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str
    index: int = 0  # choice of a request with n > 1 (each echoes the same)
    output: list[int] = field(default_factory=list)
    sent_text: str = ""

    @property
    def key(self) -> str:
        return self.request_id if self.index == 0 else f"{self.request_id}#{self.index}"


class FakeEngineCore:
    """Implements `server.engine.types.EngineCore` without a model."""

    def __init__(self, *, max_model_len: int = 1024, max_batch_size: int = 4, tokens_per_step: int = 3,
                 model_name: str = "demo-llama") -> None:
        self.tokenizer = demo_tokenizer()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.tokens_per_step = tokens_per_step
        self.fail_marker: str | None = None  # prompt text that makes that request fail, alone
        self.crash_marker: str | None = None  # prompt text that makes step() raise
        self.refuse_marker: str | None = None  # prompt text that add_request refuses (EngineError)
        self.paused = threading.Event()  # set: steps schedule but emit nothing
        self.pause_after: int | None = None  # set `paused` once a request has this many output tokens
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.running: dict[str, _Seq] = {}
        self.waiting: deque[_Seq] = deque()

    # ---------------------------------------------------------------- EngineCore

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        text = self.tokenizer.decode(prompt_token_ids)
        if self.refuse_marker and self.refuse_marker in text:
            raise EngineError("fake engine refuses this prompt")
        self.added.append(request_id)
        self.waiting.extend(_Seq(request_id, list(prompt_token_ids), params, text, i) for i in range(params.n))

    def abort_request(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running = {k: s for k, s in self.running.items() if s.request_id != request_id}
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> list[RequestDelta]:
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting.popleft()
            self.running[seq.key] = seq
        if self.paused.is_set():
            time.sleep(PAUSED_STEP_S)
            return []
        if self.crash_marker and any(self.crash_marker in s.prompt_text for s in self.running.values()):
            raise RuntimeError("fake engine crashed")
        deltas = []
        for seq in list(self.running.values()):
            deltas.append(self._advance(seq))
            if deltas[-1].finished:
                del self.running[seq.key]
        if self.pause_after is not None and any(len(s.output) >= self.pause_after for s in self.running.values()):
            self.paused.set()
        return deltas

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), len(self.waiting), len(self.running) / self.max_batch_size)

    # ---------------------------------------------------------------- decoding

    def expected_ids(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The echo: prompt token i is output token i, then EOS (or the prompt again with ignore_eos)."""
        n = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        echo = prompt_ids + ([] if params.ignore_eos else [self.tokenizer.eos_token_id])
        return [echo[i % len(echo)] for i in range(n)]

    def _advance(self, seq: _Seq) -> RequestDelta:
        if self.fail_marker and self.fail_marker in seq.prompt_text and seq.output:
            return self._delta(seq, [], "", FinishReason.ERROR, error="fake failure of one request")
        k = self.tokens_per_step if seq.params.speculative else 1
        plan = self.expected_ids(seq.prompt_ids, seq.params)
        new = plan[len(seq.output): len(seq.output) + k]
        finish = None
        stops = set(seq.params.stop_token_ids) | ({self.tokenizer.eos_token_id} - {None})
        for i, token in enumerate(new):
            if token in stops and not (seq.params.ignore_eos and token == self.tokenizer.eos_token_id):
                new, finish = new[: i + 1], FinishReason.STOP
                break
        seq.output += new
        if finish is None and len(seq.output) == len(plan):
            finish = FinishReason.LENGTH
        text = self.tokenizer.decode(seq.output, skip_special_tokens=True)
        for stop in seq.params.stop:
            if stop in text:
                text, finish = text[: text.index(stop)], FinishReason.STOP
        if finish is None:
            text = text[: len(text) - _held_back(text, seq.params.stop)]
        piece, seq.sent_text = text[len(seq.sent_text):], text
        speculated = k > 1
        return self._delta(seq, new, piece, finish, speculated=speculated,
                           drafts=k - 1 if speculated else 0, accepted=max(len(new) - 1, 0) if speculated else 0)

    def _delta(self, seq: _Seq, new: list[int], text: str, finish: FinishReason | None, *, error: str | None = None,
               speculated: bool = False, drafts: int = 0, accepted: int = 0) -> RequestDelta:
        return RequestDelta(
            request_id=seq.request_id, index=seq.index, token_ids=new, text=text, finish_reason=finish,
            prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output), speculated=speculated,
            num_draft_tokens=drafts, num_accepted_tokens=accepted, error=error,
            logprobs=None if seq.params.logprobs is None else [fake_logprob(t, seq.params.logprobs) for t in new],
        )


def fake_logprob(token_id: int, top: int) -> TokenLogprob:
    """A made-up but deterministic log-probability for `token_id`, with `top` alternatives after it."""
    logprob = -0.25 * (token_id % 4)
    return TokenLogprob(token_id, logprob, [(token_id + i, logprob - i) for i in range(top)])


def _held_back(text: str, stops: list[str]) -> int:
    """Characters to keep back: half a UTF-8 character, or a tail that may grow into a stop string."""
    if text.endswith("\ufffd"):
        return 1
    return max((n for stop in stops for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])), default=0)


# -------------------------------------------------------------------- app helpers


def make_settings(**overrides: Any) -> Settings:
    return Settings(model=DEMO_MODEL, drafter="ngram", **overrides)


@contextlib.asynccontextmanager
async def api_client(core: Any, **settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """An httpx client wired to a fresh app (lifespan running) over `core`."""
    settings.setdefault("max_batch_size", core.max_batch_size)
    app = create_app(make_settings(**settings), core)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client, app


def sse_payloads(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order; asserts the framing is well formed."""
    payloads = []
    for event in body.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in event.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), f"bad SSE event: {event!r}"
        payloads.append(lines[0][len("data: "):])
    return payloads


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "demo-llama", "messages": [{"role": "user", "content": content}], **extra}
