"""The speculative step's phases as functions: propose -> verify -> accept -> commit.

  propose: the drafter turns each sequence's context into a token tree rooted at its pending
           token (CTC collapse, dedupe and trie-building happen inside the drafter);
  verify:  ONE base-model forward over every sequence's tree and every prefill chunk;
  accept:  walk each tree from its root along the base model's decided tokens (greedy or seeded
           sample, sampler.py; accept.py) -> accepted path + bonus token. Logits are computed
           only at the nodes the walks reach, one LM-head call per depth for the whole batch: the
           vocabulary projection is a large share of a small model's per-token cost, and most
           nodes of a tree are never reached;
  commit:  move the accepted nodes' K/V right after each prefix; tell the drafter what entered
           the cache (with hidden states, for drafters that condition on them).
Plain decoding is the same step with root-only trees.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from drafter.base import Drafter, ProposeRequest
from drafter.tree import TokenTree
from server.engine.accept import AcceptResult, walk_trees
from server.engine.sampler import decide_tokens
from server.engine.sequence import Sequence
from server.runtime.batch import ForwardItem, build_batch
from server.runtime.host import host_list
from server.runtime.kv_cache import KVCache
from server.runtime.model import CausalLM

log = logging.getLogger(__name__)


def propose(drafter: Drafter | None, decode: list[tuple[Sequence, int]], tier: int = 0) -> list[TokenTree]:
    """A tree per decoding sequence, drafted by the drafter's `tier`; budget 0 (or no drafter)
    gives a root-only tree."""
    trees = [TokenTree.chain(seq.pending_token, []) for seq, _ in decode]
    asks = [(i, ProposeRequest(seq.request_id, seq.pending_token, b, tier)) for i, (seq, b) in enumerate(decode)
            if b > 0]
    if drafter is not None and asks:
        try:
            proposed = drafter.propose([r for _, r in asks])
        except Exception:
            # A drafter failure costs this step its speedup, never a request: decode plainly.
            log.exception("drafter %s failed; decoding this step without drafts", drafter.name)
            return trees
        for (i, _), tree in zip(asks, proposed):
            trees[i] = tree
    return trees


@dataclass
class VerifyOutput:
    hidden: torch.Tensor  # (B, L, H) final-norm hidden states of every new token
    logits: torch.Tensor  # (M, V) float32 rows requested by `rows`
    rows: list[list[int]]  # per item, indices into `logits` of the token positions asked for


def verify(model: CausalLM, cache: KVCache, items: list[ForwardItem], logit_positions: list[list[int]]) -> VerifyOutput:
    """One forward over all items; logits only at `logit_positions[b]` of item b (the vocabulary
    projection is the largest matrix of a small model, so rows that need none skip it: prefill
    rows before the last, and tree nodes, whose logits `accept` computes as its walks reach them)."""
    batch = build_batch(items, cache.max_len, cache.k.device)
    hidden = model(batch, cache)
    b_idx = [b for b, pos in enumerate(logit_positions) for _ in pos]
    t_idx = [t for pos in logit_positions for t in pos]
    rows, k = [], 0
    for pos in logit_positions:
        rows.append(list(range(k, k + len(pos))))
        k += len(pos)
    logits = model.compute_logits(hidden[b_idx, t_idx]) if b_idx else hidden.new_zeros(0, 0)
    return VerifyOutput(hidden=hidden, logits=logits, rows=rows)


def decide(logits: torch.Tensor, seqs: list[Sequence], positions: list[int]) -> list[int]:
    """The base model's token at each row: row i belongs to seqs[i], output position positions[i]."""
    return host_list(decide_tokens(logits, [s.params for s in seqs], [s.seed for s in seqs], positions))


def accept(model: CausalLM, hidden: torch.Tensor, items: list[int], trees: list[TokenTree],
           decide: Callable[[torch.Tensor, list[tuple[int, int]]], list[int]]) -> list[AcceptResult]:
    """Walk every tree (item `items[k]` of the verify forward holds `trees[k]`), computing logits
    only at the nodes the walks stand on: per round one LM-head call over those rows, then
    `decide(logits, [(k, node), ...])` -> their decided tokens."""

    def at(nodes: list[tuple[int, int]]) -> list[int]:
        rows = hidden[[items[k] for k, _ in nodes], [node for _, node in nodes]]
        return decide(model.compute_logits(rows), nodes)

    return walk_trees([(t.tokens, t.parents) for t in trees], at)


def commit(cache: KVCache, seqs: list[Sequence], results: list[AcceptResult]) -> None:
    """Keep each sequence's accepted path (root + accepted drafts) in its KV slot."""
    cache.commit_paths([s.slot for s in seqs], [r.path for r in results])
