"""n > 1 in the engine: n sequences from one prefill, each as n=1 with its own seed would decode.

On the demo model with its CTC drafter and prompt lookup (the drafter's state is forked with the
K/V: a CTC drafter that missed the shared prefix's hidden states would fail, and the guard would
quietly stop drafting, so the tests also check that the forks drafted).
"""

from __future__ import annotations

import pytest
import torch

from server.engine.engine import EngineConfig, LLMEngine
from server.engine.factory import build_drafter
from server.engine.scheduler import SchedulerConfig
from server.engine.sequence import Status
from server.engine.types import EngineError, FinishReason, SamplingParams
from server.runtime.kv_cache import KVCache
from server.runtime.loader import load_model, load_tokenizer, chat_prompt_ids
from server.settings import REPO_ROOT

DEMO = REPO_ROOT / "models" / "demo-llama"
DRAFTER = f"{REPO_ROOT / 'models' / 'demo-llama-ctc'}+ngram"
pytestmark = pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="no demo model")


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO, dtype="float32", device="cpu"), load_tokenizer(DEMO)


def make_engine(demo, drafter: str | None, batch: int = 4, prefill_chunk: int = 512) -> LLMEngine:
    model, tokenizer = demo
    sched = SchedulerConfig(max_batch_size=batch, governor=False, prefill_chunk=prefill_chunk)
    return LLMEngine(model, tokenizer, EngineConfig(max_model_len=256, scheduler=sched),
                     drafter=build_drafter(drafter, model, batch, 256))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[tuple[str, int], dict]:
    """Every choice's tokens, finish reason and draft counts, by (request id, index)."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    out: dict[tuple[str, int], dict] = {}
    for _ in range(2000):
        if not engine.has_work():
            break
        for d in engine.step():
            o = out.setdefault((d.request_id, d.index), {"tokens": [], "finish": None, "drafts": 0, "finals": 0})
            o["tokens"] += d.token_ids
            o["drafts"] += d.num_draft_tokens
            if d.finished:
                o["finish"], o["finals"] = d.finish_reason, o["finals"] + 1
    assert not engine.has_work()
    assert engine.cache.num_used_slots == 0 and not engine._seqs
    return out


def prompt(demo, text: str) -> list[int]:
    return chat_prompt_ids(demo[1], [{"role": "user", "content": text}])


@pytest.mark.parametrize("drafter", [None, DRAFTER])
def test_greedy_choices_are_identical_and_equal_to_one_choice(demo, drafter):
    ids = prompt(demo, "What is 12 times 4? Explain step by step.")
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    one = run(make_engine(demo, drafter), {"r": (ids, params)})[("r", 0)]
    three = run(make_engine(demo, drafter), {"r": (ids, SamplingParams(**{**vars(params), "n": 3}))})
    assert sorted(three) == [("r", 0), ("r", 1), ("r", 2)]
    for o in three.values():
        assert o["tokens"] == one["tokens"] and o["finish"] is FinishReason.LENGTH and o["finals"] == 1
    if drafter:  # every fork drafted: its drafter state was forked with the K/V
        assert all(o["drafts"] > 0 for o in three.values())


def test_seeded_choice_i_is_the_single_choice_with_seed_plus_i_with_and_without_speculation(demo):
    ids = prompt(demo, "Tell me about the sea.")
    base = dict(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    singles = {f"s{i}": (ids, SamplingParams(**{**base, "seed": 1234 + i})) for i in range(3)}
    expected = run(make_engine(demo, None), singles)
    grouped = SamplingParams(**base, n=3)
    for drafter in (None, DRAFTER):
        got = run(make_engine(demo, drafter), {"g": (ids, grouped)})
        for i in range(3):
            assert got[("g", i)]["tokens"] == expected[(f"s{i}", 0)]["tokens"], (drafter, i)
    assert len({tuple(o["tokens"]) for o in expected.values()}) == 3  # distinct seeds, distinct samples


def test_shared_prefill_in_chunks_and_one_token_prompts(demo):
    """A prompt longer than a prefill chunk shares all its chunks; a one-token prompt shares none."""
    long_ids = prompt(demo, "Count: " + "one two three four five six seven eight nine ten " * 3)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    one = run(make_engine(demo, DRAFTER), {"a": (long_ids, params), "b": ([5], params)})
    many = run(make_engine(demo, DRAFTER, prefill_chunk=16),
               {"a": (long_ids, SamplingParams(**{**vars(params), "n": 2})),
                "b": ([5], SamplingParams(**{**vars(params), "n": 2}))})
    for rid in ("a", "b"):
        assert many[(rid, 0)]["tokens"] == many[(rid, 1)]["tokens"] == one[(rid, 0)]["tokens"]


def test_a_group_waits_for_slots_for_all_its_sequences_and_abort_ends_every_choice(demo):
    engine = make_engine(demo, "ngram", batch=4)
    ids = prompt(demo, "hello")
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    engine.add_request("solo", ids, params)
    engine.add_request("group", ids, SamplingParams(**{**vars(params), "n": 4}))
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["solo"]  # 1 + 4 > 4 slots: it waits
    engine.abort_request("solo")
    finals = [d for d in engine.step() if d.finished]
    assert [(d.request_id, d.finish_reason) for d in finals] == [("solo", FinishReason.ABORT)]
    # admitted with its 3 forks, which wait while the first prefills the shared prefix
    assert [s.status for s in engine.scheduler.running] == [Status.PREFILL] + [Status.FORKED] * 3
    for _ in range(3):
        engine.step()
    engine.abort_request("group")
    finals = [d for d in engine.step() if d.finished]
    assert sorted(d.index for d in finals) == [0, 1, 2, 3]
    assert {d.finish_reason for d in finals} == {FinishReason.ABORT} and {d.request_id for d in finals} == {"group"}
    assert engine.cache.num_used_slots == 0 and not engine.has_work()


def test_aborting_while_the_forks_wait_ends_them_too(demo):
    engine = make_engine(demo, None, prefill_chunk=4)
    engine.add_request("g", prompt(demo, "a long enough prompt to take several chunks"),
                       SamplingParams(max_tokens=5, temperature=0, n=3))
    engine.step()
    assert [s.status for s in engine.scheduler.running] == [Status.PREFILL, Status.FORKED, Status.FORKED]
    engine.abort_request("g")
    finals = engine.step()
    assert sorted(d.index for d in finals if d.finished) == [0, 1, 2]
    assert engine.cache.num_used_slots == 0


def test_more_choices_than_the_batch_are_refused(demo):
    with pytest.raises(EngineError, match="n=5"):
        make_engine(demo, None, batch=4).add_request("r", [1, 2, 3], SamplingParams(n=5))


def test_copy_prefix_copies_only_the_prefix():
    cache = KVCache(num_layers=2, max_slots=3, num_kv_heads=2, max_len=8, head_dim=4, dtype=torch.float32,
                    device="cpu")
    cache.k.normal_(generator=torch.Generator().manual_seed(0))
    cache.v.normal_(generator=torch.Generator().manual_seed(1))
    src, dst = cache.allocate(), cache.allocate()
    cache.advance(src, 5)
    before = cache.k[:, dst, :, 3:].clone()
    cache.copy_prefix(src, dst, 3)
    assert cache.lengths[dst] == 3
    assert torch.equal(cache.k[:, dst, :, :3], cache.k[:, src, :, :3])  # (L, Hkv, 3, hd)
    assert torch.equal(cache.v[:, dst, :, :3], cache.v[:, src, :, :3])
    assert torch.equal(cache.k[:, dst, :, 3:], before)  # past the prefix: untouched (overwritten by writes)
    with pytest.raises(ValueError):
        cache.copy_prefix(src, dst, 6)
    assert cache.can_allocate(1) and not cache.can_allocate(2)
