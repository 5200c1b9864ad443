"""Continuous batching: who runs in the next forward, with how many tokens.

Every step the scheduler
1. admits waiting requests (first come, first served) while a KV slot is free;
2. gives each decoding sequence its tree budget (draft nodes beyond the root): the adaptive
   policy below;
3. fills the step's prefill budget with prompt chunks, oldest request first, so a long prompt is
   split over several steps and never stalls the decoding sequences: the full `prefill_chunk`
   while fewer sequences decode than prefill, else a chunk sized from measured step costs so
   that the step costs at most `prefill_step_ratio` times a decode step (prefill_budget.py).

Adaptive speculation, two layers:
- the tree budget a sequence gets shrinks as the batch grows: the step's `spec_token_budget` is
  shared among the drafting sequences (a verification forward costs about the same for 1 or a few
  tokens per sequence while the machine is latency-bound, and grows linearly once it is
  compute-bound);
- `SpeculationGovernor` measures what speculation buys at the current batch size: per batch-size
  bucket and tree budget (0 = plain decoding, a few small trees, the largest allowed) it keeps the
  measured cost of a step and the acceptance every budget would have had (one verified tree
  shows that for all smaller budgets), plays the budget of most tokens per second and re-checks
  the others now and then (less often the further behind they are). So the tree shrinks where a node costs more than it is
  likely to gain (a CPU, where every tree token is compute; a large batch) and speculation stops
  where a drafter costs more than it saves, by measurement, not by a guess. A drafter with a
  cheaper way to draft (the lookup hybrid without its learned forward: Drafter.tiers) gets arms
  for each, so under load it drafts what lookup finds instead of paying for a learned forward
  or giving up drafting altogether.
There is no per-sequence switch (a sequence that accepted little lately decoding plainly): acceptance
comes in bursts, so such a switch turned drafting off just before the next burst, and it fed the
governor's counterfactual acceptance with sequences that did not draft (BENCHMARKS.md, engine).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import NamedTuple

import torch

from server.engine.prefill_budget import PrefillBudget
from server.engine.sequence import Sequence, Status


def default_tree_nodes(device: torch.device | str) -> int:
    """The server's default `max_tree_nodes` on `device`: 16 on an accelerator, where a verify
    forward costs about the same for 1 or 17 tokens; 8 on a CPU, where every tree token is compute:
    at batch 1 a 16-node tree there is 4-6% slower than an 8-node one, and a governor offered both
    wandered to it on text where it drafted well for a while (BENCHMARKS.md, "Eight nodes on a CPU")."""
    return 8 if torch.device(device).type == "cpu" else 16


@dataclass
class SchedulerConfig:
    max_batch_size: int = 16
    max_tree_nodes: int = 16  # draft nodes per sequence at batch size 1 (the server: default_tree_nodes)
    spec_token_budget: int = 48  # draft nodes per step, shared by all decoding sequences
    prefill_chunk: int = 256  # most prompt tokens per step, all prefilling sequences together
    # While sequences decode, a step that also prefills is sized to cost at most this many times a
    # decode step, by measurement (their inter-token latency; issue 14 asks for <= 2.5x the median:
    # at 2 the machine's noise took single steps past it, at 1.5 it did not, BENCHMARKS.md);
    # None: always the full prefill_chunk.
    prefill_step_ratio: float | None = 1.5
    min_prefill_chunk: int = 16  # the least a long prompt advances per step while sequences decode
    governor: bool = True  # choose the tree budget (0 = plain decoding) by measured throughput (below)
    governor_budgets: tuple[int, ...] = (2, 4, 8)  # budgets it tries besides 0 and max_tree_nodes
    explore_every: int = 32  # steps between tries of a tree size the governor currently rejects
    # A tree within this fraction of the best rate, and larger, plays instead at batch 1 (halved per
    # batch-size bucket): SpeculationGovernor's docstring says why.
    governor_larger_margin: float = 0.1
    # Below this batch size the governor's only tree of the drafter's full tier is its largest (the
    # cheaper tiers keep every size); from it on, every size of every tier (SpeculationGovernor's
    # docstring says why). 1: every size at every batch size.
    governor_choices_from: int = 2

    def __post_init__(self):
        if self.prefill_step_ratio is not None and self.prefill_step_ratio <= 1:
            raise ValueError(f"prefill_step_ratio must be > 1 (or None), not {self.prefill_step_ratio}")
        if self.governor_larger_margin < 0:
            raise ValueError(f"governor_larger_margin must be >= 0, not {self.governor_larger_margin}")
        if self.governor_choices_from < 1:
            raise ValueError(f"governor_choices_from must be >= 1, not {self.governor_choices_from}")
        if self.min_prefill_chunk < 1:
            raise ValueError(f"min_prefill_chunk must be >= 1, not {self.min_prefill_chunk}")


class Option(NamedTuple):
    """What a decode step plays: the tree budget per sequence (0: plain decoding) and the drafter
    tier that fills it (drafter.base.Drafter.tiers; 0: the drafter's full way)."""

    budget: int
    tier: int = 0


PLAIN = Option(0)
Bucket = tuple[int, bool]  # (batch-size class, some request samples): SpeculationGovernor.bucket
Arm = tuple[Bucket, Option]


@dataclass(frozen=True)
class DraftOutcome:
    """What one sequence's verified tree showed: the budget it was given, the draft nodes its tree
    had (fewer when the drafter had nothing more to offer), and the accepted draft nodes' indices
    (increasing; trees list nodes best first, so index <= k means "in the budget-k tree")."""

    budget: int
    nodes: int
    accepted: list[int]
    forward_above: float | None = None  # the tree's TokenTree.forward_above

    def accepted_within(self, k: int) -> int | None:
        """Draft tokens a budget-k tree would have accepted; None if this tree cannot tell (it was
        cut by a smaller budget, so what k more nodes would have held is unknown)."""
        if k > self.nodes and self.nodes >= self.budget:
            return None
        return sum(1 for i in self.accepted if i <= k)


class SpeculationGovernor:
    """How large a tree to verify, and with which drafter tier, per batch-size bucket, chosen by
    measured throughput.

    For every arm, (bucket, option), where an option is a tree budget and a drafter tier, it
    estimates tokens per second as
        (1 + accepted drafts per sequence and step) / seconds per step,
    and plays the best option (budget 0 = plain decoding, with no drafter forward), drafting only where
    that beats plain decoding by `margin`: the estimates rest on timings of a machine that drifts and
    is shared, and a tie is better settled for the steady, cheaper plain step.
    - Acceptance is counterfactual and cheap to learn: trees list their nodes best first
      (drafter/tree.py), so each verified tree says what every smaller budget would have accepted
      (`DraftOutcome.accepted_within`). One step of the largest tree updates all the budgets' means
      of its tier (another tier drafts other trees: each learns from its own steps).
      A step updates only budgets up to the one it played: a smaller tree cannot tell what a larger
      one would have found, and counting only the steps where it happens to know (the drafter had
      nothing more to offer) would bias the larger budgets' means towards those dry spells.
    - Cost is measured: a moving average of the wall time of steps played at each budget, an
      outlier (a pause of the process) clipped to `clip` times the current mean. A step's cost is
      stable on a machine, so the means settle in a few steps and need no per-step luck. Only a
      step that follows a step of the same budget and bucket counts: what the governor compares is
      steady states, and a switch costs extra in the step after it (a drafter catching up on the
      tokens it missed during plain steps; the base model's weights pushed out of the CPU caches by
      the drafter's). So an arm is always played at least twice in a row. A machine's speed drifts
      (other processes, clocks, a growing context), so the first counted step of a run moves its
      arm's average half-way to it: a re-check compares now with now, not with an hour ago.
      Where the drafter's own forward runs at some steps of a budget and not at others (the lookup
      hybrid leaves it out where lookup fills the budget: DraftOutcome.forward_above), a step's
      cost is bimodal and the mix moves with the text, the more so the smaller the budget. There
      each budget of the drafter's full tier keeps two averages, of its steps with and without the
      forward, and is priced at the share of recent steps that would run the forward at that
      budget, which every step tells for every budget, played or not (`step_cost`): a smaller tree
      that played through an easy stretch no longer keeps a cheap price against a larger one
      priced in a hard one.
    - Acceptance comes in bursts (a stretch of arithmetic the drafter knows, then prose it does
      not), and a plain step teaches nothing about it: a governor that stopped drafting in a dry
      spell would go on believing in it. So an estimate nothing has updated for a while drifts
      back to the arm's long-run average (`revert_steps`: half-way back after that many steps at
      batch 1, proportionally more for larger batches, whose averages swing less): where drafting
      pays on the whole, the governor drafts again soon after a dry spell, and finds out whether it
      has ended; where it does not, plain decoding stays. (Tuned with bench/governor_sim.py at batch
      1; at concurrency 4 a half-life of 8 steps had CTC alone re-drafting too often: BENCHMARKS.md.)
    Both averages are plain means of the first 1 / weight samples, then moving averages.
    The budgets a step may use are the configured ones under the batch's share of
    `spec_token_budget` (`sizes`), so the batch sizes of a bucket share arms.
    Every arm first gets `min_samples` steps (each tier's largest tree first). Then the governor
    re-plays an arm it rejects once it has not played it for `explore_every` steps times (best rate
    / its rate) squared, at most `max_backoff` times that: a near miss is re-checked often, an arm
    far behind (a large tree at a large batch on a CPU) rarely. A tree whose acceptance is still
    unknown (every one of its steps so far was cut shorter: a request a few tokens from its end, a
    full cache) is re-checked every `explore_every` steps: it is untried, not behind. Which arms: plain decoding, the
    trees of the best's tier smaller than the best, each tier's largest tree, whose steps refresh
    every budget's acceptance of that tier, and the next larger tree of the best's tier, whose cost
    only its own steps measure (without its re-checks, a middle size that looked dear once was
    never measured again: at batch 1 on a CPU, near-tie margin off, 8-node trees played 4 steps
    of 2,100 while 4-node trees, 6% slower, played the rest; BENCHMARKS.md, "A draft nobody could
    use").
    A near tie between two trees of a tier goes to the larger one: the best is the largest tree whose
    rate is within `larger_margin` of the highest (halved per bucket: a batch's estimates average
    over its sequences, and a larger tree costs more there). The estimates favour smaller trees: while
    a smaller tree plays, a larger one's acceptance is only scaled from it and its cost is the one
    it had when it last played. At batch 1 on a CPU this once left the governor on 4-node trees for
    most of a run where 8 nodes were 6% faster (BENCHMARKS.md, "The governor's near ties").
    At batch 1 (below `choices_from`, the scheduler's `governor_choices_from`) the drafter's full
    tier offers only its largest tree. Its smaller trees cost the same drafter forward and a few
    verified nodes less, so their rates near-tie the largest's in a dry stretch; at batch 1 every
    estimate follows one sequence's text, whose acceptance comes in bursts shorter than the
    averages' memory, so a smaller tree won those ties and kept playing into the next rich stretch:
    on the CPU, the CTC hybrid's 8-node trees played alone were 1-2% faster than under the governor
    with every size, on GSM8K and on MT-bench. The cheaper tiers keep every size: the EAGLE-style
    hybrid pays with lookup alone, and with lookup's 8-node trees as its only cheap arm it decoded
    plainly through dry stretches (8-11% slower in two runs of three; lookup's smaller trees keep
    drafting there). BENCHMARKS.md, "The largest tree at batch 1". A batch averages over its sequences, and
    the smaller trees are what keeps drafting paying under load.
    Re-checking a tree after a run of plain steps is dear (a drafter with its own cache first
    catches up on every token it missed), so re-checks also keep to a budget: they start only
    while the time spent in them is at most `explore_share` of the bucket's decode time.
    """

    def __init__(self, budgets: Seq[int], explore_every: int, cost_ema: float = 0.1, accept_ema: float = 0.05,
                 min_samples: int = 3, clip: float = 3.0, max_backoff: float = 8.0, margin: float = 0.05,
                 larger_margin: float = 0.1,
                 explore_share: float = 0.01, long_ema: float = 0.002, revert_steps: float = 8.0, tiers: int = 1,
                 choices_from: int = 1):
        self.budgets = sorted({x for x in budgets if x > 0}, reverse=True)
        self.tiers = tiers
        self.choices_from_bucket = self.bucket(choices_from)[0]  # the first batch-size class offered every size
        self.explore_every, self.min_samples, self.clip = explore_every, min_samples, clip
        self.max_backoff, self.margin, self.explore_share = max_backoff, margin, explore_share
        self.larger_margin = larger_margin
        self.cost_ema, self.accept_ema, self.long_ema, self.revert_steps = cost_ema, accept_ema, long_ema, revert_steps
        self.cost: dict[Arm, float] = {}  # seconds per step
        self.cost_samples: dict[Arm, int] = {}  # steps whose cost counted
        self.accepted: dict[Arm, float] = {}  # accepted drafts per sequence-step
        self.accept_samples: dict[Arm, int] = {}
        self.accepted_long: dict[Arm, float] = {}  # the same over the last 1 / long_ema steps
        self.long_samples: dict[Arm, int] = {}
        self.seen_at: dict[Arm, int] = {}  # the bucket's step count at the arm's last acceptance update
        self.steps: dict[Bucket, int] = {}  # decode steps seen per bucket
        self.last: dict[Arm, int] = {}  # the bucket's step count when the arm was last played
        self.previous: Arm | None = None  # the arm of the last step recorded
        self.before: Arm | None = None  # the step before that
        self.again: dict[Bucket, Option] = {}  # an option to play once more (the second step of a re-check)
        self.probe: dict[Bucket, Option] = {}  # the option being re-checked
        self.seconds: dict[Bucket, float] = {}  # decode seconds recorded
        self.probe_seconds: dict[Bucket, float] = {}  # of which in re-checks
        self.plays: dict[Bucket, Counter[Option]] = {}  # decode steps recorded per option (for benchmarks, logs)
        # Where a tier-0 step's work depends on the budget (DraftOutcome.forward_above):
        self.split_cost: dict[tuple[Arm, bool], float] = {}  # seconds per step with / without the forward
        self.split_samples: dict[tuple[Arm, bool], int] = {}
        self.forward_share: dict[Arm, float] = {}  # the share of recent steps that would run it
        self.share_samples: dict[Arm, int] = {}

    @staticmethod
    def bucket(batch: int, sampled: bool = False) -> Bucket:
        """Batch sizes 1, 2-3, 4-7, 8-15, ...; steps with a sampling request apart from all-greedy
        ones (drafts are accepted far less when sampling, and a long-run average learnt on greedy
        text must not pull a sampling stretch back into drafting)."""
        return max(1, batch).bit_length(), sampled

    def sizes(self, cap: int) -> list[int]:
        """Tree budgets allowed under `cap`, largest first: the configured ones that fit (or `cap`
        itself when none does). Snapped, not clipped to the cap, so the batch sizes of a bucket
        share their arms instead of each warming up its own."""
        return [x for x in self.budgets if x <= cap] or [cap]

    def options(self, cap: int, bucket: Bucket | None = None) -> list[Option]:
        """Every tier's trees, largest first, then plain decoding; in a bucket below
        `choices_from`, of the full tier (0) its largest tree only."""
        sizes = self.sizes(cap)
        largest_only = bucket is not None and bucket[0] < self.choices_from_bucket
        return [Option(x, t) for t in range(self.tiers)
                for x in (sizes[:1] if largest_only and t == 0 else sizes)] + [PLAIN]

    def acceptance(self, bucket: Bucket, option: Option) -> float | None:
        """Expected accepted drafts per sequence and step: the recent average, drifting back to the
        long-run one while nothing updates it, half-way every `revert_steps` steps per sequence of
        the bucket's smallest batch (an average over a batch has fewer dry spells)."""
        key = (bucket, option)
        recent = self.accepted.get(key)
        if recent is None:
            return None
        age = self.steps.get(bucket, 0) - self.seen_at.get(key, 0)
        half_life = self.revert_steps * 2 ** (bucket[0] - 1)
        return self.accepted_long[key] + (recent - self.accepted_long[key]) * 0.5 ** (age / half_life)

    def step_cost(self, bucket: Bucket, option: Option) -> float | None:
        """Estimated seconds per step of `option`: where the drafter's forward runs at some steps
        and not at others, its cost with and without the forward, weighted by the share of recent
        steps that would run it at this budget; else the average of the steps it played."""
        key = (bucket, option)
        share = self.forward_share.get(key)
        if share is not None:
            with_forward, without = self.split_cost.get((key, True)), self.split_cost.get((key, False))
            if with_forward is not None and without is not None:
                return share * with_forward + (1.0 - share) * without
        return self.cost.get(key)

    def rate(self, bucket: Bucket, option: Option) -> float:
        """Estimated tokens per second and sequence of steps playing `option` (0 before it is known)."""
        cost = self.step_cost(bucket, option)
        acc = 0.0 if option == PLAIN else self.acceptance(bucket, option)
        if not cost or acc is None:
            return 0.0
        return (1.0 + acc) / cost

    def choose(self, batch: int, cap: int, sampled: bool = False) -> Option:
        """Tree budget (at most `cap`) and tier for a decode step of `batch` sequences; `sampled`:
        some of them sample (temperature > 0)."""
        b = self.bucket(batch, sampled)
        options = self.options(cap, b)
        again = self.again.pop(b, None)
        if again in options:
            return again
        self.probe.pop(b, None)
        for x in options:
            if self.cost_samples.get((b, x), 0) < self.min_samples:
                return x
        rate = {x: self.rate(b, x) for x in options}  # (once per step: this runs at every decode step)
        best = max(options, key=lambda x: (rate[x], -x.budget, x.tier))
        if best != PLAIN:  # a near tie goes to the larger tree (the class docstring says why)
            near = rate[best] / (1 + self.larger_margin * 0.5 ** (b[0] - 1))
            best = max((x for x in options if x.tier == best.tier and rate[x] >= near), key=lambda x: x.budget)
        if best != PLAIN and rate[best] < (1 + self.margin) * rate[PLAIN]:
            best = PLAIN
        top, n = rate[best], self.steps.get(b, 0)
        largest: dict[int, Option] = {}  # each tier's largest tree
        for x in options[:-1]:
            largest.setdefault(x.tier, x)
        larger = [x for x in options if x.tier == best.tier and x.budget > best.budget]
        next_larger = larger[-1] if best != PLAIN and larger else None  # (options list trees largest first)
        overdue = []
        for x in options:
            if x != best and (x == PLAIN or x == largest[x.tier] or x == next_larger
                              or (x.tier == best.tier and x.budget < best.budget)):
                r = rate[x]
                if x != PLAIN and self.acceptance(b, x) is None:
                    behind = 1.0  # never measured (its trees were all cut shorter): unknown, not behind
                else:
                    behind = min(self.max_backoff, (top / r) ** 2 if r > 0 else self.max_backoff)
                late = n - self.last.get((b, x), 0) - self.explore_every * max(1.0, behind)
                if late >= 0:
                    overdue.append((late, x))
        if not overdue or self.probe_seconds.get(b, 0.0) > self.explore_share * self.seconds.get(b, 0.0):
            return best
        x = self.again[b] = self.probe[b] = max(overdue)[1]
        return x

    def record(self, batch: int, budget: int, seconds: float, outcomes: Seq[DraftOutcome] = (),
               cap: int | None = None, sampled: bool = False, tier: int = 0) -> None:
        """A pure decode step of `batch` sequences ran with per-sequence tree budget `budget` (0:
        plain) of drafter tier `tier` in `seconds`; `outcomes` are its drafting sequences' trees;
        `cap` the largest budget a sequence could have had (which arms to update; default: every
        budget)."""
        if seconds <= 0:
            return
        b = self.bucket(batch, sampled)
        self.steps[b] = self.steps.get(b, 0) + 1
        played = Option(budget, tier if budget else 0)
        key = (b, played)
        self.last[key] = self.steps[b]
        self.plays.setdefault(b, Counter())[played] += 1
        self.seconds[b] = self.seconds.get(b, 0.0) + seconds
        if self.probe.get(b) == played:
            self.probe_seconds[b] = self.probe_seconds.get(b, 0.0) + seconds
        above = [o.forward_above for o in outcomes]
        split = bool(above) and None not in above  # the forward's share of the work varies by budget
        # The step's batch ran (or would run) the forward at a budget above any sequence's mark.
        lowest = min(above) if split else None
        if self.previous == key:
            old = self.cost.get(key)
            # The first sample of a run meets an average that may be stale (the arm was last played
            # a while ago, the machine has drifted since): it counts as much as all of them.
            weight = 0.5 if self.previous != self.before else self.cost_ema
            seconds_clipped = seconds if old is None else min(seconds, self.clip * old)
            _average(self.cost, self.cost_samples, key, seconds_clipped, weight)
            if split and played.tier == 0:
                _average(self.split_cost, self.split_samples, (key, budget > lowest), seconds_clipped, weight)
        self.before = self.previous
        self.previous = key
        if not outcomes:
            return
        sizes = self.sizes(cap if cap is not None else self.budgets[0])
        if split:  # what every tier-0 budget would have run this step, whichever tier played
            for x in sizes:
                _average(self.forward_share, self.share_samples, (b, Option(x, 0)), float(x > lowest), self.accept_ema)
        base = self.accepted.get(key)  # before this step: the ratio base for larger budgets
        for x in sorted(Option(s, played.tier) for s in sizes):  # ascending: the played one before larger ones
            if x.budget > budget:
                # Unseen: keep its ratio to the played budget's acceptance but move it with the text
                # (acceptance rises and falls with what is being written; a stale estimate of a tree
                # not played lately must not beat a fresh one just for being old).
                if (b, x) in self.accepted and base:
                    self.accepted[(b, x)] *= self.accepted[key] / base
                    self.seen_at[(b, x)] = self.steps[b]
                continue
            # Sequences that did not draft this step (they opted out) count as accepting nothing, as
            # they would at any budget.
            seen = [o.accepted_within(x.budget) for o in outcomes]
            if any(a is None for a in seen):
                continue
            _average(self.accepted, self.accept_samples, (b, x), sum(seen) / batch, self.accept_ema)
            _average(self.accepted_long, self.long_samples, (b, x), sum(seen) / batch, self.long_ema)
            self.seen_at[(b, x)] = self.steps[b]


def _average(means: dict, counts: dict, key, value: float, weight: float) -> None:
    """The mean of the first 1 / weight values, then a moving average with that weight."""
    n = counts[key] = counts.get(key, 0) + 1
    old = means.get(key, 0.0)
    means[key] = old + max(weight, 1.0 / n) * (value - old)


@dataclass
class Plan:
    prefill: list[tuple[Sequence, int]]  # (sequence, chunk length)
    decode: list[tuple[Sequence, int]]  # (sequence, draft-node budget; 0 = plain decoding)
    budget: int = 0  # the largest tree budget a sequence got this step (0: a plain step)
    tier: int = 0  # the drafter tier that drafts this step's trees (Drafter.tiers)
    cap: int = 0  # the largest budget a drafting sequence could get this step (what the governor chose from)
    sampled: bool = False  # a decoding sequence samples (the governor keeps such steps apart)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def decode_kind(self) -> tuple[int, int, int] | None:
        """What the step decodes, as PrefillBudget tells decode steps apart (None: nothing)."""
        return (len(self.decode), self.budget, self.tier) if self.decode else None


class Scheduler:
    def __init__(self, config: SchedulerConfig, tiers: int = 1):
        """`tiers`: how many ways the engine's drafter can draft (Drafter.tiers); the governor picks."""
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.governor = SpeculationGovernor((*config.governor_budgets, config.max_tree_nodes), config.explore_every,
                                            larger_margin=config.governor_larger_margin, tiers=tiers,
                                            choices_from=config.governor_choices_from)
        self.prefill_budget = PrefillBudget(config.prefill_chunk, config.min_prefill_chunk, config.prefill_step_ratio)

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
        """Admit waiting sequences in order while they fit; a sequence with forks (n > 1) comes in
        with them, all or none (`can_allocate(k)`: are k cache slots free)."""
        admitted = []
        while self.waiting:
            need = self.waiting[0].group_size
            if len(self.running) + need > self.config.max_batch_size or not can_allocate(need):
                break
            seq = self.waiting.popleft()
            for s in (seq, *seq.forks):
                s.slot, s.status = allocate(), Status.FORKED if s is not seq else Status.PREFILL
                self.running.append(s)
            admitted.append(seq)
        return admitted

    def plan(self, speculation_enabled: bool) -> Plan:
        cfg = self.config
        decoding = [s for s in self.running if s.status is Status.DECODE]
        drafting = [s for s in decoding if speculation_enabled and s.params.speculative and s.drafting]
        share = cap = min(cfg.max_tree_nodes, cfg.spec_token_budget // max(1, len(drafting))) if drafting else 0
        sampled = any(not s.params.greedy for s in decoding)
        tier = 0
        if share and cfg.governor:
            share, tier = self.governor.choose(len(decoding), share, sampled)
        decode = []
        for seq in decoding:
            decode.append((seq, share if seq in drafting else 0))
        # Measured as what the step actually runs: if every decoding request opted out of
        # speculation it is a plain step (no drafter forward), whatever the governor offered.
        budget = max((b for _, b in decode), default=0)
        plan = Plan(prefill=[], decode=decode, budget=budget, tier=tier if budget else 0, cap=cap, sampled=sampled)
        prefilling = [s for s in self.running if s.status is Status.PREFILL]
        # A chunk trades the prompts' time to first token against the streams' inter-token latency:
        # bounded for the streams while they are at least as many as the prompts; when more prompts
        # wait than streams run (a burst arrived), the full chunk serves more requests sooner.
        left = self.prefill_budget.size(plan.decode_kind if len(prefilling) <= len(decode) else None)
        for seq in prefilling:
            if left > 0:
                n = min(seq.remaining_prompt, left)
                plan.prefill.append((seq, n))
                left -= n
        return plan

    def record(self, plan: Plan, seconds: float) -> None:
        """The engine ran `plan` in `seconds` (wall time of the whole step): the cost that sizes
        later steps' prefill chunks."""
        self.prefill_budget.record(sum(n for _, n in plan.prefill), plan.decode_kind, seconds)
