"""Candidates from CTC frames: static tree (paper's way) and prefix beam search vs brute force."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import pytest
import torch

from drafter.candidates import (
    Candidate,
    batched_prefix_beam_search,
    batched_static_tree_candidates,
    candidates_to_tree,
    ctc_prefix_beam_search,
    static_tree_candidates,
    topk_paths,
)
from drafter.collapse import collapse_sequence


def random_log_probs(*shape: int, seed: int, sharpness: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(sharpness * torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def brute_force(log_probs: torch.Tensor, blank: int) -> dict[tuple[int, ...], float]:
    """log P(B(x) = l) for every l: logsumexp over all (V+1)^N alignments collapsing to l."""
    num_frames, num_symbols = log_probs.shape
    lp = log_probs.tolist()
    groups: dict[tuple[int, ...], list[float]] = defaultdict(list)
    for path in itertools.product(range(num_symbols), repeat=num_frames):
        groups[tuple(collapse_sequence(path, blank))].append(sum(lp[t][s] for t, s in enumerate(path)))
    return {seq: torch.logsumexp(torch.tensor(v, dtype=torch.float64), 0).item() for seq, v in groups.items()}


def reference_static(log_probs: torch.Tensor, blank: int, paths: list[tuple[int, ...]]) -> dict[tuple[int, ...], float]:
    """Static-tree candidates the slow way: rank symbols per frame, walk each path, keep the best."""
    order = torch.argsort(log_probs, dim=-1, descending=True, stable=True).tolist()
    lp = log_probs.tolist()
    best: dict[tuple[int, ...], float] = {}
    for path in paths:
        frames = [order[t][r] for t, r in enumerate(path)]
        seq = tuple(collapse_sequence(frames, blank))
        score = sum(lp[t][s] for t, s in enumerate(frames))
        if seq and (seq not in best or score > best[seq]):
            best[seq] = score
    return best


# ----------------------------------------------------------------------------- static tree


def test_topk_paths() -> None:
    assert topk_paths([2, 1, 2]) == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    assert len(topk_paths([4, 3, 2, 2, 1, 1])) == 48
    with pytest.raises(ValueError):
        topk_paths([2, 0])


def test_static_tree_hand_table() -> None:
    blank = 3
    probs = torch.tensor(
        [
            [0.1, 0.6, 0.05, 0.25],  # ranks: 1, blank, 0, 2
            [0.1, 0.5, 0.3, 0.1],  # ranks: 1, 2, ...
            [0.05, 0.05, 0.1, 0.8],  # ranks: blank, ...
        ],
        dtype=torch.float64,
    )
    lp = probs.log()
    got = static_tree_candidates(lp, blank, [2, 2, 1])
    # Paths (frame symbols): (1,1,_) -> [1]; (1,2,_) -> [1,2]; (_,1,_) -> [1]; (_,2,_) -> [2].
    expected = {
        (1,): math.log(0.6 * 0.5 * 0.8),  # best of its two alignments
        (1, 2): math.log(0.6 * 0.3 * 0.8),
        (2,): math.log(0.25 * 0.3 * 0.8),
    }
    assert {tuple(c.tokens): c.score for c in got} == pytest.approx(expected)
    assert [c.score for c in got] == sorted((c.score for c in got), reverse=True)
    assert all(isinstance(c, Candidate) for c in got)


def test_static_tree_drops_empty_and_never_emits_blank() -> None:
    blank = 0
    lp = torch.tensor([[0.9, 0.1], [0.9, 0.1]], dtype=torch.float64).log()  # blank dominates
    got = static_tree_candidates(lp, blank, [1, 1])
    assert got == []  # the only path is all blank
    got = static_tree_candidates(lp, blank, [2, 2])
    assert [c.tokens for c in got] == [[1]]  # "1 _", "_ 1", "1 1" all collapse to [1]: one candidate
    assert got[0].score == pytest.approx(math.log(0.1 * 0.9))


@pytest.mark.parametrize("tree", [[4, 3, 2, 2, 1, 1], [3, 3, 3], [1, 1, 1, 1, 1, 1]])
def test_static_tree_matches_reference(tree: list[int]) -> None:
    blank = 5
    lp = random_log_probs(6, 6, seed=sum(tree), sharpness=1.0)
    got = static_tree_candidates(lp, blank, tree)
    assert {tuple(c.tokens): c.score for c in got} == pytest.approx(reference_static(lp, blank, topk_paths(tree)))
    assert len({tuple(c.tokens) for c in got}) == len(got)  # deduplicated


def test_static_tree_medusa_style_paths() -> None:
    blank = 4
    lp = random_log_probs(5, 5, seed=3, sharpness=1.0)
    paths = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 2)]
    got = static_tree_candidates(lp, blank, paths=paths)
    assert {tuple(c.tokens): c.score for c in got} == pytest.approx(reference_static(lp, blank, paths))
    with pytest.raises(ValueError):
        static_tree_candidates(lp, blank, [2, 2], paths=paths)  # exactly one
    with pytest.raises(ValueError):
        static_tree_candidates(lp, blank, [1] * 6)  # deeper than the 5 frames


def test_static_tree_batched_equals_single() -> None:
    lp = random_log_probs(3, 6, 8, seed=4, sharpness=1.0)
    batched = batched_static_tree_candidates(lp, 7, [4, 3, 2, 2, 1, 1])
    assert batched == [static_tree_candidates(lp[b], 7, [4, 3, 2, 2, 1, 1]) for b in range(3)]


# ----------------------------------------------------------------------------- prefix beam search


@pytest.mark.parametrize("num_frames, num_symbols, blank", [(3, 4, 3), (4, 4, 0), (4, 5, 4), (3, 5, 2), (4, 3, 2)])
def test_beam_search_equals_brute_force(num_frames: int, num_symbols: int, blank: int) -> None:
    for seed in range(3):
        lp = random_log_probs(num_frames, num_symbols, seed=seed, sharpness=1.0)
        exact = {seq: s for seq, s in brute_force(lp, blank).items() if seq}
        got = ctc_prefix_beam_search(lp, blank, beam_width=10_000, prune_topk=None)
        assert {tuple(c.tokens): c.score for c in got} == pytest.approx(exact, abs=1e-9)
        assert [c.score for c in got] == sorted((c.score for c in got), reverse=True)


def test_beam_search_total_probability_is_one() -> None:
    lp = random_log_probs(4, 4, seed=7, sharpness=1.0)
    got = ctc_prefix_beam_search(lp, 3, beam_width=10_000)
    empty = lp[:, 3].sum().item()  # the all-blank alignment is the only one giving []
    assert torch.logsumexp(torch.tensor([c.score for c in got] + [empty]), 0).item() == pytest.approx(0.0, abs=1e-9)


def test_beam_search_width_returns_top_of_exact() -> None:
    lp = random_log_probs(4, 5, seed=11, sharpness=3.0)
    exact = sorted(((s, seq) for seq, s in brute_force(lp, 4).items() if seq), reverse=True)
    got = ctc_prefix_beam_search(lp, 4, beam_width=3)
    assert 1 <= len(got) <= 3
    assert tuple(got[0].tokens) == exact[0][1]  # sharp distribution: beam finds the best
    # A narrow beam loses the alignments that ran through pruned prefixes: a lower bound, here close.
    assert exact[0][0] - 1e-3 <= got[0].score <= exact[0][0] + 1e-9


def test_beam_search_pruning() -> None:
    lp = random_log_probs(4, 5, seed=5, sharpness=1.0)
    exact = brute_force(lp, 4)
    full = ctc_prefix_beam_search(lp, 4, beam_width=10_000, prune_topk=5)  # k = V+1: no pruning
    assert full == ctc_prefix_beam_search(lp, 4, beam_width=10_000, prune_topk=None)
    pruned = ctc_prefix_beam_search(lp, 4, beam_width=10_000, prune_topk=2)
    assert pruned and len(pruned) < len(full)
    for c in pruned:  # pruning only removes alignments: scores are lower bounds of the exact ones
        assert c.score <= exact[tuple(c.tokens)] + 1e-9
        assert all(0 <= t < 5 and t != 4 for t in c.tokens)


def test_beam_search_peaked_equals_greedy_collapse() -> None:
    blank = 6
    frames = [2, 2, blank, 2, 5, blank]
    lp = torch.full((6, 7), -30.0, dtype=torch.float64)
    lp[torch.arange(6), torch.tensor(frames)] = 0.0
    lp = torch.log_softmax(lp, dim=-1)
    got = ctc_prefix_beam_search(lp, blank, beam_width=4, prune_topk=3)
    assert got[0].tokens == collapse_sequence(frames, blank) == [2, 2, 5]


def test_beam_search_batched_equals_single_and_large_vocab() -> None:
    lp = random_log_probs(3, 6, 40, seed=2)
    batched = batched_prefix_beam_search(lp, 39, beam_width=8, prune_topk=4)
    assert batched == [ctc_prefix_beam_search(lp[b], 39, 8, 4) for b in range(3)]
    # Realistic vocab (32k + blank), float32: pruning keeps the work independent of V.
    big = torch.log_softmax(torch.randn(2, 6, 32_001, generator=torch.Generator().manual_seed(0)), dim=-1)
    out = batched_prefix_beam_search(big, 32_000, beam_width=8, prune_topk=8)
    assert len(out) == 2 and all(1 <= len(c) <= 8 for c in out)
    assert all(32_000 not in c.tokens for cands in out for c in cands)


def test_beam_search_bad_args() -> None:
    lp = random_log_probs(3, 4, seed=0)
    with pytest.raises(ValueError):
        ctc_prefix_beam_search(lp, 3, beam_width=0)
    with pytest.raises(ValueError):
        ctc_prefix_beam_search(lp, 3, beam_width=2, prune_topk=0)


# ----------------------------------------------------------------------------- to a tree


def test_candidates_to_tree_end_to_end() -> None:
    blank = 9
    lp = random_log_probs(6, 10, seed=8)
    for cands in (
        ctc_prefix_beam_search(lp, blank, beam_width=16, prune_topk=4),
        static_tree_candidates(lp, blank, [4, 3, 2, 2, 1, 1]),
    ):
        tree = candidates_to_tree(77, cands, max_nodes=10)
        assert tree.tokens[0] == 77 and tree.num_draft_tokens <= 10
        assert blank not in tree.tokens[1:]  # blanks never become nodes (authors' bug 2)
        # The best candidate is fully in the tree when it fits the budget.
        best = cands[0].tokens
        node = 0
        for tok in best[:10]:
            node = next(c for c in tree.children(node) if tree.tokens[c] == tok)
        assert tree.depths[node] == min(len(best), 10)
