"""Continuous batching: who runs in the next forward, with how many tokens.

Every step the scheduler
1. admits waiting requests (first come, first served) while a KV slot is free;
2. gives each decoding sequence its tree budget (draft nodes beyond the root): the adaptive
   policy below;
3. fills what is left of the step's token budget with prefill chunks, oldest request first,
   so a long prompt is split over several steps and never stalls the decoding sequences.

Adaptive speculation, three layers:
- the tree budget a sequence gets shrinks as the batch grows: the step's `spec_token_budget` is
  shared among the drafting sequences (a verification forward costs about the same for 1 or a few
  tokens per sequence while the machine is latency-bound, and grows linearly once it is
  compute-bound);
- a sequence whose recent steps accepted (EMA) fewer than `min_accept` draft tokens decodes
  plainly, probing with a small tree every `probe_every` steps;
- `SpeculationGovernor` measures what speculation buys at the current batch size: per batch-size
  bucket it keeps moving averages of emitted tokens per second for each tree budget it tries
  (0 = plain decoding, a few small trees, the largest allowed), plays the fastest and re-tries
  the others every `explore_every` steps. So the tree shrinks where a node costs more than it is
  likely to gain (a CPU, where every tree token is compute; a large batch) and speculation stops
  where a drafter costs more than it saves, by measurement, not by a guess.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Seq
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
    governor: bool = True  # choose the tree budget (0 = plain decoding) by measured throughput (below)
    governor_budgets: tuple[int, ...] = (2, 4, 8)  # budgets it tries besides 0 and max_tree_nodes
    explore_every: int = 16  # steps between tries of the mode the governor currently rejects
    governor_ema: float = 0.2  # weight of the newest step in the governor's tokens/s averages


class SpeculationGovernor:
    """How large a tree to verify, per batch-size bucket, chosen by measured throughput.

    A small bandit: the arms are per-sequence tree budgets (0 = plain decoding). For every
    (bucket, budget) it keeps a moving average of emitted tokens per second of decode steps run
    with that budget; it plays the best one and, every `explore_every` steps of a bucket, one of the
    others in turn, so the choice follows the drafter's acceptance and the machine's cost of a
    tree as both change. Before judging, each arm gets `min_samples` steps, largest tree first.
    """

    def __init__(self, budgets: Seq[int], explore_every: int, ema: float, min_samples: int = 3):
        self.budgets = sorted(set(budgets) | {0}, reverse=True)
        self.explore_every, self.ema, self.min_samples = explore_every, ema, min_samples
        self.rate: dict[tuple[int, int], float] = {}  # (bucket, budget) -> tokens/s EMA
        self.samples: dict[tuple[int, int], int] = {}  # steps measured per (bucket, budget)
        self.steps: dict[int, int] = {}  # decode steps seen per bucket

    @staticmethod
    def bucket(batch: int) -> int:
        return max(1, batch).bit_length()  # 1, 2-3, 4-7, 8-15, 16-31, ...

    def choose(self, batch: int, cap: int) -> int:
        """The tree budget per sequence for a decode step of `batch` sequences, at most `cap`."""
        b = self.bucket(batch)
        options = sorted({min(x, cap) for x in self.budgets}, reverse=True)
        for x in options:
            if self.samples.get((b, x), 0) < self.min_samples:
                return x
        best = max(options, key=lambda x: self.rate[(b, x)])
        n = self.steps.get(b, 0)
        if n % self.explore_every == self.explore_every - 1 and len(options) > 1:
            others = [x for x in options if x != best]
            return others[(n // self.explore_every) % len(others)]
        return best

    def record(self, batch: int, budget: int, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        b = self.bucket(batch)
        self.steps[b] = self.steps.get(b, 0) + 1
        key, rate = (b, budget), tokens / seconds
        self.samples[key] = self.samples.get(key, 0) + 1
        old = self.rate.get(key)
        self.rate[key] = rate if old is None else (1 - self.ema) * old + self.ema * rate


@dataclass
class Plan:
    prefill: list[tuple[Sequence, int]]  # (sequence, chunk length)
    decode: list[tuple[Sequence, int]]  # (sequence, draft-node budget; 0 = plain decoding)
    budget: int = 0  # the largest tree budget a sequence got this step (0: a plain step)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.governor = SpeculationGovernor((*config.governor_budgets, config.max_tree_nodes),
                                            config.explore_every, config.governor_ema)

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
        share = min(cfg.max_tree_nodes, cfg.spec_token_budget // max(1, len(drafting))) if drafting else 0
        if share and cfg.governor:
            share = self.governor.choose(len(decoding), share)
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
        # Measured as what the step actually runs: if the per-sequence policy left nobody drafting it
        # is a plain step (no drafter forward), if only probes it is a probe-sized one, whatever the
        # governor offered.
        budget = max((b for _, b in decode), default=0)
        return Plan(prefill=prefill, decode=decode, budget=budget)

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
