"""Continuous batching: who runs in the next forward, with how many tokens.

Every step the scheduler
1. admits waiting requests (first come, first served) while a KV slot is free;
2. gives each decoding sequence its tree budget (draft nodes beyond the root): the adaptive
   policy below;
3. fills what is left of the step's token budget with prefill chunks, oldest request first,
   so a long prompt is split over several steps and never stalls the decoding sequences.

Adaptive speculation. A verification forward costs about the same for 1 or a few tokens per
sequence while the machine is latency-bound, and grows linearly once it is compute-bound. So
the budget a sequence gets shrinks as the batch grows (the step's `spec_token_budget` is shared
among the decoding sequences) and as its own acceptance drops: a sequence whose recent steps
accepted (EMA) fewer than `min_accept` draft tokens decodes plainly, and probes with a small
tree every `probe_every` steps to notice when drafting starts paying again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from server.engine.sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_batch_size: int = 16
    max_tree_nodes: int = 16  # draft nodes per sequence at batch size 1
    spec_token_budget: int = 48  # draft nodes per step, shared by all decoding sequences
    prefill_chunk: int = 256  # prompt tokens per step, all prefilling sequences together
    min_accept: float = 0.5  # EMA of accepted draft tokens below which a sequence stops drafting
    probe_every: int = 8  # steps between small probe trees for a sequence that stopped drafting
    probe_nodes: int = 2


@dataclass
class Plan:
    prefill: list[tuple[Sequence, int]]  # (sequence, chunk length)
    decode: list[tuple[Sequence, int]]  # (sequence, draft-node budget; 0 = plain decoding)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def admit(self, can_allocate, allocate) -> list[Sequence]:
        admitted = []
        while self.waiting and len(self.running) < self.config.max_batch_size and can_allocate():
            seq = self.waiting.popleft()
            seq.slot, seq.status = allocate(), Status.PREFILL
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def plan(self, speculation_enabled: bool) -> Plan:
        cfg = self.config
        decoding = [s for s in self.running if s.status is Status.DECODE]
        drafting = [s for s in decoding if speculation_enabled and s.params.speculative]
        share = min(cfg.max_tree_nodes, cfg.spec_token_budget // max(1, len(drafting)))
        decode = []
        for seq in decoding:
            budget = self._tree_budget(seq, share) if seq in drafting else 0
            decode.append((seq, budget))
        prefill, left = [], cfg.prefill_chunk
        for seq in self.running:
            if seq.status is Status.PREFILL and left > 0:
                n = min(seq.remaining_prompt, left)
                prefill.append((seq, n))
                left -= n
        return Plan(prefill=prefill, decode=decode)

    def _tree_budget(self, seq: Sequence, share: int) -> int:
        if share <= 0:
            return 0
        if seq.accept_ema >= self.config.min_accept:
            return share
        seq.steps_since_probe += 1
        if seq.steps_since_probe >= self.config.probe_every:
            seq.steps_since_probe = 0
            return min(share, self.config.probe_nodes)
        return 0
