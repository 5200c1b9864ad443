"""Exactness of the base-model runtime against transformers' own models (fp32, random init).

Every forward mode is checked: prefill, batched decode with unequal lengths, every node of a
verification tree against running that node's path sequentially, commit followed by decoding,
and plain greedy generation against `generate`.
"""

from __future__ import annotations

import pytest
import torch

from server.runtime.batch import ForwardItem, build_batch
from server.runtime.config import ModelConfig, ModelConfigError
from server.runtime.loader import load_model

MAX_LEN = 128
ATOL = 1e-4


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    family, hf, path = hf_checkpoint
    ours = load_model(path, dtype="float32", device="cpu")
    return hf, ours


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]  # (T, V)


def run(model, cache, items):
    batch = build_batch(items, MAX_LEN)
    hidden = model(batch, cache)  # (T, H) packed
    logits = model.compute_logits(hidden)
    return [logits[lo:hi] for lo, hi in zip(batch.offsets, batch.offsets[1:])]  # per item (n_b, V)


def prefill(model, cache, prompts):
    slots = [cache.allocate() for _ in prompts]
    logits = run(model, cache, [ForwardItem(s, 0, p) for s, p in zip(slots, prompts)])
    for s, p in zip(slots, prompts):
        cache.advance(s, len(p))
    return slots, logits


def decode_and_compare(hf, ours, cache, slots, seqs, g, steps: int) -> None:
    """Batched decode of random next tokens; each sequence's logits must match transformers'."""
    for _ in range(steps):
        nxt = [int(torch.randint(0, 160, (1,), generator=g)) for _ in seqs]
        logits = run(ours, cache, [ForwardItem(s, cache.lengths[s], [t]) for s, t in zip(slots, nxt)])
        for b, (s, t) in enumerate(zip(slots, nxt)):
            cache.advance(s, 1)
            seqs[b].append(t)
            torch.testing.assert_close(logits[b][0], hf_logits(hf, seqs[b])[-1], atol=ATOL, rtol=0)


def test_prefill_matches(pair):
    hf, ours = pair
    cache = ours.make_cache(2, MAX_LEN)
    prompt = torch.randint(0, 160, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    _, logits = prefill(ours, cache, [prompt])
    torch.testing.assert_close(logits[0], hf_logits(hf, prompt), atol=ATOL, rtol=0)


def test_chunked_prefill_and_batched_decode_unequal_lengths(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (7, 19, 2)]
    cache = ours.make_cache(4, MAX_LEN)
    slots = [cache.allocate() for _ in prompts]
    # Prefill in two chunks of unequal sizes, all three sequences in each forward.
    for lo, hi in ((0, 5), (5, 100)):
        items = [ForwardItem(s, cache.lengths[s], p[lo:hi]) for s, p in zip(slots, prompts) if p[lo:hi]]
        run(ours, cache, items)
        for it in items:
            cache.advance(it.slot, len(it.tokens))
    seqs = [list(p) for p in prompts]
    decode_and_compare(hf, ours, cache, slots, seqs, g, steps=5)


# A tree with siblings at two depths and a deep branch: node: parent
TREE_PARENTS = [-1, 0, 0, 1, 1, 2, 3, 6, 0]


def test_tree_verification_matches_sequential_paths(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (11, 4)]
    cache = ours.make_cache(2, MAX_LEN)
    slots, _ = prefill(ours, cache, prompts)
    trees = [torch.randint(0, 160, (len(TREE_PARENTS),), generator=g).tolist() for _ in prompts]
    items = [ForwardItem(s, cache.lengths[s], t, TREE_PARENTS) for s, t in zip(slots, trees)]
    logits = run(ours, cache, items)
    for b, (prompt, tree) in enumerate(zip(prompts, trees)):
        for node in range(len(tree)):
            path, n = [], node
            while n >= 0:
                path.insert(0, tree[n])
                n = TREE_PARENTS[n]
            expected = hf_logits(hf, prompt + path)[-1]
            torch.testing.assert_close(logits[b][node], expected, atol=ATOL, rtol=0, msg=f"seq {b} node {node}")


def test_commit_then_decode_equals_sequential_cache(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (9, 14)]
    cache = ours.make_cache(2, MAX_LEN)
    slots, _ = prefill(ours, cache, prompts)
    trees = [torch.randint(0, 160, (len(TREE_PARENTS),), generator=g).tolist() for _ in prompts]
    run(ours, cache, [ForwardItem(s, cache.lengths[s], t, TREE_PARENTS) for s, t in zip(slots, trees)])
    paths = [[0, 1, 3], [0, 2, 5]]  # root + accepted nodes: different branches per sequence
    cache.commit_paths(slots, paths)
    seqs = [p + [t[i] for i in path] for p, t, path in zip(prompts, trees, paths)]
    assert [cache.lengths[s] for s in slots] == [len(s) for s in seqs]
    decode_and_compare(hf, ours, cache, slots, seqs, g, steps=3)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding with the runtime: prefill, then one token per forward."""
    cache = model.make_cache(1, MAX_LEN)
    (slot,), logits = prefill(model, cache, [prompt])
    out = [int(logits[0][-1].argmax())]
    while len(out) < n:
        logits = run(model, cache, [ForwardItem(slot, cache.lengths[slot], [out[-1]])])
        cache.advance(slot, 1)
        out.append(int(logits[0][0].argmax()))
    return out


def test_greedy_generation_equals_transformers_generate(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(5)
    for n in (3, 17):
        prompt = torch.randint(0, 160, (n,), generator=g).tolist()
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                          pad_token_id=0)[0, n:].tolist()
        assert greedy(ours, prompt, 24) == ref


def test_unknown_architecture_is_refused():
    raw = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}
    with pytest.raises(ModelConfigError, match="not supported; supported: LlamaForCausalLM"):
        ModelConfig.from_dict(raw)


def test_unsupported_rope_type_is_refused(hf_checkpoint):
    import json

    _, _, path = hf_checkpoint
    raw = json.loads((path / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ModelConfigError, match="yarn"):
        ModelConfig.from_dict(raw)
