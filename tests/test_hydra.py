"""Hydra heads: sequentially dependent drafting, checkpoints, training, and losslessness."""

from __future__ import annotations

import pytest
import torch

from drafter.base import ProposeRequest
from drafter.hydra import HydraConfig, HydraDrafter, HydraHeads, HydraObjective
from drafter.loading import load_draft_model, load_drafter, save_drafter
from drafter.train import TrainConfig, anchor_targets, train
from server.engine.factory import build_drafter
from tests.test_drafters import base, drafter_free, seeded, synthetic_data  # noqa: F401 - base is a fixture
from tests.test_engine import GREEDY, make_engine, prompts_for, run_all


def hydra_model(base_model, **kw) -> HydraHeads:
    """Random heads (not the identity start), so that every head depends on its whole input."""

    def build():
        m = HydraHeads(HydraConfig.for_base(base_model.config, **kw))
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.05)
        return m.attach_base(base_model)

    return seeded(build)


@torch.no_grad()
def test_candidates_score_each_path_with_heads_that_see_the_draft_so_far(base):
    _, model = base
    m = hydra_model(model, num_heads=3, topk_per_head=[3, 2, 2])
    drafter = HydraDrafter(m)
    h = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for sid, hid in zip("ab", h):
        drafter.start(sid, [])
        drafter.observe(sid, [5, 6], torch.stack([torch.zeros_like(hid), hid]))
    cands = drafter.candidates([ProposeRequest("a", 7, budget=16), ProposeRequest("b", 9, budget=16)])
    for cs, hid, pending in zip(cands, h, (7, 9)):
        assert len(cs) == 3 + 3 * 2 + 3 * 2 * 2  # every node of the static tree
        assert len({tuple(c.tokens) for c in cs}) == len(cs)
        for c in cs:  # reference: one head call per position, on this path alone
            prefix, want = [pending], 0.0
            for k, tok in enumerate(c.tokens):
                lp = torch.log_softmax(m.head_logits(k, hid[None], torch.tensor([prefix])), -1)[0]
                want += float(lp[tok])
                prefix.append(tok)
            assert c.score == pytest.approx(want, abs=1e-4)
    # Head 1 reads the token drafted before it: the same first token, other pending token, other scores.
    x = torch.tensor([[7, 1], [9, 1]])
    assert not torch.allclose(m.head_logits(1, h[:1].expand(2, -1), x)[0], m.head_logits(1, h[:1].expand(2, -1), x)[1])


def test_checkpoint_round_trip(base, tmp_path):
    _, model = base
    m = hydra_model(model, num_heads=3, num_layers=2)
    save_drafter(m, tmp_path / "d")
    loaded = load_draft_model(tmp_path / "d", model, dtype=torch.float32)
    for (k, v), (k2, v2) in zip(m.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert loaded.config == m.config
    assert isinstance(load_drafter(tmp_path / "d", model, max_slots=1, max_len=32), HydraDrafter)


def test_training_reduces_loss_and_resumes(base, tmp_path):
    _, model = base
    data = synthetic_data(model)
    draft = seeded(lambda: HydraHeads(HydraConfig.for_base(model.config, num_heads=3)).attach_base(model))
    convs = [data.conversation(i) for i in range(len(data))]
    anchors = [anchor_targets(c, 3)[::3] for c in convs]

    def loss() -> float:
        with torch.no_grad():
            return float(HydraObjective(draft)(convs, anchors)[0])

    before = loss()
    cfg = TrainConfig(steps=1, conversations_per_step=4, lr=1e-2, warmup=1, checkpoint_every=1, weight_decay=0.0)
    train(draft, data, tmp_path / "h", cfg)
    cfg.steps = 40
    train(draft, data, tmp_path / "h", cfg)  # resumes at step 1
    assert loss() < 0.9 * before
    assert torch.load(tmp_path / "h" / ".train" / "checkpoint.pt", weights_only=False)["step"] == 40
    assert (tmp_path / "h" / "model.safetensors").is_file()


@pytest.mark.parametrize("suffix", ["", "+ngram"])
def test_engine_with_hydra_is_lossless(base, tmp_path, suffix):
    _, model = base
    save_drafter(hydra_model(model, num_heads=3), tmp_path / "hydra")
    drafter = build_drafter(str(tmp_path / "hydra") + suffix, model, max_slots=4, max_len=96)
    assert drafter.name == "hydra" + suffix
    reqs = {f"r{i}": (p, GREEDY) for i, p in enumerate(prompts_for(5, seed=23))}
    plain = run_all(make_engine(model, None), reqs)
    spec = run_all(make_engine(model, drafter, max_tree_nodes=8), reqs)
    for rid in reqs:
        assert spec[rid]["tokens"] == plain[rid]["tokens"], rid
    assert sum(o["drafts"] for o in spec.values()) > 0
    assert drafter_free(drafter)
