"""Faults injected at each call site of the engine's step: the invariant of engine.py holds.

Every admitted request gets exactly one final delta; nothing hangs; the engine serves the next
request. A drafter fault (start, observe, propose, release, a bad tree) costs drafts only: every
request, the faulty one included, ends with the output plain decoding gives, greedy and seeded.
A fault in the model forward (prefill, decode, the LM head), the sampler or the detokenizer fails
the one request it hits; the others in its step finish with their plain output, on both
acceptance paths (speculate.Acceptance).

The base model is a real (tiny, random-init) checkpoint loaded by our loader; the drafters are the
real n-gram drafter and the shipped CTC + lookup hybrid (random-init CTC module). Fakes are the
faults only: thin wrappers that raise where told and otherwise call the real part.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch

from drafter.base import Drafter
from drafter.ctc import CTCDraftModel, CTCDrafter, CTCDrafterConfig
from drafter.hybrid import LookupHybridDrafter
from drafter.ngram import NgramDrafter
from drafter.tree import TokenTree
from server.api.async_engine import AsyncEngine
from server.api.metrics import ServerMetrics
from server.engine import speculate
from server.engine.drafter_guard import DrafterGuardConfig
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.scheduler import SchedulerConfig
from server.engine.sequence import Status
from server.engine.speculate import Acceptance
from server.engine.types import FinishReason, SamplingParams
from server.runtime.loader import load_model
from tests.conftest import make_hf_model

pytestmark = pytest.mark.timeout(300)

MAX_TOKENS = 16
# Four requests that share every step: the one the fault targets, a greedy and a seeded one that
# speculate, and one that asked for no speculation. Prompts repeat, so the n-gram drafter drafts.
BAD = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
REQUESTS = {
    "bad": ([5, 17, 42, 9] * 3, BAD),
    "good": ([3, 77, 3, 77, 120, 3, 77], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)),
    "seeded": ([8, 1, 8, 1, 8, 60, 61], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=7,
                                                          ignore_eos=True)),
    "plain": ([30, 31, 32, 30, 31, 32], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                                        speculative=False)),
}


class _IdTokenizer:
    """Random-init models have no tokenizer; decode ids as text."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults-llama3")
    make_hf_model("llama3", seed=3).save_pretrained(path)
    return load_model(path, dtype="float32", device="cpu")


def new_drafter(kind: str, model) -> Drafter | None:
    if kind == "none":
        return None
    if kind == "ngram":
        return NgramDrafter()
    torch.manual_seed(0)
    ctc = CTCDraftModel(CTCDrafterConfig.for_base(model.config)).attach_base(model)
    return LookupHybridDrafter(CTCDrafter(ctc, max_slots=4, max_len=96))


def new_engine(model, drafter: Drafter | None, guard: DrafterGuardConfig | None = None,
               acceptance: str = "auto") -> LLMEngine:
    # Governor off: every step drafts, so every drafter call site is reached.
    cfg = EngineConfig(max_model_len=96, scheduler=SchedulerConfig(max_batch_size=4, governor=False),
                       drafter_guard=guard or DrafterGuardConfig(), acceptance=Acceptance(acceptance))
    return LLMEngine(model, _IdTokenizer(), cfg, drafter=drafter)


def drive(engine: LLMEngine, requests: dict, setup=None, max_steps: int = 400) -> dict[str, dict]:
    """Run requests to the end, bounded; check each gets exactly one final delta, nothing after it."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    if setup is not None:
        setup(engine)
    out = {rid: {"tokens": [], "finals": []} for rid in requests}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for d in engine.step():
            o = out[d.request_id]
            assert not o["finals"], f"{d.request_id}: a delta after its final one"
            o["tokens"] += d.token_ids
            if d.finished:
                o["finals"].append(d)
    assert not engine.has_work(), "the engine did not finish (hung)"
    for rid, o in out.items():
        assert len(o["finals"]) == 1, f"{rid}: {len(o['finals'])} final deltas"
        o["finish"], o["error"] = o["finals"][0].finish_reason, o["finals"][0].error
    assert engine.cache.num_used_slots == 0 and not engine.scheduler.running and not engine.scheduler.waiting
    return out


@pytest.fixture(scope="module")
def plain(model) -> dict[str, list[int]]:
    """What plain decoding (no drafter, no faults) gives each request."""
    out = drive(new_engine(model, None), REQUESTS)
    return {rid: o["tokens"] for rid, o in out.items()}


def serves_next(engine: LLMEngine, plain: dict[str, list[int]]) -> None:
    out = drive(engine, {"next": REQUESTS["good"]})
    assert out["next"]["tokens"] == plain["good"] and out["next"]["finish"] is FinishReason.LENGTH


# -- drafter faults: speed only ------------------------------------------------------------------
class FaultyDrafter(Drafter):
    """A real drafter; `fails(method, seq_ids, nth_call)` says when a call raises instead (before the
    real call runs, so the real drafter misses it, as after a crash half-way)."""

    def __init__(self, inner: Drafter, fails, bad_tree: str | None = None):
        self.inner, self.fails, self.bad_tree = inner, fails, bad_tree
        self.name, self.needs_hidden, self.tiers = f"faulty-{inner.name}", inner.needs_hidden, inner.tiers
        self.calls: Counter[str] = Counter()
        self.seen: set[str] = set()

    def _maybe_fail(self, method: str, seq_ids: list[str]) -> None:
        self.calls[method] += 1
        self.seen.update(seq_ids)
        if self.fails(method, seq_ids, self.calls[method]):
            raise RuntimeError(f"injected {method} fault")

    def start(self, seq_id, prompt_ids):
        self._maybe_fail("start", [seq_id])
        self.inner.start(seq_id, prompt_ids)

    def observe(self, seq_id, token_ids, hidden):
        self._maybe_fail("observe", [seq_id])
        self.inner.observe(seq_id, token_ids, hidden)

    def propose(self, requests):
        self._maybe_fail("propose", [r.seq_id for r in requests])
        trees = self.inner.propose(requests)
        if self.bad_tree is None or "bad" not in [r.seq_id for r in requests]:
            return trees
        if self.bad_tree == "none":
            return None
        if self.bad_tree == "too few":
            return trees[:-1]
        bad = {"token": lambda r: [r.pending_token, 10**6],  # not in the vocabulary: would fail the forward
               "root": lambda r: [r.pending_token + 1, 1],
               "over budget": lambda r: [r.pending_token] + [1] * (r.budget + 1)}[self.bad_tree]
        return [TokenTree.chain(bad(r)[0], bad(r)[1:]) if r.seq_id == "bad" else t for r, t in zip(requests, trees)]

    def release(self, seq_id):
        self._maybe_fail("release", [seq_id])
        self.inner.release(seq_id)

    def look_ahead(self, ahead):
        self._maybe_fail("look_ahead", ahead.seq_ids)
        return self.inner.look_ahead(ahead)

    def take_look_ahead(self, values):
        self._maybe_fail("take_look_ahead", [])
        self.inner.take_look_ahead(values)

    def drop_look_ahead(self):
        self.inner.drop_look_ahead()


def check_drafter_fault(engine: LLMEngine, drafter: FaultyDrafter, out: dict, plain: dict) -> None:
    for rid, o in out.items():
        assert o["finish"] is FinishReason.LENGTH and o["error"] is None, rid
        assert o["tokens"] == plain[rid], f"{rid}: output changed by a drafter fault"
    assert "plain" not in drafter.seen  # a request that does not speculate never reaches the drafter
    assert engine.guard.errors > 0 and engine.stats().drafter_errors == engine.guard.errors


@pytest.mark.parametrize("kind", ["ngram", "ctc+ngram"])
@pytest.mark.parametrize("method", ["start", "observe", "propose", "release"])
def test_a_drafter_fault_on_one_request_costs_drafts_only(model, plain, kind, method):
    drafter = FaultyDrafter(new_drafter(kind, model), lambda m, ids, n: m == method and "bad" in ids)
    engine = new_engine(model, drafter)
    out = drive(engine, REQUESTS)
    assert drafter.calls["propose"] > 0
    check_drafter_fault(engine, drafter, out, plain)
    assert engine.guard.enabled  # one failing request does not switch the drafter off
    serves_next(engine, plain)


@pytest.mark.parametrize("method", ["look_ahead", "take_look_ahead"])
def test_a_failing_look_ahead_costs_drafts_only(model, plain, method):
    """All-nodes acceptance, where the CTC drafter looks ahead (base.Drafter.look_ahead): a look-ahead
    that raises (for the step with "bad" in it; the 3rd hand-over) stops drafting for the sequences
    it was for; the others, and every output, carry on."""
    drafter = FaultyDrafter(new_drafter("ctc+ngram", model),
                            lambda m, ids, n: m == method and ("bad" in ids or (not ids and n == 3)))
    engine = new_engine(model, drafter, acceptance="all-nodes")
    out = drive(engine, REQUESTS)
    assert drafter.calls[method] > 0
    check_drafter_fault(engine, drafter, out, plain)
    assert engine.guard.enabled
    serves_next(engine, plain)


@pytest.mark.parametrize("bad_tree", ["token", "root", "over budget", "none", "too few"])
def test_a_drafter_proposing_a_bad_tree_costs_drafts_only(model, plain, bad_tree):
    drafter = FaultyDrafter(new_drafter("ngram", model), lambda m, ids, n: False, bad_tree=bad_tree)
    engine = new_engine(model, drafter)
    check_drafter_fault(engine, drafter, drive(engine, REQUESTS), plain)
    serves_next(engine, plain)


@pytest.mark.parametrize("kind", ["ngram", "ctc+ngram"])
def test_a_drafter_failing_one_call_in_ten_changes_no_output(model, plain, kind):
    drafter = FaultyDrafter(new_drafter(kind, model), lambda m, ids, n: sum(drafter.calls.values()) % 10 == 0)
    engine = new_engine(model, drafter)
    check_drafter_fault(engine, drafter, drive(engine, REQUESTS), plain)
    serves_next(engine, plain)


def test_a_drafter_that_keeps_failing_is_switched_off(model, plain, caplog):
    drafter = FaultyDrafter(NgramDrafter(), lambda m, ids, n: m == "observe")
    engine = new_engine(model, drafter, DrafterGuardConfig(max_errors=3, window=10))
    out = drive(engine, REQUESTS)
    check_drafter_fault(engine, drafter, out, plain)
    assert engine.guard.errors == 3  # bad, good, seeded; then the drafter is off
    assert not engine.guard.enabled and "decoding without drafts from now on" in caplog.text
    calls = sum(drafter.calls.values())
    serves_next(engine, plain)
    assert sum(drafter.calls.values()) == calls  # off means never called again


# -- engine faults: the request they hit fails, the others finish ---------------------------------
class FaultyModel:
    """The real model; its forward (or LM head) raises when the request "bad" is in the batch and
    in the phase `fail_in` (PREFILL or DECODE)."""

    def __init__(self, engine: LLMEngine, fail_in: Status, where: str):
        self.engine, self.model, self.fail_in, self.where = engine, engine.model, fail_in, where
        self.last_slots: list[int] = []
        self.faults = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _maybe_fail(self, where: str) -> None:
        bad = self.engine._seqs.get("bad")
        if where == self.where and bad is not None and bad.status is self.fail_in and bad.slot in self.last_slots:
            self.faults += 1
            raise RuntimeError(f"injected {where} fault")

    def __call__(self, batch, cache):
        self.last_slots = batch.meta.slots.tolist()
        self._maybe_fail("forward")
        return self.model(batch, cache)

    def compute_logits(self, hidden):
        self._maybe_fail("lm_head")
        return self.model.compute_logits(hidden)


class FaultyDetokenizer:
    """The request's real incremental detokenizer; `method` raises."""

    def __init__(self, inner, method: str):
        self.inner, self.method = inner, method

    @property
    def stopped(self) -> bool:
        return self.inner.stopped

    def push(self, ids):
        if self.method == "push":
            raise RuntimeError("injected detokenizer fault")
        return self.inner.push(ids)

    def flush(self):
        if self.method == "flush":
            raise RuntimeError("injected detokenizer fault")
        return self.inner.flush()


def check_engine_fault(out: dict, plain: dict) -> None:
    assert out["bad"]["finish"] is FinishReason.ERROR and "internal error" in out["bad"]["error"]
    for rid in ("good", "seeded", "plain"):
        assert out[rid]["finish"] is FinishReason.LENGTH and out[rid]["error"] is None, rid
        assert out[rid]["tokens"] == plain[rid], f"{rid}: output changed by another request's fault"


@pytest.mark.parametrize("fail_in, where", [(Status.PREFILL, "forward"), (Status.DECODE, "forward"),
                                             (Status.PREFILL, "lm_head"), (Status.DECODE, "lm_head")])
@pytest.mark.parametrize("acceptance", ["path", "all-nodes"])
def test_a_model_fault_fails_only_its_request(model, plain, fail_in, where, acceptance):
    engine = new_engine(model, new_drafter("ctc+ngram", model), acceptance=acceptance)
    faulty = engine.model = FaultyModel(engine, fail_in, where)
    check_engine_fault(drive(engine, REQUESTS), plain)
    assert faulty.faults > 0
    serves_next(engine, plain)


@pytest.mark.parametrize("acceptance", ["path", "all-nodes"])
def test_a_sampler_fault_fails_only_its_request(model, plain, monkeypatch, acceptance):
    real = speculate.decide_tokens

    def decide_tokens(logits, params, seeds, positions):
        if any(p is BAD for p in params):
            raise RuntimeError("injected sampler fault")
        return real(logits, params, seeds, positions)

    monkeypatch.setattr(speculate, "decide_tokens", decide_tokens)
    engine = new_engine(model, new_drafter("ngram", model), acceptance=acceptance)
    check_engine_fault(drive(engine, REQUESTS), plain)
    serves_next(engine, plain)


@pytest.mark.parametrize("method", ["push", "flush"])
def test_a_detokenizer_fault_fails_only_its_request(model, plain, method):
    def setup(engine):
        seq = engine._seqs["bad"]
        seq.detok = FaultyDetokenizer(seq.detok, method)

    engine = new_engine(model, new_drafter("ngram", model))
    out = drive(engine, REQUESTS, setup)
    check_engine_fault(out, plain)
    if method == "flush":  # it failed while finishing, after emitting every token but the last
        assert out["bad"]["tokens"] == plain["bad"][: len(out["bad"]["tokens"])] and out["bad"]["tokens"]
    serves_next(engine, plain)


# -- through the worker thread: every request's stream ends ---------------------------------------
@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_every_stream_ends_and_drafter_errors_are_counted_through_the_worker(model, plain):
    """Finding: when the drafter's release raised, a finished request never got its final message.
    Here release fails for every request; each stream still ends, bounded, with its plain output."""
    drafter = FaultyDrafter(NgramDrafter(), lambda m, ids, n: m == "release")
    metrics = ServerMetrics()
    worker = AsyncEngine(new_engine(model, drafter), metrics, max_batch_size=4, max_queue=4)
    worker.start()

    async def run(rid: str):
        prompt, params = REQUESTS[rid]
        return [d async for d in worker.generate(rid, prompt, params)]

    try:
        async with asyncio.timeout(60):
            results = await asyncio.gather(*(run(rid) for rid in REQUESTS))
            again = await run("good")
    finally:
        await worker.shutdown()
    for rid, deltas in zip(REQUESTS, [*results]):
        assert [d.finished for d in deltas].count(True) == 1 and deltas[-1].finished
        assert deltas[-1].finish_reason is FinishReason.LENGTH
        assert [t for d in deltas for t in d.token_ids] == plain[rid]
    assert [t for d in again for t in d.token_ids] == plain["good"]
    text = metrics.render().decode()
    assert "ctc_drafter_errors_total 4.0" in text  # bad, good, seeded, then good again; plain never drafts
