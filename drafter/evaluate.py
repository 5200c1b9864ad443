"""Acceptance length of a drafter on held-out prompts, measured through the real engine.

Greedy decoding (temperature 0), so the text is the base model's own and only the number of
verification steps depends on the drafter. Figures:
  tau      = generated tokens / decode steps: tokens per base forward (bonus included), over every
             step; the figure speed follows;
  tau_spec = 1 + accepted / drafted steps: the same over steps where the drafter proposed
             something (Prometheus' acceptance length; equals tau for drafters that always draft);
  tokens_per_step = the share of steps that emitted 1, 2, ... tokens: a pile-up at the deepest
             draft the drafter can make says its drafts end too soon.
propose_share_of_verify = time in the drafter (its forward and candidate search) / time in the
base model's verification forwards, over the run.
All prompts run in one engine batch with a fixed tree budget per sequence (adaptive shrinking off),
which does not change greedy outputs or per-sequence acceptance, only wall time.

MT-bench as the CTC-drafter paper (and Medusa, Hydra, EAGLE) evaluate it: every question has two
user turns, and the second turn's prompt holds the model's OWN first answer (`conversation_prompt`),
so the second turn is measured on text the base model wrote, as a chat user would see it.
`answer_questions` runs the turns in order, `by_category` sums the figures per MT-bench category
and overall (GSM8K questions have one turn and the category "gsm8k").
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from server.engine.engine import EngineConfig, LLMEngine
from server.engine.scheduler import SchedulerConfig
from server.engine.types import SamplingParams
from server.runtime.loader import chat_prompt_ids

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "eval_prompts.jsonl"


def load_prompts(tokenizer, path: Path = DEFAULT_PROMPTS, source: str = "gsm8k", limit: int | None = None) -> list[list[int]]:
    rows = [json.loads(line) for line in Path(path).open()]
    rows = [r for r in rows if source in ("all", r["source"])][:limit]
    return [chat_prompt_ids(tokenizer, [{"role": "user", "content": r["turns"][0]}]) for r in rows]


def eval_engine(model, tokenizer, drafter, tree_nodes: int, max_model_len: int, batch: int) -> LLMEngine:
    """An engine that drafts at every step with a fixed tree budget: it measures the drafter."""
    sched = SchedulerConfig(max_batch_size=batch, max_tree_nodes=tree_nodes, spec_token_budget=tree_nodes * batch,
                            governor=False)  # never switch drafting off: measure the drafter
    return LLMEngine(model, tokenizer, EngineConfig(max_model_len=max_model_len, scheduler=sched), drafter=drafter)


def acceptance(model, tokenizer, drafter, prompts: list[list[int]], max_tokens: int = 256,
               tree_nodes: int = 16, max_model_len: int = 1024, batch: int = 16) -> dict:
    engine = eval_engine(model, tokenizer, drafter, tree_nodes, max_model_len, batch)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p[: max_model_len - max_tokens], params)
    drafted = accepted = draft_tokens = 0
    per_step: Counter[int] = Counter()  # tokens a decode step emitted -> steps
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for d in engine.step():
            if not d.token_ids:
                continue
            if outputs[d.request_id]:  # the first delta comes from prefill, not a decode step
                per_step[len(d.token_ids)] += 1
            outputs[d.request_id] += d.token_ids
            if d.speculated:
                drafted += 1
                accepted += d.num_accepted_tokens
                draft_tokens += d.num_draft_tokens
    steps = per_step.total()
    tokens = sum(n * count for n, count in per_step.items())
    ph = engine.phase_seconds
    return {
        "tau": tokens / max(steps, 1),
        # Draft cost: drafter time (forward + candidate search) over the base model's verify forward
        # and acceptance.
        "propose_share_of_verify": ph["propose"] / (ph["verify"] + ph["accept"]) if ph["verify"] else 0.0,
        "tau_spec": 1 + accepted / max(drafted, 1),
        "draft_tokens_per_step": draft_tokens / max(drafted, 1),
        "decode_steps": steps,
        # share of decode steps that emitted n tokens (bonus included): where the drafts end
        "tokens_per_step": {n: per_step[n] / max(steps, 1) for n in sorted(per_step)},
        "generated_tokens": tokens + len(prompts),
        "outputs": [outputs[str(i)] for i in range(len(prompts))],
    }


# ----------------------------------------------------------------------------- multi-turn questions


@dataclass
class TurnRun:
    """One answer to one user turn: its tokens, decode steps and speculation counters, and its
    time from submission to the last token (meaningful when requests run one at a time)."""

    tokens: list[int] = field(default_factory=list)
    steps: int = 0  # decode steps after the first token (which prefill produced)
    spec_steps: int = 0  # of which drafted at least one token
    draft_tokens: int = 0
    accepted_tokens: int = 0  # bonus token excluded
    wall_s: float = 0.0


def load_questions(path: Path = DEFAULT_PROMPTS, source: str = "all", limit: int | None = None) -> list[dict]:
    """Rows of eval_prompts.jsonl ({"id", "source", "category"?, "turns"}) of `source` (or all),
    the first `limit` of them; a row without a category gets its source as one."""
    rows = [json.loads(line) for line in Path(path).open()]
    rows = [{**r, "category": r.get("category") or r["source"]} for r in rows if source in ("all", r["source"])]
    return rows[:limit]


def conversation_prompt(tokenizer, turns: list[str], answers: list[str]) -> list[int]:
    """The prompt of user turn len(answers): the user turns so far, each but the last followed by
    the model's own answer to it."""
    messages = []
    for user, answer in zip(turns, answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": turns[len(answers)]})
    return chat_prompt_ids(tokenizer, messages)


def run_requests(engine: LLMEngine, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, TurnRun]:
    """Submit `prompts` at once and step `engine` until idle; one TurnRun per request."""
    runs = {rid: TurnRun() for rid in prompts}
    t0 = time.perf_counter()
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    while engine.has_work():
        for d in engine.step():
            if d.error:
                raise RuntimeError(f"request {d.request_id} failed: {d.error}")
            r = runs[d.request_id]
            if d.token_ids and r.tokens:  # the first delta comes from prefill, not a decode step
                r.steps += 1
            r.tokens += d.token_ids
            r.spec_steps += d.speculated
            r.draft_tokens += d.num_draft_tokens
            r.accepted_tokens += d.num_accepted_tokens
            if d.finished:
                r.wall_s = time.perf_counter() - t0
    return runs


def answer_questions(engine: LLMEngine, tokenizer, questions: list[dict], max_tokens: int,
                     max_model_len: int) -> list[list[TurnRun]]:
    """Every turn of every question, greedy, turn k of all questions in one batch (the engine's
    batch size decides how many run at once; batch 1 times each answer alone).
    Returns runs[question][turn]."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    answers: list[list[str]] = [[] for _ in questions]
    runs: list[list[TurnRun]] = [[] for _ in questions]
    for k in range(max(len(q["turns"]) for q in questions)):
        ask = [i for i, q in enumerate(questions) if len(q["turns"]) > k]
        prompts = {str(i): conversation_prompt(tokenizer, questions[i]["turns"], answers[i]) for i in ask}
        prompts = {i: p[-(max_model_len - max_tokens):] for i, p in prompts.items()}  # keep the latest turns
        for rid, run in run_requests(engine, prompts, params).items():
            runs[int(rid)].append(run)
            answers[int(rid)].append(tokenizer.decode(run.tokens, skip_special_tokens=True))
    return runs


def summarize_turns(runs: list[TurnRun]) -> dict:
    """Acceptance figures over a set of answers (see the module docstring for tau and tau_spec)."""
    steps, spec = sum(r.steps for r in runs), sum(r.spec_steps for r in runs)
    decoded = sum(max(len(r.tokens) - 1, 0) for r in runs)  # after the prefill's first token
    return {
        "answers": len(runs), "generated_tokens": sum(len(r.tokens) for r in runs), "decode_steps": steps,
        "tau": decoded / steps if steps else None,
        "tau_spec": 1 + sum(r.accepted_tokens for r in runs) / spec if spec else None,
        "wall_s": sum(r.wall_s for r in runs),
    }


def by_category(questions: list[dict], runs: list[list[TurnRun]]) -> dict[str, dict]:
    """`summarize_turns` per category (all turns of its questions), and "overall"."""
    groups: dict[str, list[TurnRun]] = {}
    for q, rs in zip(questions, runs):
        groups.setdefault(q["category"], []).extend(rs)
    out = {cat: summarize_turns(rs) for cat, rs in groups.items()}
    out["overall"] = summarize_turns([r for rs in runs for r in rs])
    return out


def conversation_acceptance(model, tokenizer, drafter, questions: list[dict], max_tokens: int = 256,
                            tree_nodes: int = 16, max_model_len: int = 1024, batch: int = 16) -> dict:
    """`acceptance` over every turn of `questions`: figures per category and overall, and the
    outputs (per question, its turns' tokens concatenated) to compare with plain decoding."""
    engine = eval_engine(model, tokenizer, drafter, tree_nodes, max_model_len, batch)
    runs = answer_questions(engine, tokenizer, questions, max_tokens, max_model_len)
    return {"categories": by_category(questions, runs), "outputs": [[t for r in rs for t in r.tokens] for rs in runs]}
