"""One forward's worth of work: which tokens of which sequences, where they go, what they see.

Every forward mode is the same thing seen from the attention's side: sequence b brings q_len new
tokens that attend its whole committed prefix (cache_len tokens) plus some of each other.
- prefill chunk / decode: the new tokens form a causal chain, positions cache_len + i;
- tree verification: the new tokens are a flattened trie (node 0 = the pending token, parents
  before children), each sees only its ancestors and itself, and its position is
  cache_len + depth, so siblings share a position.
So one `ForwardBatch` (token ids + `AttentionMetadata`) drives all three, mixed in one call.
New K/V are written at cache index cache_len + i (i = node index), whatever the position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardItem:
    """One sequence's share of a forward. `parents=None` means a causal chain."""

    slot: int
    cache_len: int
    tokens: list[int]
    parents: list[int] | None = None

    def depths(self) -> list[int]:
        if self.parents is None:
            return list(range(len(self.tokens)))
        depths: list[int] = []
        for i, p in enumerate(self.parents):
            if (p < 0) != (i == 0) or p >= i:
                raise ValueError(f"tree parents must be topological with a single root at 0, got {self.parents}")
            depths.append(0 if p < 0 else depths[p] + 1)
        return depths

    def mask(self) -> torch.Tensor:
        """(n, n) bool: mask[i, j] = node i attends node j (ancestor-or-self, or causal)."""
        n = len(self.tokens)
        if self.parents is None:
            return torch.ones(n, n, dtype=torch.bool).tril_()
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            mask[i] |= mask[self.parents[i]]
        return mask


@dataclass
class AttentionMetadata:
    """Per-forward attention inputs, built once and read by every layer (no global context)."""

    slots: torch.Tensor  # (B,) int64 cache slot of each sequence
    cache_lens: torch.Tensor  # (B,) int64 committed tokens before this forward
    q_lens: torch.Tensor  # (B,) int64 new tokens of each sequence (the rest of L is padding)
    positions: torch.Tensor  # (B, L) int64 rotary positions
    tree_mask: torch.Tensor  # (B, L, L) bool new-token-to-new-token visibility
    write_batch: torch.Tensor  # (T,) for the T real new tokens: batch row,
    write_token: torch.Tensor  # (T,) index within the row,
    write_slot: torch.Tensor  # (T,) cache slot,
    write_pos: torch.Tensor  # (T,) cache index (cache_len + i)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # (B, L) int64, padded with 0
    meta: AttentionMetadata
    items: list[ForwardItem]

    @property
    def last_index(self) -> torch.Tensor:
        """(B,) index of each sequence's last real token (where a prefill's next token comes from)."""
        return self.meta.q_lens - 1


def build_batch(items: list[ForwardItem], max_model_len: int, device: torch.device | str = "cpu") -> ForwardBatch:
    if not items:
        raise ValueError("a forward needs at least one sequence")
    B, L = len(items), max(len(it.tokens) for it in items)
    input_ids = torch.zeros(B, L, dtype=torch.long)
    positions = torch.zeros(B, L, dtype=torch.long)
    tree_mask = torch.zeros(B, L, L, dtype=torch.bool)
    wb, wt, ws, wp = [], [], [], []
    for b, it in enumerate(items):
        n = len(it.tokens)
        if n == 0:
            raise ValueError(f"slot {it.slot}: empty forward item")
        if it.cache_len + n > max_model_len:
            raise ValueError(f"slot {it.slot}: {it.cache_len} + {n} tokens exceed the cache length {max_model_len}")
        input_ids[b, :n] = torch.tensor(it.tokens)
        positions[b, :n] = it.cache_len + torch.tensor(it.depths())
        tree_mask[b, :n, :n] = it.mask()
        tree_mask[b, n:, :] = torch.eye(L, dtype=torch.bool)[n:]  # padding rows see themselves only
        wb += [b] * n
        wt += range(n)
        ws += [it.slot] * n
        wp += range(it.cache_len, it.cache_len + n)

    def t(x):
        return torch.as_tensor(x, dtype=torch.long).to(device)

    meta = AttentionMetadata(
        slots=t([it.slot for it in items]),
        cache_lens=t([it.cache_len for it in items]),
        q_lens=t([len(it.tokens) for it in items]),
        positions=positions.to(device),
        tree_mask=tree_mask.to(device),
        write_batch=t(wb),
        write_token=t(wt),
        write_slot=t(ws),
        write_pos=t(wp),
    )
    return ForwardBatch(input_ids=input_ids.to(device), meta=meta, items=items)
