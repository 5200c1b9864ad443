"""Time the Triton kernels of kernels/ against their torch references on one CUDA device.

One command, shapes from flags; prints one line per op with both times, the speedup measured in
this run, and the largest difference between the two outputs. Absolute times hold only for the
device named in the header. Without a CUDA device it says so and exits 0.

    python -m bench.bench_kernels                                  # a 64-node tree, B=4
    python -m bench.bench_kernels --q-len 1 --batch 16 --prefix 2048 --mask chain   # decode
    python -m bench.bench_kernels --dtype float16 --block-n 32 --num-warps 8       # tuning
(from the repository root; `python bench/bench_kernels.py` works once the package is installed)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable

import torch

from kernels.kv_commit import kv_commit_ref, kv_commit_triton
from kernels.tree_attention import tree_attention_ref, tree_attention_triton

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="sequences in the batch (B)")
    p.add_argument("--q-heads", type=int, default=32, help="query heads (Hq)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (Hkv)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (D)")
    p.add_argument("--prefix", type=int, default=512, help="committed tokens per sequence (cache_len)")
    p.add_argument("--q-len", type=int, default=64,
                   help="new tokens per sequence (tree nodes, or 1 for decode)")
    p.add_argument("--mask", choices=["tree", "chain"], default="tree", help="random tree or causal chain")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--layers", type=int, default=32, help="layers moved by one kv_commit")
    p.add_argument("--accepted", type=int, default=5, help="accepted path length for kv_commit")
    p.add_argument("--block-m", type=int, default=None, help="tree attention rows per program (auto)")
    p.add_argument("--block-n", type=int, default=None, help="tree attention keys per block (auto)")
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median wall time of one call in milliseconds, by CUDA events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def random_tree_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, n) ancestor-or-self mask of a random tree whose parents precede their children."""
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        parent = int(torch.randint(0, i, (1,), generator=gen))
        mask[i] |= mask[parent]
    return mask


def bench_tree_attention(args: argparse.Namespace, dtype: torch.dtype, gen: torch.Generator) -> None:
    B, L, D = args.batch, args.q_len, args.head_dim
    max_len = args.prefix + L
    shape = (B, args.kv_heads, max_len, D)  # one slot per sequence
    k_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    v_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    q = torch.randn(B * L, args.q_heads, D, generator=gen).to("cuda", dtype)  # packed: B sequences of L tokens
    if args.mask == "tree":
        tree_mask = torch.cat([random_tree_mask(L, gen).view(-1) for _ in range(B)])
    else:
        tree_mask = torch.tril(torch.ones(L, L, dtype=torch.bool)).view(-1).repeat(B)
    meta = dict(cu_seqlens=torch.arange(B + 1) * L, slots=torch.arange(B), cache_lens=torch.full((B,), args.prefix),
                tree_mask=tree_mask, mask_offsets=torch.arange(B) * L * L)
    inputs = dict(q=q, k_cache=k_cache, v_cache=v_cache, scale=1.0 / math.sqrt(D),
                  **{name: t.cuda() for name, t in meta.items()})
    tuning = dict(max_q_len=L, block_m=args.block_m, block_n=args.block_n, num_warps=args.num_warps,
                  num_stages=args.num_stages)

    ref = tree_attention_ref(**inputs)
    out = tree_attention_triton(**inputs, **tuning)
    rel_err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    t_ref = time_ms(lambda: tree_attention_ref(**inputs), args.warmup, args.iters)
    t_tri = time_ms(lambda: tree_attention_triton(**inputs, **tuning), args.warmup, args.iters)
    report(f"tree_attention B={B} Hq={args.q_heads} Hkv={args.kv_heads} D={D} prefix={args.prefix} "
           f"q_len={L} mask={args.mask}", t_ref, t_tri, f"max rel diff {rel_err:.2e}")


def bench_kv_commit(args: argparse.Namespace, dtype: torch.dtype, gen: torch.Generator) -> None:
    B, P, D = args.batch, max(args.accepted, 1), args.head_dim
    max_len = args.prefix + args.q_len
    shape = (args.layers, B, args.kv_heads, max_len, D)
    k_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    v_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    # A root-to-leaf path of P nodes through a q_len-node tree: node 0, then increasing indices.
    assert P <= args.q_len, "--accepted cannot exceed --q-len"
    later_nodes = [torch.randperm(args.q_len - 1, generator=gen)[: P - 1].sort().values + 1 for _ in range(B)]
    src_index = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), n]) for n in later_nodes])  # (B, P)
    meta = dict(slots=torch.arange(B), cache_lens=torch.full((B,), args.prefix),
                src_index=src_index, num_accepted=torch.full((B,), args.accepted))
    meta = {name: t.cuda() for name, t in meta.items()}

    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_commit_ref(k_ref, v_ref, **meta)
    kv_commit_triton(k_cache, v_cache, **meta)
    exact = torch.equal(k_ref, k_cache) and torch.equal(v_ref, v_cache)
    # Re-running the same moves on the already moved cache costs the same: fine for timing.
    t_ref = time_ms(lambda: kv_commit_ref(k_ref, v_ref, **meta), args.warmup, args.iters)
    t_tri = time_ms(lambda: kv_commit_triton(k_cache, v_cache, **meta), args.warmup, args.iters)
    report(f"kv_commit layers={args.layers} B={B} Hkv={args.kv_heads} D={D} accepted={args.accepted}",
           t_ref, t_tri, "outputs identical" if exact else "OUTPUTS DIFFER")


def report(name: str, t_ref: float, t_tri: float, check: str) -> None:
    print(f"{name}\n  torch ref {t_ref:9.3f} ms | triton {t_tri:9.3f} ms | "
          f"speedup {t_ref / t_tri:6.2f}x | {check}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (the Triton kernels run on CUDA only)")
        return 0
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | dtype {args.dtype}")
    bench_tree_attention(args, dtype, gen)
    bench_kv_commit(args, dtype, gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
