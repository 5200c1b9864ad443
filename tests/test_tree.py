"""Token trees: construction invariants, ancestor mask, trie merging under a budget."""

from __future__ import annotations

import math
import random

import pytest
import torch

from drafter.tree import TokenTree, build_trie


def assert_valid(tree: TokenTree) -> None:
    assert tree.parents[0] == -1 and tree.depths[0] == 0
    for i in range(1, tree.num_nodes):
        assert 0 <= tree.parents[i] < i
        assert tree.depths[i] == tree.depths[tree.parents[i]] + 1
    # A trie: no two children of one node carry the same token.
    for i in range(tree.num_nodes):
        kids = [tree.tokens[c] for c in tree.children(i)]
        assert len(kids) == len(set(kids))


def sequences(tree: TokenTree) -> set[tuple[int, ...]]:
    """Every root-to-node token sequence (root excluded) the tree holds."""
    return {tuple(tree.tokens[j] for j in tree.path_to(i)[1:]) for i in range(1, tree.num_nodes)}


def test_hand_built_tree_mask_children_paths() -> None:
    #        0
    #      /   \
    #     1     2
    #    / \     \
    #   3   4     5
    #   |
    #   6
    tree = TokenTree.from_parents([100, 11, 12, 13, 14, 15, 16], [-1, 0, 0, 1, 1, 2, 3])
    assert tree.num_nodes == 7 and tree.num_draft_tokens == 6
    assert tree.depths == [0, 1, 1, 2, 2, 2, 3]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0, 0],
            [1, 1, 0, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 0, 1, 0, 0, 1, 0],
            [1, 1, 0, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.ancestor_mask(), expected)
    assert tree.children(0) == [1, 2] and tree.children(1) == [3, 4] and tree.children(6) == []
    assert tree.path_to(6) == [0, 1, 3, 6] and tree.path_to(0) == [0] and tree.path_to(5) == [0, 2, 5]
    assert tree.depths_tensor().tolist() == tree.depths


def test_ancestor_mask_matches_path_to_on_random_trees() -> None:
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 40)
        parents = [-1] + [rng.randrange(i) for i in range(1, n)]
        tree = TokenTree.from_parents(list(range(n)), parents)
        mask = tree.ancestor_mask()
        for i in range(n):
            assert set(torch.nonzero(mask[i]).flatten().tolist()) == set(tree.path_to(i))


def test_chain() -> None:
    tree = TokenTree.chain(7, [1, 2, 3])
    assert tree.tokens == [7, 1, 2, 3] and tree.parents == [-1, 0, 1, 2] and tree.depths == [0, 1, 2, 3]
    assert torch.equal(tree.ancestor_mask(), torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    root_only = TokenTree.chain(7, [])
    assert root_only.num_nodes == 1 and root_only.ancestor_mask().tolist() == [[True]]


@pytest.mark.parametrize(
    "tokens, parents, depths",
    [
        ([1, 2], [-1, 1], [0, 1]),  # parent not before child
        ([1, 2], [0, 0], [0, 1]),  # root has a parent
        ([1, 2, 3], [-1, 0, 0], [0, 1, 2]),  # wrong depth
        ([1, 2], [-1], [0]),  # lengths differ
        ([], [], []),  # no root
    ],
)
def test_invalid_trees_are_rejected(tokens: list[int], parents: list[int], depths: list[int]) -> None:
    with pytest.raises(ValueError):
        TokenTree(tokens, parents, depths)


def test_build_trie_shares_prefixes_and_dedupes() -> None:
    cands = [[1, 2, 3], [1, 2, 4], [1, 2, 3], [5], [1, 2], []]
    tree = build_trie(0, cands, max_nodes=64)
    assert_valid(tree)
    assert tree.num_draft_tokens == 5  # 1, 1-2, 1-2-3, 1-2-4, 5
    assert sequences(tree) == {(1,), (1, 2), (1, 2, 3), (1, 2, 4), (5,)}
    assert tree.tokens[0] == 0


def test_build_trie_first_k_nodes_are_the_budget_k_tree() -> None:
    # Best first: truncating a tree to its first k draft nodes gives the tree of budget k, so one
    # verified tree prices every smaller budget (the governor relies on it).
    rng = random.Random(3)
    for _ in range(50):
        cands = [[rng.randrange(4) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(1, 8))]
        scores = [rng.choice([-1.0, -2.0, rng.uniform(-5, 0)]) for _ in cands]
        full = build_trie(0, cands, scores, max_nodes=64)
        for k in range(full.num_draft_tokens + 1):
            small = build_trie(0, cands, scores, max_nodes=k)
            assert small.tokens == full.tokens[: k + 1] and small.parents == full.parents[: k + 1]


def test_build_trie_depth_is_collapsed_position() -> None:
    # Positions are trie depths: contiguous along every path (no RoPE gap, the authors' bug 3).
    tree = build_trie(9, [[4, 4, 6], [4, 5]], max_nodes=8)
    for i in range(tree.num_nodes):
        assert [tree.depths[j] for j in tree.path_to(i)] == list(range(tree.depths[i] + 1))


def test_build_trie_budget_keeps_best_and_stays_valid() -> None:
    cands = [[1, 2, 3, 4], [5, 6], [1, 7], [8, 9, 10]]
    scores = [-1.0, -0.5, -3.0, -2.0]
    tree = build_trie(0, cands, scores, max_nodes=4)
    assert_valid(tree)
    # Values: 5,6 -> -0.5; 1,2,3,4 -> -1.0; 8,9,10 -> -2.0; 7 -> -3.0. Top 4: 5, 6, 1, 2.
    assert sequences(tree) == {(5,), (5, 6), (1,), (1, 2)}
    # Best first (a parent before its child on ties).
    assert tree.tokens[1:] == [5, 6, 1, 2]


def test_build_trie_budget_prefix_of_kept_always_kept() -> None:
    # A deep excellent candidate: its prefix must come along even though the budget binds.
    tree = build_trie(0, [[1, 2, 3, 4, 5], [6], [7]], [0.0, -1.0, -2.0], max_nodes=3)
    assert_valid(tree)
    assert sequences(tree) == {(1,), (1, 2), (1, 2, 3)}


def test_build_trie_scores_none_means_ranked() -> None:
    tree = build_trie(0, [[3, 4], [5, 6], [7]], None, max_nodes=3)
    assert sequences(tree) == {(3,), (3, 4), (5,)}


def test_build_trie_duplicate_takes_best_score() -> None:
    # [2] appears twice; its better score (-0.1) beats [1] (-0.5).
    tree = build_trie(0, [[1], [2], [2]], [-0.5, -3.0, -0.1], max_nodes=1)
    assert sequences(tree) == {(2,)}


def test_build_trie_sum_merge_values_a_node_by_all_the_drafts_through_it() -> None:
    # Three whole drafts: [1, 2, 3] at p 0.4, [4, 5] at 0.3 and [4, 6] at 0.3. Token 4 starts 0.6 of
    # the probability: "sum" ranks it first, then the best draft's nodes (0.4 each), so a 3-node
    # tree holds 4, 1, 2; "max" (each node its best draft's score) keeps the best draft whole.
    cands, scores = [[1, 2, 3], [4, 5], [4, 6]], [math.log(0.4), math.log(0.3), math.log(0.3)]
    assert build_trie(0, cands, scores, max_nodes=3).tokens[1:] == [1, 2, 3]
    summed = build_trie(0, cands, scores, max_nodes=3, merge="sum")
    assert_valid(summed)
    assert summed.tokens[1:] == [4, 1, 2]
    assert sequences(build_trie(0, cands, scores, max_nodes=100, merge="sum")) == \
        sequences(build_trie(0, cands, scores, max_nodes=100))  # the budget decides, not the nodes
    with pytest.raises(ValueError, match="merge"):
        build_trie(0, cands, scores, merge="mean")


def test_build_trie_zero_budget_and_bad_args() -> None:
    tree = build_trie(42, [[1, 2]], max_nodes=0)
    assert tree.tokens == [42] and tree.num_draft_tokens == 0
    with pytest.raises(ValueError):
        build_trie(0, [[1]], [0.0, 1.0])
    with pytest.raises(ValueError):
        build_trie(0, [[1]], max_nodes=-1)
    with pytest.raises(ValueError):
        build_trie(0, [[1]], [float("nan")])


@pytest.mark.parametrize("merge", ["max", "sum"])
def test_build_trie_random_budget_is_valid_and_optimal(merge: str) -> None:
    rng = random.Random(1)
    for _ in range(30):
        cands = [[rng.randrange(3) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(1, 12))]
        scores = [rng.uniform(-5, 0) for _ in cands]
        full = build_trie(0, cands, scores, max_nodes=1000, merge=merge)
        budget = rng.randint(0, full.num_draft_tokens)
        tree = build_trie(0, cands, scores, max_nodes=budget, merge=merge)
        assert_valid(tree)
        assert tree.num_draft_tokens == budget
        assert sequences(tree) <= sequences(full)
        # Every kept node is worth at least as much as every dropped one.
        def value(seq: tuple[int, ...]) -> float:
            through = [s for c, s in zip(cands, scores) if tuple(c[: len(seq)]) == seq]
            return max(through) if merge == "max" else math.log(sum(map(math.exp, through)))

        kept, dropped = sequences(tree), sequences(full) - sequences(tree)
        if kept and dropped:
            assert min(map(value, kept)) >= max(map(value, dropped)) - 1e-12
