"""Benchmark the engine core (LLMEngine) on one model: speculative vs plain decoding, in one run.

Measures (bench/README.md explains every figure): 1. batch 1, per drafter and temperature: tokens/s,
prefill time, acceptance length, tokens per step, speedup over plain decoding; 2. total tokens/s with
M = level x --requests-per-slot requests submitted at once; 3. peak RSS and KV-cache size; 4. optionally
a sweep of SchedulerConfig.max_tree_nodes at batch 1, temperature 0; 5. optionally (--itl-prefill N) a
streaming request's inter-token latency while an N-token prompt is prefilled alongside it. Ratios only mean something within
one run (DESIGN.md section 4), so all variants run in one process, on the same prompts, after a warm-up,
in rotating order. Speculative outputs are compared with plain ones token for token: at temperature 0
(and, thanks to per-position sampling noise, with seeded sampling too) any difference is a bug.

Usage, from the repository root: python -m bench.bench_engine [--help]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from server.engine.engine import EngineConfig, LLMEngine
from server.engine.factory import build_drafter
from server.engine.scheduler import SchedulerConfig, default_tree_nodes
from server.engine.speculate import Acceptance
from server.engine.types import GrammarSpec, SamplingParams
from server.runtime.loader import DTYPES, load_model, load_tokenizer

Requests = dict[str, tuple[list[int], SamplingParams]]
PHASES = ("propose", "verify", "accept", "finish")  # LLMEngine.phase_seconds' keys


@dataclass(frozen=True)
class Variant:
    """One engine configuration under test: a drafter (none, ngram or a directory), the governor and,
    when several are compared (--acceptance path,all-nodes; --path-ahead 0,2; --drafter-dtype
    auto,bfloat16), the acceptance path, the path walk's look-ahead and the trained drafter's dtype.
    `control`: a second plain engine, run like the others; its ratio to the first shows how far
    two identical engines differ in one run (the machine's noise), which no speedup can be read
    more finely than."""

    drafter: str
    governor: bool = True
    control: bool = False
    acceptance: str | None = None  # None: --acceptance's first value; else named in the variant
    path_ahead: int | None = None  # None: --path-ahead's first value; else named in the variant
    dtype: str | None = None  # None: --drafter-dtype's first value; else named in the variant
    larger_margin: float | None = None  # None: --governor-larger-margin's first value; else named
    choices_from: int | None = None  # None: --governor-choices-from's first value; else named

    @property
    def name(self) -> str:
        if self.control:
            return "none (control)"
        base = self.drafter if self.drafter.lower() in ("none", "ngram") else Path(self.drafter).name
        base = base if self.acceptance is None else f"{base} [{self.acceptance}]"
        base = base if self.path_ahead is None else f"{base} [ahead {self.path_ahead}]"
        base = base if self.dtype is None else f"{base} [{self.dtype}]"
        base = base if self.larger_margin is None else f"{base} [larger margin {self.larger_margin:g}]"
        base = base if self.choices_from is None else f"{base} [all sizes from batch {self.choices_from}]"
        return base if self.governor or base == "none" else f"{base} (no governor)"


@dataclass
class RequestRun:
    """What one request did: its tokens, timings (from submission) and speculation counters."""

    tokens: list[int] = field(default_factory=list)
    wall_s: float = 0.0  # submission -> last token
    prefill_s: float = 0.0  # submission -> first token (time to first token)
    steps: int = 0  # verification steps after the first token
    spec_steps: int = 0  # of which drafted at least one token
    draft_tokens: int = 0
    accepted_tokens: int = 0  # bonus token excluded
    # seconds per engine phase (LLMEngine.phase_seconds) over the decode steps that ran this request
    # alone (at batch 1, all of them)
    phase_s: Counter = field(default_factory=Counter)


def drive(engine: LLMEngine, requests: Requests) -> tuple[dict[str, RequestRun], float, int]:
    """Submit all requests at once and step the engine until it is idle: (runs, wall time, engine steps)."""
    runs, engine_steps = {rid: RequestRun() for rid in requests}, 0
    t0 = time.perf_counter()
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    while engine.has_work():
        engine_steps += 1
        before = Counter(engine.phase_seconds)
        step = engine.step()
        if len(step) == 1 and runs[step[0].request_id].tokens:  # one request's decode step
            runs[step[0].request_id].phase_s.update(Counter(engine.phase_seconds) - before)
        for d in step:
            if d.error:
                raise RuntimeError(f"request {d.request_id} failed: {d.error}")
            r, now = runs[d.request_id], time.perf_counter()
            if r.tokens:
                r.steps += 1
            else:
                r.prefill_s = now - t0
            r.tokens += d.token_ids
            r.spec_steps += d.speculated
            r.draft_tokens += d.num_draft_tokens
            r.accepted_tokens += d.num_accepted_tokens
            if d.finished:
                r.wall_s = now - t0
    return runs, time.perf_counter() - t0, engine_steps


def summarize(runs: list[RequestRun], wall_s: float, engine_steps: int, serial: bool) -> dict:
    """Aggregate figures over runs that took `wall_s` and `engine_steps` in all. `serial`: the runs
    went one at a time (batch 1), so per-request decode time (after the first token) is meaningful."""
    n, tokens = len(runs), sum(len(r.tokens) for r in runs)
    steps, spec = sum(r.steps for r in runs), sum(r.spec_steps for r in runs)
    drafted, accepted = sum(r.draft_tokens for r in runs), sum(r.accepted_tokens for r in runs)
    decode_s = sum(r.wall_s - r.prefill_s for r in runs) if serial else None
    return {
        "requests": n, "generated_tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / wall_s,
        "ttft_mean_s": sum(r.prefill_s for r in runs) / n,  # = prefill time at batch 1
        "decode_tokens_per_s": (tokens - n) / decode_s if serial and decode_s else None,
        "decode_ms_per_step": 1e3 * decode_s / steps if serial and steps else None,
        "engine_steps": engine_steps, "ms_per_engine_step": 1e3 * wall_s / engine_steps,
        "steps": steps, "spec_steps": spec, "draft_tokens": drafted, "accepted_tokens": accepted,
        "acceptance_length": 1 + accepted / spec if spec else None,  # per speculating step, bonus included
        "draft_acceptance_rate": accepted / drafted if drafted else None,
        "drafts_per_spec_step": drafted / spec if spec else None,  # the tree size actually verified
        "tokens_per_step": (tokens - n) / steps if steps else None,  # per request over all its decode steps
        # where a decode step's time goes, ms per step (LLMEngine.phase_seconds; batch 1 only)
        "phase_ms_per_step": {k: 1e3 * sum(r.phase_s[k] for r in runs) / steps for k in PHASES}
        if serial and steps else None,
    }


def choices(engine: LLMEngine) -> dict[str, float]:
    """What the speculation governor played: the share of the engine's decode steps per tree budget
    (`/lookup`: the drafter's cheaper tier), all batch sizes together, largest share first."""
    plays = Counter()
    for counts in engine.scheduler.governor.plays.values():
        plays.update(counts)
    total = sum(plays.values()) or 1
    return {f"{o.budget}{'/lookup' if o.tier else ''}" if o.budget else "plain": n / total
            for o, n in plays.most_common()}


def mismatches(outputs: dict[str, list[list[int]]], reference: str = "none") -> list[dict]:
    """Every (variant, prompt) whose tokens differ from the plain engine's, with the first differing index."""
    found = []
    for name, outs in outputs.items():
        for i, (ref, got) in enumerate(zip(outputs[reference], outs)):
            if got != ref:
                first = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
                found.append({"variant": name, "prompt": i, "first_diff": first, "lens": [len(ref), len(got)]})
    return found


def bench_interleaved(engines: dict[str, LLMEngine], prompts: list[list[int]], args: argparse.Namespace,
                      temperature: float) -> dict:
    """Batch 1: each prompt alone through every engine (warmed up first), the order rotating per prompt."""
    for e in engines.values():
        warm_up(e, prompts[0])
    names, runs, steps = list(engines), {n: [] for n in engines}, dict.fromkeys(engines, 0)
    for i, ids in enumerate(prompts):
        params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, seed=args.seed + i,
                                ignore_eos=args.ignore_eos, grammar=grammar(args))
        k = i % len(names)
        for name in names[k:] + names[:k]:
            one, _, n_steps = drive(engines[name], {f"p{i}": (ids, params)})
            runs[name].append(one[f"p{i}"])
            steps[name] += n_steps
    result = {n: summarize(rs, sum(r.wall_s for r in rs), steps[n], serial=True) for n, rs in runs.items()}
    for n in names:
        result[n]["speedup"] = result[n]["tokens_per_s"] / result["none"]["tokens_per_s"]
        result[n]["choices"] = choices(engines[n])
    bad = mismatches({n: [r.tokens for r in rs] for n, rs in runs.items()})
    return {"temperature": temperature, "variants": result, "mismatches": bad}


def bench_concurrency(make: Callable[..., LLMEngine], variants: list[Variant], prompts: list[list[int]],
                      args: argparse.Namespace, level: int) -> dict:
    """M = level x requests-per-slot requests at once into engines of `level` slots; total tokens/s."""
    m = level * args.requests_per_slot
    reqs: Requests = {f"c{j}": (prompts[j % len(prompts)], SamplingParams(
        max_tokens=args.max_tokens, temperature=args.concurrency_temperature, seed=args.seed + j,
        ignore_eos=args.ignore_eos, grammar=grammar(args))) for j in range(m)}
    engines = {v.name: make(v, max_batch_size=level) for v in variants}
    for e in engines.values():
        warm_up(e, prompts[0])
    names = list(engines)  # ABBA order over repeats: drift over time (thermal, neighbours) hits all alike
    order = [n for r in range(args.concurrency_repeats) for n in (names if r % 2 == 0 else names[::-1])]
    runs, walls, steps, outputs = {n: [] for n in names}, dict.fromkeys(names, 0.0), dict.fromkeys(names, 0), {}
    for name in order:
        done, wall, n_steps = drive(engines[name], reqs)
        runs[name] += done.values()
        walls[name] += wall
        steps[name] += n_steps
        outputs[name] = [done[rid].tokens for rid in reqs]
    result = {n: summarize(runs[n], walls[n], steps[n], serial=False) for n in names}
    for n in result:
        result[n]["speedup"] = result[n]["tokens_per_s"] / result["none"]["tokens_per_s"]
        result[n]["choices"] = choices(engines[n])
    return {"concurrency": level, "requests": m, "variants": result, "mismatches": mismatches(outputs)}


def bench_prefill_itl(make: Callable[..., LLMEngine], variants: list[Variant], prompts: list[list[int]],
                      args: argparse.Namespace) -> dict:
    """What a decoding stream feels while a long prompt arrives: one request streams (greedy,
    --max-tokens); after its 8th token an --itl-prefill-token prompt is submitted next to it and
    prefilled in chunks of at most --prefill-chunk tokens, sized by --prefill-step-ratio, sharing
    the stream's steps. Inter-token latency (ITL) is the time between two deltas of the stream, as
    a client sees it; reported: its median over the whole stream and over the steps without the
    long prompt (pure decode steps: with small chunks, most of the stream's steps may share the
    prefill, and the median over all of them is a mixed step), its maximum over the steps in which
    the long prompt was prefilling, the chunks the scheduler gave the long prompt and the long
    prompt's time to first token (what smaller chunks cost it)."""
    long_prompt = [t for p in prompts for t in p] * (1 + args.itl_prefill // sum(map(len, prompts)))
    long_prompt = long_prompt[: args.itl_prefill]
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    result = {}
    for v in variants:
        engine = make(v, max_batch_size=2)
        warm_up(engine, prompts[0])
        engine.add_request("stream", prompts[0], greedy)
        gaps, during, quiet, last, state = [], [], [], None, "before"  # long prompt: before, prefilling, done
        chunks, long_seq, submitted, long_ttft = [], None, 0.0, 0.0
        while engine.has_work():
            prefilling = state == "prefilling"
            done = long_seq.num_prefilled if long_seq else 0
            deltas = engine.step()
            if long_seq is None:
                long_seq = next((x for x in engine.scheduler.running if x.request_id == "long"), None)
            if long_seq is not None and long_seq.num_prefilled > done:
                chunks.append(long_seq.num_prefilled - done)
            now = time.perf_counter()
            for d in deltas:
                if d.error:
                    raise RuntimeError(f"request {d.request_id} failed: {d.error}")
                if d.request_id == "long" and d.token_ids:
                    state, long_ttft = "done", now - submitted
                elif d.request_id == "stream" and d.token_ids:
                    if last is not None:
                        gaps.append(now - last)
                        (during if prefilling else quiet).append(now - last)
                    last = now
            if state == "before" and len(gaps) >= 7:  # 8 tokens streamed
                engine.add_request("long", long_prompt, SamplingParams(max_tokens=1, temperature=0.0))
                state, submitted = "prefilling", time.perf_counter()
        median = sorted(gaps)[len(gaps) // 2]  # (tests/statistics.py shadows the stdlib module under pytest)
        decode_median = sorted(quiet)[len(quiet) // 2]
        worst = max(during, default=0.0)
        result[v.name] = {"median_itl_ms": 1e3 * median, "max_itl_during_prefill_ms": 1e3 * worst,
                          "ratio": worst / median, "median_decode_itl_ms": 1e3 * decode_median,
                          "ratio_to_decode": worst / decode_median,
                          "median_ratio_to_decode": sorted(during)[len(during) // 2] / decode_median if during else 0.0,
                          # the machine's noise: how far the pure decode steps' own maximum is from their median
                          "decode_max_ratio": max(quiet) / decode_median, "prefill_steps": len(during),
                          "stream_gaps": len(gaps), "chunks": chunks, "long_ttft_ms": 1e3 * long_ttft}
    return {"prompt_tokens": len(long_prompt), "prefill_chunk": args.prefill_chunk,
            "prefill_step_ratio": args.prefill_step_ratio, "variants": result}


def _span(xs: list[int]) -> str:
    """'16-37' for the sizes of a run of chunks ('' for none)."""
    return "" if not xs else f"{min(xs)}" if min(xs) == max(xs) else f"{min(xs)}-{max(xs)}"


def grammar(args: argparse.Namespace) -> GrammarSpec | None:
    """--json-schema: every timed request (batch 1 and concurrency) is constrained to that schema."""
    return GrammarSpec("json_schema", json.loads(args.json_schema.read_text())) if args.json_schema else None


def warm_up(engine: LLMEngine, prompt: list[int]) -> None:
    """A short untimed run: first-call costs (allocator, kernels, lazy imports) stay out of the figures.
    Then the engine forgets what it measured, as the server does after its warm-up
    (server/engine/warmup.py): the speculation governor starts afresh on the timed requests."""
    drive(engine, {"warmup": (prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))})
    engine.forget_measurements()


def load_prompts(path: Path, source: str, n: int, tokenizer) -> list[list[int]]:
    """First user turn of the first n prompts of `source`, in the chat template, ready to answer."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if source == "all" or r["source"] == source][:n]
    if len(rows) < n:
        raise SystemExit(f"{path} has only {len(rows)} prompts of source {source!r}")
    msgs = [[{"role": "user", "content": r["turns"][0]}] for r in rows]
    return [list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
            for m in msgs]


def machine(model: torch.nn.Module) -> dict:
    """Where the figures come from: absolute times mean nothing without it."""
    info = {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(next(model.parameters()).device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def peak_rss_mib() -> float:
    """Peak resident set of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sections(res: dict) -> list[tuple[str, dict]]:
    """(name, section) for every section of the run that compares variants."""
    out = [(f"batch 1, temperature {b['temperature']}", b) for b in res["batch1"]]
    out += [(f"concurrency {c['concurrency']}", c) for c in res["concurrency"]]
    return out + ([("tree sweep", res["tree_sweep"])] if res["tree_sweep"] else [])


def all_mismatches(res: dict) -> list[tuple[str, dict]]:
    """(section, mismatch) over every section of the run."""
    return [(name, x) for name, sec in sections(res) for x in sec["mismatches"]]


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# Markdown columns: header -> (key in a variant's summary, digits, unit suffix).
_COLUMNS = {
    "tok/s": ("tokens_per_s", 1, ""), "decode tok/s": ("decode_tokens_per_s", 1, ""),
    "accept len": ("acceptance_length", 2, ""), "tok/step": ("tokens_per_step", 2, ""),
    "ms/step": ("decode_ms_per_step", 1, ""), "ms/engine step": ("ms_per_engine_step", 1, ""),
    "TTFT s": ("ttft_mean_s", 2, ""), "speedup": ("speedup", 2, "x"),
    "drafts/step": ("drafts_per_spec_step", 1, ""),
}
_COMMON = ["drafts/step", "accept len", "tok/step", "ms/step", "speedup"]


def table(lead: list[str], cols: list[str], rows: list[tuple[list, dict]]) -> list[str]:
    """A Markdown table: `lead` columns given per row, then `cols` read from each variant summary."""
    head = lead + cols
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for first, v in rows:
        cells = [_fmt(v[key], digits) + unit for key, digits, unit in (_COLUMNS[c] for c in cols)]
        out.append("| " + " | ".join(map(str, first + cells)) + " |")
    return out


def markdown(res: dict) -> str:
    """The run's tables, ready to paste into BENCHMARKS.md."""
    m, mem = res["machine"], res["memory"]
    out = [f"Model `{res['model']}`, {m['device']} {m['dtype']}, {m['torch_threads']} torch threads, {m['cpu_count']} "
           f"CPUs, torch {m['torch']}; {res['num_prompts']} {res['source']} prompts, max_tokens {res['max_tokens']}; "
           + (f"every request constrained to the JSON schema {res['json_schema']}; " if res.get("json_schema") else "") +
           f"scheduler {', '.join(f'{k} {v}' for k, v in res['scheduler'].items() if k != 'max_batch_size')}.",
           "", "**Batch 1** (prefill ms = mean time to first token)", ""]
    rows = [([n, b["temperature"], _fmt(1e3 * v["ttft_mean_s"], 1)], v) for b in res["batch1"]
            for n, v in b["variants"].items()]
    out += table(["drafter", "temp", "prefill ms"], ["tok/s", "decode tok/s", *_COMMON], rows)
    out += ["", "**Batch 1: where a decode step's time goes** (ms per step, and in units of plain decoding's "
            "step; verify = the base model's forward, accept = deciding and walking the trees)", "",
            "| drafter | temp | " + " | ".join(PHASES) + " | step |", "|" + " --- |" * (len(PHASES) + 3)]
    for b in res["batch1"]:
        plain = b["variants"]["none"]["decode_ms_per_step"]
        for n, v in b["variants"].items():
            ph = v.get("phase_ms_per_step")
            if ph and plain:
                cells = [f"{ph[k]:.2f} ({ph[k] / plain:.2f}x)" for k in PHASES]
                out.append(f"| {n} | {b['temperature']} | " + " | ".join(cells)
                           + f" | {v['decode_ms_per_step']:.2f} ({v['decode_ms_per_step'] / plain:.2f}x) |")
    out += ["", f"**Concurrency** (temperature {res['concurrency_temperature']}; TTFT includes queueing)", ""]
    rows = [([c["concurrency"], c["requests"], n], v) for c in res["concurrency"] for n, v in c["variants"].items()]
    out += table(["concurrency", "requests", "drafter"],
                 ["tok/s", "TTFT s", "drafts/step", "accept len", "tok/step", "ms/engine step", "speedup"], rows)
    if res["tree_sweep"]:
        out += ["", "**max_tree_nodes sweep** (batch 1, temperature 0; variant = drafter@max_tree_nodes)", ""]
        out += table(["variant"], ["tok/s", *_COMMON], [([n], v) for n, v in res["tree_sweep"]["variants"].items()])
    played = [(where, n, v["choices"]) for where, sec in sections(res) for n, v in sec["variants"].items()
              if set(v["choices"]) - {"plain"}]  # engines that drafted
    if played:
        out += ["", "**Tree budgets played** (share of decode steps; /lookup: the drafter's lookup-only tier)", "",
                "| section | drafter | budgets |", "| --- | --- | --- |"]
        out += [f"| {where} | {n} | " + ", ".join(f"{k} {x:.0%}" for k, x in ch.items()) + " |"
                for where, n, ch in played]
    if res.get("prefill_itl"):
        itl = res["prefill_itl"]
        out += ["", f"**Inter-token latency while a {itl['prompt_tokens']}-token prompt is prefilled alongside** "
                f"(prefill chunk {itl['prefill_chunk']}, prefill step ratio {itl.get('prefill_step_ratio') or 'off'}; "
                "ratio: max ITL over the prefill steps / median ITL of the stream; the same over the median of "
                "its pure decode steps; their median / decode median; noise: max / median of the decode steps)", "",
                "| drafter | median ITL ms | decode-step median ms | max during prefill ms | ratio | "
                "max / decode median | median / decode median | noise | prefill steps | chunks | long TTFT ms |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        out += [f"| {n} | {v['median_itl_ms']:.1f} | {v['median_decode_itl_ms']:.1f} | "
                f"{v['max_itl_during_prefill_ms']:.1f} | {v['ratio']:.2f}x | {v['ratio_to_decode']:.2f}x | "
                f"{v['median_ratio_to_decode']:.2f}x | {v['decode_max_ratio']:.2f}x | "
                f"{v['prefill_steps']} | {_span(v['chunks'])} | {v['long_ttft_ms']:.0f} |"
                for n, v in itl["variants"].items()]
    out += ["", f"Peak RSS {mem['peak_rss_mib']:.0f} MiB (after loading the model: "
            f"{mem['rss_after_load_mib']:.0f} MiB); weights {mem['weights_mib']:.1f} MiB; "
            f"KV cache {mem['kv_cache_mib_per_slot']:.1f} MiB per slot "
            f"({mem['kv_cache_mib_largest']:.1f} MiB at {mem['largest_batch']} slots)."]
    controls = [v["speedup"] for sec in [*res["batch1"], *res["concurrency"]] for n, v in sec["variants"].items()
                if n == Variant("none", control=True).name]
    if controls:
        out.append(f"Control (a second plain engine): {min(controls):.3f}x to {max(controls):.3f}x the first: ratios "
                   f"that close to 1.0 are within this run's noise.")
    bad = all_mismatches(res)
    out.append(f"Outputs identical to plain decoding: {'yes' if not bad else f'NO, {len(bad)} mismatches'}.")
    return "\n".join(out)


def drafter_dtypes(text: str) -> list[str]:
    names = text.split(",")
    for name in names:
        if name != "auto" and name not in DTYPES:
            raise argparse.ArgumentTypeError(f"{name!r} is not auto or one of {', '.join(DTYPES)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="models/demo-llama", help="Hugging Face model directory")
    p.add_argument("--drafters", default="none,ngram",
                   help="comma-separated: none, ngram, or drafter directories; 'none' (the baseline) is always run")
    p.add_argument("--prompts", type=Path, default=Path("../shared/data/eval_prompts.jsonl"),
                   help="eval prompts, JSONL rows {source, turns}")
    p.add_argument("--source", default="gsm8k", help="prompt set: gsm8k, mt_bench or all")
    p.add_argument("--num-prompts", type=int, default=20, help="prompts at batch 1 (and cycled for concurrency)")
    p.add_argument("--max-tokens", type=int, default=256, help="max new tokens per request")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--temperatures", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.7],
                   help="batch-1 temperatures; sampling is seeded per prompt (--seed + prompt index)")
    p.add_argument("--concurrency", type=ints, default=[1, 4, 16], help="concurrency levels (engine slots)")
    p.add_argument("--requests-per-slot", type=int, default=3, help="requests submitted per slot at each level")
    p.add_argument("--concurrency-repeats", type=int, default=2, help="runs per drafter and level, in ABBA order")
    p.add_argument("--concurrency-temperature", type=float, default=0.0, help="temperature of the concurrency runs")
    p.add_argument("--tree-budgets", type=ints, default=[],
                   help="comma-separated max_tree_nodes values to sweep at batch 1, temperature 0; empty = no sweep")
    p.add_argument("--max-tree-nodes", type=int, default=None,
                   help="SchedulerConfig.max_tree_nodes: draft nodes per sequence at batch 1 (default: the "
                        "server's on this device, 8 on a CPU, 16 on a GPU)")
    p.add_argument("--spec-token-budget", type=int, default=SchedulerConfig.spec_token_budget,
                   help="SchedulerConfig.spec_token_budget: draft nodes per step shared by all sequences")
    p.add_argument("--governor", choices=["on", "off", "both"], default="on" if SchedulerConfig.governor else "off",
                   help="SchedulerConfig.governor (speculate only while measured tokens/s beats plain steps); "
                        "both: every drafter twice, with and without it")
    p.add_argument("--governor-larger-margin", type=lambda s: [float(x) for x in s.split(",")],
                   default=[SchedulerConfig.governor_larger_margin],
                   help="SchedulerConfig.governor_larger_margin: a larger tree within this fraction of the best rate plays "
                        "instead (batch 1; halved per batch-size bucket); several (comma-separated): every drafter runs "
                        "under each, interleaved in one run")
    p.add_argument("--governor-choices-from", type=ints, default=[SchedulerConfig.governor_choices_from],
                   help="SchedulerConfig.governor_choices_from: below this batch size the governor offers only the "
                        "largest tree of the drafter's full tier (1: every tree size at every batch size); "
                        "several (comma-separated): every drafter runs under each, interleaved in one run")
    p.add_argument("--itl-prefill", type=int, default=0,
                   help="prompt tokens of a long prompt prefilled next to a streaming request (0 = skip that section)")
    p.add_argument("--prefill-chunk", type=int, default=SchedulerConfig.prefill_chunk,
                   help="SchedulerConfig.prefill_chunk: prompt tokens per step, all prefilling sequences together")
    p.add_argument("--prefill-step-ratio", type=float, default=SchedulerConfig.prefill_step_ratio or 0.0,
                   help="SchedulerConfig.prefill_step_ratio: while sequences decode, a step that also prefills "
                        "costs at most this many decode steps (measured); 0 = always --prefill-chunk")
    p.add_argument("--control", action="store_true",
                   help="also run a second plain engine, whose ratio to the first measures the run's noise")
    p.add_argument("--acceptance", type=lambda s: [Acceptance(a).value for a in s.split(",")],
                   default=[Acceptance.AUTO.value],
                   help="EngineConfig.acceptance: path, all-nodes or auto (all-nodes on CUDA, path on CPU); several "
                   "(comma-separated): every drafter runs under each, interleaved in one run")
    p.add_argument("--path-ahead", type=ints, default=[EngineConfig.path_ahead],
                   help="EngineConfig.path_ahead: nodes down each walk's likeliest branch that the path walk's LM-head "
                   "calls also decide; several (comma-separated): every drafter runs under each, interleaved in one run")
    p.add_argument("--drafter-dtype", type=drafter_dtypes, default=["auto"],
                   help="a trained drafter's dtype: auto (the server's: the base model's, or on a CPU with native bf16 "
                   "beside a float32 base the faster of float32 and bfloat16 by a timed propose), float32, bfloat16 or "
                   "float16; "
                   "several (comma-separated): every drafter runs under each, interleaved in one run")
    p.add_argument("--json-schema", type=Path, default=None,
                   help="constrain every timed request to this JSON schema (structured outputs)")
    p.add_argument("--max-model-len", type=int, default=1024, help="context length (KV cache positions per slot)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto",
                   help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16 or bfloat16")
    p.add_argument("--seed", type=int, default=0, help="torch seed and base of the per-request sampling seeds")
    p.add_argument("--out", type=Path, default=None, help="JSON output; None = bench/results/<UTC timestamp>.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.max_tree_nodes is None:
        args.max_tree_nodes = default_tree_nodes(model.lm_head.weight.device)
    tokenizer = load_tokenizer(args.model)
    rss_after_load = peak_rss_mib()
    governors = {"on": [True], "off": [False], "both": [True, False]}[args.governor]
    accepts = args.acceptance if len(args.acceptance) > 1 else [None]  # several: each drafter under each
    aheads = args.path_ahead if len(args.path_ahead) > 1 else [None]
    dtypes = args.drafter_dtype if len(args.drafter_dtype) > 1 else [None]
    margins = args.governor_larger_margin if len(args.governor_larger_margin) > 1 else [None]
    froms = args.governor_choices_from if len(args.governor_choices_from) > 1 else [None]
    variants = [Variant("none")] + [Variant(d, g, acceptance=a, path_ahead=n, dtype=t, larger_margin=m, choices_from=c)
                                    for d in args.drafters.split(",") if d and d.lower() != "none" for g in governors
                                    for a in accepts for n in aheads for t in dtypes for m in (margins if g else [None])
                                    for c in (froms if g else [None])]
    if args.control:
        variants.insert(1, Variant("none", control=True))
    prompts = load_prompts(args.prompts, args.source, args.num_prompts, tokenizer)

    def make(v: Variant, max_batch_size: int = 1, max_tree_nodes: int = args.max_tree_nodes) -> LLMEngine:
        sched = SchedulerConfig(max_batch_size=max_batch_size, max_tree_nodes=max_tree_nodes,
                                spec_token_budget=args.spec_token_budget, governor=v.governor,
                                governor_larger_margin=args.governor_larger_margin[0] if v.larger_margin is None
                                else v.larger_margin,
                                governor_choices_from=args.governor_choices_from[0] if v.choices_from is None
                                else v.choices_from,
                                prefill_chunk=args.prefill_chunk, prefill_step_ratio=args.prefill_step_ratio or None)
        dtype = v.dtype or args.drafter_dtype[0]
        drafter = build_drafter(v.drafter, model, max_batch_size, args.max_model_len,
                                dtype=None if dtype == "auto" else DTYPES[dtype])
        cfg = EngineConfig(max_model_len=args.max_model_len, scheduler=sched,
                           acceptance=Acceptance(v.acceptance or args.acceptance[0]),
                           path_ahead=args.path_ahead[0] if v.path_ahead is None else v.path_ahead)
        return LLMEngine(model, tokenizer, cfg, drafter=drafter, model_name=Path(args.model).name)

    sched = SchedulerConfig(max_tree_nodes=args.max_tree_nodes, spec_token_budget=args.spec_token_budget,
                            prefill_chunk=args.prefill_chunk, prefill_step_ratio=args.prefill_step_ratio or None)
    res: dict = {"command": shlex.join([sys.executable] + sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
                 "started": datetime.now(timezone.utc).isoformat(), "machine": machine(model), "model": args.model,
                 "source": args.source, "num_prompts": len(prompts), "max_tokens": args.max_tokens,
                 "json_schema": str(args.json_schema) if args.json_schema else None,
                 "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "scheduler": asdict(sched)
                 | {"governor": args.governor}, "concurrency_temperature": args.concurrency_temperature}
    engines = {v.name: make(v) for v in variants}
    res["batch1"] = [bench_interleaved(engines, prompts, args, t) for t in args.temperatures]
    kv_slot = next(iter(engines.values())).cache.nbytes / 2**20
    del engines
    res["concurrency"] = [bench_concurrency(make, variants, prompts, args, lvl) for lvl in args.concurrency]
    res["tree_sweep"] = None
    if args.tree_budgets:
        sweep = {"none": make(variants[0])} | {f"{v.name}@{b}": make(v, max_tree_nodes=b)
                                               for b in args.tree_budgets for v in variants[1:] if not v.control}
        res["tree_sweep"] = bench_interleaved(sweep, prompts, args, 0.0)
        del sweep
    res["prefill_itl"] = bench_prefill_itl(make, variants, prompts, args) if args.itl_prefill else None
    largest = max(args.concurrency, default=1)
    res["memory"] = {"peak_rss_mib": peak_rss_mib(), "rss_after_load_mib": rss_after_load, "largest_batch": largest,
                     "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
                     "kv_cache_mib_per_slot": kv_slot, "kv_cache_mib_largest": kv_slot * largest}
    if torch.cuda.is_available() and args.device != "cpu":
        res["memory"]["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    res["finished"] = datetime.now(timezone.utc).isoformat()

    out = args.out or Path("bench/results") / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    print(f"\nwrote {out}", file=sys.stderr)
    for where, x in all_mismatches(res):
        print(f"MISMATCH: speculative output differs from plain decoding (a bug) in {where}: {x}", file=sys.stderr)


if __name__ == "__main__":
    main()
