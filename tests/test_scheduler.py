"""Scheduler policy on toy sequences: admission, prefill chunking, tree budgets, the governor."""

from __future__ import annotations

import pytest
import torch

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.prefill_budget import PrefillBudget
from server.engine.scheduler import (PLAIN, DraftOutcome, Option, Plan, Scheduler, SchedulerConfig,
                                     SpeculationGovernor, default_tree_nodes)
from server.engine.sequence import Sequence, Status
from server.engine.types import SamplingParams


def seq(i: int, prompt_len: int = 10, speculative: bool = True) -> Sequence:
    return Sequence(f"r{i}", list(range(prompt_len)), SamplingParams(speculative=speculative),
                    IncrementalDetokenizer(None))


def admitted(sched: Scheduler, slots: int) -> list[Sequence]:
    free = list(range(slots))
    return sched.admit(lambda k=1: len(free) >= k, free.pop)


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


# -- prefill chunks next to decoding sequences (prefill_budget.py) ------------------------------------
K = (1, 0, 0)  # a kind of decode step: one sequence, plain decoding (Plan.decode_kind)


def measured(decode_s: float, token_s: float, ratio: float | None = 2.0, chunk: int = 256,
             min_chunk: int = 16) -> PrefillBudget:
    """A budget that has seen a lone 256-token prefill, pure decode steps and one mixed step of a
    machine where a decode step costs `decode_s` and a prompt token adds `token_s`."""
    b = PrefillBudget(chunk, min_chunk, ratio)
    b.record(256, None, decode_s + 256 * token_s)
    for _ in range(3):
        b.record(0, K, decode_s)
    b.record(20, K, decode_s + 20 * token_s)
    return b


def test_mixed_step_chunk_keeps_the_step_within_ratio_times_a_decode_step():
    b = measured(decode_s=0.010, token_s=0.010 / 36)  # the CPU demo model: 256 tokens ~ 7 decode steps
    assert b.size(K) == 36  # 0.010 + 36 * p = 2 x 0.010
    assert measured(0.010, 0.010 / 36, ratio=3.0).size(K) == 72
    assert b.size(None) == 256  # nobody waits: a lone prompt's time to first token as before


def test_chunk_is_weighed_against_the_decode_step_it_joins():
    b = measured(decode_s=0.010, token_s=0.010 / 36)
    tree = (1, 16, 0)  # the same sequence verifying 16-node trees: a dearer step
    for _ in range(3):
        b.record(0, tree, 0.020)
    assert b.size(tree) == 72 and b.size(K) == 36
    assert b.size((2, 0, 0)) == 72  # a kind not measured yet: the latest measured one's cost


def test_chunk_is_clamped_to_the_configured_range():
    assert measured(0.020, 0.020 / 5000).size(K) == 256  # a GPU: prompt tokens nearly free next to a decode
    assert measured(0.010, 0.010 / 4).size(K) == 16  # tokens this dear: the prompt still advances
    assert measured(0.010, 0.0).size(K) == 256
    assert measured(0.010, 0.010 / 36, ratio=None).size(K) == 256  # the rule switched off


def test_unmeasured_machine_gets_small_chunks_and_a_lone_prefill_seeds_the_token_cost():
    b = PrefillBudget(256, 16, 2.0)
    assert b.size(K) == 16 and b.size(None) == 256
    b.record(256, None, 0.080)  # a lone prefill: seconds / tokens, an upper bound of a token's cost
    b.record(0, K, 0.010)
    assert b.size(K) == 32
    b.record(32, K, 0.010 + 32 * 0.010 / 64)  # the marginal cost, measured, replaces the seed
    assert b.size(K) == 64
    b.record(256, None, 0.080)  # lone prefills only seed: they do not override what mixed steps measured
    assert b.size(K) == 64


def test_mixed_steps_before_any_decode_step_still_learn_the_decode_cost():
    b = PrefillBudget(256, 16, 2.0)
    b.record(256, None, 0.256)  # seed: 1 ms a token
    b.record(16, K, 0.016 + 0.050)  # prompts arrived together: no pure decode step yet
    assert b.decode_cost(K) == pytest.approx(0.050) and b.size(K) == 50


def test_a_pause_moves_the_token_cost_by_at_most_the_clip_and_passes():
    p = 0.010 / 36
    b = measured(0.010, p, min_chunk=1)
    b.record(36, K, 5.0)  # the process was descheduled for seconds
    # its extra time clipped to 3x the estimate: (0.75 * 20p + 3 * 36p) / (0.75 * 20 + 36) = 2.4p, not 500p
    assert b.size(K) == 14
    for _ in range(10):  # the pause decays out of the sums: back near 36 within ten steps
        n = b.size(K)
        b.record(n, K, 0.010 + n * p)
    assert b.size(K) >= 34


def test_a_long_prefill_pauses_for_a_decode_step_that_refreshes_its_cost():
    b = measured(0.010, 0.010 / 36)
    for _ in range(6):
        b.record(36, K, 0.010 + 36 * 0.010 / 36)
    assert b.size(K) == 36  # 7 mixed steps in a row (measured() ran one)
    b.record(36, K, 0.020)
    assert b.size(K) == 0 and b.size(None) == 256  # a pure decode step next; a lone prompt need not wait
    b.record(0, K, 0.020)  # the machine got slower meanwhile: the fresh sample counts half
    assert b.decode_cost(K) == pytest.approx(0.015) and b.size(K) > 0


def test_plan_sizes_the_prefill_from_what_the_engine_recorded():
    s = Scheduler(SchedulerConfig(prefill_chunk=256, prefill_step_ratio=2.0, governor=False))
    decoding(s, 1)
    long = seq(9, prompt_len=1000)
    s.add(long)
    admitted(s, slots=2)
    assert sum(n for _, n in s.plan(True).prefill) == 16  # nothing measured yet
    s.record(Plan(prefill=[(long, 256)], decode=[]), 0.080)
    s.record(Plan(prefill=[], decode=[(s.running[0], 0)]), 0.010)
    plan = s.plan(True)
    assert plan.prefill == [(long, 32)] and len(plan.decode) == 1
    s.remove(s.running[0])  # the stream finished: the prompt gets the full chunk
    assert s.plan(True).prefill == [(long, 256)]


def test_a_burst_of_prompts_gets_full_chunks_until_the_streams_are_as_many():
    s = Scheduler(SchedulerConfig(prefill_chunk=256, max_batch_size=8, prefill_step_ratio=2.0, governor=False))
    stream = decoding(s, 1)[0]
    prompts = [seq(10 + i, prompt_len=500) for i in range(2)]
    for x in prompts:
        s.add(x)
    admitted(s, slots=3)
    s.record(Plan(prefill=[(prompts[0], 256)], decode=[]), 0.080)
    s.record(Plan(prefill=[], decode=[(stream, 0)]), 0.010)
    assert sum(n for _, n in s.plan(True).prefill) == 256  # 2 prompts wait, 1 streams
    s.remove(prompts[1])
    assert sum(n for _, n in s.plan(True).prefill) == 32  # 1 and 1: the stream's latency is bounded


def test_scheduler_config_refuses_a_ratio_that_cannot_be_met():
    with pytest.raises(ValueError, match="prefill_step_ratio"):
        SchedulerConfig(prefill_step_ratio=1.0)
    with pytest.raises(ValueError, match="min_prefill_chunk"):
        SchedulerConfig(min_prefill_chunk=0)
    with pytest.raises(ValueError, match="governor_larger_margin"):
        SchedulerConfig(governor_larger_margin=-0.1)


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


def test_requests_that_opt_out_never_draft():
    s = Scheduler(SchedulerConfig(governor=False))
    decoding(s, 2, speculative=False)
    assert {b for _, b in s.plan(True).decode} == {0}


def test_draft_outcome_tells_what_smaller_budgets_would_have_accepted():
    o = DraftOutcome(budget=16, nodes=16, accepted=[1, 3, 9])  # the tree was cut at 16 nodes
    assert [o.accepted_within(k) for k in (2, 4, 8, 16)] == [1, 2, 2, 3]
    assert o.accepted_within(32) is None  # what a larger tree would have held is unknown
    short = DraftOutcome(budget=16, nodes=5, accepted=[2, 5])  # the drafter had only 5 nodes
    assert [short.accepted_within(k) for k in (4, 16, 32)] == [1, 2, 2]
    assert DraftOutcome(budget=8, nodes=0, accepted=[]).accepted_within(16) == 0  # nothing drafted


B1 = (1, False)  # the governor's bucket of all-greedy steps at batch 1


def play(g: SpeculationGovernor, batch: int, cap: int, cost: dict[int, float], accepted: list[int], steps: int,
         nodes: int = 16) -> list[int]:
    """Drive the governor: every step at budget x costs cost[x] seconds and each sequence's tree
    accepts the draft nodes `accepted` (indices, best first) among its first min(x, nodes)."""
    chosen = []
    for _ in range(steps):
        x = g.choose(batch, cap).budget
        chosen.append(x)
        n = min(x, nodes)
        outcomes = [DraftOutcome(x, n, [i for i in accepted if i <= n])] * batch if x else []
        g.record(batch, x, cost[x], outcomes, cap)
    return chosen


def test_governor_warms_up_largest_first_then_plays_the_fastest_and_explores():
    g = SpeculationGovernor([4, 16], explore_every=4, min_samples=2, explore_share=1.0)
    cost = {16: 2.0, 4: 1.2, 0: 1.0}
    # Accepts nodes 1, 2, 3 (a chain the best 4 nodes hold): 4 tokens per step at 16 or 4, 1 plain.
    warm = play(g, 1, 16, cost, [1, 2, 3], 9)
    assert warm == [16] * 3 + [4] * 3 + [0] * 3  # a step after a switch does not count: 2 samples take 3
    assert (g.rate(B1, Option(4)), g.rate(B1, Option(16)), g.rate(B1, PLAIN)) == pytest.approx(((1 + 3) / 1.2, (1 + 3) / 2.0, 1.0))
    # Rates: 4 -> 3.33 tokens/s, 16 -> 2.0, plain 1.0. The others are re-checked (two steps in a row)
    # once unplayed for explore_every (4) steps times (3.33 / rate) squared: 16 after 11.1 steps, plain
    # after the cap, 8 x 4. Warm-up ended at step 9 (16 last played at step 3, plain at 9).
    later = play(g, 1, 16, cost, [1, 2, 3], 64)
    assert [(9 + 1 + i, x) for i, x in enumerate(later) if x != 4] == [
        (16, 16), (17, 16), (30, 16), (31, 16), (42, 0), (43, 0), (44, 16), (45, 16), (58, 16), (59, 16),
        (72, 16), (73, 16)]


def test_governor_prices_small_trees_from_large_ones():
    # Accepted nodes 1 and 7: a 4-node tree accepts one, the 16-node tree two. Only 16 and 0 were
    # played after warm-up, yet the acceptance of budget 4 is known from the 16-node trees.
    g = SpeculationGovernor([4, 16], explore_every=1000, min_samples=1)
    play(g, 1, 16, {16: 1.0, 4: 1.0, 0: 1.0}, [1, 7], 3)
    for _ in range(20):
        g.record(1, 16, 1.0, [DraftOutcome(16, 16, [1, 7])], 16)
    assert abs(g.accepted[(B1, Option(4))] - 1.0) < 1e-9 and abs(g.accepted[(B1, Option(16))] - 2.0) < 1e-9


def test_governor_stops_speculating_when_it_stops_paying_and_per_bucket():
    g = SpeculationGovernor([16], explore_every=4, min_samples=1, explore_share=1.0)
    cost = {16: 1.5, 0: 1.0}
    # 4 tokens / 1.5 s beat 1 / s; plain, 2.7x behind, is re-checked after 4 x 7.1 = 28 steps.
    assert play(g, 1, 16, cost, [1, 2, 3], 35) == [16, 16, 0, 0] + [16] * 29 + [0, 0]
    assert g.choose(8, cap=6) == Option(6)  # another bucket (8-15 sequences) starts its own warm-up
    chosen = play(g, 1, 16, cost, [], 80)  # drafts stop being accepted
    assert chosen[-24:].count(0) >= 16  # plain, but for the re-checks of the tree (two steps each)


def test_governor_clips_outlier_step_times():
    g = SpeculationGovernor([16], explore_every=4, cost_ema=0.5, clip=3.0)
    g.record(1, 0, 5.0)  # the first step at a budget: a switch, not counted
    assert (B1, PLAIN) not in g.cost
    g.record(1, 0, 1.0)
    g.record(1, 0, 100.0)  # a pause of the process: counted as 3 s
    assert g.cost[(B1, PLAIN)] == 2.0


def test_plan_uses_the_governors_budget():
    s = Scheduler(SchedulerConfig(max_tree_nodes=16, governor_budgets=(4,), governor_choices_from=1))
    decoding(s, 1)
    plan = s.plan(True)
    assert plan.budget == 16 and plan.decode[0][1] == 16 and plan.cap == 16  # the largest tree first
    assert plan.sampled  # seq() requests sample: their steps are kept apart from greedy ones
    for _ in range(4):
        s.governor.record(1, 16, 2.0, [DraftOutcome(16, 16, [1, 2])], 16, sampled=True)
    for _ in range(4):
        s.governor.record(1, 4, 1.0, [DraftOutcome(4, 4, [1, 2])], 16, sampled=True)
    for _ in range(4):
        s.governor.record(1, 0, 1.0, sampled=False)  # a greedy bucket's plain steps: not this bucket
    assert s.plan(True).budget == 0  # the sampled bucket has no plain cost yet: it plays plain first
    for _ in range(4):
        s.governor.record(1, 0, 1.0, sampled=True)
    plan = s.plan(True)
    assert plan.budget == 4 and plan.decode[0][1] == 4
    assert s.plan(False).budget == 0
    # A request that opted out of speculation decodes plainly: the step counts as plain.
    s.running[0].params.speculative = False
    plan = s.plan(True)
    assert plan.decode[0][1] == 0 and plan.budget == 0


def test_governor_drafts_only_when_it_beats_plain_by_the_margin():
    for cost16, expected in ((1.9, 0), (1.7, 16)):  # 2 tokens per step at 16: 1.05x or 1.18x plain's rate
        g = SpeculationGovernor([16], explore_every=1000, min_samples=1, margin=0.1)
        chosen = play(g, 1, 16, {16: cost16, 0: 1.0}, [1], 12)
        assert chosen[4:] == [expected] * 8


def test_governor_keeps_re_checks_within_their_share_of_time():
    # Plain wins (the tree accepts nothing); a re-check of the 3 s tree costs 6 s, and re-checks may
    # take 3% of the time: one per 200 s of decoding at most, whatever explore_every says.
    g = SpeculationGovernor([16], explore_every=1, min_samples=1, explore_share=0.03)
    chosen = play(g, 1, 16, {16: 3.0, 0: 1.0}, [], 600)
    rechecks = sum(1 for a, b in zip(chosen, chosen[1:]) if a == 0 and b == 16)
    assert 2 <= rechecks <= 4 and chosen[-50:].count(0) >= 48  # about 620 s in all


def test_unplayed_larger_tree_follows_the_played_ones_acceptance_at_its_ratio():
    g = SpeculationGovernor([8, 16], explore_every=1000, accept_ema=0.5)
    g.record(1, 16, 1.0, [DraftOutcome(16, 16, [1, 12])], 16)  # 16 accepts 2, 8 would have accepted 1
    assert (g.accepted[(B1, Option(16))], g.accepted[(B1, Option(8))]) == (2.0, 1.0)
    for _ in range(10):  # now only 8 is played, and the text got easier: it accepts 3 per step
        g.record(1, 8, 1.0, [DraftOutcome(8, 8, [1, 2, 3])], 16)
    assert g.accepted[(B1, Option(8))] == pytest.approx(3.0, abs=0.01) and g.accepted[(B1, Option(16))] > 5.0  # ratio 2 kept


def test_governor_gives_a_near_tie_to_the_larger_tree_less_so_the_larger_the_batch():
    # Both trees accept a chain of 3 (4 tokens per step); 4 nodes cost 1.0 s, 8 nodes 5% or 15% more.
    for batch, cost8, expected in ((1, 1.05, 8), (1, 1.15, 4), (8, 1.05, 4)):
        g = SpeculationGovernor([4, 8], explore_every=1000, min_samples=2, larger_margin=0.1)
        chosen = play(g, batch, 8, {8: cost8, 4: 1.0, 0: 1.0}, [1, 2, 3], 30)
        assert chosen[:9] == [8] * 3 + [4] * 3 + [0] * 3  # warm-up
        # batch 1: within 10% the larger tree plays; batch 8 (bucket 8-15): within 1.25% only
        assert chosen[9:] == [expected] * 21, (batch, cost8)


def test_governor_re_learns_cost_ratios_at_re_checks():
    # The tree first looks dear (4.0 s: the machine was busy while it was measured), so plain wins.
    # Then the tree really costs 1.5 s (2 tokens per step: 1.33x plain). Re-checks must find it out.
    g = SpeculationGovernor([16], explore_every=16, min_samples=2, explore_share=1.0)
    play(g, 1, 16, {16: 4.0, 0: 1.0}, [1], 12)
    assert g.choose(1, 16) == PLAIN
    later = play(g, 1, 16, {16: 1.5, 0: 1.0}, [1], 200)
    assert later[-50:].count(16) >= 45


def test_governor_drafts_again_after_a_dry_spell_where_drafting_pays_on_the_whole():
    # Tree steps cost 2 s against 1 s plain. The text first accepts 3 drafts per step (4 tokens: 2x
    # plain) for a long stretch, then nothing for a while (plain wins), then 3 again. Re-checks are
    # off (explore_every huge): what brings the tree back is its long-run average.
    g = SpeculationGovernor([16], explore_every=10**6, min_samples=2, revert_steps=16)
    cost = {16: 2.0, 0: 1.0}
    assert play(g, 1, 16, cost, [1, 2, 3], 300)[-100:] == [16] * 100
    dry = play(g, 1, 16, cost, [], 100)
    assert dry[-50:].count(0) >= 40  # it stopped drafting, but tried again now and then
    back = play(g, 1, 16, cost, [1, 2, 3], 100)
    assert back[-60:] == [16] * 60


def test_governor_snaps_a_batchs_cap_to_the_configured_budgets():
    g = SpeculationGovernor([2, 4, 8, 16], explore_every=4)
    assert g.options(16) == [Option(16), Option(8), Option(4), Option(2), PLAIN]
    # Batches of 9 to 12 sequences (caps 5 down to 4) share the arms 4 and 2 rather than each
    # warming up its own; a cap under the smallest budget is played as it is.
    assert g.options(5) == g.options(4) == [Option(4), Option(2), PLAIN]
    assert g.options(1) == [Option(1), PLAIN]


def test_governor_picks_the_cheaper_drafter_tier_where_the_dear_one_does_not_pay():
    # Tier 0 (a learned drafter with lookup) accepts 2 per step but its forward makes a step cost
    # 3 s; tier 1 (lookup alone) accepts 1 per step at 1.2 s; plain is 1 s. Tier 1 wins: 1.67 tokens/s.
    g = SpeculationGovernor([4], explore_every=1000, min_samples=2, tiers=2)
    cost = {(4, 0): 3.0, (4, 1): 1.2, (0, 0): 1.0}
    accepted = {0: [1, 2], 1: [1]}
    chosen = []
    for _ in range(30):
        x = g.choose(1, 4)
        chosen.append(x)
        outcomes = [DraftOutcome(4, 4, accepted[x.tier])] if x.budget else []
        g.record(1, x.budget, cost[x], outcomes, 4, tier=x.tier)
    assert chosen[:9] == [Option(4, 0)] * 3 + [Option(4, 1)] * 3 + [PLAIN] * 3  # warm-up: each tier, then plain
    assert chosen[9:] == [Option(4, 1)] * 21
    assert g.rate(B1, Option(4, 0)) == pytest.approx(3 / 3.0) and g.rate(B1, Option(4, 1)) == pytest.approx(2 / 1.2)


def test_a_tree_whose_trees_were_all_cut_is_re_checked_soon_not_after_the_backoff():
    """The largest tree's warm-up steps were all cut shorter (a request about to end): its acceptance
    is unknown, so its rate reads 0. It is re-checked after explore_every steps, as an untried arm,
    not after max_backoff x explore_every as one far behind; once measured it wins."""
    g = SpeculationGovernor([4, 16], explore_every=4, min_samples=1, explore_share=1.0)
    for _ in range(2):  # cut to 3 nodes each time: what 16 (or 4) would accept is unknown
        assert g.choose(1, 16).budget == 16
        g.record(1, 16, 2.0, [DraftOutcome(3, 3, [1, 2])], 16)
    assert g.acceptance(B1, Option(16)) is None and g.rate(B1, Option(16)) == 0.0
    cost = {16: 2.0, 4: 1.5, 0: 1.0}
    chosen = play(g, 1, 16, cost, [1, 2, 3, 4, 5, 6, 7], 40)  # a chain of 7: 16 takes all, 4 takes 4
    first16 = chosen.index(16)
    assert first16 <= 4 + 2 * 2 + 4  # warm-up of 4 and plain (2 steps each), then explore_every
    assert chosen.count(16) >= 24  # 8 tokens / 2 s beat 5 / 1.5 s: 16 from then on, but for re-checks


def test_governor_prices_each_budget_by_the_share_of_steps_that_would_run_the_drafters_forward():
    # The lookup hybrid's learned forward runs only where lookup does not fill the budget
    # (TokenTree.forward_above): lookup fills 6 nodes on half the steps, none on the others. At
    # budget 4 a step then costs 1.0 s without the forward and 2.0 s with it, so 4 plays at half
    # its forward's share: 1.5 s. Budget 8 would run it on every step, and the steps of 4 say so.
    g = SpeculationGovernor([4, 8], explore_every=1000, min_samples=1)
    for i in range(40):
        fill = 6 if i % 2 else 0
        g.record(1, 4, 2.0 if fill < 4 else 1.0, [DraftOutcome(4, 4, [1], forward_above=fill)], 8)
    assert g.forward_share[(B1, Option(4))] == pytest.approx(0.5, abs=0.05)
    assert g.forward_share[(B1, Option(8))] == pytest.approx(1.0)  # 8 > 6: the forward every time
    assert g.split_cost[((B1, Option(4)), True)] == pytest.approx(2.0)
    assert g.split_cost[((B1, Option(4)), False)] == pytest.approx(1.0)
    assert g.step_cost(B1, Option(4)) == pytest.approx(1.5, abs=0.05)
    # A stretch where lookup always fills: the mixed average follows the cheap steps only, the price
    # follows the share, with the cost of each kind of step kept from all of them.
    for _ in range(60):
        g.record(1, 4, 1.0, [DraftOutcome(4, 4, [1], forward_above=6)], 8)
    assert g.forward_share[(B1, Option(4))] < 0.1 and g.forward_share[(B1, Option(8))] == pytest.approx(1.0)
    assert g.split_cost[((B1, Option(4)), True)] == pytest.approx(2.0)
    assert g.step_cost(B1, Option(4)) < 1.1
    # Without the hybrid's information (None) a budget is priced by its steps' plain average.
    h = SpeculationGovernor([4, 8], explore_every=1000, min_samples=1)
    for _ in range(5):
        h.record(1, 4, 2.0, [DraftOutcome(4, 4, [1])], 8)
    assert h.step_cost(B1, Option(4)) == h.cost[(B1, Option(4))] == pytest.approx(2.0) and not h.forward_share


def test_governor_re_checks_the_next_larger_tree_not_only_the_largest():
    # 4 plays; 16 is far behind, 8 close behind: 8 must get re-checks of its own, or its cost would
    # never be measured again (the steps of 16 price its acceptance, not its cost).
    g = SpeculationGovernor([4, 8, 16], explore_every=4, min_samples=1, explore_share=1.0, larger_margin=0.0)
    chosen = play(g, 1, 16, {16: 4.0, 8: 1.1, 4: 1.0, 0: 1.0}, [1, 2, 3], 120)
    after_warm_up = chosen[8:]
    assert after_warm_up.count(4) > after_warm_up.count(8) > 0  # 8 is re-checked...
    assert after_warm_up.count(8) > after_warm_up.count(16)  # ...more often than 16, further behind


def test_default_tree_nodes_are_smaller_on_a_cpu():
    assert default_tree_nodes("cpu") == 8 and default_tree_nodes(torch.device("cpu")) == 8
    assert default_tree_nodes("cuda") == 16  # (no CUDA needed to ask)


def test_below_choices_from_the_full_tier_offers_only_its_largest_tree():
    # At batch 1 (the server's default, choices_from=2) a smaller tree of the full tier would win
    # here by its estimates, but only its largest plays; the cheaper tier keeps every size, and from
    # batch 2 on every arm is weighed.
    g = SpeculationGovernor([2, 4, 8], explore_every=4, min_samples=2, explore_share=1.0, tiers=2, choices_from=2)
    assert g.options(8, g.bucket(1)) == g.options(8, g.bucket(1, sampled=True)) == [
        Option(8, 0), Option(8, 1), Option(4, 1), Option(2, 1), PLAIN]
    assert g.options(8, g.bucket(2)) == g.options(8) == [Option(8, 0), Option(4, 0), Option(2, 0),
                                                         Option(8, 1), Option(4, 1), Option(2, 1), PLAIN]
    h = SpeculationGovernor([2, 4, 8], explore_every=4, min_samples=2, explore_share=1.0, choices_from=2)
    cost = {8: 3.0, 4: 1.2, 2: 1.1, 0: 1.0}
    assert set(play(h, 1, 8, cost, [1, 2], 60)) == {8, 0}
    assert 4 in play(h, 2, 8, cost, [1, 2], 60)  # the same costs at batch 2: the smaller tree plays
    # The cheaper tier stays an option at batch 1: where it pays (lookup alone against a dear
    # learned forward), it plays.
    k = SpeculationGovernor([4, 8], explore_every=1000, min_samples=2, tiers=2, choices_from=2)
    for _ in range(30):
        x = k.choose(1, 8)
        outcomes = [DraftOutcome(8, 8, [1, 2] if x.tier == 0 else [1])] if x.budget else []
        k.record(1, x.budget, {0: 3.0, 1: 1.2}[x.tier] if x.budget else 1.0, outcomes, 8, tier=x.tier)
    assert x == Option(8, 1) and k.plays[B1][Option(8, 1)] > 20 and Option(4, 0) not in k.plays[B1]
    # 1 restores every arm at every batch size
    assert SpeculationGovernor([4, 8], explore_every=4, choices_from=1).options(8, B1) == [Option(8), Option(4), PLAIN]


def test_the_scheduler_passes_governor_choices_from_and_checks_it():
    assert Scheduler(SchedulerConfig(max_tree_nodes=8)).governor.options(8, B1) == [Option(8), PLAIN]  # one tier
    assert len(Scheduler(SchedulerConfig(max_tree_nodes=8, governor_choices_from=1)).governor.options(8, B1)) > 2
    with pytest.raises(ValueError, match="governor_choices_from"):
        SchedulerConfig(governor_choices_from=0)
