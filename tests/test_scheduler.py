"""Scheduler policy on toy sequences: admission, prefill chunking, tree budgets, the governor."""

from __future__ import annotations

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.scheduler import Scheduler, SchedulerConfig, SpeculationGovernor
from server.engine.sequence import Sequence, Status
from server.engine.types import SamplingParams


def seq(i: int, prompt_len: int = 10, speculative: bool = True) -> Sequence:
    return Sequence(f"r{i}", list(range(prompt_len)), SamplingParams(speculative=speculative),
                    IncrementalDetokenizer(None))


def admitted(sched: Scheduler, slots: int) -> list[Sequence]:
    free = list(range(slots))
    return sched.admit(lambda: bool(free), free.pop)


def test_admission_is_fifo_and_bounded_by_slots_and_batch():
    s = Scheduler(SchedulerConfig(max_batch_size=3))
    for i in range(5):
        s.add(seq(i))
    got = admitted(s, slots=2)
    assert [x.request_id for x in got] == ["r0", "r1"] and all(x.status is Status.PREFILL for x in got)
    assert [x.request_id for x in admitted(s, slots=4)] == ["r2"]  # batch of 3 is full
    assert len(s.waiting) == 2


def test_prefill_chunks_share_the_step_budget_oldest_first():
    s = Scheduler(SchedulerConfig(prefill_chunk=16))
    for i, n in enumerate((10, 30)):
        s.add(seq(i, prompt_len=n))
    admitted(s, slots=4)
    plan = s.plan(speculation_enabled=True)
    assert [(x.request_id, n) for x, n in plan.prefill] == [("r0", 10), ("r1", 6)]


def decoding(s: Scheduler, n: int, **kw) -> list[Sequence]:
    seqs = [seq(i, **kw) for i in range(n)]
    for x in seqs:
        s.add(x)
    admitted(s, slots=n)
    for x in seqs:
        x.status, x.num_prefilled, x.output_ids = Status.DECODE, len(x.prompt_ids), [1]
    return seqs


def test_tree_budget_shrinks_as_the_batch_grows():
    cfg = SchedulerConfig(max_batch_size=32, max_tree_nodes=16, spec_token_budget=48, governor=False)
    for n, share in ((1, 16), (3, 16), (6, 8), (16, 3), (32, 1)):
        s = Scheduler(cfg)
        decoding(s, n)
        assert {b for _, b in s.plan(True).decode} == {share}, n


def test_low_acceptance_switches_a_sequence_off_with_periodic_probes():
    s = Scheduler(SchedulerConfig(governor=False, probe_every=4, probe_nodes=2))
    (x,) = decoding(s, 1)
    x.accept_ema = 0.1
    budgets = [s.plan(True).decode[0][1] for _ in range(8)]
    assert budgets == [0, 0, 0, 2, 0, 0, 0, 2]


def test_requests_that_opt_out_never_draft():
    s = Scheduler(SchedulerConfig(governor=False))
    decoding(s, 2, speculative=False)
    assert {b for _, b in s.plan(True).decode} == {0}


def test_governor_picks_the_fastest_budget_per_batch_bucket_and_explores():
    g = SpeculationGovernor([4, 16], explore_every=4, ema=0.5, min_samples=2)
    speed = {16: 20, 4: 30, 0: 10}  # tokens/s at batch 1: the small tree wins
    warm = []
    for _ in range(6):  # two samples of each budget first, largest first
        warm.append(g.choose(1, cap=16))
        g.record(1, warm[-1], tokens=speed[warm[-1]], seconds=1.0)
    assert warm == [16, 16, 4, 4, 0, 0]
    # batch 16: plain is faster (and the cap of 3 per sequence makes 4 and 16 the same arm, 3).
    for _ in range(2):
        assert g.choose(16, cap=3) in (3, 0)
        g.record(16, 3, tokens=16, seconds=1.0)
        g.record(16, 0, tokens=40, seconds=1.0)
    choices = []
    for _ in range(8):
        choices.append(g.choose(1, cap=16))
        g.record(1, choices[-1], tokens=speed[choices[-1]], seconds=1.0)
    assert choices.count(4) == 6 and sorted(c for c in choices if c != 4) == [0, 16]  # explores in turn
    assert g.choose(16, cap=3) == 0


def test_governor_switches_when_speculation_stops_paying():
    g = SpeculationGovernor([16], explore_every=4, ema=0.5, min_samples=1)
    g.record(1, 16, 30, 1.0)
    g.record(1, 0, 10, 1.0)
    for _ in range(20):  # drafts stop being accepted: speculative steps now emit 8 tokens/s
        budget = g.choose(1, cap=16)
        g.record(1, budget, 8 if budget else 10, 1.0)
    assert g.choose(1, cap=16) == 0


def test_plan_uses_the_governors_budget():
    s = Scheduler(SchedulerConfig(max_tree_nodes=16, governor_budgets=(4,)))
    decoding(s, 1)
    plan = s.plan(True)
    assert plan.budget == 16 and plan.decode[0][1] == 16  # the largest tree is tried first
    for _ in range(3):
        s.governor.record(1, 16, 10, 1.0)
        s.governor.record(1, 4, 30, 1.0)
        s.governor.record(1, 0, 5, 1.0)
    plan = s.plan(True)
    assert plan.budget == 4 and plan.decode[0][1] == 4
    assert s.plan(False).budget == 0
    # A sequence switched off by its low acceptance decodes plainly: the step counts as plain.
    s.running[0].accept_ema = 0.0
    plan = s.plan(True)
    assert plan.decode[0][1] == 0 and plan.budget == 0
