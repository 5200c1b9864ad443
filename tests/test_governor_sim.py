"""The governor against simulated clocks (bench/governor_sim.py): behaviour, not timings of this machine."""

import random

from bench.governor_sim import BUDGETS, Text, outcome, simulate_once

COST = {0: 3.0e-3, 2: 6.0e-3, 4: 6.5e-3, 8: 7.5e-3, 16: 11.0e-3}  # a CPU: every tree node costs


def test_reconstructed_tree_accepts_what_the_trace_says_for_every_smaller_budget():
    for accepted in ([0, 0, 0, 0], [1, 1, 3, 3], [2, 4, 7, 9], [2, 2, 2, 5]):
        for budget in BUDGETS:
            o = outcome(budget, accepted)
            assert [o.accepted_within(k) for k in BUDGETS if k <= budget] == \
                [a for k, a in zip(BUDGETS, accepted) if k <= budget]


def test_text_positions_pick_the_step_that_covers_them():
    t = Text([[1, 2, 2, 2], [0, 0, 0, 0], [2, 3, 5, 6]])
    assert t.starts == [0, 3, 4] and t.length == 11
    assert [t.accepted(p, 4) for p in (0, 2, 3, 4, 10)] == [2, 2, 0, 3, 3]
    assert t.accepted(5, 0) == 0


def rate(texts, policy, seed=0):
    return simulate_once(texts, policy, COST, random.Random(seed), noise=0.08, catch_up=0.02, catch_up_window=48,
                         passes=1, governor_args={"explore_every": 32})


def test_governor_drafts_where_drafts_are_accepted_and_stays_plain_where_they_are_not():
    rng = random.Random(1)
    good = [Text([[2, 4, 6, 6] if rng.random() < 0.8 else [0, 0, 0, 0] for _ in range(80)]) for _ in range(20)]
    bad = [Text([[0, 0, 1, 1] if rng.random() < 0.2 else [0, 0, 0, 0] for _ in range(300)]) for _ in range(20)]
    for seed in range(3):
        assert rate(good, "governor", seed) > 0.9 * max(rate(good, b, seed) for b in BUDGETS)
        assert rate(good, "governor", seed) > 1.5 * rate(good, 0, seed)
        assert rate(bad, "governor", seed) > 0.98 * rate(bad, 0, seed)  # re-checks cost ~1% (explore_share)


def test_governor_follows_texts_that_alternate_between_easy_and_hard():
    # Requests alternate: one the drafter knows (accepts 4 at budget 4), one it does not. Following
    # them (drafting in one, not in the other) beats every fixed choice, on average over clocks: a
    # single run's gain ranges from about 0.93 to 1.1 with the seed (0.94 to 1.12 with
    # larger_margin=0, whose mean over these ten seeds is 1.03: 8 nodes, 13% behind 4 here, are
    # sometimes within the near-tie margin of a noisy estimate).
    easy = [[2, 4, 4, 4]] * 60
    hard = [[0, 0, 0, 0]] * 200
    texts = [Text(easy if i % 2 == 0 else hard) for i in range(20)]
    gain = [rate(texts, "governor", s) / max(rate(texts, b, s) for b in (0, *BUDGETS)) for s in range(10)]
    assert sum(gain) / 10 > 1.005, gain
