"""What one verification forward costs as the tree grows, and what a drafter's propose costs, at
batch 1 on one model: the two numbers that decide whether speculation can pay on a machine.

Times one base-model verify forward (runtime only, no engine) of a chain of n tokens after a
200-token prefix, with logits at all n (the engine computes them only along the accepted path, so
this is an upper bound), for n in --tree-sizes, relative to n = 1 (a plain decode step), and one
`propose` of each --drafters entry after 3 newly committed tokens, and one LM-head call over r rows
for r in --lm-head-rows (what the path walk pays per round: speculate.accept decides a walk's node
and up to EngineConfig.path_ahead nodes below it in one call). Median of --repeats rounds.

Usage, from the repository root: python -m bench.bench_verify_cost [--help]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from drafter.loading import propose_ms
from server.engine import speculate
from server.engine.factory import build_drafter
from server.runtime.batch import ForwardItem
from server.runtime.loader import load_model


def timed(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner * 1e3  # ms per call


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="models/demo-llama")
    ap.add_argument("--drafters", default="models/demo-llama-ctc,models/demo-llama-medusa",
                    help="comma-separated drafter specs to time a propose of (empty: none)")
    ap.add_argument("--tree-sizes", default="1,2,4,8,16,32", help="tokens verified per forward")
    ap.add_argument("--lm-head-rows", default="1,2,3,4", help="rows of the LM-head calls to time (empty: none)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=30, help="calls per timed round")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="float32", device="cpu")
    cache = model.make_cache(1, 2048)
    slot = cache.allocate()
    prefix = 200
    speculate.verify(model, cache, [ForwardItem(slot, 0, list(range(5, 5 + prefix)))], [[]])
    cache.advance(slot, prefix)

    sizes = [int(x) for x in args.tree_sizes.split(",") if x]
    ms = {}
    for n in sizes:
        item = [ForwardItem(slot, prefix, list(range(7, 7 + n)), [-1, *range(n - 1)])]

        def step(item=item, n=n):
            speculate.verify(model, cache, item, [list(range(n))])

        step()
        ms[n] = statistics.median(timed(step, args.inner) for _ in range(args.repeats))
    print(f"model {args.model}, {torch.get_num_threads()} torch threads, prefix {prefix} tokens")
    print("| tokens verified | ms | x plain step |\n| --- | --- | --- |")
    for n in sizes:
        print(f"| {n} | {ms[n]:.2f} | {ms[n] / ms[sizes[0]]:.2f} |")

    rows = [int(x) for x in args.lm_head_rows.split(",") if x]
    if rows:
        hidden = torch.randn(max(rows), model.config.hidden_size)
        us = {r: 1e3 * statistics.median(timed(lambda r=r: model.compute_logits(hidden[:r]), args.inner)
                                          for _ in range(args.repeats)) for r in rows}
        print("| LM-head rows | us | x 1 row |\n| --- | --- | --- |")
        for r in rows:
            print(f"| {r} | {us[r]:.0f} | {us[r] / us[rows[0]]:.2f} |")

    for spec in filter(None, args.drafters.split(",")):
        drafter = build_drafter(spec, model, max_slots=1, max_len=2048)
        t = statistics.median(propose_ms(drafter, model.config.hidden_size, model.lm_head.weight.device,
                                         rounds=args.repeats, calls=args.inner, context=prefix))
        print(f"propose of {spec} (3 new tokens, budget 16): {t:.2f} ms = {t / ms[sizes[0]]:.2f} x plain step")


if __name__ == "__main__":
    main()
