"""GPU benchmark of the runtime and engine on Llama-2-7B / Llama-3-8B shaped random-init models (issue 6, sec. 3).

Per shape, batch 1, --prompt-len random prompt tokens, --new-tokens generated greedily, EOS ignored:
1. decode: our plain LLMEngine's tokens/s, vs transformers' `generate` on the same weights in the same run,
   and as a share of the bandwidth limit (measured device copy bandwidth / bytes one decode step reads);
2. step cost: one runtime forward over a 32- and a 64-draft-node tree on the prefix vs one plain decode
   forward; the CTC drafter's forward (random init, 1 layer, N=6 frames) and whole propose; the KV commit;
3. a PROJECTED speedup = acceptance length / step cost (from the CPU demo-model benchmark's tau);
4. concurrency: total tokens/s plain vs speculative, with SIMULATED acceptance (random weights make real
   drafts useless): an oracle drafter proposes the plain run's own continuation, each token corrupted with
   a probability chosen so the acceptance length is about --acceptance-length.
Weights: step times do not depend on their values, so they are random, built directly on the device in the
target dtype as a transformers LlamaForCausalLM. Our CausalLM borrows the very same tensors after parsing
transformers' config with our ModelConfig (--weights shared: no copy, no disk, seconds for 8B parameters);
--weights disk round-trips save_pretrained -> our load_model instead (the loader end to end; ~1 min and a
second copy of the weights for 7B/8B). Before section 4 a bigram is planted (embeddings scaled up and
lm_head[perm[x]] += e_x): greedy decoding of random weights is full of near-ties that bf16 rounding flips
between batch shapes, which would derail the oracle; planted, the continuation is perm-iteration with a wide
logit margin, while shapes and kernels, hence step times, stay the same.

    python -m bench.bench_gpu --acceptance-length 3.2      # both shapes, about 5 minutes on an H100
    python -m bench.bench_gpu --shape tiny --device cpu    # CPU smoke test (7B/8B shapes: skipped, exit 0)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.bench_engine import drive, mismatches, summarize, warm_up
from drafter.base import Drafter, ProposeRequest
from drafter.candidates import topk_paths
from drafter.ctc import CTCDraftModel, CTCDrafter, CTCDrafterConfig
from drafter.tree import TokenTree, build_trie
from kernels.backend import kernel_backend
from server.engine import speculate
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.scheduler import SchedulerConfig
from server.engine.types import SamplingParams
from server.engine.warmup import capture_graphs
from server.runtime.batch import ForwardItem
from server.runtime.config import ModelConfig
from server.runtime.loader import load_model, resolve_dtype
from server.runtime.model import CausalLM
from server.runtime.rope import inverse_frequencies

_ROPE3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
SHAPES: dict[str, dict] = {  # transformers LlamaConfig arguments
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_theta=500000.0, rope_scaling={**_ROPE3, "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=500000.0, rope_scaling={**_ROPE3, "original_max_position_embeddings": 64}),
}
STATIC_TOPK = [4, 3, 2, 2, 1, 1]  # timed trees: Medusa-like top-k per frame over N=6 frames
PLACEHOLDER_TAU = 3.0  # only when no measured acceptance length is given; the output says so
HAS_GOVERNOR = "governor" in SchedulerConfig.__dataclass_fields__
EMBED_RMS, PLANT_LOGIT = 100.0, 40.0  # planted bigram: embeddings dwarf the layers' ~15/dim; margin ~30 logits


class StubTokenizer:
    """The engine detokenizes every step; no Llama tokenizer can be fetched, so one character per token."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "x" * len(ids)


def per_token_accept(tau: float, depth: int) -> float:
    """q with 1 + sum_{k=1..depth} q^k = tau: the expected acceptance length (leading right drafts + the
    bonus token) of a `depth`-long chain whose drafts are each right with probability q."""
    if not 0 < tau - 1 < depth:
        return min(1.0, max(0.0, tau - 1))
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection: the sum increases with q
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid**k for k in range(1, depth + 1)) < tau - 1 else (lo, mid)
    return lo


class OracleDrafter(Drafter):
    """Simulated acceptance: drafts `reference[request id]` (the plain run's continuation) as a chain of up to
    `depth` tokens, each replaced by a wrong one with probability 1 - q, plus wrong siblings filling the node
    budget (verification then costs what a full tree costs). A request whose emitted tokens leave the
    reference is counted in `diverged` and gets only wrong drafts from then on."""

    name = "oracle"

    def __init__(self, reference: dict[str, list[int]], q: float, depth: int, vocab: int, seed: int):
        self.ref, self.q, self.depth, self.vocab = reference, q, depth, vocab
        self.rng = random.Random(seed)
        self.pos: dict[str, int] = {}  # output index of the next token to enter the KV cache (negative: prompt)
        self.diverged: set[str] = set()

    def start(self, seq_id: str, prompt_ids: list[int]) -> None:
        self.pos[seq_id] = -len(prompt_ids)

    def _check(self, seq_id: str, token: int) -> None:
        ref, i = self.ref.get(seq_id), self.pos[seq_id]
        if ref is not None and i >= 0 and (i >= len(ref) or ref[i] != token):
            self.diverged.add(seq_id)

    def observe(self, seq_id: str, token_ids: list[int], hidden: torch.Tensor | None) -> None:
        for t in token_ids:
            self._check(seq_id, t)
            self.pos[seq_id] += 1

    def _wrong(self, avoid: int | None) -> int:
        while (t := self.rng.randrange(self.vocab)) == avoid:
            pass
        return t

    def propose(self, requests: list[ProposeRequest]) -> list[TokenTree]:
        return [self._tree(r) for r in requests]

    def _tree(self, r: ProposeRequest) -> TokenTree:
        self._check(r.seq_id, r.pending_token)
        k, ref = self.pos[r.seq_id], [] if r.seq_id in self.diverged else self.ref.get(r.seq_id, [])
        right = [ref[k + j] if k + j < len(ref) else None for j in range(1, min(self.depth, r.budget) + 1)]
        chain = [t if t is not None and self.rng.random() < self.q else self._wrong(t) for t in right]
        tokens, parents = [r.pending_token, *chain], list(range(-1, len(chain)))
        for _ in range(r.budget - len(chain)):  # wrong siblings of chain nodes, like a beam's alternatives
            p = self.rng.randrange(len(chain))
            tokens.append(self._wrong(right[p]))
            parents.append(p)
        return TokenTree.from_parents(tokens, parents)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median ms of one call: CUDA events on a drained stream (host work counts: the GPU waits for it);
    wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def build_models(shape: str, device: torch.device, dtype: torch.dtype, weights: str, seed: int):
    """(transformers model, our CausalLM) on the same random weights, made on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**SHAPES[shape], architectures=["LlamaForCausalLM"], bos_token_id=None,
                         eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        hf = LlamaForCausalLM(hf_cfg).eval()
    if weights == "disk":
        tmp = tempfile.mkdtemp(prefix=f"bench-gpu-{shape}-")
        hf.save_pretrained(tmp)
        model = load_model(tmp, dtype=str(dtype).removeprefix("torch."), device=str(device))
        shutil.rmtree(tmp)
        return hf, model
    cfg = ModelConfig.from_dict(hf_cfg.to_dict())
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.load_state_dict(hf.state_dict(), strict=True, assign=True)  # the same tensors, no copy
    model.inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    return hf, model.eval()


def copy_bandwidth(device: torch.device, mib: int, warmup: int, repeats: int) -> dict:
    """Device-to-device copy of a `mib` MiB buffer; GB/s counts the bytes read plus the bytes written."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, repeats)
    return {"buffer_mib": mib, "copy_ms": ms, "gb_per_s": 2 * src.numel() / ms / 1e6}


def step_bytes(model: CausalLM, args: argparse.Namespace) -> dict:
    """Bytes one batch-1 decode step must read: every weight but the input embedding table (one row is
    read), plus the KV cache at the run's mean context length."""
    c, embed = model.config, model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = total - (0 if c.tie_word_embeddings else embed.numel() * embed.element_size())
    kv = c.num_layers * 2 * c.num_kv_heads * c.head_dim * embed.element_size() * (args.prompt_len + args.new_tokens / 2)
    return {"parameters": sum(p.numel() for p in model.parameters()), "weight_bytes": total,
            "weight_bytes_read_per_step": weights, "kv_bytes_read_per_step": kv, "bytes_per_step": weights + kv}


def make_engine(model: CausalLM, slots: int, args: argparse.Namespace, drafter: Drafter | None = None,
                governor: bool = False, graphs: bool = False) -> LLMEngine:
    """An engine on `model`; `graphs`: with CUDA graphs captured and attached to the model, as the server
    does at start-up (where they can run: CUDA and the Triton kernels). The model serves one engine's graphs
    at a time: detach them (`model.graph_runner = None`) before the next engine."""
    sched = SchedulerConfig(max_batch_size=slots, max_tree_nodes=args.max_tree_nodes,
                            spec_token_budget=args.spec_token_budget, prefill_chunk=args.prefill_chunk,
                            **({"governor": governor} if HAS_GOVERNOR else {}))
    cfg = EngineConfig(max_model_len=args.prompt_len + args.new_tokens + args.max_tree_nodes + 1, scheduler=sched)
    engine = LLMEngine(model, StubTokenizer(), cfg, drafter=drafter)
    model.graph_runner = None
    if graphs:
        capture_graphs(engine)
    return engine


def greedy(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)


def random_prompt(gen: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(vocab, (n,), generator=gen).tolist()


def bench_plain(model: CausalLM, prompt: list[int], args: argparse.Namespace, graphs: bool = False) -> dict:
    """Our engine without a drafter, the request alone, --runs times after a warm-up (`graphs`: see
    make_engine; `cuda_graphs` says whether any were captured)."""
    engine, runs, steps = make_engine(model, 1, args, graphs=graphs), [], 0
    captured = model.graph_runner is not None
    try:
        warm_up(engine, prompt)
        for i in range(args.runs):
            done, _, n = drive(engine, {f"plain{i}": (prompt, greedy(args))})
            runs, steps = runs + list(done.values()), steps + n
    finally:
        model.graph_runner = None
    return {**summarize(runs, sum(r.wall_s for r in runs), steps, serial=True), "tokens": runs[0].tokens,
            "cuda_graphs": captured}


def bench_transformers(hf, prompt: list[int], args: argparse.Namespace, device: torch.device) -> dict:
    """transformers `generate`: greedy, its default (dynamic) cache, sdpa. Decode rate: N - 1 tokens over
    the time of an N-token run minus that of a 1-token one (prefill + first token)."""
    ids = torch.tensor([prompt], device=device)

    def generate(n: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, out[0, len(prompt) :].tolist()  # .tolist() waits for the GPU

    generate(4)  # warm-up
    first = statistics.median(generate(1)[0] for _ in range(args.runs))
    fulls = [generate(args.new_tokens) for _ in range(args.runs)]
    full, n = statistics.median(t for t, _ in fulls), args.new_tokens
    return {"tokens_per_s": n / full, "decode_tokens_per_s": (n - 1) / (full - first) if full > first else None,
            "prefill_s": first, "wall_s": full, "tokens": fulls[0][1]}


def static_tree(root: int, nodes: int, vocab: int, gen: torch.Generator) -> TokenTree:
    """A realistic verification tree: the `nodes` best nodes (build_trie) of a static top-k tree over N=6
    frames, rank r scoring -r, random tokens."""
    table = torch.randint(vocab, (len(STATIC_TOPK), max(STATIC_TOPK)), generator=gen).tolist()
    paths = topk_paths(STATIC_TOPK)
    cands = [[table[t][r] for t, r in enumerate(p)] for p in paths]
    return build_trie(root, cands, [-float(sum(p)) for p in paths], max_nodes=nodes)


def bench_verify(model: CausalLM, args: argparse.Namespace, device: torch.device, gen: torch.Generator) -> dict:
    """One runtime forward (speculate.verify: batch build + forward + logits at every node; the engine computes
    logits only along the walked paths, so this is its upper bound)
    on a --prompt-len prefix: root only (= a plain decode step) vs trees of --tree-sizes draft nodes; and
    the KV commit of a round(tau)-node path."""
    P, V = args.prompt_len, model.config.vocab_size
    cache = model.make_cache(1, P + max(args.tree_sizes) + 1)
    slot = cache.allocate()
    speculate.verify(model, cache, [ForwardItem(slot, 0, random_prompt(gen, V, P))], [[P - 1]])
    cache.advance(slot, P)

    def timed(tree: TokenTree) -> float:
        item = ForwardItem(slot, P, tree.tokens, tree.parents)
        return time_ms(lambda: speculate.verify(model, cache, [item], [list(range(tree.num_nodes))]),
                       device, args.warmup, args.repeats)

    out = {"prefix": P, "plain_forward_ms": timed(TokenTree.chain(1, [])), "trees": []}
    for n in args.tree_sizes:
        tree = static_tree(1, n, V, gen)
        ms = timed(tree)
        out["trees"].append({"draft_nodes": tree.num_draft_tokens, "depth": max(tree.depths), "verify_ms": ms,
                             "ratio": ms / out["plain_forward_ms"]})
    path = list(range(max(1, round(args.acceptance))))

    def commit() -> None:
        cache.commit_paths([slot], [path])
        cache.lengths[slot] = P  # rewind: every call commits onto the same prefix

    return {**out, "commit_ms": time_ms(commit, device, args.warmup, args.repeats)}


def bench_draft(model: CausalLM, args: argparse.Namespace, device: torch.device, plain_ms: float) -> dict:
    """A random-init CTC drafter on a --prompt-len context; one step = observe round(tau) new tokens, then
    `frames` (its forward) or `propose` (forward, copy to the host, CTC prefix beam search, trie)."""
    P, H, dtype = args.prompt_len, model.config.hidden_size, model.lm_head.weight.dtype
    cfg = CTCDrafterConfig.for_base(model.config, num_frames=args.draft_frames, num_layers=args.draft_layers,
                                    num_labels=min(4, args.draft_frames))
    with torch.device(device), default_dtype(dtype):
        dm = CTCDraftModel(cfg).attach_base(model).eval().requires_grad_(False)
    drafter, prompt = CTCDrafter(dm, max_slots=1, max_len=P + 64), list(range(P))
    req = ProposeRequest("d", pending_token=1, budget=args.max_tree_nodes)
    drafter.start("d", prompt)
    drafter.observe("d", prompt, torch.randn(P, H, device=device, dtype=dtype))
    drafter.frames([req])  # the prefix enters the drafter's cache
    k, slot = max(1, round(args.acceptance)), drafter.state["d"].slot
    new_hidden = torch.randn(k, H, device=device, dtype=dtype)

    def step(call: Callable[[list[ProposeRequest]], object]) -> float:
        def run() -> object:
            drafter.cache.lengths[slot] = P  # rewind: every step drafts on the same context
            drafter.observe("d", prompt[:k], new_hidden)
            return call([req])
        return time_ms(run, device, args.warmup, args.repeats)

    frames, propose = step(drafter.frames), step(drafter.propose)
    return {"frames": cfg.num_frames, "layers": cfg.num_layers,
            "own_parameters": sum(p.numel() for p in dm.parameters()), "frames_ms": frames,
            "frames_share": frames / plain_ms, "propose_ms": propose, "propose_share": propose / plain_ms}


def projection(verify: dict, draft: dict, tau: float) -> list[dict]:
    """PROJECTED speedup(n) = tau / cost(n), cost = (verify(n) + propose + commit) / plain decode forward."""
    out = []
    for t in verify["trees"]:
        cost = (t["verify_ms"] + draft["propose_ms"] + verify["commit_ms"]) / verify["plain_forward_ms"]
        out.append({"draft_nodes": t["draft_nodes"], "step_cost": cost, "projected_speedup": tau / cost})
    return out


@torch.no_grad()
def plant_bigram(model: CausalLM, gen: torch.Generator) -> None:
    """Greedy decoding becomes x_{t+1} = perm[x_t] with a margin far above bf16 rounding (module docstring):
    embeddings scaled to RMS EMBED_RMS, then lm_head[perm[x]] += PLANT_LOGIT / H * e_x / rms(e_x)."""
    E, W = model.model.embed_tokens.weight, model.lm_head.weight
    V, H = E.shape
    E.mul_(EMBED_RMS * E.numel() ** 0.5 / torch.linalg.vector_norm(E, dtype=torch.float32).item())
    perm = torch.randperm(V, generator=gen).to(E.device)
    for s in range(0, V, 8192):  # chunks: a float32 copy of Llama-3's table would be 2 GB
        e = E[s : s + 8192].float()
        W.index_add_(0, perm[s : s + 8192], (PLANT_LOGIT / H * e * e.pow(2).mean(-1, keepdim=True).rsqrt()).to(W.dtype))


def bench_concurrency(model: CausalLM, args: argparse.Namespace, level: int, q: float) -> dict:
    """`level` requests at once into `level`-slot engines: plain; speculative with the oracle drafter and the
    governor off (always speculates); and as shipped, governor on (speculates while it measures faster)."""
    gen = torch.Generator().manual_seed(args.seed + level)
    reqs = {f"c{j}": (random_prompt(gen, model.config.vocab_size, args.prompt_len), greedy(args)) for j in range(level)}
    runs, diverged = {}, {}
    for name in ["none", "oracle"] + (["oracle+governor"] if HAS_GOVERNOR else []):
        oracle = None
        if name != "none":
            ref = {rid: r.tokens for rid, r in runs["none"][0].items()}
            ref["warmup"] = ref["c0"][:16]  # warm_up() decodes c0's prompt for 16 tokens
            oracle = OracleDrafter(ref, q, args.oracle_depth, model.config.vocab_size, args.seed)
        engine = make_engine(model, level, args, oracle, governor=name.endswith("governor"),
                             graphs=not args.enforce_eager)
        warm_up(engine, reqs["c0"][0])
        runs[name] = drive(engine, reqs)
        model.graph_runner = None
        diverged[name] = len(oracle.diverged & reqs.keys()) if oracle else 0
        del engine
        free_memory()
    res = {n: summarize(list(d.values()), wall, steps, serial=False) for n, (d, wall, steps) in runs.items()}
    for n, v in res.items():
        v.update(speedup=v["tokens_per_s"] / res["none"]["tokens_per_s"], diverged_requests=diverged[n])
    outputs = {n: [d[rid].tokens for rid in reqs] for n, (d, _, _) in runs.items()}
    return {"concurrency": level, "acceptance": "simulated", "variants": res, "mismatches": mismatches(outputs)}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_shape(shape: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, bw: float) -> dict:
    """Every section for one shape (the transformers model is dropped after section 1)."""
    gen, t0 = torch.Generator().manual_seed(args.seed), time.perf_counter()

    def note(done: str) -> None:  # progress on stderr: a 10-minute command limit leaves no room for guessing
        print(f"[{shape} {time.perf_counter() - t0:4.0f} s] {done}", file=sys.stderr, flush=True)

    hf, model = build_models(shape, device, dtype, args.weights, args.seed)
    note(f"built ({args.weights} weights)")
    out: dict = {"shape": shape, "config": SHAPES[shape], "build_s": time.perf_counter() - t0,
                 **step_bytes(model, args)}
    out["bandwidth_limit_tokens_per_s"] = bw * 1e9 / out["bytes_per_step"]
    out["bandwidth_limit_tokens_per_s_all_weights"] = bw * 1e9 / out["weight_bytes"]  # the simpler bound
    prompt = random_prompt(gen, model.config.vocab_size, args.prompt_len)
    plain = out["plain"] = bench_plain(model, prompt, args, graphs=not args.enforce_eager)
    plain["share_of_limit"] = plain["decode_tokens_per_s"] / out["bandwidth_limit_tokens_per_s"]
    note(f"plain decode {plain['decode_tokens_per_s']:.1f} tok/s")
    if not args.no_transformers:
        out["transformers"] = bench_transformers(hf, prompt, args, device)
        a, b = plain["tokens"], out["transformers"]["tokens"]
        out["matches_transformers"] = a == b
        out["agreeing_prefix"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        note(f"transformers generate {fmt(out['transformers']['decode_tokens_per_s'])} tok/s")
    del hf
    out["verify"] = bench_verify(model, args, device, gen)
    plain["outside_forward_ms_per_step"] = plain["decode_ms_per_step"] - out["verify"]["plain_forward_ms"]
    out["draft"] = bench_draft(model, args, device, out["verify"]["plain_forward_ms"])
    out["projection"] = projection(out["verify"], out["draft"], args.acceptance)
    note("step costs and drafter")
    free_memory()
    plant_bigram(model, gen)
    q, out["concurrency"] = per_token_accept(args.acceptance, args.oracle_depth), []
    for level in args.concurrency:
        out["concurrency"].append(bench_concurrency(model, args, level, q))
        note(f"concurrency {level}")
    if device.type == "cuda":
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def resolve_acceptance(args: argparse.Namespace) -> tuple[float, str]:
    """--acceptance-length, else --acceptance-json (a bench_engine result: temperature-0 batch-1 acceptance
    length of --acceptance-variant, by default its first trained drafter; or {"acceptance_length": x})."""
    if args.acceptance_length is not None:
        return args.acceptance_length, "--acceptance-length"
    if args.acceptance_json is None:
        return PLACEHOLDER_TAU, "PLACEHOLDER, not measured: pass --acceptance-json or --acceptance-length"
    res = json.loads(args.acceptance_json.read_text())
    if "acceptance_length" in res:
        return float(res["acceptance_length"]), str(args.acceptance_json)
    variants = next(b["variants"] for b in res["batch1"] if b["temperature"] == 0)
    names = [args.acceptance_variant] if args.acceptance_variant else sorted(set(variants) - {"none"},
                                                                               key=lambda n: n == "ngram")
    for n in names:
        if (variants.get(n) or {}).get("acceptance_length"):
            return float(variants[n]["acceptance_length"]), f"{args.acceptance_json}: {n}, temperature 0"
    raise SystemExit(f"{args.acceptance_json}: no acceptance length for {names}")


def fmt(x: float | None, digits: int = 1, unit: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(res: dict) -> str:
    """Three tables for BENCHMARKS.md."""
    a, m, shapes = res["acceptance"], res["machine"], res["shapes"]
    out = [f"{m['device_name']}, torch {m['torch']}, CUDA {m['cuda']}, {m['dtype']}, kernels {m['kernel_backend']}; "
           f"batch 1, {res['prompt_len']} random prompt tokens, {res['new_tokens']} new, greedy, EOS ignored; copy "
           f"bandwidth {res['bandwidth']['gb_per_s']:.0f} GB/s (read + write).", ""]
    rows = []
    for s in shapes:
        p, t = s["plain"], s.get("transformers", {})
        same = {True: "yes", False: f"first {s.get('agreeing_prefix')}", None: "-"}[s.get("matches_transformers")]
        rows.append([s["shape"], f"{s['bytes_per_step'] / 1e9:.2f}", f"{s['bandwidth_limit_tokens_per_s']:.0f}",
                     fmt(p["decode_tokens_per_s"]), f"{100 * p['share_of_limit']:.0f}%",
                     fmt(t.get("decode_tokens_per_s")),
                     fmt(p["decode_tokens_per_s"] / t["decode_tokens_per_s"] if t.get("decode_tokens_per_s") else None,
                         2, "x"), fmt(p["decode_ms_per_step"], 2), fmt(s["verify"]["plain_forward_ms"], 2),
                     fmt(p["outside_forward_ms_per_step"], 2), same])
    out += table(["shape", "GB read/step", "limit tok/s", "ours tok/s", "% of limit", "transformers tok/s",
                  "ours/transformers", "ms/step", "forward ms", "outside forward ms", "= transformers"], rows)
    sizes = [t["draft_nodes"] for t in shapes[0]["verify"]["trees"]] if shapes else []
    out += ["", f"Batch-1 step cost on a {res['prompt_len']}-token prefix (x = / plain forward). PROJECTED speedup = "
            f"tau / ((verify + propose + commit) / plain), tau = {a['length']:.2f} ({a['source']}).", ""]
    rows = [[s["shape"], fmt(s["verify"]["plain_forward_ms"], 2)]
            + [f"{t['verify_ms']:.2f} ({t['ratio']:.2f}x)" for t in s["verify"]["trees"]]
            + [f"{s['draft'][k + '_ms']:.2f} ({s['draft'][k + '_share']:.2f}x)" for k in ("frames", "propose")]
            + [fmt(s["verify"]["commit_ms"], 3)] + [f"{p['projected_speedup']:.2f}x" for p in s["projection"]]
            for s in shapes]
    out += table(["shape", "plain ms", *(f"verify {n} ms" for n in sizes), "draft forward ms", "propose ms",
                  "commit ms", *(f"projected @{n}" for n in sizes)], rows)
    out += ["", f"Concurrency: all requests at once, total tokens/s (prefill included). ACCEPTANCE IS SIMULATED: an "
            f"oracle drafter proposes the plain run's own continuation, each token right with p = "
            f"{a['per_token_accept']:.3f} along a {res['oracle_depth']}-deep chain (target tau {a['length']:.2f}), "
            f"wrong siblings filling max_tree_nodes {res['max_tree_nodes']} / spec_token_budget "
            f"{res['spec_token_budget']}.", ""]
    rows = []
    for s in shapes:
        for c in s["concurrency"]:
            p, o, g = (c["variants"].get(k, {}) for k in ("none", "oracle", "oracle+governor"))
            rows.append([s["shape"], str(c["concurrency"]), fmt(p["tokens_per_s"]), fmt(o["tokens_per_s"]),
                         fmt(o["speedup"], 2, "x"), fmt(g.get("tokens_per_s")), fmt(g.get("speedup"), 2, "x"),
                         fmt(o["acceptance_length"], 2), fmt(o["tokens_per_step"], 2), str(o["diverged_requests"]),
                         "yes" if not c["mismatches"] else "NO"])
    out += table(["shape", "concurrency", "plain tok/s", "spec tok/s", "speedup", "spec+governor tok/s", "speedup",
                  "accept len", "tok/step", "diverged", "= plain"], rows)
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", action="append", help=f"repeatable or comma-separated: {', '.join(SHAPES)} (tiny: a "
                   "few-MB Llama for CPU smoke tests); None: llama2-7b,llama3-8b")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cuda or cpu")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32")
    p.add_argument("--weights", choices=["shared", "disk"], default="shared", help="shared: our model borrows the "
                   "transformers model's tensors; disk: save_pretrained + our load_model")
    p.add_argument("--prompt-len", type=int, default=512, help="random prompt tokens; also the timed steps' prefix")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per request, EOS ignored")
    p.add_argument("--runs", type=int, default=2, help="timed batch-1 generations, ours and transformers'")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before each step timing")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per step timing (the median is reported)")
    p.add_argument("--copy-mib", type=int, default=1024, help="buffer of the copy-bandwidth measurement, MiB")
    p.add_argument("--tree-sizes", type=ints, default=[32, 64], help="draft nodes (root excluded) of the timed trees")
    p.add_argument("--draft-frames", type=int, default=6, help="CTC drafter frames N")
    p.add_argument("--draft-layers", type=int, default=1, help="CTC drafter decoder layers")
    p.add_argument("--acceptance-length", type=float, default=None, help="tau (tokens per verification step) "
                   "for the projection and the oracle; take it from the CPU demo-model benchmark (bench_engine, "
                   f"CTC drafter, temperature 0); overrides --acceptance-json; neither: {PLACEHOLDER_TAU}, flagged")
    p.add_argument("--acceptance-json", type=Path, default=None,
                   help='bench_engine result JSON (or {"acceptance_length": x}) to read tau from')
    p.add_argument("--acceptance-variant", default=None,
                   help="drafter label in --acceptance-json; None: its first trained one")
    p.add_argument("--oracle-depth", type=int, default=6, help="chain depth of the simulated drafts (CTC: N frames)")
    p.add_argument("--concurrency", type=ints, default=[1, 2, 4, 8, 16, 32], help="concurrency levels (engine slots)")
    p.add_argument("--max-tree-nodes", type=int, default=SchedulerConfig.max_tree_nodes,
                   help="SchedulerConfig.max_tree_nodes of the engines (and the drafter's propose budget)")
    p.add_argument("--spec-token-budget", type=int, default=SchedulerConfig.spec_token_budget,
                   help="SchedulerConfig.spec_token_budget: draft nodes per step, shared by all sequences")
    p.add_argument("--prefill-chunk", type=int, default=SchedulerConfig.prefill_chunk, help="prompt tokens per step")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' generate")
    p.add_argument("--enforce-eager", action="store_true", help="engines without CUDA graphs (as ctc-serve "
                   "--enforce-eager); by default they capture them, as the server does")
    p.add_argument("--quick", action="store_true", help="runs 1, warmup 2, repeats 5, at most 128 new tokens, "
                   "concurrency 1,8,32")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, prompts, trees and the oracle")
    p.add_argument("--out", type=Path, default=None, help="JSON output; default bench/results/gpu-<UTC time>.json")
    args = p.parse_args(argv)
    args.shape = [s for arg in (args.shape or ["llama2-7b,llama3-8b"]) for s in arg.split(",") if s]
    if unknown := set(args.shape) - SHAPES.keys():
        p.error(f"unknown shape(s) {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    if args.quick:
        args.runs, args.warmup, args.repeats = 1, 2, 5
        args.new_tokens, args.concurrency = min(args.new_tokens, 128), [1, 8, 32]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if not cuda and args.device.startswith("cuda"):
        print(f"no CUDA device on this machine (--device {args.device}): nothing benchmarked")
        return 0
    if not cuda and (big := [s for s in args.shape if s != "tiny"]):
        print(f"no CUDA device: skipping {', '.join(big)} (7B/8B shapes are benchmarked on a GPU only)")
        args.shape = [s for s in args.shape if s == "tiny"]
        if not args.shape:
            return 0
    device = torch.device("cuda" if cuda else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    args.acceptance, source = resolve_acceptance(args)
    import transformers

    res: dict = {
        "command": shlex.join([sys.executable, *sys.argv]), "date": datetime.now(timezone.utc).isoformat(),
        "machine": {"device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                    "device": str(device), "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "transformers": transformers.__version__,
                    "kernel_backend": kernel_backend().value, "python": platform.python_version()},
        "weights": args.weights, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "oracle_depth": args.oracle_depth, "max_tree_nodes": args.max_tree_nodes,
        "spec_token_budget": args.spec_token_budget, "prefill_chunk": args.prefill_chunk,
        "acceptance": {"length": args.acceptance, "source": source,
                       "per_token_accept": per_token_accept(args.acceptance, args.oracle_depth)},
        "bandwidth": copy_bandwidth(device, args.copy_mib, args.warmup, args.repeats), "shapes": []}
    out = args.out or Path("bench/results") / f"gpu-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for shape in args.shape:
        t0 = time.perf_counter()
        res["shapes"].append({**bench_shape(shape, args, device, dtype, res["bandwidth"]["gb_per_s"]),
                              "total_s": time.perf_counter() - t0})
        free_memory()
        res["finished"] = datetime.now(timezone.utc).isoformat()
        out.write_text(json.dumps(res, indent=2) + "\n")  # after every shape: a cut-off run keeps what it did
    print(markdown(res))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
