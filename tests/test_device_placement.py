"""Where and in what precision things run: Triton launches on their inputs' device (`cuda:N`), and
the CTC drafter's rope frequencies stay float32 when the module is cast to bfloat16.

Both checked on the CPU: the launch device by construction (the wrappers enter the context that
`device_context` gives for their first tensor, and that context selects the tensor's CUDA index),
the rope precision against a float32 forward at long positions, with the old behaviour (frequencies
cast with the module) as the negative control.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import types

import pytest
import torch

from drafter.ctc import CTCDraftModel, CTCDrafterConfig
from kernels import backend
from kernels.kv_commit import kv_commit_ref, kv_commit_triton
from kernels.tree_attention import tree_attention_ref, tree_attention_triton
from server.runtime.batch import ForwardItem, build_batch
from server.runtime.rope import inverse_frequencies


def test_device_context_selects_the_tensors_cuda_index():
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))  # no CUDA needed to build the context
    ctx = backend.device_context(on_gpu1)
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert isinstance(backend.device_context(torch.zeros(1)), contextlib.nullcontext)


@pytest.fixture
def entered(monkeypatch):
    """The devices whose context a Triton wrapper entered, in order."""
    seen: list[torch.device] = []

    @contextlib.contextmanager
    def record(tensor):
        seen.append(tensor.device)
        yield

    monkeypatch.setattr(backend, "device_context", record)
    return seen


def _needs_interpreter():
    if not backend.triton_available():
        pytest.skip("triton cannot be imported")
    if torch.cuda.is_available():
        pytest.skip("checked on the CPU under TRITON_INTERPRET=1")


def test_kv_commit_triton_launches_inside_its_caches_device_context(entered):
    _needs_interpreter()
    k, v = torch.randn(2, 2, 1, 8, 4), torch.randn(2, 2, 1, 8, 4)
    args = (torch.tensor([1]), torch.tensor([2]), torch.tensor([[2, 3]]), torch.tensor([2]))
    k_exp, v_exp = k.clone(), v.clone()
    kv_commit_ref(k_exp, v_exp, *args)
    kv_commit_triton(k, v, *args)
    assert entered == [k.device]
    assert torch.equal(k, k_exp) and torch.equal(v, v_exp)  # the guarded wrapper still does its job


def test_tree_attention_triton_launches_inside_its_querys_device_context(entered):
    _needs_interpreter()
    q, kc, vc = torch.randn(1, 2, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)  # one packed token
    mask = torch.ones(1, dtype=torch.bool)
    # cu_seqlens, slots, cache_lens, tree_mask, mask_offsets, scale
    args = (q, kc, vc, torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([3]), mask, torch.tensor([0]), 0.25)
    out = tree_attention_triton(*args)
    assert entered == [q.device]
    torch.testing.assert_close(out, tree_attention_ref(*args), atol=1e-5, rtol=0)


def test_split_kv_tree_attention_launches_inside_its_querys_device_context(entered):
    _needs_interpreter()
    q, kc, vc = torch.randn(1, 2, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    mask = torch.ones(1, dtype=torch.bool)
    args = (q, kc, vc, torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([35]), mask, torch.tensor([0]), 0.25)
    out = tree_attention_triton(*args, block_n=16, num_splits=2)  # both passes: split, then combine
    assert entered == [q.device]
    torch.testing.assert_close(out, tree_attention_ref(*args), atol=1e-5, rtol=0)


def _drafter(seed: int = 0) -> CTCDraftModel:
    cfg = CTCDrafterConfig(base_architecture="LlamaForCausalLM", base_hidden_size=64, base_vocab_size=100,
                           num_heads=4, num_kv_heads=2, intermediate_size=96)
    torch.manual_seed(seed)
    m = CTCDraftModel(cfg).eval()
    with torch.no_grad():  # sharpen attention, so that where a key sits (its rope angle) matters
        for layer in m.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return m


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_drafter_rope_frequencies_stay_float32_through_casts(dtype):
    m = _drafter().to(dtype)
    assert m.fuse.weight.dtype == dtype  # the module was cast...
    assert m.inv_freq.dtype == torch.float32  # ...its rope frequencies were not
    assert torch.equal(m.inv_freq, inverse_frequencies(16, m.config.rope_theta, {}))
    assert m.to("cpu").float().to(dtype).inv_freq.dtype == torch.float32


def test_bfloat16_drafter_matches_float32_rope_at_long_positions():
    fp32 = _drafter()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    # Rope is relative: a rounded frequency errs by (query position - key position) x its rounding,
    # so the tokens are spread 300 positions apart, up to 3300 between the first and the last.
    L = 12
    meta = build_batch([ForwardItem(0, 0, [0] * L)], 4096).meta
    meta = dataclasses.replace(meta, positions=torch.arange(L) * 300)  # packed: (T,)
    x = torch.randn(L, 64)  # packed: (T, H)
    with torch.no_grad():
        want = fp32.run(x, meta, None)
        got = bf16.run(x.to(torch.bfloat16), meta, None).float()
        bf16.inv_freq = bf16.inv_freq.to(torch.bfloat16)  # the old behaviour: cast with the module
        old = bf16.run(x.to(torch.bfloat16), meta, None).float()
    err, old_err = (got - want).abs().max().item(), (old - want).abs().max().item()
    assert err < 0.1, err  # bfloat16 activations, float32 angles
    assert old_err > 3 * err, (err, old_err)  # negative control: the test tells the two apart
