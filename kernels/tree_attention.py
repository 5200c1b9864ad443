"""Tree attention over a slot-based KV cache: the attention of one verify / prefill / decode step.

Packed (varlen) layout, as flash-attention's cu_seqlens: the new tokens of all B sequences of a
forward are concatenated along one token dimension, q of shape (T, Hq, D), sequence b owning rows
cu_seqlens[b]:cu_seqlens[b+1] (q_len[b] = their count). No row is padding, so a step's cost follows
its real token count.

Cache layout (per layer): k_cache, v_cache of shape (num_slots, Hkv, max_len, D). Sequence b lives
in slot slots[b]; positions [0, cache_len[b]) hold its committed prefix. The q_len[b] new tokens of
this forward have ALREADY been written (RoPE applied) at positions cache_len[b] + j, j < q_len[b].

Query i of sequence b (i < q_len[b]) attends
- every prefix key, positions [0, cache_len[b]), and
- new key j (position cache_len[b] + j, j < q_len[b]) iff mask_b[i, j], where mask_b is sequence b's
  (q_len, q_len) block of the flat `tree_mask`, stored row-major from mask_offsets[b].
mask_b is "ancestor-or-self" for a token tree (as in Medusa / SpecInfer tree attention) and
"j <= i" for a causal chain (prefill chunk, plain decode with q_len = 1).
GQA: Hq = Hkv * group, query head h reads kv head h // group.

Output rows that attend no key are ZEROS in both implementations (never NaN), and so are rows
that belong to no sequence: packed rows past cu_seqlens[B]. Fixed-size (padded) metadata is valid
input: items with q_len 0 contribute nothing, and a CUDA graph's padding rows sit past the last
item (server/runtime/graphs.py), so one captured launch serves every step that fits its bucket.

Two implementations with one contract:
- `tree_attention_ref`: plain torch (`scaled_dot_product_attention` per sequence, on views of the
  cache, no gather copy); the CPU path of the runtime and the test oracle.
- `tree_attention_triton`: a flash-attention style kernel (online softmax over key blocks, fp32
  accumulation). The `group` query heads that share a kv head are packed into the rows of one
  program (row r = i * group + g), so each K/V block is loaded once per kv head rather than once
  per query head; this matters most for decode, where q_len is 1 and a per-head program would
  fill 1 row of a 16-row tile. The grid is sized by the longest sequence; the programs of a
  shorter one past its rows return at once.
  Split-KV (flash-decoding): when the grid has far fewer programs than the GPU has SMs (decode at
  batch 1: B x Hkv = 8 programs on 132 SMs), each (rows, sequence, kv head) program is split again
  over NUM_SPLITS contiguous ranges of the key positions. Pass 1 writes every split's normalised
  partial output and its log-sum-exp; pass 2 (`_combine_splits_kernel`, oracle `combine_splits_ref`)
  merges them: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M = max_s lse_s, which is exact
  softmax algebra (each split's softmax rescaled to the common denominator).
`tree_attention` dispatches between them (see kernels/backend.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from kernels.backend import is_interpreted, jit_kernel, launches_on_input_device, use_triton

# triton.language, bound by `_kernel()` on the first launch: triton is imported lazily (see
# kernels/backend.py), and the kernel below is plain Python until then.
tl: Any = None

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tree_attention_ref(
    q: torch.Tensor,  # (T, Hq, D) packed new tokens
    k_cache: torch.Tensor,  # (num_slots, Hkv, max_len, D)
    v_cache: torch.Tensor,  # (num_slots, Hkv, max_len, D)
    cu_seqlens: torch.Tensor,  # (B + 1,) int64
    slots: torch.Tensor,  # (B,) int64
    cache_lens: torch.Tensor,  # (B,) int64
    tree_mask: torch.Tensor,  # (sum q_len^2,) bool
    mask_offsets: torch.Tensor,  # (B,) int64
    scale: float,
) -> torch.Tensor:  # (T, Hq, D)
    """Reference tree attention in plain torch (see the module docstring for the contract).

    One SDPA call per sequence on views of its slot (no gather of the caches into a padded batch):
    on one CPU thread at B=16 with prefixes of 1-2k tokens this is several times faster than one
    padded batched call. Inputs to SDPA are 4-D on purpose: CPU SDPA takes its fused (flash)
    kernel only for 4-D inputs (3-D measured ~4x slower).
    """
    T, Hq, D = q.shape
    Hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    out = torch.zeros_like(q)  # rows past cu_seqlens[B] (padding) stay zero
    cu = cu_seqlens.tolist()
    for b, (slot, c, m0) in enumerate(zip(slots.tolist(), cache_lens.tolist(), mask_offsets.tolist())):
        lo, n = cu[b], cu[b + 1] - cu[b]
        if n == 0:
            continue
        assert c + n <= max_len, f"sequence {b}: cache_len {c} + q_len {n} > max_len {max_len}"
        k = k_cache[slot, :, : c + n]  # (Hkv, S, D), a view
        v = v_cache[slot, :, : c + n]
        new = tree_mask[m0 : m0 + n * n].view(n, n)
        mask = torch.cat([new.new_ones(n, c), new], dim=1)  # (n, S)
        has_key = mask.any(dim=-1)  # (n,)
        mask = mask | ~has_key[:, None]  # keyless rows attend all (finite), zeroed below
        # Fold the group into query rows: head h = kvh * group + g -> row g * n + i of kv head kvh.
        qb = q[lo : lo + n].transpose(0, 1).reshape(1, Hkv, group * n, D)
        mb = mask.expand(group, n, c + n).reshape(1, 1, group * n, c + n)
        o = F.scaled_dot_product_attention(qb, k[None], v[None], attn_mask=mb, scale=scale)
        out[lo : lo + n] = o.view(Hq, n, D).transpose(0, 1).masked_fill(~has_key[:, None, None], 0.0)
    return out


def _tree_attention_kernel(
    Q, K, V, Out,  # (T, Hq, D), (NS, Hkv, S, D) x2, (T, Hq, D)
    Partial, Lse,  # NUM_SPLITS > 1 only: (NUM_SPLITS, T, Hq, D) and (NUM_SPLITS, T, Hq) float32
    CuSeqlens, Slots, CacheLens, TreeMask, MaskOffsets,  # (B + 1,), (B,) x2 int64, flat uint8, (B,) int64
    scale_log2e,  # softmax scale * log2(e): the kernel works in base 2 (exp2)
    stride_qt, stride_qh,
    stride_ks, stride_kh, stride_kt,
    stride_vs, stride_vh, stride_vt,
    stride_ot, stride_oh,
    num_kv_heads, D, T, Hq,
    GROUP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # One program = BLOCK_M packed rows (query i, head-in-group g) of one (sequence, kv head), over
    # one of NUM_SPLITS contiguous ranges of its key positions.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // num_kv_heads
    kvh = pid_bh % num_kv_heads
    row0 = tl.load(CuSeqlens + b)  # int64: the sequence's first packed row
    q_len = (tl.load(CuSeqlens + b + 1) - row0).to(tl.int32)
    if pid_m * BLOCK_M >= q_len * GROUP:
        return  # the grid fits the longest sequence; this one has no rows here
    slot = tl.load(Slots + b)  # int64: slot * stride_ks can pass 2**31 on a large cache
    cache_len = tl.load(CacheLens + b).to(tl.int32)  # positions < max_len: int32 is plenty
    mask_off = tl.load(MaskOffsets + b)  # int64: sum of q_len^2 can be large

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed row r = i * GROUP + g
    offs_i = offs_r // GROUP  # query index within the sequence's new tokens
    offs_h = kvh * GROUP + offs_r % GROUP  # query head
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < q_len * GROUP  # rows past q_len belong to the next sequence: untouched
    d_ok = offs_d < D

    q_ptrs = Q + (row0 + offs_i[:, None]) * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + slot * stride_ks + kvh * stride_kh
    v_base = V + slot * stride_vs + kvh * stride_vh
    mask_base = TreeMask + mask_off + offs_i[:, None] * q_len  # row i of the sequence's block
    num_keys = cache_len + q_len
    # This split's keys: [key_lo, key_hi), whole BLOCK_N blocks except at the end (an empty range
    # when there are fewer blocks than splits; its rows then report lse = -inf and weigh nothing).
    split_len = tl.cdiv(tl.cdiv(num_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
    key_lo = pid_s * split_len
    key_hi = tl.minimum(num_keys, key_lo + split_len)
    for start in range(key_lo, key_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # key positions in the slot
        n_ok = offs_n < key_hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        # Prefix keys are visible to every real row; new key j = n - cache_len goes through the mask.
        j = offs_n - cache_len
        is_new = (j >= 0) & n_ok
        tree = tl.load(mask_base + j[None, :], mask=row_ok[:, None] & is_new[None, :], other=0)
        allowed = row_ok[:, None] & ((offs_n < cache_len)[None, :] | (tree != 0))

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e  # (BLOCK_M, BLOCK_N)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen no allowed key its max is -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # p is rounded to the cache dtype for the tensor-core dot (as in FlashAttention); under
        # UPCAST the second cast is back to fp32, so the rounding is the same.
        p = p.to(K.dtype.element_ty).to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # keyless rows: acc = 0 -> 0
    if NUM_SPLITS == 1:
        o_ptrs = Out + (row0 + offs_i[:, None]) * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Contiguous (NUM_SPLITS, T, Hq, D) / (NUM_SPLITS, T, Hq) buffers; int64 row index: T * Hq * D
        # can pass 2**31 for a long prefill chunk.
        rows = (pid_s * T + row0 + offs_i).to(tl.int64) * Hq + offs_h  # (BLOCK_M,)
        tl.store(Partial + rows[:, None] * D + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(Lse + rows, lse, mask=row_ok)


def _combine_splits_kernel(
    Partial, Lse, Out,  # (S, T, Hq, D), (S, T, Hq) float32; (T, Hq, D)
    num_rows, D,  # num_rows = T * Hq
    stride_ot, stride_oh, Hq,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program = one (packed row, query head): the weighted mean of its splits' outputs.
    row = tl.program_id(0).to(tl.int64)  # = t * Hq + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < D
    lse = tl.load(Lse + offs_s * num_rows + row, mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
    top = tl.max(lse, 0)
    has_key = top != float("-inf")
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - tl.where(has_key, top, 0.0)))  # (BLOCK_S,)
    part = tl.load(Partial + (offs_s[:, None] * num_rows + row) * D + offs_d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    part = tl.where(w[:, None] > 0.0, part, 0.0)  # splits without keys left their rows unwritten
    out = tl.sum(w[:, None] * part, 0) / tl.where(has_key, tl.sum(w, 0), 1.0)  # keyless rows -> 0
    t = row // Hq
    h = row % Hq
    tl.store(Out + t * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)


def _kernel() -> Any:
    """The jit-wrapped kernel (built once, on first use)."""
    global tl
    import triton.language as tl

    return jit_kernel(_tree_attention_kernel)


def _combine_kernel() -> Any:
    _kernel()  # binds tl
    return jit_kernel(_combine_splits_kernel)


def combine_splits_ref(partial: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Merge split-KV partial results (the oracle of `_combine_splits_kernel`).

    partial (S, T, Hq, D): each split's softmax-normalised output over its keys; lse (S, T, Hq):
    log2 of each split's softmax denominator (in the kernel's base-2 logits), -inf for a split
    whose rows saw no key (its partial is then ignored, whatever it holds). Returns (T, Hq, D)
    float32; rows that no split saw a key for are zero."""
    top = lse.max(dim=0).values  # (T, Hq)
    has_key = top != float("-inf")
    w = torch.where(lse == float("-inf"), 0.0, torch.exp2(lse - torch.where(has_key, top, 0.0)))  # (S, T, Hq)
    part = torch.where(w[..., None] > 0, partial.float(), 0.0)
    den = torch.where(has_key, w.sum(dim=0), 1.0)
    return (w[..., None] * part).sum(dim=0) / den[..., None]


MAX_KV_SPLITS = 16  # beyond this the combine pass and the partial buffers cost more than idle SMs
MIN_SPLIT_KEYS = 256  # a split shorter than this (at full cache) is mostly launch overhead


def num_kv_splits(programs: int, num_sms: int, max_len: int) -> int:
    """How many KV splits a launch of `programs` (row block, sequence, kv head) programs should use:
    enough to give every SM about one program when the grid alone would leave most of them idle,
    at most MAX_KV_SPLITS, and none shorter than MIN_SPLIT_KEYS keys of a full cache of `max_len`.
    Depends on shapes only (never on the cache lengths, which live on the device), so a CUDA graph
    captured for a bucket keeps a valid choice for every step it replays."""
    if programs <= 0 or 2 * programs > num_sms:
        return 1
    return max(1, min(MAX_KV_SPLITS, num_sms // programs, max_len // MIN_SPLIT_KEYS))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@launches_on_input_device
def tree_attention_triton(
    q: torch.Tensor,  # (T, Hq, D) packed new tokens
    k_cache: torch.Tensor,  # (num_slots, Hkv, max_len, D)
    v_cache: torch.Tensor,  # (num_slots, Hkv, max_len, D)
    cu_seqlens: torch.Tensor,  # (B + 1,) int64
    slots: torch.Tensor,  # (B,) int64
    cache_lens: torch.Tensor,  # (B,) int64
    tree_mask: torch.Tensor,  # (sum q_len^2,) bool
    mask_offsets: torch.Tensor,  # (B,) int64
    scale: float,
    *,
    max_q_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    num_splits: int | None = None,
) -> torch.Tensor:  # (T, Hq, D), contiguous
    """Triton tree attention; same contract as `tree_attention_ref`.

    max_q_len (the longest sequence's q_len) sizes the grid; pass it from the host-side metadata,
    since deriving it from cu_seqlens is a device sync. Caller contract not checked here (it too
    would need a sync): cu_seqlens ascending from 0 to T, cache_len + q_len <= max_len, slot
    indices in range, tree_mask holding every block. block_m defaults to the packed row count
    (group * max_q_len) rounded up to a power of two, clamped to [16, 64]: 16 is tl.dot's minimum
    tile, 64 a standard flash tile. block_n defaults to 64 keys for 16-bit inputs and 32 for fp32,
    which keeps fp32 at D = 128 at 74 KB of shared memory on sm_90 (115 KB with 64).
    num_splits: KV splits per program (module docstring, split-KV); None: `num_kv_splits` for this
    grid on a CUDA device, 1 under the interpreter.
    """
    assert q.dim() == 3 and k_cache.dim() == 4, "q: (T, Hq, D); caches: (num_slots, Hkv, max_len, D)"
    T, Hq, D = q.shape
    num_slots, Hkv, max_len, Dk = k_cache.shape
    B = slots.shape[0]
    assert v_cache.shape == k_cache.shape, f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}"
    assert Dk == D, f"head_dim mismatch: q {D}, cache {Dk}"
    assert Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}"
    assert q.dtype in _FLOAT_DTYPES and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, (
        f"dtypes: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}; want one of {_FLOAT_DTYPES}")
    for name, t, n in (("cu_seqlens", cu_seqlens, B + 1), ("slots", slots, B), ("cache_lens", cache_lens, B),
                       ("mask_offsets", mask_offsets, B)):
        assert t.shape == (n,) and t.dtype == torch.int64 and t.is_contiguous(), (
            f"{name}: want contiguous int64 ({n},), got {t.dtype} {tuple(t.shape)}")
    assert tree_mask.dim() == 1 and tree_mask.dtype == torch.bool and tree_mask.is_contiguous(), (
        f"tree_mask: want contiguous flat bool, got {tree_mask.dtype} {tuple(tree_mask.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in its last dim, strides {t.stride()}"
    for t in (k_cache, v_cache, cu_seqlens, slots, cache_lens, tree_mask, mask_offsets):
        assert t.device == q.device, f"all inputs must be on {q.device}, got one on {t.device}"

    import triton  # lazy, see kernels/backend.py

    if B == 0 or T == 0:
        return torch.zeros((T, Hq, D), dtype=q.dtype, device=q.device)
    if max_q_len is None:
        max_q_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    group = Hq // Hkv
    if block_m is None:
        block_m = min(64, max(16, triton.next_power_of_2(group * max_q_len)))
    if block_n is None:
        block_n = 32 if q.dtype == torch.float32 else 64
    block_d = max(16, triton.next_power_of_2(D))
    # Triton's CPU interpreter has no bf16 arithmetic (its tl.dot multiplies the bf16 bit
    # patterns, triton issue #11584), so there the dot operands are cast to fp32 first: a
    # faithful stand-in, as a product of two bf16 numbers is exact in fp32.
    kernel = _kernel()
    upcast = q.dtype == torch.bfloat16 and is_interpreted(kernel)
    # fp32 products must be exact fp32 ("ieee"); the GPU default for fp32 is TF32, ~1e-3 off.
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    grid = (triton.cdiv(group * max_q_len, block_m), B * Hkv)
    if num_splits is None:
        num_splits = num_kv_splits(grid[0] * grid[1], _sm_count(q.device), max_len) if q.is_cuda else 1
    assert num_splits >= 1, f"num_splits must be >= 1, got {num_splits}"
    # Unsplit, rows past cu_seqlens[B] are never stored: zero them up front. Split, the combine pass
    # writes every row (those of no item from lse = -inf: zeros).
    out = (torch.zeros if num_splits == 1 else torch.empty)((T, Hq, D), dtype=q.dtype, device=q.device)
    partial = lse = out  # unused placeholders when not split
    if num_splits > 1:
        partial = torch.empty((num_splits, T, Hq, D), dtype=torch.float32, device=q.device)
        lse = torch.full((num_splits, T, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    kernel[(*grid, num_splits)](
        q, k_cache, v_cache, out, partial, lse,
        cu_seqlens, slots, cache_lens, tree_mask.view(torch.uint8), mask_offsets,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        Hkv, D, T, Hq,
        GROUP=group, NUM_SPLITS=num_splits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION=precision, UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _combine_kernel()[(T * Hq,)](
            partial, lse, out, T * Hq, D, out.stride(0), out.stride(1), Hq,
            NUM_SPLITS=num_splits, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
        )
    return out


def tree_attention(
    q: torch.Tensor,  # (T, Hq, D) packed new tokens
    k_cache: torch.Tensor,  # (num_slots, Hkv, max_len, D)
    v_cache: torch.Tensor,  # (num_slots, Hkv, max_len, D)
    cu_seqlens: torch.Tensor,  # (B + 1,) int64
    slots: torch.Tensor,  # (B,) int64
    cache_lens: torch.Tensor,  # (B,) int64
    tree_mask: torch.Tensor,  # (sum q_len^2,) bool
    mask_offsets: torch.Tensor,  # (B,) int64
    scale: float,
    *,
    max_q_len: int | None = None,
) -> torch.Tensor:  # (T, Hq, D)
    """Tree attention: the Triton kernel on CUDA when the backend allows it, else the reference."""
    args = (q, k_cache, v_cache, cu_seqlens, slots, cache_lens, tree_mask, mask_offsets, scale)
    if use_triton(q, k_cache, v_cache):
        return tree_attention_triton(*args, max_q_len=max_q_len)
    return tree_attention_ref(*args)
