"""`make gpu-check`: the one GPU check of issue 14, in one command and one results file.

On a CUDA host (bf16, the Triton kernels), in one process, about 3-5 minutes on an H100/H200:
1. kernels: tree attention (Triton, split-KV where it applies) against the torch reference in
   fp32, and the KV commit (exact), at Llama-3-8B attention shapes (32/8 heads, head_dim 128);
2. decode: batch-1 greedy tokens/s of our plain engine on a random Llama-3-8B-shaped model, eager
   and with CUDA graphs, as a share of the bandwidth limit (bytes one step reads / measured copy
   bandwidth), and transformers' `generate` on the same weights in the same run;
3. verify: one verification forward over a tree of 1..64 draft nodes on a 512-token prefix, over
   a plain decode forward (root only), eager and with CUDA graphs;
4. demo: the demo model with its drafter (CTC + prompt lookup if trained, else prompt lookup)
   against plain decoding, batch 1, greedy: tokens/s and whether the outputs are identical.
Targets (issue 14) are printed next to the figures: plain decode >= 70% of the bandwidth limit,
a 64-node verify <= 1.3x a plain step. Absolute times hold for the named device only.

    python -m bench.gpu_check                        # CUDA: everything, writes bench/results/gpu-check-*.json
    python -m bench.gpu_check --smoke --device cpu   # every section at tiny shapes (Triton interpreted), < 1 min

The results file is JSON with the markdown tables in its "markdown" field; the tables are also printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "models" / "demo-llama"
TARGET_DECODE_SHARE = 0.70  # plain decode tokens/s over the bandwidth limit
TARGET_VERIFY_64 = 1.3  # a 64-draft-node verify forward over a plain decode forward
DEMO_PROMPTS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Write a short poem about the sea.",
    "Explain what a prime number is.",
    "A train travels 60 km in 1.5 hours. What is its average speed?",
    "List three uses of copper.",
    "What is 12 times 7?",
    "Give two tips for learning to cook.",
    "Sara reads 20 pages a day. How many pages does she read in a week?",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cuda, cuda:N or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats: checks the script, not the GPU")
    p.add_argument("--verify-nodes", type=ints, default=[1, 2, 4, 8, 16, 32, 64], help="draft nodes of the "
                   "timed verification trees (the root comes on top)")
    p.add_argument("--prompt-len", type=int, default=512, help="random prompt tokens of the 8B-shaped model")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per batch-1 decode run")
    p.add_argument("--demo-prompts", type=int, default=8, help=f"demo prompts (at most {len(DEMO_PROMPTS)})")
    p.add_argument("--demo-tokens", type=int, default=128, help="max_tokens of each demo request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="results JSON; default bench/results/gpu-check-<UTC>.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.verify_nodes = [n for n in args.verify_nodes if n <= 8] or [1]
        args.prompt_len, args.new_tokens = 16, 8
        args.demo_prompts, args.demo_tokens = min(args.demo_prompts, 2), min(args.demo_tokens, 12)
    return args


def bench_args(args: argparse.Namespace) -> argparse.Namespace:
    """The bench_gpu settings the reused functions read."""
    from server.engine.scheduler import SchedulerConfig

    return argparse.Namespace(
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=1, warmup=1 if args.smoke else 3,
        repeats=2 if args.smoke else 15, max_tree_nodes=max(args.verify_nodes), prefill_chunk=SchedulerConfig.prefill_chunk,
        spec_token_budget=max(args.verify_nodes), copy_mib=4 if args.smoke else 1024,
    )


# ----------------------------------------------------------------------------- 1. kernels


def kernel_cases(smoke: bool) -> dict[str, tuple[list[int], list[int], bool]]:
    """name: (q_lens, cache_lens, tree)."""
    if smoke:
        return {"decode-b1": ([1], [70], False), "tree-b2": ([5, 3], [40, 2], True), "mixed": ([9, 1, 1], [0, 20, 3], False)}
    return {"decode-b1": ([1], [4095], False), "decode-b16": ([1] * 16, [2047 - 97 * i for i in range(16)], False),
            "tree17-b1": ([17], [4000], True), "tree65-b4": ([65, 65, 40, 65], [512, 300, 777, 1], True),
            "mixed-prefill": ([256] + [1] * 16, [512] + [300 + 50 * i for i in range(16)], False)}


def check_kernels(args: argparse.Namespace, device: torch.device, ba: argparse.Namespace) -> dict:
    from bench.bench_gpu import time_ms
    from bench.bench_kernels import random_tree_mask
    from kernels import backend
    from kernels.kv_commit import kv_commit_ref, kv_commit_triton
    from kernels.tree_attention import tree_attention_ref, tree_attention_triton

    if not backend.triton_available():
        return {"skipped": "triton cannot be imported"}
    import triton.language as tl

    interpreted = type(tl.zeros).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 at triton's import
    if device.type == "cpu" and not interpreted:
        return {"skipped": "triton runs compiled in this process: the CPU needs TRITON_INTERPRET=1 set first"}
    hq, hkv, d = (4, 2, 16) if args.smoke else (32, 8, 128)
    gen, rows = torch.Generator().manual_seed(args.seed), []
    for name, (q_lens, cache_lens, tree) in kernel_cases(args.smoke).items():
        B, T = len(q_lens), sum(q_lens)
        shape = (B, hkv, max(c + n for c, n in zip(cache_lens, q_lens)), d)
        k, v = (torch.randn(shape, generator=gen).to(device, torch.bfloat16) for _ in range(2))
        q = torch.randn(T, hq, d, generator=gen).to(device, torch.bfloat16)
        masks = [random_tree_mask(n, gen) if tree else torch.ones(n, n, dtype=torch.bool).tril() for n in q_lens]
        meta = dict(cu_seqlens=torch.tensor([0, *q_lens]).cumsum(0), slots=torch.arange(B),
                    cache_lens=torch.tensor(cache_lens), tree_mask=torch.cat([m.view(-1) for m in masks]),
                    mask_offsets=torch.tensor([0, *(n * n for n in q_lens)]).cumsum(0)[:-1])
        meta = {key: t.to(device) for key, t in meta.items()}
        ref = tree_attention_ref(q.float(), k.float(), v.float(), **meta, scale=d**-0.5)
        scale = ref.abs().max().item()
        for splits in (None, 3) if args.smoke else (None,):  # the interpreter has no SM count: force a split
            out = tree_attention_triton(q, k, v, **meta, scale=d**-0.5, max_q_len=max(q_lens), num_splits=splits)
            err = (out.float() - ref).abs().max().item() / scale
            ms = time_ms(lambda: tree_attention_triton(q, k, v, **meta, scale=d**-0.5, max_q_len=max(q_lens)),
                         device, ba.warmup, ba.repeats) if not args.smoke else None
            rows.append({"op": "tree_attention", "case": name + ("" if splits is None else f" splits={splits}"),
                         "dtype": "bfloat16", "max_rel_err": err, "ok": err <= 1e-2, "triton_ms": ms})
    layers = 2 if args.smoke else 32
    kc, vc = (torch.randn(layers, 4, hkv, 96, d, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    commit = dict(slots=torch.tensor([2, 0]), cache_lens=torch.tensor([40, 7]),
                  src_index=torch.tensor([[0, 3, 5, 9], [0, 1, 2, -1]]), num_accepted=torch.tensor([4, 3]))
    commit = {key: t.to(device) for key, t in commit.items()}
    k_ref, v_ref = kc.clone(), vc.clone()
    kv_commit_ref(k_ref, v_ref, **commit)
    kv_commit_triton(kc, vc, **commit)
    exact = torch.equal(kc, k_ref) and torch.equal(vc, v_ref)
    rows.append({"op": "kv_commit", "case": f"{layers} layers, B=2", "dtype": "bfloat16",
                 "max_rel_err": 0.0 if exact else None, "ok": exact, "triton_ms": None})
    return {"heads": [hq, hkv, d], "interpreted": interpreted, "rows": rows}


# ----------------------------------------------------------------------------- 2. decode


def check_decode(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, ba: argparse.Namespace):
    """Plain batch-1 decode, eager and with graphs, against the bandwidth limit and transformers.
    Returns (results, our model) so the verify section reuses the weights."""
    from bench.bench_gpu import bench_plain, bench_transformers, build_models, copy_bandwidth, random_prompt, step_bytes

    shape = "tiny" if args.smoke else "llama3-8b"
    hf, model = build_models(shape, device, dtype, "shared", args.seed)
    bw = copy_bandwidth(device, ba.copy_mib, ba.warmup, ba.repeats)
    res = {"shape": shape, "bandwidth": bw, **step_bytes(model, ba)}
    res["limit_tokens_per_s"] = bw["gb_per_s"] * 1e9 / res["bytes_per_step"]
    prompt = random_prompt(torch.Generator().manual_seed(args.seed), model.config.vocab_size, args.prompt_len)
    for mode, graphs in (("eager", False), ("graphs", True)):
        r = bench_plain(model, prompt, ba, graphs=graphs)
        r["share_of_limit"] = r["decode_tokens_per_s"] / res["limit_tokens_per_s"]
        res[mode] = r
    res["transformers"] = bench_transformers(hf, prompt, ba, device)
    res["graphs_equal_eager"] = res["graphs"]["tokens"] == res["eager"]["tokens"]
    res["eager_equals_transformers"] = res["eager"]["tokens"] == res["transformers"]["tokens"]
    del hf
    return res, model


# ----------------------------------------------------------------------------- 3. verify


def check_verify(args: argparse.Namespace, model, device: torch.device, ba: argparse.Namespace) -> dict:
    """ms of speculate.verify (batch build, forward, logits at every node) per tree size and mode."""
    from bench.bench_gpu import random_prompt, static_tree, time_ms
    from drafter.tree import TokenTree
    from server.engine import speculate
    from server.runtime.batch import ForwardItem
    from server.runtime.graphs import GraphRunner, can_capture, default_buckets

    P, V, most = args.prompt_len, model.config.vocab_size, max(args.verify_nodes) + 1
    gen = torch.Generator().manual_seed(args.seed + 1)
    cache = model.make_cache(1, P + most)
    slot = cache.allocate()
    speculate.verify(model, cache, [ForwardItem(slot, 0, random_prompt(gen, V, P))], [[P - 1]])
    cache.advance(slot, P)
    trees = {0: TokenTree.chain(1, [])} | {n: static_tree(1, n, V, gen) for n in args.verify_nodes}
    res: dict = {"prefix": P, "modes": {}}
    for mode in ("eager", "graphs"):
        model.graph_runner = None
        if mode == "graphs":
            runner = GraphRunner(model, cache, default_buckets(1, most))
            if can_capture(cache):
                runner.capture()
            res["graphs_captured"] = bool(runner.graphs)  # CPU: the padded buckets run, uncaptured
            model.graph_runner = runner
        ms = {}
        for n, tree in trees.items():
            item = ForwardItem(slot, P, tree.tokens, tree.parents)
            nodes = list(range(tree.num_nodes))
            ms[n] = time_ms(lambda: speculate.verify(model, cache, [item], [nodes]), device, ba.warmup, ba.repeats)
        res["modes"][mode] = {"plain_ms": ms[0], "trees": [{"draft_nodes": trees[n].num_draft_tokens, "ms": ms[n],
                                                            "ratio": ms[n] / ms[0]} for n in args.verify_nodes]}
    model.graph_runner = None
    return res


# ----------------------------------------------------------------------------- 4. demo model


def check_demo(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    from bench.bench_engine import drive, summarize, warm_up
    from server.engine.engine import EngineConfig, LLMEngine
    from server.engine.factory import build_drafter
    from server.engine.scheduler import SchedulerConfig
    from server.engine.types import SamplingParams
    from server.engine.warmup import capture_graphs
    from server.runtime.loader import load_model, load_tokenizer

    if not (DEMO_MODEL / "config.json").is_file():
        return {"skipped": f"{DEMO_MODEL} is not built"}
    ctc = DEMO_MODEL.with_name(DEMO_MODEL.name + "-ctc")
    spec = f"{ctc}+ngram" if (ctc / "model.safetensors").is_file() else "ngram"
    model = load_model(DEMO_MODEL, dtype=str(dtype).removeprefix("torch."), device=str(device))
    tok = load_tokenizer(DEMO_MODEL)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)) for p in DEMO_PROMPTS[: args.demo_prompts]]
    max_len = max(map(len, prompts)) + args.demo_tokens + 32
    params = SamplingParams(max_tokens=args.demo_tokens, temperature=0.0, ignore_eos=True)
    res: dict = {"drafter": Path(spec).name, "prompts": len(prompts), "max_tokens": args.demo_tokens}
    for name, drafter_spec in (("plain", None), ("speculative", spec)):
        drafter = build_drafter(drafter_spec, model, 1, max_len) if drafter_spec else None
        engine = LLMEngine(model, tok, EngineConfig(max_model_len=max_len, scheduler=SchedulerConfig(max_batch_size=1)),
                           drafter=drafter)
        res["cuda_graphs"] = capture_graphs(engine) is not None
        try:
            warm_up(engine, prompts[0])
            runs, outputs = [], []
            for i, p in enumerate(prompts):
                done, _, steps = drive(engine, {f"r{i}": (p, params)})
                runs += list(done.values())
                outputs.append(done[f"r{i}"].tokens)
        finally:
            model.graph_runner = None
        res[name] = {**summarize(runs, sum(r.wall_s for r in runs), sum(r.steps for r in runs), serial=True),
                     "outputs": outputs}
    res["speedup"] = res["speculative"]["decode_tokens_per_s"] / res["plain"]["decode_tokens_per_s"]
    same = [a == b for a, b in zip(res["plain"]["outputs"], res["speculative"]["outputs"])]
    res["identical_outputs"] = sum(same)
    return res


# ----------------------------------------------------------------------------- report


def fmt(x, digits: int = 2, unit: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"gpu-check on {m['device_name']} ({m['device']}), torch {m['torch']}, CUDA {m['cuda']}, {m['dtype']}, "
           f"kernels {m['kernel_backend']}{', SMOKE (tiny shapes: the figures mean nothing)' if res['smoke'] else ''}; "
           f"{res['total_s']:.0f} s.", ""]
    k = res["kernels"]
    out += ["**1. Kernel parity** (Triton vs the fp32 torch reference; max error relative to the output's scale):", ""]
    if "skipped" in k:
        out += [f"skipped: {k['skipped']}"]
    else:
        out += table(["op", "case", "dtype", "max rel err", "ok", "triton ms"],
                     [[r["op"], r["case"], r["dtype"], fmt(r["max_rel_err"], 1, "") if r["max_rel_err"] is None
                       else f"{r['max_rel_err']:.1e}", "yes" if r["ok"] else "NO", fmt(r["triton_ms"], 3)]
                      for r in k["rows"]])
    d = res["decode"]
    out += ["", f"**2. Plain decode, batch 1**, {d['shape']} random weights, {res['args']['prompt_len']} prompt tokens, "
            f"{res['args']['new_tokens']} new; limit = copy bandwidth {d['bandwidth']['gb_per_s']:.0f} GB/s / "
            f"{d['bytes_per_step'] / 1e9:.2f} GB per step = {d['limit_tokens_per_s']:.0f} tok/s; "
            f"target >= {TARGET_DECODE_SHARE:.0%} of the limit.", ""]
    t = d["transformers"]["decode_tokens_per_s"]
    label = {"eager": "ours, eager", "graphs": "ours, CUDA graphs" if d["graphs"]["cuda_graphs"]
             else "ours, graphs asked (none on the CPU: eager)"}
    rows = [[label[mode], fmt(d[mode]["decode_tokens_per_s"], 1), f"{d[mode]['share_of_limit']:.0%}",
             "yes" if d[mode]["share_of_limit"] >= TARGET_DECODE_SHARE else "NO",
             fmt(d[mode]["decode_tokens_per_s"] / t if t else None, 2, "x"), fmt(d[mode]["decode_ms_per_step"], 2)]
            for mode in ("eager", "graphs")]
    rows.append(["transformers generate", fmt(t, 1), fmt(t / d["limit_tokens_per_s"] * 100 if t else None, 0, "%"),
                 "", "1.00x", ""])
    out += table(["engine", "tok/s", "% of limit", "target met", "vs transformers", "ms/step"], rows)
    out += ["", f"Same tokens: graphs = eager {'yes' if d['graphs_equal_eager'] else 'NO'}; eager = transformers "
            f"{'yes' if d['eager_equals_transformers'] else 'no (bf16 near-ties on random weights)'}."]
    v = res["verify"]
    modes = v["modes"]
    out += ["", f"**3. Verify-step cost**, batch 1, {v['prefix']}-token prefix, logits at every node, over a plain "
            f"decode forward in the same mode; target: 64 draft nodes <= {TARGET_VERIFY_64}x. Graphs "
            f"{'captured' if v['graphs_captured'] else 'NOT captured (CPU: padded buckets, eager)'}.", ""]
    rows = [["plain (root only)"] + [f"{modes[m]['plain_ms']:.2f} ms" for m in ("eager", "graphs")]]
    for i, tr in enumerate(modes["eager"]["trees"]):
        g = modes["graphs"]["trees"][i]
        rows.append([f"{tr['draft_nodes']} draft nodes", f"{tr['ms']:.2f} ms ({tr['ratio']:.2f}x)",
                     f"{g['ms']:.2f} ms ({g['ratio']:.2f}x)"])
    out += table(["tree", "eager", "CUDA graphs"], rows)
    big = [m for m in ("eager", "graphs") if modes[m]["trees"] and modes[m]["trees"][-1]["draft_nodes"] >= 64]
    if big:
        out += ["", "64-node target met: " + ", ".join(
            f"{m} {'yes' if modes[m]['trees'][-1]['ratio'] <= TARGET_VERIFY_64 else 'NO'}" for m in big) + "."]
    dm = res["demo"]
    out += ["", "**4. Demo model, speculative vs plain**, batch 1, greedy:", ""]
    if "skipped" in dm:
        out += [f"skipped: {dm['skipped']}"]
    else:
        out += table(["engine", "decode tok/s", "accept len", "speedup", "identical outputs"],
                     [["plain", fmt(dm["plain"]["decode_tokens_per_s"], 1), "-", "1.00x", "-"],
                      [f"speculative ({dm['drafter']})", fmt(dm["speculative"]["decode_tokens_per_s"], 1),
                       fmt(dm["speculative"]["acceptance_length"]), fmt(dm["speedup"], 2, "x"),
                       f"{dm['identical_outputs']}/{dm['prompts']}"]])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if not cuda and not args.smoke:
        print(f"no CUDA device (--device {args.device}): nothing checked; --smoke runs the tiny CPU version")
        return 0
    if not cuda and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on CPU tensors (kernels/backend.py)
    device = torch.device(args.device if cuda and args.device != "auto" else "cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    from server.runtime.loader import resolve_dtype
    from kernels.backend import kernel_backend

    dtype = resolve_dtype("auto", device)
    ba, t0 = bench_args(args), time.perf_counter()
    res: dict = {"command": shlex.join([sys.executable, *sys.argv]), "date": datetime.now(timezone.utc).isoformat(),
                 "smoke": args.smoke, "args": {k: v for k, v in vars(args).items() if k != "out"},
                 "targets": {"decode_share_of_limit": TARGET_DECODE_SHARE, "verify_64_over_plain": TARGET_VERIFY_64},
                 "machine": {"device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                             "device": str(device), "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
                             "cuda": torch.version.cuda, "kernel_backend": kernel_backend().value}}
    args.out = args.out or REPO / "bench" / "results" / f"gpu-check-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def note(section: str) -> None:  # progress on stderr, and a partial file if a later section fails
        print(f"[gpu-check {time.perf_counter() - t0:5.1f} s] {section} done", file=sys.stderr, flush=True)
        args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")

    res["kernels"] = check_kernels(args, device, ba)
    note("kernels")
    res["decode"], model = check_decode(args, device, dtype, ba)
    note("decode")
    res["verify"] = check_verify(args, model, device, ba)
    del model
    note("verify")
    res["demo"] = check_demo(args, device, dtype)
    res["total_s"] = time.perf_counter() - t0
    res["markdown"] = markdown(res)
    note("demo")
    print(res["markdown"])
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
