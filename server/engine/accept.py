"""Acceptance: walk a verified token tree from the root and emit the accepted drafts + a bonus token.

Setting. Node 0 is the sequence's pending token, nodes 1..n are draft tokens (parents[i] < i; see
drafter/tree.py). The verify forward gives the hidden state of every node, hence its logits: the
base model's next-token distribution after the path root..i. The sampler turns them into one decided
token per node (the walk reads only the nodes it reaches: `walk_trees` decides only those, lazily, on
the host; `walk_trees_on_device` takes every node's decision and walks on the device, for accelerators),
    decided[i] = D(logits[i], base + depth(i)),   D(l, t) = argmax(l' / T + g_t)  (greedy: argmax l),
with g_t the Gumbel noise of output position t (sampler.py) and base = the output position of the
token that follows the root (= the number of tokens the request has emitted, pending one included).

Rule (`accept_tree`). At node i (start: the root): if some child of i carries decided[i], move to it
and repeat; otherwise stop and emit decided[i] as the bonus. Output = the accepted children's
tokens + the bonus, 1 to depth + 1 tokens per step. With a root-only tree it is plain decoding.

1. Pathwise lossless. Let y_t be plain decoding's token at output position t (same seed). Claim:
   a step emits y_base, ..., y_{base+k}. Invariant: the walk's node i at depth d has path tokens
   (pending, y_base, ..., y_{base+d-1}), so logits[i] are plain decoding's logits for position
   base + d and decided[i] = D(same logits, same t) = y_{base+d}. If a child carries y_{base+d} the
   walk moves there (depth d + 1, invariant kept); else y_{base+d} is the bonus. Hence speculative
   output equals plain output token for token, for greedy and seeded sampling alike, whatever the
   tree, and (g_t i.i.d. over t) it is distributed exactly as the base model's sampling chain.

2. Equivalence with recursive rejection sampling (RRS; SpecInfer, Miao et al. 2024) over sibling
   drafts with one-hot draft distributions q_j = delta(c_j) (our drafts are deterministic).
   At a node with target p = softmax(l' / T) and distinct children tokens c_1..c_C, RRS does:
       r_1 = p;  for j = 1..C: accept c_j w.p. min(1, r_j(c_j) / q_j(c_j)) = r_j(c_j);
                               on rejection r_{j+1} = norm(max(0, r_j - q_j)) (= r_j without c_j);
       all rejected: bonus ~ r_{C+1}.
   With S_j = p(c_1) + ... + p(c_{j-1}):  r_j(v) = p(v) / (1 - S_j) for v not in {c_1..c_{j-1}}, so
       P(reach c_j)  = prod_{l<j} (1 - r_l(c_l)) = prod_{l<j} (1 - S_{l+1}) / (1 - S_l) = 1 - S_j,
       P(accept c_j) = (1 - S_j) * p(c_j) / (1 - S_j) = p(c_j),
       P(bonus = v)  = (1 - S_{C+1}) * p(v) / (1 - S_{C+1}) = p(v)   for v not a child (0 otherwise).
   That is the law of "draw x ~ p; move to the child carrying x, else emit x": our rule with
   x = decided[i], an exact Gumbel-max draw from p. RRS restarts at the accepted child with that
   child's p, and so does our walk (fresh, independent g_{t+1}), so the two laws agree on the whole
   emitted sequence; ours additionally couples it to plain sampling sample by sample. It is also
   optimal: no lossless rule can accept c_j more often than p(c_j), the chance of emitting c_j.
   `recursive_rejection_probs` computes the RRS outcome law by the recursion above; the tests check
   it against the closed form and against empirical frequencies of this module's rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from server.runtime.host import host_list


@dataclass(frozen=True)
class AcceptResult:
    """One sequence's acceptance: `path` = node indices root..last accepted node (path[0] == 0);
    `emitted` = tokens of path[1:] followed by the bonus token (len(emitted) == len(path))."""

    path: list[int]
    emitted: list[int]

    @property
    def num_accepted(self) -> int:
        """Accepted draft tokens (bonus excluded), as counted by ctc_spec_decode_num_accepted_tokens_total."""
        return len(self.path) - 1

    @property
    def bonus(self) -> int:
        return self.emitted[-1]


def check_tree(tree_tokens: Sequence[int], parents: Sequence[int]) -> None:
    """Raise ValueError unless the tree is non-empty, rooted at node 0 and topologically ordered."""
    n = len(tree_tokens)
    if n == 0 or len(parents) != n:
        raise ValueError(f"need equal non-empty lengths, got {n} tokens, {len(parents)} parents")
    if parents[0] != -1:
        raise ValueError(f"node 0 must be the root (parents[0] == -1), got {parents[0]}")
    for i in range(1, n):
        if not 0 <= parents[i] < i:
            raise ValueError(f"parents[{i}] = {parents[i]}: nodes must be in topological order (0 <= parent < index)")


def accept_tree(tree_tokens: Sequence[int], parents: Sequence[int], decided: Sequence[int]) -> AcceptResult:
    """Walk from the root: at node i, move to the child whose token is decided[i]; else stop and emit
    decided[i] as the bonus (module docstring: why this is lossless and equals RRS).

    tree_tokens, parents, decided: (n+1,) each; decided[i] = token decided from node i's logits.
    If siblings repeat a token (a trie never does) the lowest-index one is taken; any choice is
    lossless, since the emitted tokens do not depend on it.
    """
    check_tree(tree_tokens, parents)
    if len(decided) != len(tree_tokens):
        raise ValueError(f"{len(tree_tokens)} tokens but {len(decided)} decided")
    return walk_trees([(tree_tokens, parents)], lambda at: [decided[i] for _, i in at])[0]


def walk_trees(trees: Sequence[tuple[Sequence[int], Sequence[int]]],
               decide: Callable[[list[tuple[int, int]]], Sequence[int]]) -> list[AcceptResult]:
    """`accept_tree` for several (tokens, parents) trees at once, deciding lazily: the walks advance
    one depth per round, and each round asks `decide` for the decided tokens of the nodes the walks
    stand on, as (tree index, node) pairs. Only those nodes' tokens are ever read, so a caller that
    computes logits on demand pays for the accepted paths (plus one node each), not for the trees.
    The trees must pass `check_tree` (the caller checks them, so that one bad tree fails only its
    own sequence).
    """
    child_of: list[dict[tuple[int, int], int]] = []  # per tree: (parent, token) -> child
    for tokens, parents in trees:
        kids = {}
        for i in range(len(parents) - 1, 0, -1):  # descending, so the lowest index wins on repeats
            kids[(parents[i], int(tokens[i]))] = i
        child_of.append(kids)
    paths: list[list[int]] = [[0] for _ in trees]
    emitted: list[list[int]] = [[] for _ in trees]
    active = list(range(len(trees)))
    while active:
        toks = decide([(k, paths[k][-1]) for k in active])
        walking = []
        for k, tok in zip(active, toks):
            tok = int(tok)
            emitted[k].append(tok)
            nxt = child_of[k].get((paths[k][-1], tok))
            if nxt is not None:  # else tok is the bonus and this walk ends
                paths[k].append(nxt)
                walking.append(k)
        active = walking
    return [AcceptResult(path=p, emitted=e) for p, e in zip(paths, emitted)]


def walk_trees_on_device(tokens: torch.Tensor, parents: torch.Tensor, decided: torch.Tensor,
                         depth: int) -> torch.Tensor:
    """`accept_tree` for S trees at once with tensor ops only, so it runs where the tensors are
    (no copy to the host, no data-dependent control flow): one round per depth, all walks in step.

    tokens, parents, decided (S, n): tree k's nodes in row k, padded at the end with parents that
    are no node (< 0; padding then never matches a child); depth: the deepest tree's depth.
    Returns (S, 2, depth + 1) int64: [k, 0] = the path (node indices), [k, 1] = the emitted tokens,
    both padded with -1 after the walk's end (a path never holds -1; `emitted` may, where a decided
    token is -1, so read it up to the path's length). Equals `walk_trees` (tests check it).
    """
    num, _ = tokens.shape
    rows = torch.arange(num, device=tokens.device)  # (S,)
    at = torch.zeros(num, dtype=torch.long, device=tokens.device)  # (S,) the node each walk stands on
    walking = torch.ones(num, dtype=torch.bool, device=tokens.device)  # (S,)
    out = torch.full((num, 2, depth + 1), -1, dtype=torch.long, device=tokens.device)
    out[:, 0, 0] = 0
    for d in range(depth + 1):
        tok = decided[rows, at]  # (S,) decided token of the node each walk stands on
        out[:, 1, d] = torch.where(walking, tok, -1)
        child = (parents == at[:, None]) & (tokens == tok[:, None])  # (S, n) children carrying it
        moves = walking & child.any(dim=1)  # (S,) else tok is the bonus and the walk ends
        nxt = child.to(torch.uint8).argmax(dim=1)  # (S,) the first (lowest-index) match, as accept_tree
        if d < depth:  # a node at the deepest depth has no children
            out[:, 0, d + 1] = torch.where(moves, nxt, -1)
        at = torch.where(moves, nxt, at)
        walking = moves
    return out


def accept_batch(
    tokens: Sequence[int],
    parents: Sequence[int],
    decided: Sequence[int] | torch.Tensor,
    num_nodes: Sequence[int],
) -> list[AcceptResult]:
    """`accept_tree` for a batch of trees flattened one after the other (the verify forward's layout).

    tokens, parents, decided: (N,) with N = sum(num_nodes); sequence b owns the slice
    [offset_b, offset_b + num_nodes[b]) and its `parents` are local to that slice (as in TokenTree),
    so its root has parent -1. `decided` may be a device tensor: it is copied to the host once.
    Paths in the results are local node indices.
    """
    dec = host_list(decided) if isinstance(decided, torch.Tensor) else list(decided)
    total = sum(num_nodes)
    if not len(tokens) == len(parents) == len(dec) == total:
        raise ValueError(f"sum(num_nodes) = {total} but {len(tokens)} tokens, {len(parents)} parents, {len(dec)} decided")
    results = []
    start = 0
    for n in num_nodes:
        end = start + n
        results.append(accept_tree(tokens[start:end], parents[start:end], dec[start:end]))
        start = end
    return results


def recursive_rejection_probs(p: torch.Tensor, children_tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcome law of recursive rejection sampling at one node with one-hot (deterministic) drafts.

    p (V,): the target distribution at the node (normalised here); children_tokens: c_1..c_C, tried
    in this order. Returns float64 `(accept (C,), bonus (V,))`: accept[j] = P(child j is accepted),
    bonus[v] = P(every child is rejected and v is the bonus); together they sum to 1. Computed by
    the explicit recursion (module docstring, point 2), not by its closed form, which is
    accept[j] = p(c_j) for a first occurrence and bonus[v] = p(v) for v not among the children.
    """
    if p.dim() != 1:
        raise ValueError(f"p must be (V,), got shape {tuple(p.shape)}")
    r = p.detach().to("cpu", torch.float64)
    r = r / r.sum()  # (V,) residual r_j
    reach = 1.0  # P(children 1..j-1 all rejected)
    accept = torch.zeros(len(children_tokens), dtype=torch.float64)  # (C,)
    for j, c in enumerate(children_tokens):
        q = torch.zeros_like(r)
        q[c] = 1.0  # one-hot draft distribution of child j
        a = min(1.0, float(r[c] / q[c]))  # acceptance probability min(1, r(c) / q(c))
        accept[j] = reach * a
        reach *= 1.0 - a
        residual = (r - q).clamp(min=0)  # max(0, r - q): r without c
        mass = float(residual.sum())
        if mass <= 0.0 or reach <= 0.0:  # c took all the remaining mass: nothing is left to reach
            return accept, torch.zeros_like(r)
        r = residual / mass
    return accept, reach * r
