"""The engine end to end on random-init models: lossless against transformers, stops, batching.

The lossless tests run on both acceptance paths (speculate.Acceptance): the path walk the CPU
uses and the all-nodes walk an accelerator uses; both must give exactly plain decoding's output.
A `NoisyOracleDrafter` (test-only) proposes trees built from the reference continuation with
some tokens corrupted and some siblings added, so every step exercises acceptance, rejection at
every depth and sibling choice; lossless means the engine's output is still exactly greedy.
"""

from __future__ import annotations

import random

import pytest
import torch

from drafter.base import Drafter, ProposeRequest
from drafter.ngram import NgramDrafter
from drafter.tree import build_trie
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.scheduler import SchedulerConfig
from server.engine.speculate import Acceptance
from server.engine.types import EngineError, FinishReason, SamplingParams
from server.runtime.loader import load_model


class NoisyOracleDrafter(Drafter):
    """Knows each request's reference continuation; proposes it with errors, plus a decoy branch."""

    name = "noisy-oracle"

    def __init__(self, references: dict[str, list[int]], vocab: int, seed: int = 0):
        self.refs, self.vocab, self.rng = references, vocab, random.Random(seed)
        self.seen: dict[str, int] = {}

    def start(self, seq_id, prompt_ids):
        self.seen[seq_id] = -len(prompt_ids)  # counts committed tokens past the prompt

    def observe(self, seq_id, token_ids, hidden=None):
        self.seen[seq_id] += len(token_ids)

    def propose(self, requests: list[ProposeRequest]):
        trees = []
        for r in requests:
            ref = self.refs[r.seq_id]
            done = self.seen[r.seq_id] + 1  # output tokens emitted so far (pending included)
            good = ref[done : done + r.budget]
            bad = [t if self.rng.random() < 0.7 else self.rng.randrange(self.vocab) for t in good]
            decoy = [self.rng.randrange(self.vocab) for _ in good[:2]]
            trees.append(build_trie(r.pending_token, [bad, decoy], [0.0, -1.0], max_nodes=r.budget))
        return trees


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


class _NoTokenizer:
    """Random-init models have no tokenizer; decode ids as text so stop strings can be tested."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


ACCEPTANCE = ["path", "all-nodes"]  # speculate.Acceptance values (auto is one of them, by device)


def make_engine(model, drafter=None, max_len=96, batch=4, acceptance="auto", **sched):
    # The throughput governor makes speculation depend on timings; tests that count drafts want
    # every step to speculate. Outputs never depend on it (test_greedy_is_lossless... runs it on).
    sched = {"governor": False, **sched}
    cfg = EngineConfig(max_model_len=max_len, scheduler=SchedulerConfig(max_batch_size=batch, **sched),
                       acceptance=Acceptance(acceptance))
    return LLMEngine(model, _NoTokenizer(), cfg, drafter=drafter)


def run_all(engine, requests: dict[str, tuple[list[int], SamplingParams]], max_steps=2000):
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    out = {rid: {"tokens": [], "text": "", "finish": None, "drafts": 0, "accepted": 0, "logprobs": None}
           for rid in requests}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for d in engine.step():
            o = out[d.request_id]
            o["tokens"] += d.token_ids
            o["text"] += d.text
            o["drafts"] += d.num_draft_tokens
            o["accepted"] += d.num_accepted_tokens
            if d.logprobs is not None:
                assert len(d.logprobs) == len(d.token_ids)
                o["logprobs"] = (o["logprobs"] or []) + d.logprobs
            if d.finished:
                o["finish"] = d.finish_reason
    assert not engine.has_work(), "engine did not finish"
    return out


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    family, hf, path = hf_checkpoint
    return hf, load_model(path, dtype="float32", device="cpu")


def prompts_for(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 160, (int(L),), generator=g).tolist() for L in torch.randint(2, 30, (n,), generator=g)]


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("drafter_kind", ["none", "ngram", "oracle"])
@pytest.mark.parametrize("acceptance", ACCEPTANCE)
def test_greedy_is_lossless_against_transformers(models, drafter_kind, acceptance):
    hf, model = models
    prompts = prompts_for(6, seed=11)
    refs = {f"r{i}": hf_greedy(hf, p, 24) for i, p in enumerate(prompts)}
    drafter = {"none": None, "ngram": NgramDrafter(), "oracle": NoisyOracleDrafter(refs, 160)}[drafter_kind]
    # batch 4 < 6 requests: the last two wait for slots, so admission mid-flight is exercised;
    # a small prefill chunk splits prompts across steps.
    engine = make_engine(model, drafter, batch=4, prefill_chunk=16, max_tree_nodes=6,
                         governor=drafter_kind == "ngram", acceptance=acceptance)
    out = run_all(engine, {rid: (p, GREEDY) for rid, p in zip(refs, prompts)})
    for rid, ref in refs.items():
        assert out[rid]["tokens"] == ref, rid
        assert out[rid]["finish"] is FinishReason.LENGTH
    if drafter_kind == "oracle":
        total_acc = sum(o["accepted"] for o in out.values())
        total_draft = sum(o["drafts"] for o in out.values())
        assert 0 < total_acc < total_draft, "the oracle should be partly right and partly wrong"
    assert engine.cache.num_used_slots == 0


def test_the_path_walks_look_ahead_changes_calls_not_tokens(models, monkeypatch):
    """EngineConfig.path_ahead reaches the path walk: looking further down the likeliest branch
    makes fewer LM-head calls over more rows each, and the tokens stay transformers' own."""
    hf, model = models
    prompts = prompts_for(4, seed=5)
    refs = {f"r{i}": hf_greedy(hf, p, 24) for i, p in enumerate(prompts)}
    calls: list[int] = []
    real = type(model).compute_logits
    monkeypatch.setattr(type(model), "compute_logits", lambda self, h: calls.append(len(h)) or real(self, h))
    seen = {}
    for ahead in (0, 3):
        calls.clear()
        cfg = EngineConfig(max_model_len=96, scheduler=SchedulerConfig(max_batch_size=4, governor=False,
                                                                       max_tree_nodes=8),
                           acceptance=Acceptance.PATH, path_ahead=ahead)
        engine = LLMEngine(model, _NoTokenizer(), cfg, drafter=NoisyOracleDrafter(refs, 160))
        out = run_all(engine, {rid: (p, GREEDY) for rid, p in zip(refs, prompts)})
        assert {rid: o["tokens"] for rid, o in out.items()} == refs
        seen[ahead] = (len(calls), max(calls))
    assert seen[3][0] < seen[0][0] and seen[3][1] > seen[0][1], seen
    with pytest.raises(ValueError, match="path_ahead"):
        EngineConfig(path_ahead=-1)


@pytest.mark.parametrize("acceptance", ACCEPTANCE)
def test_seeded_sampling_is_identical_with_and_without_speculation(models, acceptance):
    _, model = models
    prompts = prompts_for(4, seed=12)
    params = [SamplingParams(max_tokens=20, temperature=t, top_p=p, top_k=k, seed=100 + i, ignore_eos=True)
              for i, (t, p, k) in enumerate([(0.7, 1.0, None), (1.0, 0.9, None), (1.3, 1.0, 20), (0.5, 0.8, 10)])]
    reqs = {f"s{i}": (p, sp) for i, (p, sp) in enumerate(zip(prompts, params))}
    plain = run_all(make_engine(model, None, acceptance=acceptance), reqs)
    # Draft with the plain run's own outputs as the (noisy) reference: long acceptances happen.
    refs = {rid: o["tokens"] for rid, o in plain.items()}
    spec = run_all(make_engine(model, NoisyOracleDrafter(refs, 160, seed=3), max_tree_nodes=5, acceptance=acceptance),
                   reqs)
    again = run_all(make_engine(model, None, batch=1, acceptance=acceptance), reqs)
    for rid in reqs:
        assert spec[rid]["tokens"] == plain[rid]["tokens"] == again[rid]["tokens"], rid
    assert sum(o["accepted"] for o in spec.values()) > 0


@pytest.mark.parametrize("acceptance", ACCEPTANCE)
def test_logprobs_are_the_base_models_with_and_without_speculation(models, acceptance):
    hf, model = models
    prompts = prompts_for(3, seed=14)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True, logprobs=0),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)]
    reqs = {f"l{i}": (p, sp) for i, (p, sp) in enumerate(zip(prompts, params))}
    plain = run_all(make_engine(model, None, acceptance=acceptance), reqs)
    refs = {rid: o["tokens"] for rid, o in plain.items()}
    spec = run_all(make_engine(model, NoisyOracleDrafter(refs, 160, seed=4), max_tree_nodes=5, acceptance=acceptance),
                   reqs)
    assert sum(o["accepted"] for o in spec.values()) > 0
    for rid, (prompt, sp) in reqs.items():
        tokens = plain[rid]["tokens"]
        with torch.no_grad():  # the reference: one transformers forward over prompt + output
            logits = hf(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
        ref = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
        for run in (plain, spec):
            lps = run[rid]["logprobs"]
            assert run[rid]["tokens"] == tokens
            if sp.logprobs is None:
                assert lps is None
                continue
            assert [lp.token_id for lp in lps] == tokens
            assert torch.allclose(torch.tensor([lp.logprob for lp in lps]), ref[range(len(tokens)), tokens], atol=1e-4)
            for lp, row in zip(lps, ref):
                top = row.topk(sp.logprobs)
                assert [t for t, _ in lp.top] == top.indices.tolist()
                assert torch.allclose(torch.tensor([v for _, v in lp.top]), top.values, atol=1e-4)


def test_different_seeds_give_different_samples(models):
    _, model = models
    prompt = prompts_for(1, seed=13)[0]
    reqs = {f"s{i}": (prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=i, ignore_eos=True)) for i in range(4)}
    out = run_all(make_engine(model, None), reqs)
    assert len({tuple(o["tokens"]) for o in out.values()}) > 1


@pytest.mark.parametrize("acceptance", ACCEPTANCE)
def test_stops_eos_max_tokens_stop_token_and_stop_string(models, acceptance):
    hf, model = models
    prompt = prompts_for(1, seed=14)[0]
    ref = hf_greedy(hf, prompt, 30)
    eos = ref[5]
    k = ref.index(eos)  # first occurrence (may be before index 5)
    engine = make_engine(model, NgramDrafter(), acceptance=acceptance)
    engine.eos_ids = {eos}
    stop_text = "".join(f"<{i}>" for i in ref[8:10])
    reqs = {
        "eos": (prompt, SamplingParams(max_tokens=30, temperature=0)),
        "len": (prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)),
        "stoptok": (prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[ref[7]])),
        "stopstr": (prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop_text])),
    }
    out = run_all(engine, reqs)
    assert out["eos"]["tokens"] == ref[: k + 1] and out["eos"]["finish"] is FinishReason.STOP
    assert out["len"]["tokens"] == ref[:3] and out["len"]["finish"] is FinishReason.LENGTH
    j = ref.index(ref[7])
    assert out["stoptok"]["tokens"] == ref[: j + 1] and out["stoptok"]["finish"] is FinishReason.STOP
    full = "".join(f"<{i}>" for i in ref)
    assert out["stopstr"]["finish"] is FinishReason.STOP
    assert out["stopstr"]["text"] == full[: full.index(stop_text)]


def test_context_limit_stops_with_length(models):
    hf, model = models
    prompt = prompts_for(1, seed=15)[0][:20]
    engine = make_engine(model, NgramDrafter(), max_len=len(prompt) + 7)
    out = run_all(engine, {"c": (prompt, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))})
    assert out["c"]["finish"] is FinishReason.LENGTH
    assert out["c"]["tokens"] == hf_greedy(hf, prompt, 7)


def test_abort_frees_the_slot_and_others_continue(models):
    hf, model = models
    prompts = prompts_for(2, seed=16)
    engine = make_engine(model, None, batch=2)
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("b", prompts[1], GREEDY)
    engine.step()
    engine.step()
    engine.abort_request("a")
    assert engine.cache.num_used_slots == 1
    got, finish = [], {}
    while engine.has_work():
        for d in engine.step():
            if d.request_id == "b":
                got += d.token_ids
            if d.finished:
                finish[d.request_id] = d.finish_reason
    assert finish == {"a": FinishReason.ABORT, "b": FinishReason.LENGTH}
    assert engine.cache.num_used_slots == 0


def test_bad_requests_are_refused(models):
    _, model = models
    engine = make_engine(model, None, max_len=32)
    with pytest.raises(EngineError, match="context"):
        engine.add_request("x", list(range(40)), GREEDY)
    with pytest.raises(EngineError, match="empty"):
        engine.add_request("y", [], GREEDY)
    with pytest.raises(EngineError, match="token ids"):
        engine.add_request("z", [5, 100000], GREEDY)
    with pytest.raises(EngineError):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize("acceptance", ACCEPTANCE)
def test_a_failing_request_does_not_stop_the_others(models, monkeypatch, acceptance):
    hf, model = models
    prompts = prompts_for(2, seed=17)
    engine = make_engine(model, None, acceptance=acceptance)
    import server.engine.speculate as spec

    real = spec.decide_tokens

    def flaky(logits, params, seeds, positions):
        if any(p.temperature == 0.123 for p in params):
            raise RuntimeError("boom")
        return real(logits, params, seeds, positions)

    monkeypatch.setattr(spec, "decide_tokens", flaky)
    bad = SamplingParams(max_tokens=8, temperature=0.123, seed=1)
    out = run_all(engine, {"bad": (prompts[0], bad), "good": (prompts[1], GREEDY)})
    assert out["bad"]["finish"] is FinishReason.ERROR
    assert out["good"]["tokens"] == hf_greedy(hf, prompts[1], 24)
    assert engine.cache.num_used_slots == 0


class _BrokenDrafter(NgramDrafter):
    def propose(self, requests):
        raise RuntimeError("drafter bug")


def test_a_failing_drafter_degrades_to_plain_decoding(models):
    hf, model = models
    prompts = prompts_for(2, seed=18)
    out = run_all(make_engine(model, _BrokenDrafter()), {f"r{i}": (p, GREEDY) for i, p in enumerate(prompts)})
    for i, p in enumerate(prompts):
        assert out[f"r{i}"]["tokens"] == hf_greedy(hf, p, 24)
        assert out[f"r{i}"]["finish"] is FinishReason.LENGTH



def test_prefill_chunks_sized_by_measured_costs_stay_lossless(models):
    """Chunks that follow measured step times (scheduler.PrefillBudget) vary from run to run; the
    outputs must not. The engine reports every step's time to the scheduler."""
    hf, model = models
    stream = prompts_for(1, seed=5)[0]
    long = ([t for p in prompts_for(4, seed=6) for t in p] * 4)[:100]
    refs = {"stream": hf_greedy(hf, stream, 24), "long": hf_greedy(hf, long, 4)}
    engine = make_engine(model, batch=2, max_len=160, prefill_chunk=64, min_prefill_chunk=2)
    got: dict[str, list[int]] = {"stream": [], "long": []}
    engine.add_request("stream", stream, GREEDY)
    for step in range(200):
        if step == 3:  # the stream decodes: the long prompt's chunks are sized to share its steps
            engine.add_request("long", long, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        if not engine.has_work():
            break
        for d in engine.step():
            got[d.request_id] += d.token_ids
    budget = engine.scheduler.prefill_budget
    assert budget.decode_s is not None and budget.token_s is not None
    assert got == refs
