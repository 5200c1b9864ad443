"""Types shared by the engine, the worker loop and the API layer.

The API layer maps one HTTP request to `SamplingParams` (validated once, here), the engine core
takes `add_request`/`abort_request`/`step`, and every step yields `RequestDelta`s: the new
tokens and text of one request, plus what speculation did for it in that step (for metrics).
Nothing here imports torch or web frameworks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max_tokens or the model's context limit
    ABORT = "abort"  # cancelled (client went away, shutdown)
    ERROR = "error"  # this request failed inside the engine; others carry on


class EngineError(ValueError):
    """A request the engine refuses (the API layer turns it into a 400)."""


MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's chat limit)
MAX_CHOICES = 16  # n: sequences one request may ask for (each holds a batch slot and a KV-cache slot)


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint every emitted token must keep (structured outputs, forced tool calls).

    The output is `prefix`, then one JSON value (any JSON object for kind "json_object"; a value
    valid against `schema` for kind "json_schema"), then `suffix`; after that only EOS. Tool calls
    use `prefix`/`suffix` for the chat template's call markers around {"name": ..., "arguments": ...}.
    """

    kind: str  # "json_object" | "json_schema"
    schema: dict | None = None  # the JSON schema, for kind "json_schema"
    prefix: str = ""
    suffix: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("json_object", "json_schema"):
            raise EngineError(f"unknown grammar kind {self.kind!r}")
        if (self.kind == "json_schema") != (self.schema is not None):
            raise EngineError("a json_schema grammar needs a schema, and only it takes one")


@dataclass
class SamplingParams:
    """How to decode one request. `temperature == 0` means greedy.

    `top_k=None` and `top_p=1.0` switch those filters off. `speculative=False` decodes this
    request one token per step even when the server runs a drafter. `logprobs=k` (0 <= k <= 20)
    returns each emitted token's log-probability and the k likeliest tokens at its position;
    None returns none. `n` sequences are decoded from one prefill of the prompt; with a seed,
    sequence i samples with `seed + i`, so choice i is what a request with n=1 and that seed gives.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    speculative: bool = True
    logprobs: int | None = None
    n: int = 1
    # Logits processing, applied identically with and without speculation (along a draft tree path
    # the penalties count the path's drafted tokens before each node, as plain decoding would):
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count among generated tokens
    repetition_penalty: float = 1.0  # vLLM/CTRL: logits of prompt or generated tokens / (or *) this
    grammar: GrammarSpec | None = None  # structured output / forced tool call

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise EngineError(f"top_k must be >= 1 (or unset), got {self.top_k}")
        if any(not s for s in self.stop):
            raise EngineError("stop strings must be non-empty")
        if not 1 <= self.n <= MAX_CHOICES:
            raise EngineError(f"n must be in [1, {MAX_CHOICES}], got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise EngineError(f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise EngineError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if not self.repetition_penalty > 0:
            raise EngineError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not -100 <= b <= 100 for b in self.logit_bias.values()):
            raise EngineError("logit_bias values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenLogprob:
    """The base model's log-probability of one emitted token, and the `top` likeliest tokens at its
    position as (token id, log-probability), best first.

    Log-probabilities are of the model's own distribution, log_softmax(logits), before temperature
    and top-k/top-p (as vLLM reports them by default). Speculation does not change them: the
    logits at an accepted tree node are the ones plain decoding computes at that position.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestDelta:
    """What one engine step produced for one request.

    `text` is the newly decoded text (never splits a multi-byte character, never contains a stop
    string or anything after it). `num_draft_tokens`/`num_accepted_tokens` describe this step's
    speculation for the request (both 0 when it did not speculate); accepted excludes the bonus.
    `logprobs`, when the request asked for them, has one entry per token id. `index` is the choice
    (0 to n - 1) of a request with n > 1; each choice ends with its own finished delta.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far, including this delta
    speculated: bool = False
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    error: str | None = None  # set with FinishReason.ERROR
    logprobs: list[TokenLogprob] | None = None
    index: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1: used cache positions over capacity
    drafter_errors: int = 0  # drafter calls that failed since start (the requests decoded on without drafts)


class EngineCore(Protocol):
    """The synchronous engine the worker thread drives. One thread owns it; nothing is locked."""

    model_name: str
    max_model_len: int
    tokenizer: object  # a transformers tokenizer (chat template, decode)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def has_work(self) -> bool: ...

    def step(self) -> list[RequestDelta]: ...

    def stats(self) -> EngineStats: ...
