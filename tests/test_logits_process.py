"""Logits processing (logit_bias, presence/frequency/repetition penalties): the math against a
row-by-row reference, plain decoding against a step-by-step transformers loop, and speculative
decoding (CTC and n-gram drafters on the demo model) against plain decoding, token for token and
log-probability for log-probability.
"""

from __future__ import annotations

import functools

import pytest
import torch

from server.engine.engine import EngineConfig, LLMEngine
from server.engine.speculate import Acceptance
from server.engine.factory import build_drafter
from server.engine.grammar import Grammars
from server.engine.logits_process import LogitsProcessor
from server.engine.scheduler import SchedulerConfig
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams
from server.runtime.loader import chat_prompt_ids, load_model, load_tokenizer
from tests.conftest import DEMO_MODEL, make_hf_model
from tests.test_engine import NoisyOracleDrafter, make_engine, run_all

ACCEPTANCES = (Acceptance.PATH, Acceptance.ALL_NODES)  # the two walks must agree with plain decoding alike
DEMO_MODEL_CTC = DEMO_MODEL.parent / "demo-llama-ctc"
DRAFTERS = ["ngram", str(DEMO_MODEL_CTC)]


@functools.cache
def demo():
    """(tokenizer, our model) of the demo model, loaded once per session."""
    return load_tokenizer(DEMO_MODEL), load_model(DEMO_MODEL, dtype="float32", device="cpu")


def demo_engine(drafter_spec: str | None, batch: int = 8, max_len: int = 512,
                acceptance: Acceptance = Acceptance.PATH) -> LLMEngine:
    tok, model = demo()
    drafter = build_drafter(drafter_spec, model, max_slots=batch, max_len=max_len)
    cfg = EngineConfig(max_model_len=max_len, scheduler=SchedulerConfig(max_batch_size=batch, governor=False),
                       acceptance=acceptance)
    return LLMEngine(model, tok, cfg, drafter=drafter)


def demo_prompts(n: int) -> list[list[int]]:
    tok, _ = demo()
    questions = ["What is 12 + 7?", "Tom has 3 apples and buys 5 more. How many now?", "Describe a cat.",
                 "List three colours.", "What is 9 times 8?", "Write a short greeting."]
    return [chat_prompt_ids(tok, [{"role": "user", "content": questions[i % len(questions)]}]) for i in range(n)]


def fake_seq(prompt: list[int], output: list[int], params: SamplingParams) -> Sequence:
    return Sequence("r", prompt, params, detok=None, output_ids=list(output))


# -- the math ------------------------------------------------------------------------------------
def reference_row(logits: torch.Tensor, prompt: list[int], emitted: list[int], p: SamplingParams) -> torch.Tensor:
    """One row processed by the textbook definitions, token by token."""
    x = logits.clone()
    for tok, bias in p.logit_bias.items():
        x[tok] += bias
    for tok in set(prompt) | set(emitted):
        x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok in set(emitted):
        x[tok] -= p.frequency_penalty * emitted.count(tok) + p.presence_penalty
    return x


def test_process_matches_a_row_by_row_reference():
    g = torch.Generator().manual_seed(0)
    v = 50
    params = [SamplingParams(logit_bias={3: 5.0, 7: -100.0}), SamplingParams(presence_penalty=1.5),
              SamplingParams(frequency_penalty=-0.7), SamplingParams(repetition_penalty=1.8),
              SamplingParams(repetition_penalty=0.6, frequency_penalty=0.4, presence_penalty=-1.0, logit_bias={1: 2.0}),
              SamplingParams()]
    seqs, paths = [], []
    for i, p in enumerate(params * 2):  # each params twice: two rows of one sequence with different paths
        prompt = torch.randint(0, v, (6,), generator=g).tolist()
        output = torch.randint(0, v, (i % 5,), generator=g).tolist()
        seqs.append(fake_seq(prompt, output, p))
        paths.append(torch.randint(0, v, (i % 3,), generator=g).tolist())
    logits = torch.randn(len(seqs), v, generator=g) * 3
    out = LogitsProcessor(Grammars(None, v, [])).process(logits, seqs, paths)
    for i, (s, path) in enumerate(zip(seqs, paths)):
        want = reference_row(logits[i], s.prompt_ids, s.output_ids + path, s.params)
        assert torch.allclose(out[i], want, atol=1e-5), (i, s.params)
    assert not torch.equal(out[:5], logits[:5]), "every processed row changes"


def test_no_processing_is_a_no_op():
    logits = torch.randn(3, 20)
    seqs = [fake_seq([1, 2], [3, 3], SamplingParams()) for _ in range(3)]
    assert LogitsProcessor(Grammars(None, 20, [])).process(logits, seqs, [[], [4], [4, 5]]) is logits


# -- plain decoding against transformers ---------------------------------------------------------
PROCESSORS = {
    "logit_bias": dict(logit_bias={5: 4.0, 17: 3.0, 40: -100.0}),
    "presence": dict(presence_penalty=2.0),
    "frequency": dict(frequency_penalty=1.5),
    "repetition": dict(repetition_penalty=1.6),
    "all": dict(logit_bias={9: 2.5}, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, our model) of a random-init llama3."""
    hf = make_hf_model("llama3")
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path, safe_serialization=True)
    return hf, load_model(path, dtype="float32", device="cpu")


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_plain_decoding_matches_a_transformers_loop(tiny, name):
    """Greedy with a processor = argmax of reference_row over a transformers forward at each step;
    and it differs from unprocessed greedy decoding (the processor does something)."""
    hf, model = tiny
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, **PROCESSORS[name])
    out = run_all(make_engine(model), {"p": (prompt, params), "q": (prompt, SamplingParams(
        max_tokens=16, temperature=0, ignore_eos=True))})
    emitted: list[int] = []
    with torch.no_grad():
        for _ in range(16):
            logits = hf(torch.tensor([prompt + emitted])).logits[0, -1].float()
            emitted.append(int(reference_row(logits, prompt, emitted, params).argmax()))
    assert out["p"]["tokens"] == emitted
    assert out["p"]["tokens"] != out["q"]["tokens"]


# -- speculation is lossless ---------------------------------------------------------------------
def processor_requests(n_prompts: int = 3) -> dict[str, tuple[list[int], SamplingParams]]:
    reqs = {}
    for i, (name, kw) in enumerate(sorted(PROCESSORS.items())):
        for j, prompt in enumerate(demo_prompts(n_prompts)):
            greedy = dict(temperature=0, logprobs=2) if j % 2 == 0 else dict(temperature=0.8, seed=10 * i + j, logprobs=0)
            reqs[f"{name}-{j}"] = (prompt, SamplingParams(max_tokens=48, **greedy, **kw))
    return reqs


@pytest.mark.parametrize("acceptance", list(ACCEPTANCES))
@pytest.mark.parametrize("drafter_spec", DRAFTERS)
def test_speculative_equals_plain_with_processors(drafter_spec, acceptance):
    reqs = processor_requests()
    plain = run_all(demo_engine(None), reqs)
    spec = run_all(demo_engine(drafter_spec, acceptance=acceptance), reqs)
    for rid in reqs:
        assert spec[rid]["tokens"] == plain[rid]["tokens"], rid
        assert spec[rid]["finish"] == plain[rid]["finish"], rid
        for a, b in zip(spec[rid]["logprobs"], plain[rid]["logprobs"], strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4, rid
            assert [t for t, _ in a.top] == [t for t, _ in b.top], rid
    assert sum(o["accepted"] for o in spec.values()) > 0, "the drafter never helped: nothing was tested"


@pytest.mark.parametrize("acceptance", list(ACCEPTANCES))
def test_penalties_count_the_drafted_tokens_on_the_path(tiny, acceptance):
    """A noisy oracle drafts the plain run's own output: long accepted paths, whose later nodes
    are decided with penalties that must count the drafted tokens above them."""
    _, model = tiny
    g = torch.Generator().manual_seed(5)
    reqs = {f"r{i}": (torch.randint(0, 160, (8,), generator=g).tolist(),
                      SamplingParams(max_tokens=24, temperature=t, seed=i, ignore_eos=True, **kw))
            for i, (t, kw) in enumerate([(0, PROCESSORS["frequency"]), (0, PROCESSORS["presence"]),
                                         (0.9, PROCESSORS["repetition"]), (1.1, PROCESSORS["all"])])}
    plain = run_all(make_engine(model), reqs)
    refs = {rid: o["tokens"] for rid, o in plain.items()}
    spec = run_all(make_engine(model, NoisyOracleDrafter(refs, 160, seed=2), max_tree_nodes=6,
                           acceptance=acceptance.value), reqs)
    for rid in reqs:
        assert spec[rid]["tokens"] == plain[rid]["tokens"], rid
    assert sum(o["accepted"] for o in spec.values()) > 10

