"""The CUDA-graph runner's CPU half (server/runtime/graphs.py): bucketing, padding, static buffers.

Capture and replay need CUDA, but what a graph computes is the padded forward over the static
buffers, and that runs here. Checked on a model that is Llama-3-8B-shaped where attention cares
(GQA 32/8):
- a padded, bucketed forward gives the hidden states and logits of the unpadded one;
- padding writes K/V only at the scratch position: every other cache entry is what the unpadded
  forward leaves (with a negative control: padding aimed at position 0 is caught);
- steps outside every bucket run eagerly, and the engine's greedy output with the runner attached
  equals its output without.
A CUDA test at the end captures and replays real graphs (skipped without CUDA).
"""

from __future__ import annotations

import copy

import pytest
import torch

from server.engine.engine import EngineConfig, LLMEngine
from server.engine.scheduler import SchedulerConfig
from server.engine.types import SamplingParams
from server.runtime.batch import ForwardItem, build_batch
from server.runtime.config import ModelConfig
from server.runtime.graphs import Bucket, GraphRunner, StaticBatch, default_buckets, pick_bucket
from server.runtime.model import CausalLM, fuse_projections

MAX_LEN = 64


@pytest.fixture(scope="module")
def model() -> CausalLM:
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=2,
        num_heads=32, num_kv_heads=8, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=MAX_LEN,
        tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False, rope_theta=500000.0,
    )
    torch.manual_seed(0)
    return fuse_projections(CausalLM(cfg).eval())


def filled_cache(model: CausalLM, slots: int = 6):
    """A cache whose every entry (scratch position included) holds random values, so any stray
    write shows."""
    cache = model.make_cache(slots, MAX_LEN)
    gen = torch.Generator().manual_seed(1)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    return cache


# A decode, a 5-node tree, a 2-token chain and a 3-node tree: 4 items, 11 tokens, longest 5.
ITEMS = [
    ForwardItem(slot=3, cache_len=9, tokens=[5]),
    ForwardItem(slot=0, cache_len=20, tokens=[7, 8, 9, 10, 11], parents=[-1, 0, 0, 1, 1]),
    ForwardItem(slot=5, cache_len=0, tokens=[12, 13]),
    ForwardItem(slot=1, cache_len=40, tokens=[14, 15, 16], parents=[-1, 0, 0]),
]


def test_default_buckets_double_up_to_the_limits():
    buckets = default_buckets(max_items=6, max_q_len=17)
    assert [b for b in buckets if b.q_len == 1] == [Bucket(1, 1, 1), Bucket(2, 1, 2), Bucket(4, 1, 4), Bucket(6, 1, 6)]
    assert {b.q_len for b in buckets} == {1, 17}
    assert [b.tokens for b in buckets if b.items == 1 and b.q_len == 17] == [2, 4, 8, 16, 17]
    assert [b.tokens for b in buckets if b.items == 6 and b.q_len == 17] == [8, 16, 32, 64, 102]
    assert len(default_buckets(16, 17)) == 30
    assert default_buckets(2, 1) == [Bucket(1, 1, 1), Bucket(2, 1, 2)]  # no speculation: decode only


def test_pick_bucket_takes_the_fewest_tokens_that_hold_the_step():
    buckets = default_buckets(max_items=16, max_q_len=17)
    assert pick_bucket(buckets, 1, 1, 1) == Bucket(1, 1, 1)  # batch-1 decode
    assert pick_bucket(buckets, 3, 1, 3) == Bucket(4, 1, 4)
    assert pick_bucket(buckets, 4, 5, 11) == Bucket(4, 17, 16)
    assert pick_bucket(buckets, 16, 17, 16 * 17) == Bucket(16, 17, 272)
    assert pick_bucket(buckets, 16, 2, 17) == Bucket(16, 17, 32)
    assert pick_bucket(buckets, 1, 18, 18) is None  # a prefill chunk longer than the tree budget
    assert pick_bucket(buckets, 17, 1, 17) is None  # more sequences than the largest batch


def test_static_batch_pads_after_the_real_rows():
    static = StaticBatch(Bucket(8, 8, 32), torch.device("cpu"), scratch_pos=MAX_LEN)
    n = static.load(ITEMS, MAX_LEN)
    real = build_batch(ITEMS, MAX_LEN).meta
    meta = static.batch.meta
    assert n == 11 and meta.num_tokens == 32 and meta.max_q_len == 8
    assert meta.cu_seqlens.tolist() == real.cu_seqlens.tolist() + [11] * 4  # 4 empty items
    assert torch.equal(static.batch.input_ids[:11], build_batch(ITEMS, MAX_LEN).input_ids)
    assert torch.equal(meta.positions[:11], real.positions) and meta.positions[11:].eq(0).all()
    assert torch.equal(meta.write_pos[:11], real.write_pos) and meta.write_pos[11:].eq(MAX_LEN).all()
    assert torch.equal(meta.tree_mask[: real.tree_mask.numel()], real.tree_mask)
    assert meta.slots.tolist()[:4] == [3, 0, 5, 1] and meta.cache_lens.tolist() == [9, 20, 0, 40, 0, 0, 0, 0]
    # A smaller step afterwards: nothing of the larger one survives in the real rows' metadata.
    assert static.load(ITEMS[:1], MAX_LEN) == 1
    assert meta.cu_seqlens.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1] and meta.write_pos[1:].eq(MAX_LEN).all()
    with pytest.raises(ValueError, match="do not fit"):
        StaticBatch(Bucket(2, 8, 16), torch.device("cpu"), MAX_LEN).load(ITEMS, MAX_LEN)  # 4 items > 2


@pytest.mark.parametrize("bucket", [Bucket(4, 5, 11), Bucket(4, 8, 16), Bucket(8, 16, 64)], ids=str)
def test_padded_forward_equals_unpadded_and_touches_only_the_scratch(model, bucket):
    eager_cache, graph_cache = filled_cache(model), filled_cache(model)
    batch = build_batch(ITEMS, MAX_LEN)
    expected = model.forward_eager(batch, eager_cache)  # (11, H)
    runner = GraphRunner(model, graph_cache, [bucket])
    assert runner.bucket_for(batch) == bucket
    hidden = runner.run(batch)
    assert hidden.shape == expected.shape
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.compute_logits(hidden), model.compute_logits(expected), rtol=1e-5, atol=1e-4)
    real = slice(0, MAX_LEN)  # every position but the scratch one
    torch.testing.assert_close(graph_cache.k[..., real, :], eager_cache.k[..., real, :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graph_cache.v[..., real, :], eager_cache.v[..., real, :], rtol=1e-5, atol=1e-5)
    # Padding rows (if the bucket has any) wrote to the scratch position of slot 0, the real rows did not.
    padded = not torch.equal(graph_cache.k[:, 0, :, MAX_LEN], eager_cache.k[:, 0, :, MAX_LEN])
    assert padded == (bucket.tokens > 11)


def test_padding_aimed_at_a_real_position_is_caught(model):
    # Negative control for the test above: padding rows writing at position 0 (a committed prefix
    # entry) instead of the scratch position change the cache where the unpadded forward does not.
    eager_cache, graph_cache = filled_cache(model), filled_cache(model)
    batch = build_batch(ITEMS, MAX_LEN)
    model.forward_eager(batch, eager_cache)
    bucket = Bucket(4, 8, 16)
    runner = GraphRunner(model, graph_cache, [bucket])
    runner.static[bucket] = StaticBatch(bucket, torch.device("cpu"), scratch_pos=0)
    runner.run(batch)
    assert not torch.equal(graph_cache.k[..., :MAX_LEN, :], eager_cache.k[..., :MAX_LEN, :])


def test_steps_outside_the_buckets_run_eagerly(model):
    cache = filled_cache(model)
    runner = GraphRunner(model, cache, [Bucket(4, 8, 16)])
    prefill = build_batch([ForwardItem(slot=2, cache_len=0, tokens=list(range(20)))], MAX_LEN)
    assert runner.run(prefill) is None
    model.graph_runner = runner
    try:
        out = model(prefill, cache)  # falls back to the eager forward
        assert out.shape == (20, model.config.hidden_size)
        other = filled_cache(model)  # a cache the runner was not built for: eager as well
        torch.testing.assert_close(model(build_batch(ITEMS, MAX_LEN), other),
                                   model.forward_eager(build_batch(ITEMS, MAX_LEN), filled_cache(model)))
    finally:
        model.graph_runner = None


def test_warm_up_captures_nothing_on_the_cpu(model):
    from server.engine.warmup import capture_graphs

    engine = LLMEngine(model, StubTokenizer(), EngineConfig(max_model_len=MAX_LEN))
    assert capture_graphs(engine) is None and model.graph_runner is None


class StubTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


def generate(model: CausalLM, prompts: list[list[int]], runner: bool) -> tuple[list[list[int]], list[int]]:
    """Greedy outputs of a 4-slot engine with prompt-lookup drafting, and the longest item of each
    step the runner served."""
    from drafter.ngram import NgramDrafter

    sched = SchedulerConfig(max_batch_size=4, max_tree_nodes=6, spec_token_budget=16, governor=False)
    engine = LLMEngine(model, StubTokenizer(), EngineConfig(max_model_len=MAX_LEN, scheduler=sched),
                       drafter=NgramDrafter())
    served = []
    if runner:
        r = GraphRunner(model, engine.cache, default_buckets(4, 7))
        real_run = r.run
        def run(batch):
            out = real_run(batch)
            if out is not None:
                served.append(batch.meta.max_q_len)
            return out

        r.run = run
        model.graph_runner = r
    try:
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
        out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        while engine.has_work():
            for d in engine.step():
                assert d.error is None
                out[d.request_id] += d.token_ids
    finally:
        model.graph_runner = None
    return list(out.values()), served


def test_engine_output_is_unchanged_by_the_runner(model):
    # Prompts that repeat, so prompt lookup drafts trees; the planted model makes greedy output
    # follow a cycle the drafts can hit (random weights would otherwise accept nothing).
    planted = copy.deepcopy(model)
    with torch.no_grad():
        planted.lm_head.weight.copy_(planted.model.embed_tokens.weight.roll(1, dims=0) * 8)
    prompts = [[(3 * i + j) % 11 + 1 for j in range(14)] for i in range(3)] + [[2, 9, 4] * 6]
    plain, _ = generate(planted, prompts, runner=False)
    padded, served = generate(planted, prompts, runner=True)
    assert padded == plain
    assert len(served) > 10 and max(served) > 1  # decode and verification steps went through the buckets


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_graphs_replay_the_eager_forward_cuda(model):
    from server.runtime.graphs import can_capture

    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    eager_cache = gpu.make_cache(6, MAX_LEN)
    graph_cache = gpu.make_cache(6, MAX_LEN)
    if not can_capture(graph_cache):
        pytest.skip("the Triton backend is off (CTC_KERNELS=torch)")
    runner = GraphRunner(gpu, graph_cache, default_buckets(6, 8))
    runner.capture()
    for items in (ITEMS, ITEMS[:1], ITEMS[1:3]):
        batch = build_batch(items, MAX_LEN, "cuda")
        expected = gpu.forward_eager(batch, eager_cache)
        assert runner.bucket_for(batch) in runner.graphs
        torch.testing.assert_close(runner.run(batch).float(), expected.float(), rtol=2e-2, atol=2e-2)
    real = slice(0, MAX_LEN)
    torch.testing.assert_close(graph_cache.k[..., real, :].float(), eager_cache.k[..., real, :].float(),
                               rtol=2e-2, atol=2e-2)
