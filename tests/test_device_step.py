"""Issue 14, point 6: the device-resident step's invariants, checked on the CPU.

The base model is Llama-3-8B-shaped where these invariants care: vocabulary 128,256, GQA with 32
query and 8 KV heads; the rest is small (hidden 512 = 32 heads x 16, two layers, random weights)
so a step takes well under a second on two cores. The drafter is a random-init CTC drafter for
it (beam search), whose trees are mostly wrong: what is measured is what crosses to the host and
how often the LM head runs, not how much is accepted. Transfers are counted by server/runtime/host.py
on every device, the CPU included, so the counts are those an accelerator would see.

On the all-nodes path (speculate.Acceptance.ALL_NODES), per pure decode step at batch 16:
- the step makes exactly one copy to the host: prefills' first tokens, accepted paths and emitted
  tokens, 8 x 2 x batch x (deepest tree + 1) bytes, and the CTC drafter's look-ahead for the next
  step (base.Drafter.look_ahead: its frames over this step's accepted paths, run on the device
  before the copy), their top-k, batch x frames x (k + frames x k + 1) float32. Only a step whose
  sequences the previous step did not look ahead for (the first decode step after the prefills)
  makes a second copy, the drafter's own; a request with logprobs adds one, the emitted tokens'
  rows. Exact figures, with no vocabulary size in them; the test runs at two vocabulary sizes and
  finds the same formula at both;
- the LM head (model.compute_logits) runs once per step, prefill steps included.
A mixed step (a prefill chunk beside decode trees) sends exactly its real token rows through
attention (the packed layout of point 1), at the engine level.
"""

from __future__ import annotations

import pytest
import torch

from drafter.ctc import CTCDraftModel, CTCDrafter, CTCDrafterConfig
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.scheduler import SchedulerConfig
from server.engine.sequence import Status
from server.engine.speculate import Acceptance
from server.engine.types import SamplingParams
from server.runtime import model as model_module
from server.runtime.config import ModelConfig
from server.runtime.host import TRANSFERS
from server.runtime.model import CausalLM, fuse_projections

BATCH = 16
MAX_LEN = 128
TREE_NODES = 4  # draft nodes per sequence: small trees keep the all-nodes LM head cheap on 2 cores
LLAMA3_8B_VOCAB = 128_256


def llama3_8b_shaped(vocab: int) -> CausalLM:
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=512, intermediate_size=1024, num_layers=2,
        num_heads=32, num_kv_heads=8, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=MAX_LEN,
        tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False, rope_theta=500000.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return fuse_projections(CausalLM(cfg).eval())


def ctc_drafter(model: CausalLM) -> CTCDrafter:
    # 4 heads (not the base's 32), so its attention calls are told apart from the base model's
    cfg = CTCDrafterConfig.for_base(model.config, num_heads=4, num_kv_heads=4, intermediate_size=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        draft = CTCDraftModel(cfg).to(model.lm_head.weight.device).attach_base(model)
    return CTCDrafter(draft, max_slots=BATCH, max_len=MAX_LEN)


@pytest.fixture(scope="module", params=[LLAMA3_8B_VOCAB, 32_000], ids=["vocab128k", "vocab32k"])
def base(request) -> CausalLM:
    return llama3_8b_shaped(request.param)


class _NoTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def new_engine(model: CausalLM, drafter, acceptance: Acceptance = Acceptance.ALL_NODES, **sched) -> LLMEngine:
    sched = dict(max_batch_size=BATCH, max_tree_nodes=TREE_NODES, spec_token_budget=BATCH * TREE_NODES,
                 governor=False, **sched)
    cfg = EngineConfig(max_model_len=MAX_LEN, scheduler=SchedulerConfig(**sched), acceptance=acceptance)
    return LLMEngine(model, _NoTokenizer(), cfg, drafter=drafter)


class StepRecorder:
    """Per engine step: host transfers, LM-head calls, the trees the drafter proposed, and how many
    sequences' frames the drafter computed in `propose` (fresh) and in its look-ahead (ahead)."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.lm_head_calls, self.trees, self.fresh, self.ahead = engine, 0, [], 0, 0
        model, guard = engine.model, engine.guard
        real_logits, real_propose, real_look_ahead = model.compute_logits, guard.propose, guard.look_ahead

        def compute_logits(hidden):
            self.lm_head_calls += 1
            return real_logits(hidden)

        def propose(*args, **kwargs):
            self.trees = real_propose(*args, **kwargs)
            return self.trees

        def look_ahead(*args, **kwargs):
            values = real_look_ahead(*args, **kwargs)
            self.ahead += 0 if values is None else len(values)
            return values

        # instance attributes: this engine only
        model.compute_logits, guard.propose, guard.look_ahead = compute_logits, propose, look_ahead
        drafter = guard.drafter
        if drafter is not None and hasattr(drafter, "frames"):
            real_frames = drafter.frames

            def frames(requests):
                self.fresh += len(requests)
                return real_frames(requests)

            drafter.frames = frames

    def step(self):
        self.lm_head_calls, self.trees, self.fresh, self.ahead = 0, [], 0, 0
        before = TRANSFERS.snapshot()
        deltas = self.engine.step()
        return deltas, TRANSFERS.snapshot() - before


def prompts(vocab: int, n: int = BATCH, length: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("logprobs", [None, 2], ids=["plain", "logprobs"])
def test_all_nodes_decode_step_copies_once_with_vocab_free_bytes_and_one_lm_head_call(base, logprobs):
    drafter = ctc_drafter(base)
    engine = new_engine(base, drafter)
    assert engine.acceptance is Acceptance.ALL_NODES
    rec = StepRecorder(engine)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=logprobs)
    for i, p in enumerate(prompts(base.config.vocab_size)):
        engine.add_request(f"r{i}", p, params)
    cfg = drafter.model.config
    frames, k = cfg.num_frames, cfg.prune_topk
    decoding: set[str] = set()
    decode_steps = one_copy_steps = 0
    while engine.has_work():
        all_decoding = len(decoding) == BATCH
        deltas, moved = rec.step()
        assert rec.lm_head_calls == 1  # every step: prefill rows and all tree nodes in one call
        decoding |= {d.request_id for d in deltas if d.token_ids}
        if not all_decoding or any(d.finished for d in deltas):
            continue
        decode_steps += 1
        drafted = sum(t.num_nodes > 1 for t in rec.trees)
        depth = max(max(t.depths) for t in rec.trees)
        emitted = sum(len(d.token_ids) for d in deltas)
        expected_transfers = 1 + (rec.fresh > 0) + (logprobs is not None)
        expected_bytes = 8 * 2 * BATCH * (depth + 1)  # the acceptance's copy: paths + tokens, int64
        # the drafter's frames' top-k, float32: this step's fresh ones in a copy of their own, the
        # look-ahead's for the next step in the acceptance's copy
        expected_bytes += 4 * (rec.fresh + rec.ahead) * frames * (k + frames * k + 1)
        if logprobs is not None:  # float64 rows of the emitted tokens: logprob, then top values and ids
            expected_bytes += 8 * emitted * (1 + 2 * logprobs)
        assert (moved.transfers, moved.bytes) == (expected_transfers, expected_bytes)
        if drafted == BATCH and rec.fresh == 0:  # every tree from the look-ahead: the step copied once
            assert rec.ahead == BATCH or any(d.finished for d in deltas)
            one_copy_steps += 1
    assert decode_steps >= 3 and one_copy_steps >= 2
    assert drafter.cache.num_used_slots == 0


def test_plain_decode_step_copies_once(base):
    engine = new_engine(base, None)
    rec = StepRecorder(engine)
    for i, p in enumerate(prompts(base.config.vocab_size, n=4)):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    while engine.has_work():
        _, moved = rec.step()
        assert moved.transfers == 1 and rec.lm_head_calls == 1


def test_path_walk_calls_the_lm_head_once_per_depth(base):
    """The CPU's path walk, for contrast: one LM-head call and one copy per round of the walks."""
    engine = new_engine(base, ctc_drafter(base), acceptance=Acceptance.PATH)
    rec = StepRecorder(engine)
    for i, p in enumerate(prompts(base.config.vocab_size, n=4)):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.step()  # the prefills (first tokens: one call)
    deltas, moved = rec.step()
    rounds = max(len(d.token_ids) for d in deltas)
    assert rec.lm_head_calls == rounds and moved.transfers == rounds + 1  # + the drafter's copy


def test_a_mixed_steps_attention_runs_its_real_tokens(base, monkeypatch):
    """One prefill chunk beside 15 decode trees: the base model's attention gets exactly
    chunk + tree nodes query rows (packed), not 16 x the longest item."""
    engine = new_engine(base, ctc_drafter(base), prefill_chunk=40, prefill_step_ratio=None)  # fixed 40-token chunks
    vocab = base.config.vocab_size
    for i, p in enumerate(prompts(vocab, n=BATCH - 1)):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    while len(decoding_seqs(engine)) < BATCH - 1:  # the 15 prompts, 40 tokens per step
        engine.step()
    engine.add_request("long", prompts(vocab, n=1, length=100)[0], SamplingParams(max_tokens=2, temperature=0.0))
    rec = StepRecorder(engine)
    rows: list[int] = []
    real_attention = model_module.tree_attention

    def counting_attention(q, *args, **kwargs):
        if q.shape[1] == base.config.num_heads:  # the base model's (the drafter has 4 heads)
            rows.append(q.shape[0])
        return real_attention(q, *args, **kwargs)

    monkeypatch.setattr(model_module, "tree_attention", counting_attention)
    rec.step()
    nodes = sum(t.num_nodes for t in rec.trees)
    assert len(rec.trees) == BATCH - 1 and nodes > BATCH - 1  # every decode drafted a tree
    assert rows == [40 + nodes] * base.config.num_layers


def decoding_seqs(engine: LLMEngine) -> list:
    return [s for s in engine.scheduler.running if s.status is Status.DECODE]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_auto_is_all_nodes_and_gives_the_path_walks_output():
    """On a GPU: auto picks all-nodes; its output equals the path walk's on the same device, and a
    decode step with the CTC drafter copies to the host at most twice (once with the look-ahead)."""
    model = llama3_8b_shaped(LLAMA3_8B_VOCAB).cuda()
    out = {}
    for acceptance in (Acceptance.AUTO, Acceptance.PATH):
        engine = new_engine(model, ctc_drafter(model), acceptance=acceptance)
        assert engine.acceptance is (Acceptance.ALL_NODES if acceptance is Acceptance.AUTO else Acceptance.PATH)
        rec = StepRecorder(engine)
        for i, p in enumerate(prompts(model.config.vocab_size)):
            engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        tokens: dict[str, list[int]] = {}
        moved = []
        while engine.has_work():
            deltas, m = rec.step()
            moved.append(m.transfers)
            for d in deltas:
                tokens.setdefault(d.request_id, []).extend(d.token_ids)
        out[acceptance] = tokens
        if acceptance is Acceptance.AUTO:
            assert max(moved) <= 2 and moved.count(2) <= 1  # the first decode step; then the look-ahead's
    assert out[Acceptance.AUTO] == out[Acceptance.PATH]
