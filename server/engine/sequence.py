"""Per-request decoding state, owned by the engine's thread.

Life of a sequence: WAITING (queued, no KV slot) -> PREFILL (has a slot; its prompt enters the
cache chunk by chunk) -> DECODE (the prompt is in; `output_ids[-1]` is the pending token, emitted
but not yet in the cache, the root of the next verification tree) -> FINISHED (slot freed).
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

    def __post_init__(self) -> None:
        # Unseeded requests still get a fixed seed, so their noise is per position (sampler.py).
        self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)

    @property
    def pending_token(self) -> int:
        return self.output_ids[-1]

    @property
    def remaining_prompt(self) -> int:
        return len(self.prompt_ids) - self.num_prefilled

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
