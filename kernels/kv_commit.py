"""KV commit: move the K/V of the accepted tree nodes into place after a verify step.

The verify forward wrote the K/V of every tree node of sequence b at positions cache_len[b] + n
(n = node index, topological order) of its slot. Acceptance picks one root-to-leaf path:
src_index[b, :num_accepted[b]] (node indices, in path order). To commit it, position
cache_len[b] + k must receive what sits at cache_len[b] + src_index[b, k] for k < num_accepted[b],
in every layer, K and V. Everything after the committed prefix is garbage that the next forward
overwrites (gpt-fast's "write at positions" cache: no rollback needed).

Sources and destinations overlap (node index >= depth, so src_index[b, k] >= k, and a
destination can be a later move's source), so both implementations read ALL sources before
writing any destination: correct for any src_index, not only topologically ordered ones.

Cache layout: k_cache, v_cache of shape (num_layers, num_slots, Hkv, max_len, D), all layers in one
tensor so that one call moves every layer. Slots of different sequences must be distinct.

- `kv_commit_ref`: plain torch (one gather + one index_put per cache); CPU path and test oracle.
- `kv_commit_triton`: one program per (sequence, layer, kv head) that loads its whole
  (num_accepted, D) tile of K and V, syncs the block, then stores it.
`kv_commit` dispatches between them (see kernels/backend.py). All three work in place.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.backend import jit_kernel, launches_on_input_device, use_triton

# triton.language, bound by `_kernel()` on the first launch: triton is imported lazily (see
# kernels/backend.py), and the kernel below is plain Python until then.
tl: Any = None


def kv_commit_ref(
    k_cache: torch.Tensor,  # (num_layers, num_slots, Hkv, max_len, D)
    v_cache: torch.Tensor,  # (num_layers, num_slots, Hkv, max_len, D)
    slots: torch.Tensor,  # (B,) int64
    cache_lens: torch.Tensor,  # (B,) int64
    src_index: torch.Tensor,  # (B, P) int64, padded past num_accepted (padding is never read)
    num_accepted: torch.Tensor,  # (B,) int64, each <= P
) -> None:
    """Reference KV commit in plain torch, in place (see the module docstring)."""
    B, P = src_index.shape
    depth = torch.arange(P, device=src_index.device)  # (P,)
    keep = depth[None, :] < num_accepted[:, None]  # (B, P)
    seq, k = keep.nonzero(as_tuple=True)  # (N,) each: the moves to make
    if seq.numel() == 0:
        return
    slot = slots[seq]
    src = cache_lens[seq] + src_index[seq, k]  # (N,) positions
    dst = cache_lens[seq] + k
    for cache in (k_cache, v_cache):
        # Advanced indices split by a slice put the move axis first: (N, num_layers, Hkv, D).
        moved = cache[:, slot, :, src]  # a copy: every source is read before any write
        cache[:, slot, :, dst] = moved


def _kv_commit_kernel(
    K, V,  # (num_layers, num_slots, Hkv, max_len, D), updated in place
    Slots, CacheLens, SrcIndex, NumAccepted,  # (B,), (B,), (B, P), (B,) int64
    stride_kl, stride_ks, stride_kh, stride_kt,
    stride_vl, stride_vs, stride_vh, stride_vt,
    stride_ib,
    num_kv_heads, P, max_len, D,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    layer = (tl.program_id(1) // num_kv_heads).to(tl.int64)  # layer * stride_kl may pass 2**31
    h = tl.program_id(1) % num_kv_heads
    slot = tl.load(Slots + b)
    cache_len = tl.load(CacheLens + b)
    n_acc = tl.load(NumAccepted + b)

    offs_p = tl.arange(0, BLOCK_P)  # depth k along the accepted path
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = (offs_p < n_acc) & (offs_p < P)
    src = cache_len + tl.load(SrcIndex + b * stride_ib + offs_p, mask=p_ok, other=0)
    dst = cache_len + offs_p
    # Skip moves onto themselves (common: the first branch of a tree is often accepted); the
    # bounds test keeps a bad index from touching memory outside this slot.
    move = p_ok & (src != dst) & (src >= 0) & (src < max_len) & (dst < max_len)
    tile_mask = move[:, None] & (offs_d < D)[None, :]  # (BLOCK_P, BLOCK_D)

    k_base = K + layer * stride_kl + slot * stride_ks + h * stride_kh
    v_base = V + layer * stride_vl + slot * stride_vs + h * stride_vh
    k = tl.load(k_base + src[:, None] * stride_kt + offs_d[None, :], mask=tile_mask)
    v = tl.load(v_base + src[:, None] * stride_vt + offs_d[None, :], mask=tile_mask)
    # Gather-then-scatter: a thread may store where another thread still has to load (a source
    # that is also a destination), so every load of the block completes before any store.
    tl.debug_barrier()
    tl.store(k_base + dst[:, None] * stride_kt + offs_d[None, :], k, mask=tile_mask)
    tl.store(v_base + dst[:, None] * stride_vt + offs_d[None, :], v, mask=tile_mask)


def _kernel() -> Any:
    """The jit-wrapped kernel (built once, on first use)."""
    global tl
    import triton.language as tl

    return jit_kernel(_kv_commit_kernel)


@launches_on_input_device
def kv_commit_triton(
    k_cache: torch.Tensor,  # (num_layers, num_slots, Hkv, max_len, D)
    v_cache: torch.Tensor,  # (num_layers, num_slots, Hkv, max_len, D)
    slots: torch.Tensor,  # (B,) int64
    cache_lens: torch.Tensor,  # (B,) int64
    src_index: torch.Tensor,  # (B, P) int64
    num_accepted: torch.Tensor,  # (B,) int64
    *,
    num_warps: int = 4,
) -> None:
    """Triton KV commit, in place; same contract as `kv_commit_ref`.

    Not checked here (it would need a device sync): slots distinct and in range, num_accepted <= P.
    Moves whose source or destination falls past max_len are dropped rather than written out of
    bounds (the reference raises an IndexError instead).
    """
    assert k_cache.dim() == 5, "caches: (num_layers, num_slots, Hkv, max_len, D)"
    assert v_cache.shape == k_cache.shape, f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}"
    assert v_cache.dtype == k_cache.dtype, f"k_cache {k_cache.dtype} != v_cache {v_cache.dtype}"
    num_layers, num_slots, Hkv, max_len, D = k_cache.shape
    assert src_index.dim() == 2 and src_index.dtype == torch.int64 and src_index.stride(-1) == 1, (
        f"src_index: want int64 (B, P) contiguous in P, got {src_index.dtype} {tuple(src_index.shape)}")
    B, P = src_index.shape
    for name, t in (("slots", slots), ("cache_lens", cache_lens), ("num_accepted", num_accepted)):
        assert t.shape == (B,) and t.dtype == torch.int64 and t.is_contiguous(), (
            f"{name}: want contiguous int64 ({B},), got {t.dtype} {tuple(t.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in its last dim, strides {t.stride()}"
    for t in (v_cache, slots, cache_lens, src_index, num_accepted):
        assert t.device == k_cache.device, f"all tensors must be on {k_cache.device}"
    if B == 0 or P == 0:
        return
    import triton  # lazy, see kernels/backend.py

    grid = (B, num_layers * Hkv)
    _kernel()[grid](
        k_cache, v_cache, slots, cache_lens, src_index, num_accepted,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        src_index.stride(0),
        Hkv, P, max_len, D,
        BLOCK_P=triton.next_power_of_2(P), BLOCK_D=triton.next_power_of_2(D),
        num_warps=num_warps,
    )


def kv_commit(
    k_cache: torch.Tensor,  # (num_layers, num_slots, Hkv, max_len, D)
    v_cache: torch.Tensor,  # (num_layers, num_slots, Hkv, max_len, D)
    slots: torch.Tensor,  # (B,) int64
    cache_lens: torch.Tensor,  # (B,) int64
    src_index: torch.Tensor,  # (B, P) int64
    num_accepted: torch.Tensor,  # (B,) int64
) -> None:
    """KV commit in place: the Triton kernel on CUDA when the backend allows it, else the reference."""
    args = (k_cache, v_cache, slots, cache_lens, src_index, num_accepted)
    if use_triton(k_cache, v_cache):
        kv_commit_triton(*args)
    else:
        kv_commit_ref(*args)
