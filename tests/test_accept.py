"""Unit tests for server/engine/accept.py: tree walks, the batched helper, and the statistical
proof that speculation with per-position noise samples the base model's sequence distribution
and equals recursive rejection sampling at a node.

Statistical tests use fixed seeds (deterministic); ALPHA is the p-value below which a sampler is
declared wrong. 1e-4 means a correct sampler would be flagged for about one choice of seeds in
10^4; every statistical test also checks that a deliberately broken variant is flagged.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from drafter.tree import TokenTree
from server.engine.accept import (
    AcceptResult,
    accept_batch,
    accept_tree,
    recursive_rejection_probs,
    walk_trees,
    walk_trees_on_device,
)
from server.engine.speculate import accept, accept_all_nodes
from server.runtime.host import TRANSFERS
from server.engine.sampler import decide_tokens, process_logits
from server.engine.types import SamplingParams
from tests.chi_square import chi_square_pvalue

ALPHA = 1e-4


# ---- hand-made trees -------------------------------------------------------------------------------
#            0:10
#          /      \
#       1:11      2:12
#      /    \
#   3:13    4:14
#     |
#   5:15
TOKENS = [10, 11, 12, 13, 14, 15]
PARENTS = [-1, 0, 0, 1, 1, 3]
X = 99  # decided at a node the walk never reaches: must not matter


@pytest.mark.parametrize(
    ("decided", "path", "emitted"),
    [
        ([11, 13, X, 15, X, 7], [0, 1, 3, 5], [11, 13, 15, 7]),  # full acceptance down the deepest branch
        ([12, X, 8, X, X, X], [0, 2], [12, 8]),  # second sibling at depth 1
        ([11, 14, X, X, 5, X], [0, 1, 4], [11, 14, 5]),  # second sibling at depth 2
        ([11, 13, X, 6, X, X], [0, 1, 3], [11, 13, 6]),  # rejection at depth 3
        ([42, X, X, X, X, X], [0], [42]),  # first-level rejection: bonus only
        ([11, 12, X, X, X, X], [0, 1], [11, 12]),  # 12 is a child of the root, not of node 1
    ],
)
def test_walk(decided: list[int], path: list[int], emitted: list[int]) -> None:
    res = accept_tree(TOKENS, PARENTS, decided)
    assert res == AcceptResult(path=path, emitted=emitted)
    assert res.emitted == [TOKENS[i] for i in res.path[1:]] + [res.bonus]  # accepted + bonus
    assert res.num_accepted == len(path) - 1


def test_root_only_is_plain_decoding() -> None:
    assert accept_tree([10], [-1], [7]) == AcceptResult(path=[0], emitted=[7])


def test_repeated_sibling_tokens_take_the_lowest_index() -> None:
    assert accept_tree([0, 5, 5, 6], [-1, 0, 0, 2], [5, 1, 6, 9]).path == [0, 1]


@pytest.mark.parametrize(
    ("tokens", "parents", "decided"),
    [([], [], []), ([1, 2], [0, 0], [1, 2]), ([1, 2, 3], [-1, 2, 0], [1, 2, 3]), ([1, 2], [-1, 0], [1])],
)
def test_malformed_trees_are_refused(tokens: list[int], parents: list[int], decided: list[int]) -> None:
    with pytest.raises(ValueError):
        accept_tree(tokens, parents, decided)


def test_batch_equals_tree_by_tree() -> None:
    trees = [
        (TOKENS, PARENTS, [11, 13, X, 15, X, 7]),
        ([3], [-1], [4]),
        ([1, 2, 3], [-1, 0, 1], [2, 3, 4]),
        (TOKENS, PARENTS, [12, X, 8, X, X, X]),
    ]
    flat = [sum((list(t[k]) for t in trees), []) for k in range(3)]
    sizes = [len(t[0]) for t in trees]
    expected = [accept_tree(*t) for t in trees]
    assert accept_batch(flat[0], flat[1], flat[2], sizes) == expected
    assert accept_batch(flat[0], flat[1], torch.tensor(flat[2]), sizes) == expected
    with pytest.raises(ValueError):
        accept_batch(flat[0], flat[1], flat[2], [*sizes[:-1], sizes[-1] + 1])


def test_lazy_walks_ask_only_for_the_nodes_they_reach_one_depth_per_round() -> None:
    trees = [
        (TOKENS, PARENTS, [11, 13, X, 15, X, 7]),
        ([3], [-1], [4]),
        (TOKENS, PARENTS, [12, X, 8, X, X, X]),
    ]
    rounds = []

    def decide(at):
        rounds.append(at)
        return [trees[k][2][node] for k, node in at]

    results = walk_trees([(t[0], t[1]) for t in trees], decide)
    assert results == [accept_tree(*t) for t in trees]
    # Round d holds the walks still going at depth d, each at the node its path reached.
    assert rounds == [[(k, 0) for k in range(3)]] + [[(k, r.path[d]) for k, r in enumerate(results) if len(r.path) > d]
                                                    for d in range(1, max(len(r.path) for r in results))]
    assert sum(map(len, rounds)) == sum(len(r.path) for r in results)  # never a node off the paths


def random_token_tree(rng: random.Random, symbols: int) -> TokenTree:
    """A random tree of 1 to 11 nodes, each token one of `symbols`."""
    n = rng.randrange(1, 12)
    parents = [-1] + [rng.randrange(i) for i in range(1, n)]
    return TokenTree.from_parents([rng.randrange(symbols) for _ in range(n)], parents)


def test_the_device_walk_equals_the_lazy_walk_on_random_trees() -> None:
    """All-nodes acceptance (`accept_all_nodes` -> `walk_trees_on_device`) against `walk_trees`:
    random tries with repeated sibling tokens, decided tokens that often match a child (long
    walks), sometimes -1 (a failed sequence), trees of different sizes and depths in one batch."""
    rng = random.Random(0)
    for _ in range(50):
        trees, decided = [], []
        for _ in range(rng.randrange(1, 6)):
            tree = random_token_tree(rng, symbols=4)  # 4 symbols: repeats among siblings happen
            trees.append(tree)
            kids = [[tree.tokens[j] for j in tree.children(i)] for i in range(tree.num_nodes)]
            decided.append([rng.choice(k) if k and rng.random() < 0.8 else rng.choice([7, -1]) for k in kids])
        expected = walk_trees([(t.tokens, t.parents) for t in trees], lambda at: [decided[k][i] for k, i in at])
        flat = torch.tensor([d for ds in decided for d in ds])
        starts = [sum(t.num_nodes for t in trees[:k]) for k in range(len(trees))]
        node_rows = [list(range(s, s + t.num_nodes)) for s, t in zip(starts, trees)]
        before = TRANSFERS.snapshot()
        extra, got, _ = accept_all_nodes(trees, flat, node_rows, torch.tensor([5, 6]))
        assert (TRANSFERS.snapshot() - before).transfers == 1  # paths, tokens and the extra: one copy
        assert extra == [5, 6] and got == expected


def test_device_walk_shapes_and_padding() -> None:
    tokens = torch.tensor([TOKENS, [3, -1, -1, -1, -1, -1]])
    parents = torch.tensor([PARENTS, [-1, -2, -2, -2, -2, -2]])  # padding: no node's child
    decided = torch.tensor([[11, 13, X, 15, X, 7], [-1, -1, 0, 0, 0, 0]])
    out = walk_trees_on_device(tokens, parents, decided, depth=3)
    assert out.shape == (2, 2, 4)
    assert out[0].tolist() == [[0, 1, 3, 5], [11, 13, 15, 7]]
    assert out[1].tolist() == [[0, -1, -1, -1], [-1, -1, -1, -1]]  # padding a decided -1 never matches


# ---- a toy base model: next-token distribution depends on the previous token only -----------------

V = 5
LENGTH = 3  # tokens per continuation
START = 0  # the pending token before the continuation
N_SEQS = 10_000  # continuations per sequence-distribution test (125 cells, rare ones pooled)
N_NODE_DRAWS = 20_000  # draws per one-node equivalence test


def toy_logits(seed: int = 0) -> torch.Tensor:
    """(V, V) logits: row a = log P(next | previous token a), P ~ Dirichlet(2) (every prob > 0)."""
    rng = np.random.default_rng(seed)
    return torch.tensor(np.log(rng.dirichlet([2.0] * V, size=V)), dtype=torch.float32)


def random_tree(rng: random.Random, root: int, max_depth: int = 3) -> tuple[list[int], list[int], list[int]]:
    """A random trie of deterministic drafts under `root`: 0-3 distinct children per node, depth
    <= max_depth. Returns (tokens, parents, depths) in topological (breadth-first) order."""
    tokens, parents, depths = [root], [-1], [0]
    i = 0
    while i < len(tokens):
        if depths[i] < max_depth:
            for tok in rng.sample(range(V), rng.randint(0, 3)):
                tokens.append(tok)
                parents.append(i)
                depths.append(depths[i] + 1)
        i += 1
    return tokens, parents, depths


def sample_plain(table: torch.Tensor, params: SamplingParams, seeds: list[int]) -> torch.Tensor:
    """(N, LENGTH) continuations by plain decoding: position t decided from the previous token."""
    prev = torch.full((len(seeds),), START)
    out = []
    for t in range(LENGTH):
        prev = decide_tokens(table[prev], [params] * len(seeds), seeds, [t] * len(seeds))
        out.append(prev)
    return torch.stack(out, dim=1)


def sample_speculative(
    table: torch.Tensor, params: SamplingParams, seeds: list[int], tree_seed: int, depth_offset: bool = True,
    walk: str = "path",
) -> torch.Tensor:
    """(N, LENGTH) continuations by tree speculation: each step every unfinished sequence gets a
    random draft tree, all trees are verified (decided) in one batched call and walked by
    accept_batch (walk="path") or on the device by accept_all_nodes (walk="all-nodes").
    `depth_offset=False` is a deliberate bug: every node uses the step's base position."""
    rng = random.Random(tree_seed)
    emitted: list[list[int]] = [[] for _ in seeds]
    while True:
        active = [s for s in range(len(seeds)) if len(emitted[s]) < LENGTH]
        if not active:
            break
        tokens, parents, seed_rows, positions, sizes = [], [], [], [], []
        for s in active:
            t, p, d = random_tree(rng, emitted[s][-1] if emitted[s] else START)
            base = len(emitted[s])  # output position of the token after the root
            tokens += t
            parents += p
            seed_rows += [seeds[s]] * len(t)
            positions += [base + (dep if depth_offset else 0) for dep in d]
            sizes.append(len(t))
        logits = table[torch.tensor(tokens)]  # (N_nodes, V): the model after path root..i sees token i last
        decided = decide_tokens(logits, [params] * len(tokens), seed_rows, positions)
        if walk == "path":
            results = accept_batch(tokens, parents, decided, sizes)
        else:
            starts = list(itertools.accumulate(sizes, initial=0))
            trees = [TokenTree.from_parents(tokens[a:b], parents[a:b]) for a, b in zip(starts, starts[1:])]
            _, results, _ = accept_all_nodes(trees, decided, [list(range(a, b)) for a, b in zip(starts, starts[1:])],
                                          decided[:0])
        for s, res in zip(active, results):
            emitted[s] += res.emitted
    return torch.tensor([e[:LENGTH] for e in emitted])  # a step may overshoot: keep the first LENGTH


def exact_sequence_probs(table: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(V**LENGTH,) exact probability of every continuation, index = x1 * V^2 + x2 * V + x3."""
    if params.greedy:
        raise ValueError("sampled params only")
    n = table.shape[0]
    filtered = process_logits(
        table,
        torch.full((n,), params.temperature),
        torch.full((n,), params.top_k or 0),
        torch.full((n,), params.top_p),
    )
    p = torch.softmax(filtered.double() / params.temperature, dim=-1)  # (V, V) transition matrix
    probs = torch.zeros(V**LENGTH, dtype=torch.float64)
    for seq in itertools.product(range(V), repeat=LENGTH):
        prob, prev = 1.0, START
        for tok in seq:
            prob *= float(p[prev, tok])
            prev = tok
        probs[int(np.ravel_multi_index(seq, (V,) * LENGTH))] = prob
    return probs


def sequence_counts(seqs: torch.Tensor) -> torch.Tensor:
    index = (seqs * torch.tensor([V * V, V, 1])).sum(-1)
    return torch.bincount(index, minlength=V**LENGTH)


def fit_pvalue(seqs: torch.Tensor, probs: torch.Tensor) -> float:
    counts = sequence_counts(seqs)
    assert counts[probs == 0].sum() == 0  # never an impossible (filtered-out) continuation
    return chi_square_pvalue(counts[probs > 0], probs[probs > 0])


@pytest.mark.parametrize("walk", ["path", "all-nodes"])
def test_greedy_speculation_equals_greedy_decoding(walk: str) -> None:
    table = toy_logits(1)
    greedy = SamplingParams(temperature=0.0)
    seeds = list(range(200))
    plain = sample_plain(table, greedy, seeds)
    assert (plain == plain[0]).all()  # greedy: one continuation whatever the seed
    assert torch.equal(sample_speculative(table, greedy, seeds, tree_seed=5, walk=walk), plain)


@pytest.mark.parametrize("walk", ["path", "all-nodes"])
def test_seeded_speculative_sampling_is_plain_sampling_sample_by_sample(walk: str) -> None:
    """The pathwise half of the distribution test below, on both walks (fewer sequences: a
    pathwise equality needs no statistics)."""
    table = toy_logits(0)
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9, seed=0)
    seeds = list(range(500))
    assert torch.equal(sample_speculative(table, params, seeds, tree_seed=2, walk=walk),
                       sample_plain(table, params, seeds))


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0, seed=0), SamplingParams(temperature=0.8, top_k=4, top_p=0.9, seed=0)]
)
def test_speculative_sampling_matches_the_exact_sequence_distribution(params: SamplingParams) -> None:
    table = toy_logits(0)
    seeds = list(range(N_SEQS))
    probs = exact_sequence_probs(table, params)
    plain = sample_plain(table, params, seeds)
    spec = sample_speculative(table, params, seeds, tree_seed=1)
    assert fit_pvalue(plain, probs) > ALPHA
    assert fit_pvalue(spec, probs) > ALPHA
    assert torch.equal(spec, plain)  # pathwise: same seed, same continuation


def test_biased_sequence_samplers_are_detected() -> None:
    table = toy_logits(0)
    probs = exact_sequence_probs(table, SamplingParams(temperature=1.0))
    # plain sampling at a 20% wrong temperature (p ~ 1e-31 with N_SEQS draws; 5000 suffice)
    wrong_t = sample_plain(table, SamplingParams(temperature=1.2), list(range(5_000)))
    assert fit_pvalue(wrong_t, probs) < ALPHA
    # speculation that forgets the depth offset, so a step reuses one noise vector at every depth;
    # the bias is gross (p ~ 1e-117 here), so fewer sequences suffice
    buggy = sample_speculative(table, SamplingParams(temperature=1.0), list(range(2_000)), tree_seed=1, depth_offset=False)
    assert fit_pvalue(buggy, probs) < ALPHA


# ---- equivalence with recursive rejection sampling at one node -------------------------------------

P = torch.softmax(torch.tensor([0.5, -0.2, 1.0, 0.1, -1.0]), dim=-1)  # (V,) target at the node


def outcome_probs(children: list[int]) -> torch.Tensor:
    """(C + V,) RRS outcome law: accept child j (cells 0..C-1) or bonus token v (cells C..C+V-1)."""
    accept, bonus = recursive_rejection_probs(P, children)
    return torch.cat([accept, bonus])


@pytest.mark.parametrize("children", [[], [2], [2, 0, 4], [4, 0, 2], [1, 3, 0, 2]])
def test_recursive_rejection_matches_the_closed_form(children: list[int]) -> None:
    accept, bonus = recursive_rejection_probs(P, children)
    assert torch.allclose(accept, P.double()[children], atol=1e-12)  # P(accept c_j) = p(c_j)
    expected_bonus = P.double().clone()
    expected_bonus[children] = 0.0  # P(bonus v) = p(v) outside the children
    assert torch.allclose(bonus, expected_bonus, atol=1e-12)
    assert abs(float(accept.sum() + bonus.sum()) - 1.0) < 1e-12


def test_recursive_rejection_edge_cases() -> None:
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    accept, bonus = recursive_rejection_probs(one_hot, [0, 1, 2])  # child 2 takes all: nothing after it
    assert accept.tolist() == [0.0, 1.0, 0.0] and bonus.tolist() == [0.0, 0.0, 0.0]
    accept, bonus = recursive_rejection_probs(torch.tensor([0.5, 0.5]), [0, 0])  # a repeat is never accepted
    assert accept.tolist() == [0.5, 0.0] and bonus.tolist() == [0.0, 0.5]


def gumbel_rule_outcomes(children: list[int], n: int) -> torch.Tensor:
    """Outcome counts (C + V,) of decide_tokens + accept_tree at a root with these children."""
    tokens, parents = [0, *children], [-1] + [0] * len(children)
    x = torch.log(P).expand(n, -1)
    decided = decide_tokens(x, [SamplingParams(temperature=1.0)] * n, list(range(n)), [0] * n)
    counts = torch.zeros(len(children) + V, dtype=torch.long)
    for tok in decided.tolist():
        res = accept_tree(tokens, parents, [tok] + [0] * len(children))
        cell = res.path[1] - 1 if res.num_accepted else len(children) + res.bonus
        counts[cell] += 1
    return counts


def naive_rejection_outcomes(children: list[int], n: int) -> torch.Tensor:
    """A deliberately wrong rule: accept c_j w.p. p(c_j) *without* renormalising after rejections."""
    rng = np.random.default_rng(0)
    p = P.double().numpy()
    rest = p.copy()
    rest[children] = 0.0
    counts = torch.zeros(len(children) + V, dtype=torch.long)
    for _ in range(n):
        for j, c in enumerate(children):
            if rng.random() < p[c]:
                counts[j] += 1
                break
        else:
            counts[len(children) + int(rng.choice(V, p=rest / rest.sum()))] += 1
    return counts


def test_gumbel_rule_has_the_recursive_rejection_outcome_law() -> None:
    children = [2, 0, 4]
    expected = outcome_probs(children)
    counts = gumbel_rule_outcomes(children, N_NODE_DRAWS)
    assert counts[expected == 0].sum() == 0  # a child's token is never the bonus
    assert chi_square_pvalue(counts[expected > 0], expected[expected > 0]) > ALPHA
    # the comparison can fail: an unnormalised rejection rule is flagged
    naive = naive_rejection_outcomes(children, N_NODE_DRAWS)
    assert chi_square_pvalue(naive[expected > 0], expected[expected > 0]) < ALPHA


class _RowModel:
    """A stand-in for the base model's LM head: row r of `hidden` decides token decided_rows[r]."""

    def __init__(self, decided_rows: list[int], vocab: int):
        self.decided, self.vocab, self.calls = decided_rows, vocab, []

    def compute_logits(self, rows: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(rows))
        ids = [self.decided[int(r[0])] for r in rows]
        return torch.nn.functional.one_hot(torch.tensor(ids), self.vocab).float()


@pytest.mark.parametrize("ahead", [0, 1, 2, 5])
def test_the_path_walk_looking_ahead_decides_the_same_in_fewer_calls(ahead: int) -> None:
    """speculate.accept looking `ahead` nodes down each walk's likeliest branch: the same results as
    the plain lazy walk on random trees, never more LM-head calls than the walk has rounds, each call
    over at most (ahead + 1) rows per walk; a walk along first children all the way (the drafter's
    best guess right) takes ceil(path / (ahead + 1)) calls."""
    rng = random.Random(1)
    for trial in range(60):
        trees, decided = [], []
        for _ in range(rng.randrange(1, 5)):
            tree = random_token_tree(rng, symbols=5)
            kids = [tree.children(i) for i in range(tree.num_nodes)]
            if trial % 3 == 0:  # the first child always right: the longest walk down first children
                decided.append([tree.tokens[k[0]] if k else 9 for k in kids])
            else:
                decided.append([tree.tokens[rng.choice(k)] if k and rng.random() < 0.7 else 9 for k in kids])
            trees.append(tree)
        roots = [sum(t.num_nodes for t in trees[:k]) for k in range(len(trees))]
        model = _RowModel([d for ds in decided for d in ds], vocab=10)
        hidden = torch.arange(sum(t.num_nodes for t in trees), dtype=torch.float32)[:, None]

        def argmax(logits, nodes):
            assert len(logits) == len(nodes)
            return logits.argmax(-1).tolist()

        got = accept(model, hidden, roots, trees, argmax, ahead=ahead)
        assert got == walk_trees([(t.tokens, t.parents) for t in trees], lambda at: [decided[k][i] for k, i in at])
        rounds = max(len(r.path) for r in got)
        assert len(model.calls) <= rounds and max(model.calls) <= (ahead + 1) * len(trees)
        if trial % 3 == 0 and len(trees) == 1:
            assert len(model.calls) == -(-len(got[0].path) // (ahead + 1))
