"""EAGLE-style drafter: cached tree drafting against a cache-free reference, checkpoints,
training with and without the auxiliary CTC loss, and losslessness."""

from __future__ import annotations

import math

import pytest
import torch

from drafter.base import ProposeRequest
from drafter.eagle import EagleConfig, EagleDraftModel, EagleDrafter, EagleObjective
from drafter.loading import load_draft_model, load_drafter, save_drafter
from drafter.train import TrainConfig, anchor_targets, train
from server.engine.factory import build_drafter
from server.runtime.batch import ForwardItem, build_batch
from tests.test_drafters import base, drafter_free, seeded, synthetic_data  # noqa: F401 - base is a fixture
from tests.test_engine import GREEDY, make_engine, prompts_for, run_all


def eagle_model(base_model, **kw) -> EagleDraftModel:
    return seeded(lambda: EagleDraftModel(EagleConfig.for_base(base_model.config, **kw)).attach_base(base_model))


def reference_path_score(m: EagleDraftModel, hidden: torch.Tensor, tokens: list[int], pending: int,
                         path: list[int]) -> float:
    """Sum of log p(path) by the definition, with no cache: each drafted token's row is
    W [g(previous row) ; E(token)] appended to the causal chain, all rows recomputed every time."""
    rows = m.inputs(hidden, torch.tensor(tokens[1:] + [pending]))  # (T, H) committed positions
    score = 0.0
    for tok in path:
        y = m.run(rows, build_batch([ForwardItem(0, 0, [0] * len(rows))], 1 << 20).meta, cache=None)
        score += float(torch.log_softmax(m.token_logits(y[-1]), -1)[tok])
        rows = torch.cat([rows, m.inputs(y[-1:], torch.tensor([tok]))])
    return score


@torch.no_grad()
@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_cached_tree_drafting_equals_the_cache_free_definition(base, tree):
    _, model = base
    m = eagle_model(model, tree=tree, depth=3, dynamic_topk=3, static_topk=[3, 2, 1])
    drafter = EagleDrafter(m, max_slots=2, max_len=64)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 160, (30,), generator=g).tolist()
    hidden = torch.randn(30, model.config.hidden_size, generator=g)
    seen = {"a": 12, "b": 7}
    for sid, n in seen.items():
        drafter.start(sid, tokens[:n])
        drafter.observe(sid, tokens[:n], hidden[:n])
    for step, grow in enumerate([(3, 1), (1, 4), (2, 2)]):
        reqs = [ProposeRequest(sid, tokens[seen[sid]], budget=8) for sid in ("a", "b")]
        for sid, cands in zip(("a", "b"), drafter.candidates(reqs)):
            n = seen[sid]
            expected = 3 + 9 + 9 if tree == "dynamic" else 3 + 6 + 6  # nodes drafted
            assert len(cands) == expected and len({tuple(c.tokens) for c in cands}) == expected
            assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)
            for c in cands[:4] + cands[-2:]:
                want = reference_path_score(m, hidden[:n], tokens[:n], tokens[n], c.tokens)
                assert c.score == pytest.approx(want, abs=1e-4), (step, sid, c)
        for sid, k in zip(("a", "b"), grow):  # commit the pending token + k-1 more
            n = seen[sid]
            drafter.observe(sid, tokens[n : n + k], hidden[n : n + k])
            seen[sid] = n + k
    drafter.release("a")
    drafter.release("b")
    assert drafter.cache.num_used_slots == 0


def test_dynamic_tree_expands_the_most_likely_paths_only(base):
    _, model = base
    m = eagle_model(model, tree="dynamic", depth=2, dynamic_topk=2)
    drafter = EagleDrafter(m, max_slots=1, max_len=32)
    drafter.start("a", [])
    drafter.observe("a", [3, 4, 5], torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(2)))
    cands = drafter.candidates([ProposeRequest("a", 6, budget=8)])[0]
    first = sorted((c for c in cands if len(c.tokens) == 1), key=lambda c: -c.score)
    second = [c for c in cands if len(c.tokens) == 2]
    assert len(first) == 2 and len(second) == 4
    assert {c.tokens[0] for c in second} == {c.tokens[0] for c in first[:2]}


def test_a_tree_stops_growing_where_no_new_path_is_likely_enough(base):
    """min_path_prob: a tree's depth d+1 is drafted only if its likeliest depth-d node has path
    probability >= the floor; what is drafted equals the unstopped tree cut at that depth."""
    _, model = base
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(20, model.config.hidden_size, generator=g)
    tokens = torch.randint(0, 160, (20,), generator=g).tolist()

    def draft(min_path_prob: float) -> list[list]:
        drafter = EagleDrafter(eagle_model(model, depth=4, dynamic_topk=2, min_path_prob=min_path_prob),
                               max_slots=2, max_len=64)
        for sid, n in (("a", 9), ("b", 14)):
            drafter.start(sid, tokens[:n])
            drafter.observe(sid, tokens[:n], hidden[:n])
        return drafter.candidates([ProposeRequest("a", tokens[9], budget=8), ProposeRequest("b", tokens[14], budget=8)])

    full = draft(0.0)

    def best(cands, depth):
        return max(c.score for c in cands if len(c.tokens) == depth)

    floor = (best(full[0], 1) + best(full[0], 2)) / 2  # "a" drafts depths 1 and 2, then stops
    stopped = draft(math.exp(floor))
    depths_kept = []
    for cands, got in zip(full, stopped):
        keep = next((d for d in range(1, 4) if best(cands, d) < floor), 4)  # the last depth drafted
        depths_kept.append(keep)
        want = [c for c in cands if len(c.tokens) <= keep]
        assert [c.tokens for c in got] == [c.tokens for c in want]
        assert [c.score for c in got] == pytest.approx([c.score for c in want], abs=1e-5)
    assert depths_kept[0] == 2 and len(full[0]) == 2 + 4 + 4 + 4
    with pytest.raises(ValueError, match="min_path_prob"):
        EagleConfig.for_base(model.config, min_path_prob=1.0)


def test_checkpoint_round_trip(base, tmp_path):
    _, model = base
    m = eagle_model(model, tree="static")
    save_drafter(m, tmp_path / "d")
    loaded = load_draft_model(tmp_path / "d", model, dtype=torch.float32)
    for (k, v), (k2, v2) in zip(m.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert loaded.config == m.config
    assert isinstance(load_drafter(tmp_path / "d", model, max_slots=1, max_len=32), EagleDrafter)


@pytest.mark.parametrize("ctc_weight", [0.0, 0.01])
def test_training_reduces_loss_and_resumes(base, tmp_path, ctc_weight):
    _, model = base
    data = synthetic_data(model)
    draft = eagle_model(model, num_labels=3)
    convs = [data.conversation(i) for i in range(len(data))]
    anchors = [anchor_targets(c, 3)[::3] for c in convs]

    def loss() -> tuple[float, dict]:
        with torch.no_grad():
            value, metrics = EagleObjective(draft, ctc_weight)(convs, anchors)
        return float(value), metrics

    before, metrics = loss()
    assert ("ctc_match" in metrics) == bool(ctc_weight)
    cfg = TrainConfig(steps=1, conversations_per_step=4, anchors_per_conversation=8, lr=1e-2, warmup=1,
                      checkpoint_every=1, weight_decay=0.0, ctc_weight=ctc_weight)
    train(draft, data, tmp_path / "e", cfg)
    cfg.steps = 30
    train(draft, data, tmp_path / "e", cfg)  # resumes at step 1
    assert loss()[0] < 0.9 * before
    assert torch.load(tmp_path / "e" / ".train" / "checkpoint.pt", weights_only=False)["step"] == 30


def test_ctc_term_trains_the_blank_and_nothing_else_does(base):
    _, model = base
    data = synthetic_data(model, n=4)
    convs = [data.conversation(i) for i in range(len(data))]
    anchors = [anchor_targets(c, 3)[::5] for c in convs]
    for weight, moves in ((0.0, False), (0.01, True)):
        draft = eagle_model(model, num_labels=3)
        EagleObjective(draft, weight)(convs, anchors)[0].backward()
        grad = draft.blank_head.weight.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) == moves


@pytest.mark.parametrize("variant", ["dynamic", "static", "dynamic+ngram"])
def test_engine_with_eagle_is_lossless(base, tmp_path, variant):
    _, model = base
    tree, _, suffix = variant.partition("+")
    save_drafter(eagle_model(model, tree=tree), tmp_path / "eagle")
    drafter = build_drafter(str(tmp_path / "eagle") + (f"+{suffix}" if suffix else ""), model, max_slots=4, max_len=96)
    reqs = {f"r{i}": (p, GREEDY) for i, p in enumerate(prompts_for(5, seed=23))}
    plain = run_all(make_engine(model, None), reqs)
    spec = run_all(make_engine(model, drafter, max_tree_nodes=8), reqs)
    for rid in reqs:
        assert spec[rid]["tokens"] == plain[rid]["tokens"], rid
    assert sum(o["drafts"] for o in spec.values()) > 0
    assert drafter_free(drafter)
