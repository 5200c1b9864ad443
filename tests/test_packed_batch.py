"""Packed (varlen) batches: a step's cost follows its real token count, and packing changes nothing.

The model is Llama-3-8B-shaped where it matters to attention (GQA 32/8) with a small hidden size
and two layers, so it runs on a 2-core CPU. Two properties:
- shapes: a mixed step of one 256-token prefill chunk and 16 one-token decodes sends 272 token
  rows through every projection and the attention op, not 17 x 256 (forward hooks record them);
- parity: every item of a mixed packed step (prefill chunk, decodes, a verification tree) gets
  the hidden states and writes the K/V it gets in a forward of its own.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from server.runtime import model as model_module
from server.runtime.batch import ForwardItem, build_batch
from server.runtime.config import ModelConfig
from server.runtime.model import CausalLM, fuse_projections

MAX_LEN = 512


@pytest.fixture(scope="module")
def model() -> CausalLM:
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
        num_heads=32, num_kv_heads=8, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=MAX_LEN,
        tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False, rope_theta=500000.0,
    )
    torch.manual_seed(0)
    return fuse_projections(CausalLM(cfg).eval())


def test_mixed_step_runs_its_real_token_rows(model, monkeypatch):
    prefill = ForwardItem(slot=0, cache_len=0, tokens=list(range(256)))
    decodes = [ForwardItem(slot=1 + i, cache_len=10 + 7 * i, tokens=[3 + i]) for i in range(16)]
    batch = build_batch([prefill, *decodes], MAX_LEN)

    meta = batch.meta
    assert batch.input_ids.shape == (272,)
    assert meta.cu_seqlens.tolist() == [0, 256, *range(257, 273)]
    assert meta.positions.shape == (272,) and meta.max_q_len == 256
    assert meta.positions[256:].tolist() == [10 + 7 * i for i in range(16)]
    assert meta.tree_mask.numel() == 256 * 256 + 16  # one block per item, no (17, 256, 256) padding

    rows: dict[str, set[int]] = {}

    def record(name):
        def hook(module, args, output):
            rows.setdefault(name, set()).add(args[0].shape[0])
        return hook

    handles = [m.register_forward_hook(record(type(m).__name__ + ":" + name))
               for name, m in model.named_modules() if isinstance(m, nn.Linear | model_module.RMSNorm)]
    attention_rows = []
    real_attention = model_module.tree_attention

    def counting_attention(q, *args, **kwargs):
        attention_rows.append(tuple(q.shape))
        return real_attention(q, *args, **kwargs)

    monkeypatch.setattr(model_module, "tree_attention", counting_attention)
    try:
        hidden = model(batch, model.make_cache(17, MAX_LEN))
    finally:
        for h in handles:
            h.remove()
    cfg = model.config
    assert hidden.shape == (272, cfg.hidden_size)
    assert len(rows) == 6 * cfg.num_layers + 1  # qkv, o, gate_up, down and two norms per layer; the final norm
    assert all(seen == {272} for seen in rows.values()), rows
    assert attention_rows == [(272, cfg.num_heads, cfg.head_dim)] * cfg.num_layers


def prefilled_cache(model: CausalLM, prompts: list[list[int]]):
    cache = model.make_cache(len(prompts) + 1, MAX_LEN)
    for p in prompts:
        slot = cache.allocate()
        model(build_batch([ForwardItem(slot, 0, p)], MAX_LEN), cache)
        cache.advance(slot, len(p))
    return cache


def test_packed_step_equals_each_item_alone(model):
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size

    def tokens(n):
        return torch.randint(0, V, (n,), generator=g).tolist()

    prompts = [tokens(n) for n in (5, 17, 1, 30, 9)]
    cache = prefilled_cache(model, prompts)
    fresh = cache.allocate()  # a new prompt, prefilled alongside the decodes
    items = [ForwardItem(fresh, 0, tokens(40))]
    items += [ForwardItem(s, cache.lengths[s], tokens(1)) for s in range(4)]
    items.append(ForwardItem(4, cache.lengths[4], tokens(6), [-1, 0, 0, 1, 2, 1]))

    alone = copy.deepcopy(cache)
    packed_batch = build_batch(items, MAX_LEN)
    packed = model(packed_batch, cache)
    for b, it in enumerate(items):
        expected = model(build_batch([it], MAX_LEN), alone)
        rows = slice(packed_batch.offsets[b], packed_batch.offsets[b + 1])
        torch.testing.assert_close(packed[rows], expected, rtol=1e-5, atol=1e-5, msg=f"item {b}")
    # and the K/V each item wrote lands where its own forward puts it
    for it in items:
        span = (slice(None), it.slot, slice(None), slice(it.cache_len, it.cache_len + len(it.tokens)))
        torch.testing.assert_close(cache.k[span], alone.k[span], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v[span], alone.v[span], rtol=1e-5, atol=1e-5)


def test_a_tree_items_mask_is_ancestor_or_self_and_a_chains_is_causal():
    from drafter.tree import TokenTree

    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 9, 17):
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
        tree = TokenTree.from_parents(list(range(n)), parents)
        got = ForwardItem(0, 5, tree.tokens, parents).mask()
        assert got.dtype == torch.bool and torch.equal(got, tree.ancestor_mask())
    assert torch.equal(ForwardItem(0, 5, [1, 2, 3]).mask(), torch.ones(3, 3, dtype=torch.bool).tril())


def test_a_batch_reaches_the_device_in_two_copies_with_every_field_in_place(monkeypatch):
    """build_batch moves its integer fields as one tensor (views of it on the device) and the
    masks as another: two host-to-device copies per forward, whatever the number of items."""
    from server.runtime import batch as batch_module

    copies = []
    real = batch_module.to_device
    monkeypatch.setattr(batch_module, "to_device", lambda values, device, *a: copies.append(1) or real(values, device, *a))
    items = [ForwardItem(3, 7, [11, 12]), ForwardItem(1, 4, [21, 22, 23], [-1, 0, 0]), ForwardItem(0, 9, [31])]
    b = build_batch(items, 64)
    assert len(copies) == 2
    m = b.meta
    assert b.input_ids.tolist() == [11, 12, 21, 22, 23, 31]
    assert m.cu_seqlens.tolist() == [0, 2, 5, 6] == m.host_cu_seqlens
    assert m.slots.tolist() == [3, 1, 0] and m.cache_lens.tolist() == [7, 4, 9]
    assert m.positions.tolist() == [7, 8, 4, 5, 5, 9]  # the tree's siblings share a position
    assert m.write_slot.tolist() == [3, 3, 1, 1, 1, 0] and m.write_pos.tolist() == [7, 8, 4, 5, 6, 9]
    assert m.mask_offsets.tolist() == [0, 4, 13] == m.host_mask_offsets
    assert m.tree_mask.tolist() == [True, False, True, True,
                                    True, False, False, True, True, False, True, False, True, True]
    assert all(t.dtype == torch.long for t in (b.input_ids, m.cu_seqlens, m.slots, m.positions, m.write_pos))
