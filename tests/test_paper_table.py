"""MT-bench's two turns (drafter/evaluate.py) and `make paper-table`'s smoke run (bench/paper_table.py)."""

from __future__ import annotations

import math

import pytest

from bench import paper_table
from drafter.evaluate import acceptance, answer_questions, conversation_prompt, load_prompts, load_questions, run_requests
from drafter.ngram import NgramDrafter
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.types import SamplingParams
from server.runtime.loader import load_model, load_tokenizer
from tests.conftest import DEMO_MODEL, SHARED_DATA

PROMPTS = SHARED_DATA / "eval_prompts.jsonl"


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_MODEL, dtype="float32", device="cpu"), load_tokenizer(DEMO_MODEL)


def test_mt_bench_rows_have_two_turns_and_a_category():
    rows = load_questions(PROMPTS, "mt_bench")
    assert len(rows) == 24 and all(len(r["turns"]) == 2 for r in rows)
    assert len({r["category"] for r in rows}) == 8
    assert {r["category"] for r in load_questions(PROMPTS, "gsm8k", 3)} == {"gsm8k"}


def test_second_turn_prompt_holds_the_models_own_first_answer(demo, one_thread):
    model, tok = demo
    q = load_questions(PROMPTS, "mt_bench", 1)[0]
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=1024))
    (runs,) = answer_questions(engine, tok, [q], max_tokens=12, max_model_len=1024)
    assert len(runs) == 2 and all(r.tokens for r in runs)
    first = tok.decode(runs[0].tokens, skip_special_tokens=True)
    prompt = conversation_prompt(tok, q["turns"], [first])
    text = tok.decode(prompt)
    assert q["turns"][0] in text and first.strip() in text and text.rindex(q["turns"][1]) > text.index(first.strip())
    # The second answer is the model's answer to exactly that prompt.
    again = run_requests(LLMEngine(model, tok, EngineConfig(max_model_len=1024)), {"x": prompt},
                         SamplingParams(max_tokens=12, temperature=0))["x"]
    assert again.tokens == runs[1].tokens


def test_acceptance_counts_steps_by_tokens_emitted(demo, one_thread):
    """`ctc-drafter eval`'s figures: tau is the mean of the per-step histogram, which sums to 1 over
    the decode steps and never exceeds the deepest draft + the bonus token."""
    model, tok = demo
    prompts = load_prompts(tok, PROMPTS, "gsm8k", limit=2)
    r = acceptance(model, tok, NgramDrafter(max_depth=3), prompts, max_tokens=48, tree_nodes=8, batch=2)
    hist = r["tokens_per_step"]
    assert math.isclose(sum(hist.values()), 1.0)
    assert min(hist) == 1 and 1 < max(hist) <= 3 + 1  # lookup drafted somewhere, never past its depth
    assert math.isclose(sum(n * share for n, share in hist.items()), r["tau"])
    assert sum(len(o) for o in r["outputs"]) == r["generated_tokens"]


def test_spread_covers_every_category_first():
    qs = [{"id": i, "category": c} for i, c in enumerate("aaabbc")]
    assert [q["id"] for q in paper_table.spread(qs, 4)] == [0, 3, 5, 1]


def test_paper_table_smoke_run_has_every_row_and_no_mismatch(tmp_path, one_thread):
    res = paper_table.main(["--smoke", "--out", str(tmp_path / "t")])
    labels = [paper_table.PLAIN, paper_table.CONTROL]
    labels += [f"{name}{suffix}" for name in paper_table.DEFAULT_DRAFTERS for suffix in ("", " + lookup")]
    assert res["rows"] == labels
    for name in ("mt_bench", "gsm8k"):
        d = res["datasets"][name]
        assert d["mismatches"] == []
        assert list(d["rows"]) == labels
        for label, entry in d["rows"].items():
            f = entry["overall"]
            assert f["answers"] == f["questions"] * (2 if name == "mt_bench" else 1)
            assert math.isfinite(f["speedup_total"]) and f["speedup_total"] > 0
            assert math.isfinite(f["speedup_per_question"]) and f["speedup_per_question"] > 0
            if label not in labels[:2]:
                assert f["acceptance_length"] is None or f["acceptance_length"] >= 1
    assert res["datasets"]["mt_bench"]["categories"] == ["writing", "roleplay"]  # spread over categories
    assert res["datasets"]["mt_bench"]["rows"][paper_table.PLAIN]["overall"]["speedup_total"] == 1.0
    md = (tmp_path / "t.md").read_text()
    assert "| Hydra, 1,500 steps + lookup |" in md and "MT-bench by category" in md and "MISMATCH" not in md
