"""One forward's worth of work: which tokens of which sequences, where they go, what they see.

Every forward mode is the same thing seen from the attention's side: sequence b brings q_len new
tokens that attend its whole committed prefix (cache_len tokens) plus some of each other.
- prefill chunk / decode: the new tokens form a causal chain, positions cache_len + i;
- tree verification: the new tokens are a flattened trie (node 0 = the pending token, parents
  before children), each sees only its ancestors and itself, and its position is
  cache_len + depth, so siblings share a position.
So one `ForwardBatch` (token ids + `AttentionMetadata`) drives all three, mixed in one call.
New K/V are written at cache index cache_len + i (i = node index), whatever the position.

The batch is packed (varlen, as flash-attention's cu_seqlens layout): the items' new tokens are
concatenated along one token dimension of T = sum of q_lens rows, item b owning rows
cu_seqlens[b]:cu_seqlens[b+1]. Embeddings, norms, projections and the MLP run on (T, hidden); only
attention looks at the per-item offsets. Padding every item to the longest one would make a step
that mixes one 256-token prefill chunk with 16 single-token decodes run 17 x 256 rows instead of
272, and every decoding stream would pay for the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.runtime.host import to_device


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
        # Row i = its parent's row + itself, built on the host and made a tensor once (a torch op
        # per node cost 3x as much: a tree's verify step builds this every step).
        rows: list[list[bool]] = []
        for i, p in enumerate(self.parents):
            row = rows[p].copy() if p >= 0 else [False] * n
            row[i] = True
            rows.append(row)
        return torch.tensor(rows, dtype=torch.bool)


@dataclass
class AttentionMetadata:
    """Per-forward attention inputs of a packed batch, built once and read by every layer (passed
    explicitly: no global context). B items, T = sum of q_lens packed token rows."""

    cu_seqlens: torch.Tensor  # (B + 1,) int64 item b's new tokens are packed rows cu_seqlens[b]:cu_seqlens[b+1]
    slots: torch.Tensor  # (B,) int64 cache slot of each item
    cache_lens: torch.Tensor  # (B,) int64 committed tokens before this forward
    positions: torch.Tensor  # (T,) int64 rotary position of each packed row
    tree_mask: torch.Tensor  # (sum q_len^2,) bool item b's (q_len, q_len) visibility block, row-major,
    mask_offsets: torch.Tensor  # (B,) int64 starting here in tree_mask
    write_slot: torch.Tensor  # (T,) int64 cache slot of each packed row's K/V
    write_pos: torch.Tensor  # (T,) int64 cache index of each packed row's K/V (cache_len + i)
    # Host copies, so that per-item Python code (the CPU reference, the cache-free path) and a
    # kernel's grid size need no device sync.
    host_cu_seqlens: list[int]  # (B + 1,) cu_seqlens
    host_mask_offsets: list[int]  # (B,) mask_offsets
    max_q_len: int  # the longest item

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    def item_rows(self, b: int) -> slice:
        """Item b's packed rows."""
        return slice(self.host_cu_seqlens[b], self.host_cu_seqlens[b + 1])

    def item_mask(self, b: int) -> torch.Tensor:
        """(n, n) bool visibility block of item b (n = its q_len)."""
        n, start = self.host_cu_seqlens[b + 1] - self.host_cu_seqlens[b], self.host_mask_offsets[b]
        return self.tree_mask[start : start + n * n].view(n, n)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # (T,) int64, the items' tokens packed
    meta: AttentionMetadata
    items: list[ForwardItem]

    @property
    def offsets(self) -> list[int]:
        """(B + 1,) item b is packed rows offsets[b]:offsets[b+1] (host copy of cu_seqlens)."""
        return self.meta.host_cu_seqlens


@dataclass
class PackedItems:
    """A step's items packed on the host: what `build_batch` moves to the device, and what a CUDA
    graph's runner copies into its static buffers (server/runtime/graphs.py)."""

    ids: list[int]  # (T,)
    positions: list[int]  # (T,)
    masks: list[torch.Tensor]  # per item, its flat (q_len * q_len,) bool visibility block
    write_slot: list[int]  # (T,)
    write_pos: list[int]  # (T,)
    offsets: list[int]  # (B + 1,) cu_seqlens
    mask_offsets: list[int]  # (B,)
    slots: list[int]  # (B,)
    cache_lens: list[int]  # (B,)

    @property
    def max_q_len(self) -> int:
        return max(b - a for a, b in zip(self.offsets, self.offsets[1:]))


def pack_items(items: list[ForwardItem], max_model_len: int) -> PackedItems:
    if not items:
        raise ValueError("a forward needs at least one sequence")
    p = PackedItems([], [], [], [], [], [0], [], [it.slot for it in items], [it.cache_len for it in items])
    mask_end = 0
    for it in items:
        n = len(it.tokens)
        if n == 0:
            raise ValueError(f"slot {it.slot}: empty forward item")
        if it.cache_len + n > max_model_len:
            raise ValueError(f"slot {it.slot}: {it.cache_len} + {n} tokens exceed the cache length {max_model_len}")
        p.ids += it.tokens
        p.positions += [it.cache_len + d for d in it.depths()]
        p.mask_offsets.append(mask_end)
        p.masks.append(it.mask().view(-1))
        mask_end += n * n
        p.write_slot += [it.slot] * n
        p.write_pos += range(it.cache_len, it.cache_len + n)
        p.offsets.append(p.offsets[-1] + n)
    return p


def build_batch(items: list[ForwardItem], max_model_len: int, device: torch.device | str = "cpu") -> ForwardBatch:
    """The items packed and on `device`, in two copies queued without waiting (a look-ahead builds
    its batch mid-step): every integer field in one int64 tensor, cut into views there, and the
    visibility masks. Nine small tensors made one by one cost 38 us on the CPU for a one-token
    decode, one made and cut 19 (2 threads; every forward builds one, a speculative step two)."""
    p = pack_items(items, max_model_len)
    fields = (p.offsets, p.slots, p.cache_lens, p.positions, p.mask_offsets, p.write_slot, p.write_pos, p.ids)
    flat = to_device([v for f in fields for v in f], device)
    cu_seqlens, slots, cache_lens, positions, mask_offsets, write_slot, write_pos, ids = flat.split(
        [len(f) for f in fields])
    meta = AttentionMetadata(
        cu_seqlens=cu_seqlens,
        slots=slots,
        cache_lens=cache_lens,
        positions=positions,
        tree_mask=to_device(torch.cat(p.masks) if len(p.masks) > 1 else p.masks[0], device),
        mask_offsets=mask_offsets,
        write_slot=write_slot,
        write_pos=write_pos,
        host_cu_seqlens=p.offsets,
        host_mask_offsets=p.mask_offsets,
        max_q_len=p.max_q_len,
    )
    return ForwardBatch(input_ids=ids, meta=meta, items=items)
