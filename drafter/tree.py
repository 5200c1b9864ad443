"""Token trees: the flattened prefix tree (trie) of draft candidates that one verify step checks.

Node 0 is the root: the sequence's pending token (the last emitted token, not yet in the KV cache).
Nodes 1..n are draft tokens. The tree is stored flat, in topological order (`parents[i] < i`), so
that verification can feed `tokens` to the base model in one forward pass with
  - position ids  = kv_len + depths  (depth = number of edges from the root), and
  - attention mask = `ancestor_mask()`: node i sees node j iff j is on the root..i path,
and acceptance walks the tree from the root through `children`.

`build_trie` merges candidate token sequences (already CTC-collapsed) into such a tree under a node
budget. Two of the CTC-drafter authors' bugs (DESIGN.md section 1) cannot happen by construction:
  - bug 2 (blanks removed from candidates but not masked): candidates are collapsed *before* they
    reach the trie, so a blank never becomes a node and the mask only ever covers real tokens;
  - bug 3 (RoPE gap after collapsing a duplicate): a node's position is its trie depth, computed
    from the collapsed sequence, so positions along every path are contiguous (0, 1, 2, ...) no
    matter how many frames were merged or dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenTree:
    """A flattened token tree. `tokens`, `parents`, `depths` all have `num_nodes` = n + 1 entries.

    Invariants (checked on construction): parents[0] == -1; 0 <= parents[i] < i for i >= 1;
    depths[0] == 0; depths[i] == depths[parents[i]] + 1.
    """

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    # The drafter's forward ran for this tree, and would for any budget, above this many nodes and
    # not up to it: the lookup hybrid leaves its learned drafter out where lookup fills the budget
    # (drafter/hybrid.py). What the speculation governor prices each budget's steps by. None: the
    # same work whatever the budget.
    forward_above: float | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n == 0 or len(self.parents) != n or len(self.depths) != n:
            raise ValueError("tokens, parents and depths must be non-empty and of equal length")
        if self.parents[0] != -1 or self.depths[0] != 0:
            raise ValueError("node 0 must be the root: parents[0] == -1 and depths[0] == 0")
        for i in range(1, n):
            p = self.parents[i]
            if not 0 <= p < i:
                raise ValueError(f"parents[{i}] = {p}: nodes must be in topological order (0 <= parent < index)")
            if self.depths[i] != self.depths[p] + 1:
                raise ValueError(f"depths[{i}] = {self.depths[i]} but its parent has depth {self.depths[p]}")

    @classmethod
    def from_parents(cls, tokens: Sequence[int], parents: Sequence[int]) -> TokenTree:
        """Build a tree from tokens and parents, deriving the depths."""
        depths = [0] * len(parents)
        for i in range(1, len(parents)):
            depths[i] = depths[parents[i]] + 1 if 0 <= parents[i] < i else -1  # -1: rejected by the check
        return cls(list(tokens), list(parents), depths)

    @classmethod
    def chain(cls, root: int, tokens: Sequence[int]) -> TokenTree:
        """A linear draft: root -> tokens[0] -> tokens[1] -> ..."""
        n = len(tokens)
        return cls([root, *tokens], list(range(-1, n)), list(range(n + 1)))

    @property
    def num_nodes(self) -> int:
        """All nodes, root included (n + 1)."""
        return len(self.tokens)

    @property
    def num_draft_tokens(self) -> int:
        """Non-root nodes (n): the draft tokens this tree asks the base model to verify."""
        return len(self.tokens) - 1

    def children(self, i: int) -> list[int]:
        """Indices of node i's children, in increasing index order."""
        return [j for j in range(i + 1, len(self.parents)) if self.parents[j] == i]

    def first_children(self) -> list[int]:
        """Each node's first child (the lowest index: trees list nodes best first, so the likeliest
        next node), -1 for a leaf."""
        first = [-1] * len(self.parents)
        for i in range(len(self.parents) - 1, 0, -1):
            first[self.parents[i]] = i
        return first

    def path_to(self, i: int) -> list[int]:
        """Node indices on the path root..i (both included)."""
        path = [i]
        while self.parents[path[-1]] >= 0:
            path.append(self.parents[path[-1]])
        return path[::-1]

    def ancestor_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool (n+1, n+1): mask[i, j] = j is an ancestor of i or j == i (tree attention mask).

        Pointer jumping, one vectorised step per tree level: walk every node up one parent at a time
        (the root is its own parent) and mark each node reached.
        """
        n = self.num_nodes
        up = torch.tensor([0, *self.parents[1:]], dtype=torch.long, device=device)  # (n+1,)
        rows = torch.arange(n, device=device)  # (n+1,)
        mask = torch.eye(n, dtype=torch.bool, device=device)  # (n+1, n+1)
        cur = rows
        for _ in range(max(self.depths)):
            cur = up[cur]  # (n+1,) the ancestor one level higher (stays at 0 once the root is reached)
            mask[rows, cur] = True
        return mask

    def depths_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Depths as a LongTensor (n+1,): add the sequence's KV length to get position ids."""
        return torch.tensor(self.depths, dtype=torch.long, device=device)


def build_trie(
    root_token: int,
    candidates: Sequence[Sequence[int]],
    scores: Sequence[float] | None = None,
    max_nodes: int = 64,
    merge: str = "max",
) -> TokenTree:
    """Merge candidate token sequences into a trie under `root_token`, keeping at most `max_nodes`
    non-root nodes.

    Identical sequences and shared prefixes become one path. A node's value comes from the scores
    (log-probabilities) of the candidates through it, by `merge`:
    - "max": the best of them, value(v) = max{score(c) : v is on c's path}. Right where every
      node's own path is a candidate scored with its probability (EAGLE's and Hydra's trees): then
      the best candidate through v is v's own path;
    - "sum": the log of the sum of their probabilities. Right where candidates are whole drafts,
      each scored with the probability that it is exactly what follows (CTC's collapsed outputs,
      Medusa's combinations of head tokens): those through v add up to (a lower bound of) the
      probability that v's path is. There "max" ranks the deep nodes of the best draft above a
      shallow node that several slightly less likely drafts share, though that one is likelier.
    Either way every candidate through a child also passes through its parent, so value(parent)
    >= value(child); so taking the
    `max_nodes` nodes of highest value (ties: shallower first, then first seen) always takes a
    node's parent before the node, i.e. the result is a valid trie (a kept node's whole prefix is
    kept), and it maximises the sum of the kept nodes' values. `scores=None` means the candidates
    are ranked best first (score = -rank). Empty candidates add nothing.

    Output order is that ranking, best first: parents precede children, and the first k draft
    nodes are exactly the tree `max_nodes=k` would keep. So a verified tree also tells what any
    smaller budget would have accepted (the accepted path's nodes of index <= k), which is how the
    speculation governor (server/engine/scheduler.py) prices every tree size from the one it ran.
    Candidates must already be CTC-collapsed (no blanks; see the module docstring for why this and
    depth-as-position avoid the authors' bugs 2 and 3).
    """
    if max_nodes < 0:
        raise ValueError(f"max_nodes must be >= 0, got {max_nodes}")
    if scores is None:
        scores = [-float(r) for r in range(len(candidates))]
    elif len(scores) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    elif any(math.isnan(s) for s in scores):
        raise ValueError("scores must not be NaN")
    if merge not in ("max", "sum"):
        raise ValueError(f"merge must be 'max' or 'sum', got {merge!r}")

    # Full trie over temporary ids 1.. (0 = root): edges (parent, token) -> child.
    edges: dict[tuple[int, int], int] = {}
    tmp_parent = [-1]
    tmp_token = [root_token]
    tmp_depth = [0]
    tmp_value = [float("inf")]
    for seq, score in zip(candidates, scores):
        node = 0
        for tok in seq:
            child = edges.get((node, tok))
            if child is None:
                child = len(tmp_parent)
                edges[(node, tok)] = child
                tmp_parent.append(node)
                tmp_token.append(int(tok))
                tmp_depth.append(tmp_depth[node] + 1)
                tmp_value.append(float(score))
            elif merge == "sum":
                tmp_value[child] = _log_add(tmp_value[child], float(score))
            elif score > tmp_value[child]:
                tmp_value[child] = float(score)
            node = child

    # Budget: highest value first; shallower first on ties, so a parent always precedes its child.
    ranked = sorted(range(1, len(tmp_parent)), key=lambda v: (-tmp_value[v], tmp_depth[v], v))
    kept = ranked[:max_nodes]
    new_index = {0: 0}
    for i, v in enumerate(kept, start=1):
        new_index[v] = i
    return TokenTree(
        tokens=[root_token, *(tmp_token[v] for v in kept)],
        parents=[-1, *(new_index[tmp_parent[v]] for v in kept)],
        depths=[0, *(tmp_depth[v] for v in kept)],
    )


def trie_size(candidates: Sequence[Sequence[int]]) -> int:
    """Draft nodes of the trie `build_trie` would make of `candidates` with no budget: their
    distinct non-empty prefixes."""
    return len({tuple(seq[:i]) for seq in candidates for i in range(1, len(seq) + 1)})


def _log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b)), without overflow."""
    hi, lo = (a, b) if a >= b else (b, a)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))
