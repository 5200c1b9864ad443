"""Tests for kernels/: tree attention, KV commit and the backend choice.

Three tiers:
1. The torch references against hand-checkable cases and explicit Python loops (the oracles).
2. Triton-vs-reference parity on tiny shapes in Triton's CPU interpreter (TRITON_INTERPRET=1).
   Without a CUDA device this module sets TRITON_INTERPRET=1 at import, i.e. at collection,
   before any test runs; kernels/ imports triton only on a kernel's first launch, so triton is
   first imported under the interpreter even if other test modules imported kernels/ earlier.
   Skipped only if triton cannot be imported at all (or if the process runs compiled: a CUDA
   machine, where tier 3 covers the kernels; run with TRITON_INTERPRET=1 to get tier 2 there).
3. GPU parity on realistic shapes (marked gpu), skipped without CUDA.
"""

from __future__ import annotations

import math
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first `import triton` of the process (see above)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import backend  # noqa: E402
from kernels.kv_commit import kv_commit, kv_commit_ref, kv_commit_triton  # noqa: E402
from kernels.tree_attention import (  # noqa: E402
    MAX_KV_SPLITS,
    combine_splits_ref,
    num_kv_splits,
    tree_attention,
    tree_attention_ref,
    tree_attention_triton,
)

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- helpers


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """(n, n) bool: mask[i, j] iff node j is node i or one of its ancestors (parent -1 = root)."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def random_parents(n: int, gen: torch.Generator) -> list[int]:
    """A random tree in topological order: node 0 is the root, each node's parent comes before it."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]


def make_attention_case(
    q_lens: list[int],
    cache_lens: list[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    tree: bool,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict:
    """Random packed inputs for one batch. Everything the op must ignore is filled with garbage:
    other slots, cache positions past cache_len + q_len, and gaps of random bits between the
    sequences' blocks of the flat tree mask."""
    gen = torch.Generator().manual_seed(seed)
    B, T = len(q_lens), sum(q_lens)
    num_slots, max_len = B + 2, max(c + n for c, n in zip(cache_lens, q_lens)) + 5
    k_cache = torch.randn(num_slots, num_kv_heads, max_len, head_dim, generator=gen)
    v_cache = torch.randn(num_slots, num_kv_heads, max_len, head_dim, generator=gen)
    q = torch.randn(T, num_q_heads, head_dim, generator=gen)
    slots = torch.randperm(num_slots, generator=gen)[:B]
    blocks, mask_offsets, used = [], [], 0
    for n in q_lens:
        gap = torch.rand(3, generator=gen) < 0.5  # garbage the op must skip
        parents = random_parents(n, gen) if tree else list(range(-1, n - 1))
        blocks += [gap, ancestor_mask(parents).view(-1)]
        mask_offsets.append(used + 3)
        used += 3 + n * n
    cu_seqlens = torch.tensor([0, *q_lens]).cumsum(0)
    return dict(
        q=q.to(device, dtype), k_cache=k_cache.to(device, dtype), v_cache=v_cache.to(device, dtype),
        cu_seqlens=cu_seqlens.to(device), slots=slots.to(device), cache_lens=torch.tensor(cache_lens, device=device),
        tree_mask=torch.cat(blocks).to(device), mask_offsets=torch.tensor(mask_offsets, device=device),
        scale=1.0 / math.sqrt(head_dim),
    )


def item_mask(case: dict, b: int) -> torch.Tensor:
    """Sequence b's (n, n) block of the case's flat tree mask."""
    n = int(case["cu_seqlens"][b + 1] - case["cu_seqlens"][b])
    m0 = int(case["mask_offsets"][b])
    return case["tree_mask"][m0 : m0 + n * n].view(n, n)


def as_fp32(case: dict) -> dict:
    return {**case, **{name: case[name].float() for name in ("q", "k_cache", "v_cache")}}


def explicit_attention(q, k_cache, v_cache, cu_seqlens, slots, cache_lens, tree_mask, mask_offsets, scale):
    """Oracle: for every packed row and head, list the allowed key positions and softmax over them."""
    T, Hq, D = q.shape
    group = Hq // k_cache.shape[1]
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    for b in range(len(slots)):
        lo, hi = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        c, n, s, m0 = int(cache_lens[b]), hi - lo, int(slots[b]), int(mask_offsets[b])
        for i in range(n):
            keys = list(range(c)) + [c + j for j in range(n) if tree_mask[m0 + i * n + j]]
            if not keys:
                continue
            for h in range(Hq):
                k = k_cache[s, h // group, keys].double()  # (K, D)
                v = v_cache[s, h // group, keys].double()
                w = torch.softmax(k @ q[lo + i, h].double() * scale, dim=0)
                out[lo + i, h] = w @ v
    return out


def one_sequence(case: dict, b: int) -> dict:
    """Sequence b of a packed case as a batch of its own."""
    lo, hi = int(case["cu_seqlens"][b]), int(case["cu_seqlens"][b + 1])
    return {**case, "q": case["q"][lo:hi], "cu_seqlens": torch.tensor([0, hi - lo]),
            "slots": case["slots"][b : b + 1], "cache_lens": case["cache_lens"][b : b + 1],
            "tree_mask": item_mask(case, b).reshape(-1), "mask_offsets": torch.tensor([0])}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """max |actual - expected| <= rel * max |expected| (relative to the output's scale)."""
    assert torch.isfinite(actual).all(), "non-finite output"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-30)
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} * {scale:.3g}"


def make_commit_case(num_layers=2, num_slots=4, num_kv_heads=2, max_len=24, head_dim=8, seed=0,
                     dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
    k = torch.randn(shape, generator=gen).to(device, dtype)
    v = torch.randn(shape, generator=gen).to(device, dtype)
    return k, v


def commit_loop(k_cache, v_cache, slots, cache_lens, src_index, num_accepted):
    """Oracle: read every source from a snapshot, then write, one (b, k) at a time."""
    k_src, v_src = k_cache.clone(), v_cache.clone()
    for b in range(len(slots)):
        s, c = int(slots[b]), int(cache_lens[b])
        for k in range(int(num_accepted[b])):
            src = c + int(src_index[b, k])
            k_cache[:, s, :, c + k] = k_src[:, s, :, src]
            v_cache[:, s, :, c + k] = v_src[:, s, :, src]


COMMIT_CASE = dict(
    slots=torch.tensor([3, 0, 2, 1]),
    cache_lens=torch.tensor([5, 0, 9, 2]),
    # Overlaps: sequence 0 moves 2->1, 4->2 (position 2 is written after being read for the
    # previous move), 5->3; sequence 1 keeps a chain (no-op moves); padding is -1, never read.
    src_index=torch.tensor([[0, 2, 4, 5, -1], [0, 1, 2, 3, 4], [0, 3, -1, -1, -1], [0, -1, -1, -1, -1]]),
    num_accepted=torch.tensor([4, 5, 2, 0]),
)


# ----------------------------------------------------------------------------- tier 1: references


def test_tree_attention_ref_is_mean_of_allowed_values():
    # q = 0 makes every allowed score equal, so each output is the plain mean of the allowed V.
    # One kv head, D = 1, v at position t = t: the expected numbers can be read off the mask.
    max_len = 8
    v_cache = torch.arange(max_len, dtype=torch.float32).view(1, 1, max_len, 1).repeat(2, 1, 1, 1)
    v_cache[1] += 100  # slot 1: a second sequence, packed after the first
    k_cache = torch.randn(2, 1, max_len, 1)
    parents = [-1, 0, 0, 1]  # root 0; 1 and 2 under 0; 3 under 1
    tree_mask = torch.cat([ancestor_mask(parents).view(-1), torch.ones(1, dtype=torch.bool)])
    out = tree_attention_ref(torch.zeros(5, 2, 1), k_cache, v_cache, torch.tensor([0, 4, 5]), torch.tensor([0, 1]),
                             torch.tensor([3, 2]), tree_mask, torch.tensor([0, 16]), scale=1.0)
    # sequence 0: prefix positions 0, 1, 2; node n at position 3 + n.
    expected = torch.tensor([
        (0 + 1 + 2 + 3) / 4,  # root: prefix + itself
        (0 + 1 + 2 + 3 + 4) / 5,  # node 1: + root
        (0 + 1 + 2 + 3 + 5) / 5,  # node 2: + root, not its sibling 1
        (0 + 1 + 2 + 3 + 4 + 6) / 6,  # node 3: + root + 1, not 2
        100 + (0 + 1 + 2) / 3,  # sequence 1, one decode token after a 2-token prefix, in slot 1
    ])
    torch.testing.assert_close(out[:, :, 0], expected[:, None].expand(5, 2))


def test_tree_attention_ref_rows_without_keys_are_zero():
    # Empty prefix and a query row that may see nothing (not even itself): zeros, not NaN.
    case = make_attention_case([2], [0], num_q_heads=2, num_kv_heads=1, head_dim=4, tree=True)
    case["tree_mask"], case["mask_offsets"] = torch.tensor([True, False, False, False]), torch.tensor([0])
    out = tree_attention_ref(**case)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    assert out[0].abs().max() > 0


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (4, 1), (6, 2)], ids=["mha", "mqa", "gqa3"])
def test_tree_attention_ref_matches_explicit_loop(tree, num_q_heads, num_kv_heads):
    case = make_attention_case([5, 1, 3, 5], [4, 7, 0, 11], num_q_heads=num_q_heads,
                               num_kv_heads=num_kv_heads, head_dim=8, tree=tree)
    assert_rel_close(tree_attention_ref(**case), explicit_attention(**case), 1e-5)


def test_tree_attention_ref_packed_equals_each_sequence_alone():
    # A prefill chunk packed with single-token decodes and a tree: every sequence's rows are what
    # it gets in a batch of its own (no leakage across the packed boundaries).
    case = make_attention_case([9, 1, 1, 6, 1], [0, 12, 3, 5, 30], num_q_heads=4, num_kv_heads=2,
                               head_dim=8, tree=True)
    out = tree_attention_ref(**case)
    for b in range(5):
        lo, hi = int(case["cu_seqlens"][b]), int(case["cu_seqlens"][b + 1])
        torch.testing.assert_close(out[lo:hi], tree_attention_ref(**one_sequence(case, b)), rtol=1e-6, atol=1e-6)


def padded(case: dict, extra_items: int, extra_rows: int) -> dict:
    """The case as a CUDA graph's fixed-size metadata sees it: `extra_items` items with no rows
    (slot 0, cache_len 0) after the real ones, and `extra_rows` rows owned by no item at the end."""
    T, H, D = case["q"].shape
    q = torch.cat([case["q"], torch.randn(extra_rows, H, D).to(case["q"])])
    end = case["cu_seqlens"][-1:]
    zeros = torch.zeros(extra_items, dtype=torch.long, device=end.device)
    return {**case, "q": q, "cu_seqlens": torch.cat([case["cu_seqlens"], end.repeat(extra_items)]),
            "slots": torch.cat([case["slots"], zeros]), "cache_lens": torch.cat([case["cache_lens"], zeros]),
            "mask_offsets": torch.cat([case["mask_offsets"], zeros])}


def test_tree_attention_ref_accepts_padded_metadata():
    case = make_attention_case([3, 1], [5, 2], num_q_heads=4, num_kv_heads=2, head_dim=8, tree=True)
    out = tree_attention_ref(**padded(case, extra_items=3, extra_rows=4))
    assert torch.equal(out[:4], tree_attention_ref(**case))
    assert out[4:].abs().max() == 0  # rows of no item: zeros


def test_combine_splits_ref_is_the_softmax_over_all_keys():
    # Split 10 keys 4 / 0 / 6: each split's own softmax and log2-sum-exp, merged, is the full softmax.
    gen = torch.Generator().manual_seed(0)
    s, v = torch.randn(3, 10, generator=gen), torch.randn(10, 5, generator=gen)  # 3 rows, 10 keys, D = 5
    expected = torch.softmax(s, -1) @ v
    s2 = s * math.log2(math.e)  # base-2 logits, as in the kernel
    parts, lses = [], []
    for lo, hi in [(0, 4), (4, 4), (4, 10)]:
        if lo == hi:
            parts.append(torch.full((3, 5), float("nan")))  # never written: must be ignored
            lses.append(torch.full((3,), float("-inf")))
            continue
        w = torch.exp2(s2[:, lo:hi] - s2[:, lo:hi].max(-1, keepdim=True).values)
        parts.append(w / w.sum(-1, keepdim=True) @ v[lo:hi])
        lses.append(torch.logsumexp(s[:, lo:hi], -1) * math.log2(math.e))
    partial, lse = torch.stack(parts)[:, :, None], torch.stack(lses)[:, :, None]  # (S, T=3, Hq=1, ...)
    torch.testing.assert_close(combine_splits_ref(partial, lse)[:, 0], expected)
    keyless = combine_splits_ref(partial, torch.full_like(lse, float("-inf")))
    assert keyless.abs().max() == 0


def test_num_kv_splits_fills_idle_sms_only():
    assert num_kv_splits(8, 132, 8192) == MAX_KV_SPLITS  # batch 1, 8 kv heads: 16 x 8 = 128 programs
    assert num_kv_splits(32, 132, 8192) == 4
    assert num_kv_splits(128, 132, 8192) == 1  # the grid fills the GPU already
    assert num_kv_splits(8, 132, 512) == 2  # a short cache: no split under MIN_SPLIT_KEYS keys
    assert num_kv_splits(8, 132, 100) == 1
    assert num_kv_splits(0, 132, 8192) == 1


def test_kv_commit_ref_hand_checked():
    # Cache value at position t is t, so after the commit position c + k must hold c + src[k].
    num_layers, num_slots, max_len = 2, 2, 10
    positions = torch.arange(max_len, dtype=torch.float32).view(1, 1, 1, max_len, 1)
    k_cache = positions.expand(num_layers, num_slots, 1, max_len, 3).clone()
    v_cache = -k_cache
    other_slot = k_cache[:, 0].clone()
    kv_commit_ref(k_cache, v_cache, slots=torch.tensor([1]), cache_lens=torch.tensor([3]),
                  src_index=torch.tensor([[0, 2, 3, 5, -1]]), num_accepted=torch.tensor([4]))
    expected = torch.tensor([0, 1, 2, 3, 5, 6, 8, 7, 8, 9], dtype=torch.float32)  # 3 + {0,2,3,5}
    for cache, sign in ((k_cache, 1), (v_cache, -1)):
        for d in range(3):
            torch.testing.assert_close(cache[:, 1, 0, :, d], sign * expected.expand(num_layers, max_len))
    torch.testing.assert_close(k_cache[:, 0], other_slot)  # other slots untouched


def test_kv_commit_ref_matches_loop():
    k, v = make_commit_case()
    k_exp, v_exp = k.clone(), v.clone()
    commit_loop(k_exp, v_exp, **COMMIT_CASE)
    kv_commit_ref(k, v, **COMMIT_CASE)
    assert torch.equal(k, k_exp) and torch.equal(v, v_exp)


def test_kv_commit_ref_nothing_accepted_is_a_no_op():
    k, v = make_commit_case()
    k0, v0 = k.clone(), v.clone()
    kv_commit_ref(k, v, torch.tensor([1, 2]), torch.tensor([3, 4]), torch.full((2, 3), -1),
                  torch.tensor([0, 0]))
    assert torch.equal(k, k0) and torch.equal(v, v0)


# ----------------------------------------------------------------------------- backend


@pytest.fixture
def fresh_backend(monkeypatch):
    """Re-run the capability check under a patched environment, and again after the test."""
    backend.kernel_backend.cache_clear()
    yield monkeypatch
    backend.kernel_backend.cache_clear()


def test_backend_torch_can_be_forced(fresh_backend):
    fresh_backend.setenv("CTC_KERNELS", "torch")
    assert backend.kernel_backend() is backend.Backend.TORCH
    assert not backend.use_triton(torch.zeros(1))


def test_backend_rejects_unknown_value(fresh_backend):
    fresh_backend.setenv("CTC_KERNELS", "cuda")
    with pytest.raises(ValueError, match="CTC_KERNELS"):
        backend.kernel_backend()


def test_backend_forced_triton_requires_triton(fresh_backend):
    fresh_backend.setenv("CTC_KERNELS", "triton")
    fresh_backend.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton"):
        backend.kernel_backend()


def test_backend_auto_matches_capabilities(fresh_backend):
    fresh_backend.delenv("CTC_KERNELS", raising=False)
    triton_ok = HAS_CUDA and backend.triton_available()
    assert backend.kernel_backend() is (backend.Backend.TRITON if triton_ok else backend.Backend.TORCH)


def test_dispatch_uses_reference_for_cpu_tensors(fresh_backend):
    # Even with the Triton backend forced, CPU tensors take the reference path.
    fresh_backend.setenv("CTC_KERNELS", "triton")
    fresh_backend.setattr(backend, "triton_available", lambda: True)
    case = make_attention_case([3, 2], [4, 0], num_q_heads=4, num_kv_heads=2, head_dim=8, tree=True)
    assert torch.equal(tree_attention(**case), tree_attention_ref(**case))
    k, v = make_commit_case()
    k_exp, v_exp = k.clone(), v.clone()
    kv_commit_ref(k_exp, v_exp, **COMMIT_CASE)
    kv_commit(k, v, **COMMIT_CASE)
    assert torch.equal(k, k_exp) and torch.equal(v, v_exp)


# ----------------------------------------------------------------------------- tier 2: interpreter


@pytest.fixture
def interpret() -> None:
    """Skip unless this process runs Triton kernels in Triton's CPU interpreter."""
    if not backend.triton_available():
        pytest.skip("triton cannot be imported: install the `gpu` extra to test the kernels")
    if not INTERPRETING:
        pytest.skip("TRITON_INTERPRET is not 1 (this module sets it only without CUDA)")
    import triton.language as tl

    if type(tl.zeros).__name__ != "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it in the "
                    "environment (or tests/conftest.py) before anything imports triton")


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

ATTENTION_SHAPES = {
    # name: (q_lens, cache_lens, Hq, Hkv, D, tree)
    "tree-gqa-mixed": ([5, 2, 4], [9, 0, 21], 4, 2, 16, True),
    "chain-mha": ([6, 6], [3, 17], 2, 2, 16, False),
    "decode-gqa4": ([1, 1, 1], [13, 1, 30], 8, 2, 32, False),
    "tree-mqa-d24": ([7, 3], [40, 5], 3, 1, 24, True),  # head_dim not a power of two
    "prefill-and-decodes": ([20, 1, 1, 1], [0, 9, 33, 2], 4, 2, 16, False),  # one long item, several row blocks
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES))
def test_tree_attention_triton_matches_ref_interpreted(interpret, shape, dtype):
    q_lens, cache_lens, hq, hkv, d, tree = ATTENTION_SHAPES[shape]
    case = make_attention_case(q_lens, cache_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                               tree=tree, dtype=dtype)
    # Blocks of 16 (tl.dot's smallest tile): several key blocks even for these short caches.
    out = tree_attention_triton(**case, max_q_len=max(q_lens), block_m=16, block_n=16)
    assert out.dtype == dtype and out.shape == case["q"].shape
    assert_rel_close(out, tree_attention_ref(**as_fp32(case)), TOLERANCE[dtype])


SPLIT_SHAPES = {
    # name: (q_lens, cache_lens, Hq, Hkv, D, tree)
    "decode-gqa4": ([1, 1], [70, 3], 8, 2, 16, False),  # splits past the keys of sequence 1: empty
    "tree-gqa": ([5, 3], [40, 0], 4, 2, 16, True),  # some tree rows see keys of one split only
    "chain-mha": ([6], [57], 2, 2, 16, False),
}


@pytest.mark.parametrize("num_splits", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SPLIT_SHAPES))
def test_tree_attention_triton_split_kv_matches_ref_interpreted(interpret, shape, dtype, num_splits):
    q_lens, cache_lens, hq, hkv, d, tree = SPLIT_SHAPES[shape]
    case = make_attention_case(q_lens, cache_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                               tree=tree, dtype=dtype)
    out = tree_attention_triton(**case, max_q_len=max(q_lens), block_m=16, block_n=16, num_splits=num_splits)
    assert out.dtype == dtype
    assert_rel_close(out, tree_attention_ref(**as_fp32(case)), TOLERANCE[dtype])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_tree_attention_triton_accepts_padded_metadata_interpreted(interpret, num_splits):
    case = make_attention_case([3, 1], [20, 2], num_q_heads=4, num_kv_heads=2, head_dim=16, tree=True)
    big = padded(case, extra_items=2, extra_rows=5)
    out = tree_attention_triton(**big, max_q_len=8, block_m=16, block_n=16, num_splits=num_splits)
    assert_rel_close(out[:4], tree_attention_ref(**case), 1e-5)
    assert out[4:].abs().max() == 0


def test_tree_attention_triton_strided_inputs_interpreted(interpret):
    # q sliced out of a fused (T, Hq + 2 Hkv, D) projection and a cache that is a slice of a
    # wider buffer: only the last dim is contiguous, which is all the kernel needs.
    case = make_attention_case([4, 2], [6, 3], num_q_heads=4, num_kv_heads=2, head_dim=16, tree=True)
    fused = torch.randn(6, 8, 16)
    fused[:, :4] = case["q"]
    case["q"] = fused[:, :4]
    wide_k = torch.randn(*case["k_cache"].shape[:3], 32)
    wide_k[..., :16] = case["k_cache"]
    case["k_cache"] = wide_k[..., :16]
    assert not case["q"].is_contiguous() and not case["k_cache"].is_contiguous()
    out = tree_attention_triton(**case, block_m=16, block_n=16)
    assert_rel_close(out, tree_attention_ref(**case), 1e-5)


def test_tree_attention_triton_default_blocks_interpreted(interpret):
    case = make_attention_case([3, 1], [70, 2], num_q_heads=4, num_kv_heads=4, head_dim=16, tree=True)
    assert_rel_close(tree_attention_triton(**case), tree_attention_ref(**case), 1e-5)


def test_tree_attention_triton_rejects_bad_inputs():
    case = make_attention_case([2], [3], num_q_heads=4, num_kv_heads=2, head_dim=8, tree=True)
    bad = [
        dict(q=case["q"][..., :4]),  # head_dim mismatch
        dict(q=case["q"].repeat(1, 1, 2)[..., ::2]),  # last dim strided
        dict(q=case["q"][:, :3]),  # Hq not a multiple of Hkv
        dict(q=case["q"][None]),  # a padded (B, L, H, D) batch, not a packed one
        dict(tree_mask=case["tree_mask"].int()),
        dict(slots=case["slots"].int()),
        dict(cu_seqlens=case["cu_seqlens"][1:]),  # B offsets, not B + 1
        dict(k_cache=case["k_cache"].double()),
    ]
    for override in bad:
        with pytest.raises(AssertionError):
            tree_attention_triton(**{**case, **override})


def test_kv_commit_triton_rejects_bad_inputs():
    k, v = make_commit_case()
    with pytest.raises(AssertionError):
        kv_commit_triton(k[0], v[0], **COMMIT_CASE)  # a single layer's (4-D) cache
    with pytest.raises(AssertionError):
        kv_commit_triton(k, v, **{**COMMIT_CASE, "src_index": COMMIT_CASE["src_index"].int()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kv_commit_triton_matches_ref_interpreted(interpret, dtype):
    k, v = make_commit_case(dtype=dtype)
    k_exp, v_exp = k.clone(), v.clone()
    kv_commit_ref(k_exp, v_exp, **COMMIT_CASE)
    kv_commit_triton(k, v, **COMMIT_CASE)
    assert torch.equal(k, k_exp) and torch.equal(v, v_exp)


# ----------------------------------------------------------------------------- tier 3: GPU

needs_gpu = pytest.mark.skipif(not HAS_CUDA or INTERPRETING,
                               reason="needs a CUDA device (and TRITON_INTERPRET unset)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["tree64", "decode", "prefill-chunk", "mixed"])
def test_tree_attention_triton_matches_ref_gpu(kind, dtype):
    if kind == "tree64":  # B=4 verify step: a 64-node tree over ~512-token prefixes
        q_lens, cache_lens, tree = [64, 64, 40, 64], [512, 300, 777, 1], True
    elif kind == "decode":  # B=16, L=1, long prefixes
        q_lens, cache_lens, tree = [1] * 16, [2047 - 97 * i for i in range(16)], False
    elif kind == "prefill-chunk":  # a causal prefill chunk next to a fresh prompt
        q_lens, cache_lens, tree = [256, 100], [0, 1024], False
    else:  # a mixed step: one prefill chunk packed with 16 decodes
        q_lens, cache_lens, tree = [256] + [1] * 16, [512] + [300 + 50 * i for i in range(16)], False
    case = make_attention_case(q_lens, cache_lens, num_q_heads=32, num_kv_heads=8, head_dim=128,
                               tree=tree, dtype=dtype, device="cuda")
    expected = tree_attention_ref(**as_fp32(case))
    assert_rel_close(tree_attention_triton(**case), expected, TOLERANCE[dtype])
    assert_rel_close(tree_attention(**case), expected, TOLERANCE[dtype])  # dispatch on CUDA


@pytest.mark.gpu
@needs_gpu
def test_kv_commit_triton_matches_ref_gpu():
    gen = torch.Generator().manual_seed(0)
    B, P, max_len, num_slots = 16, 8, 1024, 20
    k, v = make_commit_case(num_layers=32, num_slots=num_slots, num_kv_heads=8, max_len=max_len,
                            head_dim=128, dtype=torch.bfloat16, device="cuda")
    # Node index >= depth, non-decreasing along the path, from a tree of up to 64 nodes.
    src_index = torch.arange(P) + torch.randint(0, 56, (B, P), generator=gen).cummax(dim=1).values
    args = dict(slots=torch.randperm(num_slots, generator=gen)[:B],
                cache_lens=torch.randint(0, max_len - 64, (B,), generator=gen),
                src_index=src_index, num_accepted=torch.randint(0, P + 1, (B,), generator=gen))
    args = {name: t.cuda() for name, t in args.items()}
    k_exp, v_exp = k.clone(), v.clone()
    kv_commit_ref(k_exp, v_exp, **args)
    kv_commit_triton(k, v, **args)
    assert torch.equal(k, k_exp) and torch.equal(v, v_exp)
    kv_commit(k, v, **args)  # dispatch on CUDA: a second commit of the same moves
    kv_commit_ref(k_exp, v_exp, **args)
    assert torch.equal(k, k_exp) and torch.equal(v, v_exp)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["decode-b1", "tree16-b1"])
def test_tree_attention_triton_split_kv_gpu(kind, dtype):
    # Batch 1 on an 8B shape: 8 programs on a GPU of 100+ SMs, so the automatic choice splits.
    q_lens, tree = ([1], False) if kind == "decode-b1" else ([17], True)
    case = make_attention_case(q_lens, [4000], num_q_heads=32, num_kv_heads=8, head_dim=128, tree=tree,
                               dtype=dtype, device="cuda")
    expected = tree_attention_ref(**as_fp32(case))
    assert num_kv_splits(8, torch.cuda.get_device_properties(0).multi_processor_count, 4100) > 1
    assert_rel_close(tree_attention_triton(**case, max_q_len=q_lens[0]), expected, TOLERANCE[dtype])
    assert_rel_close(tree_attention_triton(**case, max_q_len=q_lens[0], num_splits=1), expected, TOLERANCE[dtype])
