"""The speculative step's phases as functions: propose -> verify -> accept -> commit.

  propose: the drafter turns each sequence's context into a token tree rooted at its pending
           token (CTC collapse, dedupe and trie-building happen inside the drafter); the engine
           asks through drafter_guard.DrafterGuard, so a drafter fault costs drafts only;
  verify:  ONE base-model forward over every sequence's tree and every prefill chunk;
  accept:  walk each tree from its root along the base model's decided tokens (greedy or seeded
           sample, sampler.py; accept.py) -> accepted path + bonus token. Two ways, same output
           (`Acceptance`):
           - path: logits only at the nodes the walks reach, one LM-head call and one copy to the
             host per depth for the whole batch. On a CPU each logit row is compute (the
             vocabulary projection is a large share of a small model's per-token cost) and most
             nodes of a tree are never reached, so this does the least work;
           - all-nodes: logits of every node in the verify forward's one LM-head call, every
             node's token decided at once, the walks run on the device (`accept_all_nodes`), and
             ONE copy to the host of O(batch x depth) integers. On an accelerator the LM head
             over all nodes costs about what it costs over the roots (it streams the same
             weight matrix once), while every extra host round trip idles the device;
  commit:  move the accepted nodes' K/V right after each prefix; tell the drafter what entered
           the cache (with hidden states, for drafters that condition on them).
Plain decoding is the same step with root-only trees. Every decision goes through `decide`, one
function over logits rows with, per row, (sequence, output position, node): the one place where
logits turn into tokens, on both paths.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch

from drafter.tree import TokenTree
from server.engine.accept import AcceptResult, walk_trees, walk_trees_on_device
from server.engine.sampler import decide_tokens
from server.engine.sequence import Sequence
from server.runtime.batch import ForwardItem, build_batch
from server.runtime.host import host_parts, to_device
from server.runtime.kv_cache import KVCache
from server.runtime.model import CausalLM


@dataclass
class VerifyOutput:
    # (T, H) final-norm hidden states of every new token, items packed: item b's rows are
    # offsets[b]:offsets[b+1] (named apart from the padded (B, L, H) `hidden` it replaced, so
    # that code indexing it as [item, token] fails loudly instead of reading the wrong rows)
    packed_hidden: torch.Tensor
    offsets: list[int]  # (B + 1,)
    logits: torch.Tensor  # (M, V) float32 rows requested by `rows`
    rows: list[list[int]]  # per item, indices into `logits` of the token positions asked for

    def item_hidden(self, b: int) -> torch.Tensor:
        """(q_len, H) hidden states of item b's new tokens."""
        return self.packed_hidden[self.offsets[b] : self.offsets[b + 1]]


class Acceptance(enum.Enum):
    """How `accept` gets the decided tokens (module docstring): AUTO = ALL_NODES on an
    accelerator, PATH on the CPU."""

    AUTO = "auto"
    PATH = "path"
    ALL_NODES = "all-nodes"

    def resolve(self, device: torch.device) -> Acceptance:
        if self is not Acceptance.AUTO:
            return self
        return Acceptance.PATH if device.type == "cpu" else Acceptance.ALL_NODES


def verify(model: CausalLM, cache: KVCache, items: list[ForwardItem], logit_positions: list[list[int]]) -> VerifyOutput:
    """One forward over all items; logits only at `logit_positions[b]` of item b, in one LM-head
    call (the vocabulary projection is the largest matrix of a small model, so rows that need none
    skip it: prefill rows before the last and, on the path walk, tree nodes, whose logits
    `accept` computes as its walks reach them)."""
    batch = build_batch(items, cache.max_len, cache.k.device)
    hidden = model(batch, cache)  # (T, H)
    packed = [batch.offsets[b] + t for b, pos in enumerate(logit_positions) for t in pos]
    rows, k = [], 0
    for pos in logit_positions:
        rows.append(list(range(k, k + len(pos))))
        k += len(pos)
    logits = model.compute_logits(hidden[packed]) if packed else hidden.new_zeros(0, 0)
    return VerifyOutput(packed_hidden=hidden, offsets=batch.offsets, logits=logits, rows=rows)


@dataclass(frozen=True)
class DecideRow:
    """What one logits row stands for: the sequence, the output position t of the token it decides
    (= tokens the request emitted before it), and the tree node whose logits these are (0: the
    root, or a prefill's last token; `tree` is None there). seq.output_ids + the draft tokens on
    the tree path root..node (root excluded) are the tokens before position t."""

    seq: Sequence
    position: int
    node: int = 0
    tree: TokenTree | None = None

    def drafted(self) -> list[int]:
        """The draft tokens on the path below the root down to this row's node ([] at the root)."""
        if self.tree is None or self.node == 0:
            return []
        return [self.tree.tokens[i] for i in self.tree.path_to(self.node)[1:]]


def decide(logits: torch.Tensor, rows: list[DecideRow]) -> torch.Tensor:
    """The base model's token at each logits row (M, V) -> (M,) int64, on the logits' device (no
    copy to the host: the all-nodes path keeps them there)."""
    return decide_tokens(logits, [r.seq.params for r in rows], [r.seq.seed for r in rows], [r.position for r in rows])


# The path walk's look-ahead (the default of EngineConfig.path_ahead): each LM-head call also scores
# this many nodes down each walk's likeliest branch (the first child, then its first child: trees
# list nodes best first). On a CPU an LM-head call over 1 to 3 rows costs about the same, being bound
# by reading the weight matrix (`python -m bench.bench_verify_cost --lm-head-rows 1,2,3,4`), so a walk
# that follows that branch skips the next calls; it does when the drafter's best guess is right.
PATH_AHEAD = 2


def accept(model: CausalLM, hidden: torch.Tensor, roots: list[int], trees: list[TokenTree],
           decide: Callable[[torch.Tensor, list[tuple[int, int]]], list[int]], ahead: int = PATH_AHEAD,
           ) -> list[AcceptResult]:
    """The path walk. Walk every tree (`trees[k]` holds the packed rows roots[k] + node of the
    verify forward's `hidden`), computing logits only at the nodes the walks stand on and at up to
    `ahead` nodes down each one's likeliest branch (`PATH_AHEAD` by default): per round one LM-head call over
    those of them not decided yet (none when a walk stands where an earlier call looked ahead), then
    `decide(logits, [(k, node), ...])` -> their decided tokens, on the host. A node's decision
    depends only on its path from the root, so deciding it before the walk arrives changes nothing."""
    firsts = [t.first_children() for t in trees]
    known: dict[tuple[int, int], int] = {}

    def at(nodes: list[tuple[int, int]]) -> list[int]:
        need = []
        for k, node in nodes:
            for _ in range(ahead + 1):
                if node < 0 or (k, node) in known:
                    break
                need.append((k, node))
                node = firsts[k][node]
        if need:
            rows = hidden[[roots[k] + node for k, node in need]]
            known.update(zip(need, decide(model.compute_logits(rows), need)))
        return [known[x] for x in nodes]

    return walk_trees([(t.tokens, t.parents) for t in trees], at)


def accept_all_nodes(trees: list[TokenTree], decided: torch.Tensor, node_rows: list[list[int]], extra: torch.Tensor,
                     riders: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
                     ) -> tuple[list[int], list[AcceptResult], list[torch.Tensor]]:
    """The all-nodes walk: `decided` (M,) holds every node's decided token on the device, node i of
    trees[k] at row node_rows[k][i]. The walks run on the device (`walk_all_nodes`); their paths
    and emitted tokens, with `extra` (P,) int64 tokens that must reach the host too (prefills'
    first tokens), come to the host in ONE copy of P + 2 x trees x (depth + 1) ints. `riders`, given
    the walks still on the device, returns more device tensors for that same copy (the drafter's
    look-ahead). Returns (extra as a list, one AcceptResult per tree, the riders on the host)."""
    if not trees and not len(extra):
        return [], [], []
    walks = walk_all_nodes(trees, decided, node_rows)
    extra_riders = [] if riders is None else riders(walks)
    head, walks, *extra_riders = host_parts([extra.to(decided.device, torch.long), walks, *extra_riders])
    return head.tolist(), read_walks(walks), extra_riders


def walk_all_nodes(trees: list[TokenTree], decided: torch.Tensor, node_rows: list[list[int]]) -> torch.Tensor:
    """(S, 2, depth + 1) int64 on the device: per tree, its accepted path's node indices, then the
    tokens it emits, each padded with -1 (accept.walk_trees_on_device)."""
    device = decided.device
    if not trees:
        return torch.zeros(0, 2, 1, dtype=torch.long, device=device)
    width = max(t.num_nodes for t in trees)
    depth = max(max(t.depths) for t in trees)
    pad = [width - t.num_nodes for t in trees]
    tokens = to_device([t.tokens + [-1] * n for t, n in zip(trees, pad)], device)  # (S, n)
    # -2 is nobody's parent (walks stand on nodes >= 0), so padding never matches a child
    parents = to_device([t.parents + [-2] * n for t, n in zip(trees, pad)], device)  # (S, n)
    index = to_device([r + [0] * n for r, n in zip(node_rows, pad)], device)  # (S, n)
    return walk_trees_on_device(tokens, parents, decided[index], depth)


def read_walks(walks: torch.Tensor) -> list[AcceptResult]:
    """`walk_all_nodes`' output, copied to the host, as one AcceptResult per tree."""
    results = []
    for path, emitted in walks.tolist():
        n = sum(1 for p in path if p >= 0)  # the path is its entries >= 0; -1 pads it to depth + 1
        results.append(AcceptResult(path=path[:n], emitted=emitted[:n]))
    return results


def commit(cache: KVCache, seqs: list[Sequence], results: list[AcceptResult]) -> None:
    """Keep each sequence's accepted path (root + accepted drafts) in its KV slot."""
    cache.commit_paths([s.slot for s in seqs], [r.path for r in results])
