"""The slot KV cache: `max_slots` sequences x `max_len` positions, allocated once at start-up.

Each running sequence owns one slot and a committed length. A forward writes its new tokens'
K/V at cache_len + i without touching the committed prefix, so a rejected draft needs no
rollback: its entries lie past the committed length and the next forward overwrites them.
Keeping an accepted tree path is the one primitive `commit_paths` (kernels/kv_commit.py):
move the path's nodes to the positions right after the prefix and advance the length.

Every slot has one position more than `max_len`: position `scratch_pos` (= max_len) is reached by
no sequence (build_batch refuses cache_len + n > max_len), so a CUDA graph's padding rows
(server/runtime/graphs.py) write their K/V there and no real slot's entries are touched.
"""

from __future__ import annotations

import logging

import torch

from kernels.kv_commit import kv_commit
from server.runtime.batch import AttentionMetadata

log = logging.getLogger(__name__)


class CacheFullError(RuntimeError):
    pass


class KVCache:
    def __init__(
        self,
        num_layers: int,
        max_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_layers, max_slots, num_kv_heads, max_len + 1, head_dim)  # + the scratch position
        # zeros, not empty: padding queries may read never-written positions and must see finite values.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_slots, self.max_len = max_slots, max_len
        self.scratch_pos = max_len  # written by padding rows only, read by nobody
        self.lengths = [0] * max_slots
        self._free = list(range(max_slots - 1, -1, -1))  # pop() hands out slot 0 first
        log.info(
            "KV cache: %d slots x %d positions x %d layers, %s, %.1f MiB",
            max_slots, max_len, num_layers, dtype, self.nbytes / 2**20,
        )

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    # -- slots ---------------------------------------------------------------------------------
    def can_allocate(self, n: int = 1) -> bool:
        return len(self._free) >= n

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError("no free KV-cache slot")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"slot {slot} freed twice")
        self.lengths[slot] = 0
        self._free.append(slot)

    @property
    def num_used_slots(self) -> int:
        return self.max_slots - len(self._free)

    def usage(self) -> float:
        """Committed positions over capacity, 0..1."""
        return sum(self.lengths) / (self.max_slots * self.max_len)

    # -- writes --------------------------------------------------------------------------------
    def write(self, layer: int, meta: AttentionMetadata, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the packed new tokens' K/V (T, Hkv, hd) at their cache positions."""
        idx = (layer, meta.write_slot, slice(None), meta.write_pos)
        self.k[idx] = k
        self.v[idx] = v

    def advance(self, slot: int, n: int) -> None:
        """Keep the n tokens just written after the prefix (a prefill chunk or a chain)."""
        if self.lengths[slot] + n > self.max_len:
            raise CacheFullError(f"slot {slot}: {self.lengths[slot]} + {n} > {self.max_len}")
        self.lengths[slot] += n

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make slot `dst` hold slot `src`'s first n positions (a forked sequence's shared prompt)."""
        if n > self.lengths[src]:
            raise ValueError(f"slot {src} holds {self.lengths[src]} positions, not {n}")
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]  # (L, Hkv, n, hd)
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def commit_paths(self, slots: list[int], paths: list[list[int]]) -> None:
        """For each sequence keep the tree nodes `path` (node indices of the last forward, root
        first) as the tokens following its prefix; every other node of its tree is dropped."""
        # A path that is already in place (root, then nodes 1, 2, ... as in every plain decode step
        # and every chain-shaped acceptance) needs no move: only its length advances.
        moves = []
        for s, p in zip(slots, paths):
            if p == list(range(len(p))):
                self.advance(s, len(p))
            else:
                moves.append((s, p))
        if not moves:
            return
        slots, paths = [s for s, _ in moves], [p for _, p in moves]
        width = max(len(p) for p in paths)
        device = self.k.device
        src = torch.zeros(len(slots), width, dtype=torch.long)
        for b, p in enumerate(paths):
            src[b, : len(p)] = torch.tensor(p)
        kv_commit(
            self.k,
            self.v,
            torch.tensor(slots, device=device),
            torch.tensor([self.lengths[s] for s in slots], device=device),
            src.to(device),
            torch.tensor([len(p) for p in paths], device=device),
        )
        for s, p in zip(slots, paths):
            self.advance(s, len(p))
