"""The speculative step's phases as functions: propose -> verify -> accept -> commit.

  propose: the drafter turns each sequence's context into a token tree rooted at its pending
           token (CTC collapse, dedupe and trie-building happen inside the drafter); the engine
           asks through drafter_guard.DrafterGuard, so a drafter fault costs drafts only;
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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from drafter.tree import TokenTree
from server.engine.accept import AcceptResult, walk_trees
from server.engine.sampler import decide_tokens
from server.engine.sequence import Sequence
from server.runtime.batch import ForwardItem, build_batch
from server.runtime.host import host_list
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


def verify(model: CausalLM, cache: KVCache, items: list[ForwardItem], logit_positions: list[list[int]]) -> VerifyOutput:
    """One forward over all items; logits only at `logit_positions[b]` of item b (the vocabulary
    projection is the largest matrix of a small model, so rows that need none skip it: prefill
    rows before the last, and tree nodes, whose logits `accept` computes as its walks reach them)."""
    batch = build_batch(items, cache.max_len, cache.k.device)
    hidden = model(batch, cache)  # (T, H)
    packed = [batch.offsets[b] + t for b, pos in enumerate(logit_positions) for t in pos]
    rows, k = [], 0
    for pos in logit_positions:
        rows.append(list(range(k, k + len(pos))))
        k += len(pos)
    logits = model.compute_logits(hidden[packed]) if packed else hidden.new_zeros(0, 0)
    return VerifyOutput(packed_hidden=hidden, offsets=batch.offsets, logits=logits, rows=rows)


def decide(logits: torch.Tensor, seqs: list[Sequence], positions: list[int]) -> list[int]:
    """The base model's token at each row: row i belongs to seqs[i], output position positions[i]."""
    return host_list(decide_tokens(logits, [s.params for s in seqs], [s.seed for s in seqs], positions))


def accept(model: CausalLM, hidden: torch.Tensor, roots: list[int], trees: list[TokenTree],
           decide: Callable[[torch.Tensor, list[tuple[int, int]]], list[int]]) -> list[AcceptResult]:
    """Walk every tree (`trees[k]` holds the packed rows roots[k] + node of the verify forward's
    `hidden`), computing logits only at the nodes the walks stand on: per round one LM-head call
    over those rows, then `decide(logits, [(k, node), ...])` -> their decided tokens."""

    def at(nodes: list[tuple[int, int]]) -> list[int]:
        rows = hidden[[roots[k] + node for k, node in nodes]]
        return decide(model.compute_logits(rows), nodes)

    return walk_trees([(t.tokens, t.parents) for t in trees], at)


def commit(cache: KVCache, seqs: list[Sequence], results: list[AcceptResult]) -> None:
    """Keep each sequence's accepted path (root + accepted drafts) in its KV slot."""
    cache.commit_paths([s.slot for s in seqs], [r.path for r in results])
