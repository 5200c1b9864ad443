"""Acceptance length of a drafter on held-out prompts, measured through the real engine.

Greedy decoding (temperature 0), so the text is the base model's own and only the number of
verification steps depends on the drafter. Figures:
  tau      = generated tokens / decode steps: tokens per base forward (bonus included), over every
             step; the figure speed follows;
  tau_spec = 1 + accepted / drafted steps: the same over steps where the drafter proposed
             something (Prometheus' acceptance length; equals tau for drafters that always draft).
propose_share_of_verify = time in the drafter (its forward and candidate search) / time in the
base model's verification forwards, over the run.
All prompts run in one engine batch with a fixed tree budget per sequence (adaptive shrinking off),
which does not change greedy outputs or per-sequence acceptance, only wall time.
"""

from __future__ import annotations

import json
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


def acceptance(model, tokenizer, drafter, prompts: list[list[int]], max_tokens: int = 256,
               tree_nodes: int = 16, max_model_len: int = 1024, batch: int = 16) -> dict:
    sched = SchedulerConfig(max_batch_size=batch, max_tree_nodes=tree_nodes, spec_token_budget=tree_nodes * batch,
                            governor=False)  # never switch drafting off: measure the drafter
    engine = LLMEngine(model, tokenizer, EngineConfig(max_model_len=max_model_len, scheduler=sched), drafter=drafter)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p[: max_model_len - max_tokens], params)
    tokens = steps = drafted = accepted = draft_tokens = 0
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for d in engine.step():
            if not d.token_ids:
                continue
            if outputs[d.request_id]:  # the first delta comes from prefill, not a decode step
                steps += 1
                tokens += len(d.token_ids)
            outputs[d.request_id] += d.token_ids
            if d.speculated:
                drafted += 1
                accepted += d.num_accepted_tokens
                draft_tokens += d.num_draft_tokens
    ph = engine.phase_seconds
    return {
        "tau": tokens / max(steps, 1),
        # Draft cost: drafter time (forward + candidate search) over the base model's verify forward.
        "propose_share_of_verify": ph["propose"] / ph["verify"] if ph["verify"] else 0.0,
        "tau_spec": 1 + accepted / max(drafted, 1),
        "draft_tokens_per_step": draft_tokens / max(drafted, 1),
        "decode_steps": steps,
        "generated_tokens": tokens + len(prompts),
        "outputs": [outputs[str(i)] for i in range(len(prompts))],
    }
