"""The embedded demo model and its drafters: offline loading, answer quality, losslessness.

The demo model is what `ctc-serve` serves by default, so these tests use it the way a user would:
through transformers (offline), and through our engine with each shipped drafter, whose greedy
output must equal transformers' `generate` on held-out prompts.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from drafter.evaluate import load_prompts
from server.engine.factory import build_drafter
from server.runtime.loader import chat_prompt_ids, load_model
from tests.conftest import DEMO_MODEL, SHARED_DATA
from tests.test_engine import make_engine, run_all
from server.engine.types import SamplingParams

DRAFTERS = ["ngram"] + [str(p) for p in sorted(DEMO_MODEL.parent.glob("demo-llama-*")) if (p / "config.json").is_file()]
DRAFTERS += [d + "+ngram" for d in DRAFTERS[1:]]


@pytest.fixture(scope="module")
def hf_demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    return tok, model


@pytest.fixture(scope="module")
def prompts(hf_demo):
    tok, _ = hf_demo
    return load_prompts(tok, SHARED_DATA / "eval_prompts.jsonl", "gsm8k", limit=6)


@pytest.fixture(scope="module")
def hf_references(hf_demo, prompts) -> list[list[int]]:
    """transformers' greedy 96 tokens for each prompt: computed once, compared with every drafter."""
    tok, model = hf_demo
    return [hf_greedy(model, p, 96, tok.eos_token_id) for p in prompts]


def hf_greedy(model, prompt: list[int], n: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)
    return out[0, len(prompt) :].tolist()


def test_loads_offline_with_transformers_and_has_a_chat_template(hf_demo):
    tok, model = hf_demo
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "What is 2 + 3?"}])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert 4e6 < sum(p.numel() for p in model.parameters()) < 10e6
    size = sum(f.stat().st_size for f in DEMO_MODEL.iterdir())
    assert size < 40 * 2**20


def test_greedy_answers_read_like_step_by_step_answers(hf_demo, prompts):
    tok, model = hf_demo
    for prompt in prompts[:3]:
        out = hf_greedy(model, prompt, 160, tok.eos_token_id)
        text = tok.decode(out, skip_special_tokens=True)
        words = text.split()
        assert len(words) >= 15, text
        assert len(set(words)) / len(words) > 0.3, f"degenerate, repetitive answer: {text!r}"
        assert any(ch.isdigit() for ch in text), f"no arithmetic at all: {text!r}"


@pytest.mark.parametrize("drafter_spec", DRAFTERS)
def test_engine_with_shipped_drafters_equals_transformers_generate(hf_demo, prompts, hf_references, drafter_spec):
    tok, _ = hf_demo
    ours = load_model(DEMO_MODEL, dtype="float32", device="cpu")
    drafter = build_drafter(drafter_spec, ours, max_slots=4, max_len=512)
    engine = make_engine(ours, drafter, max_len=512, batch=4)
    engine.tokenizer = tok
    engine.eos_ids = {tok.eos_token_id}
    params = SamplingParams(max_tokens=96, temperature=0)
    out = run_all(engine, {str(i): (p, params) for i, p in enumerate(prompts)})
    for i in range(len(prompts)):
        assert out[str(i)]["tokens"] == hf_references[i], f"prompt {i}"
        assert out[str(i)]["text"] == tok.decode(out[str(i)]["tokens"], skip_special_tokens=True)
    assert sum(o["accepted"] for o in out.values()) > 0, "the drafter never helped"


def test_model_card_records_heldout_loss():
    report = json.loads((DEMO_MODEL / "training_report.json").read_text())
    assert report["heldout_loss"] > 0
    assert "held-out" in (DEMO_MODEL / "README.md").read_text().lower()


def build_script():
    """models/build_demo_model.py, imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_demo_model", DEMO_MODEL.parent / "build_demo_model.py")
    build = importlib.util.module_from_spec(spec)
    sys.modules["build_demo_model"] = build  # its dataclasses look their module up
    spec.loader.exec_module(build)
    return build


def test_the_build_script_writes_the_shipped_chat_template_and_tools_card():
    """Rebuilding the model must not lose the tool format: the script holds the shipped text."""
    build = build_script()
    assert (DEMO_MODEL / "chat_template.jinja").read_text() == build.CHAT_TEMPLATE
    assert (DEMO_MODEL / "README.md").read_text().endswith(build.TOOLS_CARD)


def test_unlikelihood_loss_penalises_earlier_tokens_except_the_target():
    import math

    build = build_script()
    ids = torch.tensor([[5, 6, 5, 7]])
    labels = torch.tensor([[-100, 6, 5, 7]])  # position 0 (a prompt token) is not trained
    # Uniform predictions over 10 tokens. Position 0 predicts 6 with {5} seen before; 1 predicts 5
    # with {5, 6} seen, minus the target 5; 2 predicts 7 with {5, 6} seen: 4 negatives, 3 targets.
    loss = build.unlikelihood_loss(torch.zeros(1, 4, 10), ids, labels)
    assert loss.item() == pytest.approx(-math.log(0.9) * 4 / 3)
    # A model sure of the target gets no penalty.
    sure = torch.full((1, 4, 10), -30.0)
    sure[0, 0, 6] = sure[0, 1, 5] = sure[0, 2, 7] = 30.0
    assert build.unlikelihood_loss(sure, ids, labels).item() < 1e-6
