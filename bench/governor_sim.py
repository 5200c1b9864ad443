"""Tune the speculation governor offline: record what a drafter would accept, replay it with a noisy clock.

Timings on a shared CPU drift too much to compare two governor settings by running them (the same
configuration twice differs by more than most changes do). So this tool splits the question:

  record    runs the engine at batch 1 with the largest tree on every step and stores, per step,
            how many draft tokens each smaller budget would have accepted (trees list nodes best
            first, so one verified tree tells all of them: scheduler.DraftOutcome);
  simulate  replays those traces through the real `SpeculationGovernor`: at each text position
            the chosen budget accepts what the trace says, and a step costs what you measured
            for that budget (`--cost`, e.g. from bench_verify_cost.py or bench_engine.py), times
            per-step noise, a slow random drift and now and then a burst of contention, plus a
            catch-up cost for a drafter after plain steps. It prints tokens/s relative to plain
            decoding for every fixed budget and for the governor, over several random seeds.

    python -m bench.governor_sim record --drafter models/demo-llama-ctc+ngram --temperature 0 --out /tmp/t0.json
    python -m bench.governor_sim simulate /tmp/t0.json --cost 0:3.15,2:5.96,4:6.6,8:7.45,16:10.79
    python -m bench.governor_sim simulate /tmp/t0.json --set revert_steps=16 --set margin=0.1

The text position a step starts from decides its acceptance (the trace entry that covers it), so a
budget that accepts less also walks the text more slowly, as it would. What the simulation leaves
out: batches (it is batch 1), and how a cost varies with context length.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import random
from pathlib import Path

from server.engine.scheduler import DraftOutcome, SpeculationGovernor

BUDGETS = (2, 4, 8, 16)


def record(args: argparse.Namespace) -> None:
    import torch

    from bench.bench_engine import drive, load_prompts
    from server.engine.engine import EngineConfig, LLMEngine
    from server.engine.factory import build_drafter
    from server.engine.scheduler import SchedulerConfig
    from server.engine.types import SamplingParams
    from server.runtime.loader import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="float32", device="cpu")
    tok = load_tokenizer(args.model)
    prompts = load_prompts(args.prompts, args.source, args.num_prompts, tok)
    sched = SchedulerConfig(max_batch_size=1, max_tree_nodes=max(BUDGETS), governor=False)
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=1024, scheduler=sched),
                       drafter=build_drafter(args.drafter, model, 1, 1024))
    trace: list[list[list[int]]] = []

    def on_step(batch, budget, seconds, outcomes=(), cap=None, sampled=False, tier=0):
        if outcomes:  # near max_tokens the tree is clipped: a budget it cannot tell is what the last one got
            seen, last = [], 0
            for k in BUDGETS:
                a = outcomes[0].accepted_within(k)
                last = last if a is None else a
                seen.append(last)
            trace[-1].append(seen)

    engine.scheduler.governor.record = on_step
    for i, p in enumerate(prompts):
        trace.append([])
        drive(engine, {str(i): (p, SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=i))})
    args.out.write_text(json.dumps({"drafter": args.drafter, "temperature": args.temperature,
                                    "budgets": BUDGETS, "requests": trace}) + "\n")
    print(f"{len(trace)} requests, {sum(map(len, trace))} steps -> {args.out}")


class Text:
    """One request's trace: acceptance by budget at the text positions where recorded steps began."""

    def __init__(self, steps: list[list[int]]):
        self.steps, self.starts, pos = steps, [], 0
        for accepted in steps:
            self.starts.append(pos)
            pos += 1 + accepted[-1]
        self.length = pos

    def row(self, position: int) -> list[int]:
        """Accepted drafts per budget (in BUDGETS order) of the recorded step covering `position`."""
        return self.steps[bisect.bisect_right(self.starts, position) - 1]

    def accepted(self, position: int, budget: int) -> int:
        return self.row(position)[BUDGETS.index(budget)] if budget else 0


def outcome(budget: int, accepted: list[int]) -> DraftOutcome:
    """A budget-`budget` tree whose accepted path reproduces `accepted` (per budget) for every k <= budget."""
    path, have, low = [], 0, 0
    for k, a in zip(BUDGETS, accepted):
        if k > budget:
            break
        path += range(low + 1, low + 1 + a - have)
        have, low = max(have, a), k
    return DraftOutcome(budget, budget, path)


def simulate_once(texts: list[Text], policy, cost: dict[int, float], rng: random.Random, noise: float,
                  catch_up: float, catch_up_window: int, passes: int, governor_args: dict) -> float:
    """Tokens per second of one replay; `policy` is a fixed budget or "governor"."""
    gov = SpeculationGovernor(BUDGETS, **governor_args) if policy == "governor" else None
    seconds = tokens = 0.0
    speed, burst, previous, plain_run = 1.0, 0, 0, 0
    for _ in range(passes):
        for text in texts:
            pos = 0
            while pos < text.length:
                x = gov.choose(1, max(BUDGETS)).budget if gov else policy  # one drafter tier
                accepted = text.row(pos)
                speed = min(1.4, max(0.7, speed * math.exp(rng.gauss(0, 0.01))))
                if burst <= 0 and rng.random() < 0.002:
                    burst = rng.randint(100, 600)  # another process takes the CPU for a while
                burst -= 1
                f = speed * (1.6 if burst > 0 else 1.0) * math.exp(rng.gauss(0, noise))
                sec = cost[x] * f * (1.2 if x != previous else 1.0)  # caches refill after a switch
                if x and plain_run:
                    sec += catch_up * cost[0] * min(plain_run, catch_up_window) * f
                plain_run, previous = (plain_run + 1 if x == 0 else 0), x
                if gov:
                    gov.record(1, x, sec, [outcome(x, accepted)] if x else [], max(BUDGETS))
                n = min(1 + (accepted[BUDGETS.index(x)] if x else 0), text.length - pos)
                seconds, tokens, pos = seconds + sec, tokens + n, pos + n
    return tokens / seconds


def simulate(args: argparse.Namespace) -> None:
    data = json.loads(args.trace.read_text())
    texts = [Text(steps) for steps in data["requests"] if steps]
    cost = {int(k): float(v) / 1000 for k, v in (kv.split(":") for kv in args.cost.split(","))}
    if set(cost) != {0, *BUDGETS}:
        raise SystemExit(f"--cost needs a step time in ms for budgets 0,{','.join(map(str, BUDGETS))}")
    governor_args = {"explore_every": 32} | {k: float(v) for k, v in (kv.split("=") for kv in args.set)}
    print(f"trace: {args.trace} ({data['drafter']}, temperature {data['temperature']}, {len(texts)} requests); "
          f"governor {governor_args}")

    def replay(policy) -> list[float]:
        return [simulate_once(texts, policy, cost, random.Random(s), args.noise, args.catch_up, args.catch_up_window,
                              args.passes, governor_args) for s in range(args.seeds)]

    plain = replay(0)
    for policy in (*BUDGETS, "governor"):
        r = [a / b for a, b in zip(replay(policy), plain)]
        print(f"{str(policy):>9s}  x{sum(r) / len(r):.3f} plain  (seeds: min {min(r):.3f}, max {max(r):.3f})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="acceptance by budget, per step, with the largest tree always")
    r.add_argument("--model", default="models/demo-llama")
    r.add_argument("--drafter", default="models/demo-llama-ctc+ngram")
    r.add_argument("--prompts", type=Path, default=Path("../shared/data/eval_prompts.jsonl"))
    r.add_argument("--source", default="gsm8k")
    r.add_argument("--num-prompts", type=int, default=40)
    r.add_argument("--max-tokens", type=int, default=256)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", type=Path, required=True)
    r.set_defaults(fn=record)
    s = sub.add_parser("simulate", help="replay a trace: fixed budgets and the governor, relative to plain")
    s.add_argument("trace", type=Path)
    s.add_argument("--cost", default="0:3.15,2:5.96,4:6.6,8:7.45,16:10.79",
                   help="step time in ms per budget (default: CTC+lookup, demo model, 1 thread, 2026-12-02)")
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a SpeculationGovernor argument (revert_steps, margin, explore_share, ...)")
    s.add_argument("--noise", type=float, default=0.08, help="per-step lognormal cost noise (sigma)")
    s.add_argument("--catch-up", type=float, default=0.02,
                   help="drafter catch-up cost per skipped token, in plain steps")
    s.add_argument("--catch-up-window", type=int, default=48, help="skipped tokens a drafter catches up on (ctc.py)")
    s.add_argument("--passes", type=int, default=2, help="times through the trace")
    s.add_argument("--seeds", type=int, default=12)
    s.set_defaults(fn=simulate)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
