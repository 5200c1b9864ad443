"""Tensor parallelism on this machine: TP=2 against TP=1, in one run.

For one model (the demo model, or a random-init Llama of a given width written to a temporary
checkpoint) it runs the same forwards at TP=1 (this process) and TP=2 (this process as rank 0 and
one worker, as `ctc-serve --tensor-parallel-size 2` does) and reports
  - correctness: the largest |logit difference| between the two, and whether greedy decoding of a
    prompt gives the same tokens;
  - the median forward time of a decode step (batch B, one token each) and of a prefill chunk;
  - the share of the TP=2 step rank 0 spends inside collectives (the embeddings' broadcast and the
    2 all-reduces per layer). That is transfer plus waiting for the other rank, as rank 0 sees it:
    the price of splitting the work, which on a CPU with few cores buys no extra compute.

    python -m bench.bench_tp --threads 1
    python -m bench.bench_tp --threads 1 --random-hidden 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from server.runtime.batch import ForwardItem, build_batch
from server.runtime.loader import load_model
from server.runtime.parallel.group import WorkerGroup

REPO = Path(__file__).resolve().parent.parent
MAX_LEN = 512


class CollectiveClock:
    """Wall time rank 0 spends inside torch.distributed's all_reduce and broadcast (patched in)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def installed(self):
        originals = {name: getattr(dist, name) for name in ("all_reduce", "broadcast")}

        def timed(fn):
            def call(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t0
            return call

        for name, fn in originals.items():
            setattr(dist, name, timed(fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


def random_llama(hidden: int, out: Path) -> Path:
    """A random-init Llama checkpoint of width `hidden` (head_dim 64, 4 kv heads, 8 layers)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                      num_hidden_layers=8, num_attention_heads=hidden // 64, num_key_value_heads=4,
                                      max_position_embeddings=MAX_LEN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def timed_forwards(model, batch_size: int, prefill: int, steps: int, clock: CollectiveClock) -> dict:
    g = torch.Generator().manual_seed(0)
    cache = model.make_cache(batch_size, MAX_LEN)
    slots = [cache.allocate() for _ in range(batch_size)]
    prompt = torch.randint(0, model.config.vocab_size, (prefill,), generator=g).tolist()

    def forward(items):
        clock.seconds = 0.0
        t0 = time.perf_counter()
        hidden = model(build_batch(items, MAX_LEN), cache)
        logits = model.compute_logits(hidden)
        return time.perf_counter() - t0, clock.seconds, logits

    prefills = [forward([ForwardItem(slots[0], 0, prompt)]) for _ in range(3)]
    first_logits = prefills[0][2]
    for s in slots:  # every sequence gets the prompt as its context
        forward([ForwardItem(s, 0, prompt)])
        cache.advance(s, prefill)
    decodes = []
    for _ in range(steps):
        tokens = torch.randint(0, model.config.vocab_size, (batch_size,), generator=g).tolist()
        decodes.append(forward([ForwardItem(s, cache.lengths[s], [t]) for s, t in zip(slots, tokens)]))
        for s in slots:
            if cache.lengths[s] + 1 < MAX_LEN:
                cache.advance(s, 1)
    return {
        "prefill_s": statistics.median(t for t, _, _ in prefills),
        "prefill_collective_s": statistics.median(c for _, c, _ in prefills),
        "decode_s": statistics.median(t for t, _, _ in decodes),
        "decode_collective_s": statistics.median(c for _, c, _ in decodes),
        "logits": first_logits,
    }


def greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = model.make_cache(1, MAX_LEN)
    slot = cache.allocate()
    items, out = [ForwardItem(slot, 0, prompt)], []
    while len(out) < n:
        logits = model.compute_logits(model(build_batch(items, MAX_LEN), cache))
        cache.advance(slot, len(items[0].tokens))
        out.append(int(logits[-1].argmax()))
        items = [ForwardItem(slot, cache.lengths[slot], [out[-1]])]
    return out


def measure(model, args, clock: CollectiveClock) -> dict:
    runs = {b: timed_forwards(model, b, args.prefill, args.steps, clock) for b in args.batch}
    return {"runs": runs, "greedy": greedy(model, list(range(1, 17)), args.greedy_tokens)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo-llama")
    parser.add_argument("--random-hidden", type=int, default=None,
                        help="instead of --model: a random-init 8-layer Llama of this width")
    parser.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    parser.add_argument("--prefill", type=int, default=256, help="prefill chunk length (tokens)")
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed per batch size")
    parser.add_argument("--greedy-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # the worker inherits it
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model if args.random_hidden is None else random_llama(args.random_hidden, Path(tmp) / "llama")
        clock = CollectiveClock()
        tp1 = measure(load_model(path, dtype="float32", device="cpu"), args, clock)
        group = WorkerGroup(path, "float32", "cpu", 2)
        try:
            with clock.installed():
                tp2 = measure(group.load_model(), args, clock)
        finally:
            group.close()
    print(f"model {path.name if args.random_hidden is None else f'random Llama, hidden {args.random_hidden}'}, "
          f"{args.threads} thread(s) per rank, {platform.machine()}, {torch.__version__}")
    print(f"greedy {args.greedy_tokens} tokens: TP=2 {'==' if tp1['greedy'] == tp2['greedy'] else '!='} TP=1")
    print("| forward | TP=1 ms | TP=2 ms | TP=2 / TP=1 | TP=2 in collectives | max abs logit diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for b in args.batch:
        one, two = tp1["runs"][b], tp2["runs"][b]
        diff = (one["logits"] - two["logits"]).abs().max().item()
        for kind, label in (("prefill", f"prefill {args.prefill} tokens"), ("decode", f"decode, batch {b}")):
            if kind == "prefill" and b != args.batch[0]:
                continue
            t1, t2, c2 = one[f"{kind}_s"], two[f"{kind}_s"], two[f"{kind}_collective_s"]
            rows.append({"forward": label, "tp1_s": t1, "tp2_s": t2, "tp2_collective_s": c2, "max_logit_diff": diff})
            print(f"| {label} | {t1 * 1e3:.2f} | {t2 * 1e3:.2f} | {t2 / t1:.2f} | {c2 * 1e3:.2f} ms ({c2 / t2:.0%}) "
                  f"| {diff:.1e} |")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "greedy_equal": tp1["greedy"] == tp2["greedy"],
                                        "argv": vars(args) | {"out": str(args.out), "model": str(args.model)}},
                                       indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
