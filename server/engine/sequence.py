"""Per-request decoding state, owned by the engine's thread.

Life of a sequence: WAITING (queued, no KV slot) -> PREFILL (has a slot; its prompt enters the
cache chunk by chunk) -> DECODE (the prompt is in; `output_ids[-1]` is the pending token, emitted
but not yet in the cache, the root of the next verification tree) -> FINISHED (slot freed).

A request with n > 1 is n sequences that share one prefill. The first (index 0) is scheduled as
usual and carries the others in `forks`; they are admitted with it (each gets its own slot) and
wait as FORKED while it prefills all of the prompt but its last token. Then the engine copies that
prefix's K/V into their slots and each prefills the last token itself: that forward gives each
its own first-token logits and sample, from its own seed, and then the n decode independently.
Every sequence has its own `request_id` (the drafter and the engine key their state by it); the
request's id, which its deltas carry, is `group_id`.
"""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass, field

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.types import FinishReason, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    FORKED = "forked"  # has a slot; waits for its request's first sequence to prefill the shared prefix
    DECODE = "decode"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    status: Status = Status.WAITING
    slot: int = -1
    num_prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    seed: int = 0
    drafting: bool = True  # False once the drafter failed on it: it decodes on without drafts
    arrival: float = field(default_factory=time.monotonic)
    index: int = 0  # which of its request's n choices
    group_id: str = ""  # the request's id (default: request_id)
    forks: list[Sequence] = field(default_factory=list)  # FORKED sequences waiting for this one's prefix
    shared_hidden: list = field(default_factory=list)  # the prefix's hidden states, for the forks' drafter

    def __post_init__(self) -> None:
        # Unseeded requests still get a fixed seed, so their noise is per position (sampler.py).
        base = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.seed = base + self.index
        self.group_id = self.group_id or self.request_id

    @property
    def shared_prefix(self) -> int:
        """Prompt tokens prefilled once for all of a request's sequences: all but the last."""
        return len(self.prompt_ids) - 1

    @property
    def pending_token(self) -> int:
        return self.output_ids[-1]

    @property
    def remaining_prompt(self) -> int:
        """Prompt tokens still to prefill now; while forks wait, only up to the shared prefix."""
        end = self.shared_prefix if self.forks else len(self.prompt_ids)
        return end - self.num_prefilled

    @property
    def group_size(self) -> int:
        """Slots this sequence needs to be admitted: its own and its forks'."""
        return 1 + len(self.forks)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
