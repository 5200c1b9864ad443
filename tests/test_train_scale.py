"""Drafter training for large base models, on the demo model: token-budget batches, hidden states
computed online by the frozen base model (equal to stored ones), bf16 autocast on the CPU, and
all three under DDP with two CPU processes (gloo)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from drafter.batches import TokenBudgetBatches, pack_epoch
from drafter.ctc import CTCDraftModel, CTCDrafterConfig
from drafter.data import build_distilled, encode_conversation, load_corpus, token_set
from drafter.medusa import MedusaConfig, MedusaHeads
from drafter.train import CTCObjective, HiddenStates, MedusaObjective, TrainConfig, anchor_targets, batch_conversations, train
from server.runtime.loader import load_model, load_tokenizer
from tests.conftest import DEMO_MODEL, REPO, SHARED_DATA
from tests.test_drafters import run_two_ranks


def random_lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 100) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_packed_epochs_use_every_conversation_once_within_the_budget(world):
    lengths, budget = random_lengths(57, seed=1), 200
    for epoch in range(3):
        batches = pack_epoch(lengths, budget, world, seed=7, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each exactly once
        assert all(sum(lengths[i] for i in b) <= budget for b in batches)
        assert len(batches) % world == 0
        assert batches == pack_epoch(lengths, budget, world, seed=7, epoch=epoch)  # deterministic
    assert pack_epoch(lengths, budget, world, 7, 0) != pack_epoch(lengths, budget, world, 7, 1)  # reshuffled
    assert pack_epoch(lengths, budget, world, 7, 0) != pack_epoch(lengths, budget, world, 8, 0)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_share_out_each_epoch_and_a_fresh_plan_replays_any_step(world):
    lengths, budget = random_lengths(40, seed=2), 150
    plan = TokenBudgetBatches(lengths, budget, world, seed=3)
    seen: list[int] = []
    step = 0
    while plan.locate(step)[0] == 0:  # the whole first epoch, every rank
        per_rank = [plan.ids(step, r) for r in range(world)]
        assert all(per_rank) and all(sum(lengths[i] for i in b) <= budget for b in per_rank)
        seen += itertools.chain(*per_rank)
        step += 1
    assert sorted(seen) == list(range(len(lengths)))
    later = step + 3  # into the second epoch, as a resumed run would ask first
    assert TokenBudgetBatches(lengths, budget, world, seed=3).ids(later, world - 1) == plan.ids(later, world - 1)


def test_token_budget_batches_draw_only_the_given_conversations():
    data = token_set([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 0]), ([6], [1]), ([7, 8, 9, 10], [0, 0, 0, 1])])
    keep = data.with_assistant_text()
    assert keep == [0, 3]  # 1 has no assistant text, 2 none after its first position (no anchor)
    lengths = data.lengths()
    plan = TokenBudgetBatches([lengths[i] for i in keep], 4, world=2, seed=0, ids=keep)
    assert sorted(plan.ids(0, 0) + plan.ids(0, 1)) == [0, 3]


def test_token_budget_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="below the longest conversation"):
        TokenBudgetBatches([10, 300, 20], 200, world=1, seed=0)
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        TokenBudgetBatches([10, 20, 30], 200, world=4, seed=0)
    with pytest.raises(ValueError, match="dealt evenly to 2 ranks"):  # three batches of one: no split helps
        pack_epoch([10, 10, 10], 10, world=2, seed=0, epoch=0)


@pytest.fixture(scope="module")
def demo():
    """The demo model (float32) and a few corpus conversations, encoded (short, to stay fast)."""
    model = load_model(DEMO_MODEL, dtype="float32", device="cpu")
    model.requires_grad_(False)
    tok = load_tokenizer(DEMO_MODEL)
    encoded = (encode_conversation(tok, r["messages"], max_len=96) for r in load_corpus(SHARED_DATA / "corpus.jsonl"))
    return model, list(itertools.islice((e for e in encoded if sum(e[1]) >= 24), 6))  # assistant text to draft


def draft_for(model, kind: str, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "ctc":
            draft = CTCDraftModel(CTCDrafterConfig.for_base(model.config, num_frames=4, num_labels=3))
        else:
            draft = MedusaHeads(MedusaConfig.for_base(model.config, num_heads=3))
    return draft.attach_base(model)


def loss_and_grads(draft, convs):
    """The objective on every 4th anchor of each conversation (fixed, no sampling), and its gradients."""
    objective = CTCObjective(draft) if isinstance(draft, CTCDraftModel) else MedusaObjective(draft)
    anchors = [anchor_targets(c, draft.config.num_labels)[::4] for c in convs]
    draft.zero_grad(set_to_none=True)
    loss, _ = objective(convs, anchors)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in draft.named_parameters()}


@pytest.mark.parametrize("kind", ["ctc", "medusa"])
def test_online_hidden_states_give_the_stored_loss_and_gradients(demo, kind, one_thread):
    model, encoded = demo
    ids = [3, 0, 5, 1]
    stored = batch_conversations(build_distilled(model, encoded, hidden_dtype=torch.float32), ids, None)
    online = batch_conversations(token_set(encoded), ids, model)
    for s, o in zip(stored, online):
        assert torch.equal(s["labels"], o["labels"]) and torch.equal(s["tokens"], o["tokens"])
        torch.testing.assert_close(o["hidden"], s["hidden"], rtol=1e-5, atol=1e-5)
    draft = draft_for(model, kind)
    loss_s, grads_s = loss_and_grads(draft, stored)
    loss_o, grads_o = loss_and_grads(draft, online)
    assert loss_o == pytest.approx(loss_s, rel=1e-5)
    for name in grads_s:
        torch.testing.assert_close(grads_o[name], grads_s[name], rtol=1e-4, atol=1e-6, msg=name)
    # What distill stores by default: fp16 hidden states, which move the loss by rounding only.
    loss_16, _ = loss_and_grads(draft, batch_conversations(build_distilled(model, encoded), ids, None))
    assert loss_16 == pytest.approx(loss_s, rel=1e-2)


def test_training_refuses_stored_mode_without_stored_hidden_states(demo, tmp_path):
    model, encoded = demo
    with pytest.raises(ValueError, match="--hidden-states online"):
        train(draft_for(model, "ctc"), token_set(encoded), tmp_path, TrainConfig(steps=1))
    with pytest.raises(ValueError, match="need the base model"):
        train(draft_for(model, "ctc"), token_set(encoded), tmp_path, TrainConfig(steps=1, hidden_states=HiddenStates.ONLINE))


def test_bf16_autocast_online_packed_training_lowers_the_loss_on_a_bf16_base(demo, tmp_path, one_thread):
    _, encoded = demo
    base = load_model(DEMO_MODEL, dtype="bfloat16", device="cpu")
    base.requires_grad_(False)
    data = token_set(encoded)
    draft = draft_for(base, "ctc")
    convs = batch_conversations(data, range(len(data)), base)

    def fixed_loss() -> float:  # float32 (no autocast), the same anchors before and after
        objective, anchors = CTCObjective(draft), [anchor_targets(c, 3)[::4] for c in convs]
        with torch.no_grad():
            return float(objective(convs, anchors)[0])

    before = fixed_loss()
    cfg = TrainConfig(steps=12, anchors_per_conversation=8, lr=1e-2, warmup=1, weight_decay=0.0, checkpoint_every=12,
                      max_tokens_per_batch=200, hidden_states=HiddenStates.ONLINE, autocast_bf16=True)
    metrics = train(draft, data, tmp_path, cfg, base=base)
    after = fixed_loss()
    assert after < 0.9 * before, (before, after, metrics)
    assert all(p.dtype == torch.float32 for p in draft.parameters())  # master weights
    opt = torch.load(tmp_path / ".train" / "checkpoint.pt", weights_only=False)["opt"]
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt["state"].values())


def test_the_autocast_option_changes_the_training_step(demo, tmp_path, one_thread):
    """A negative control for the test above: one step with and without autocast, from the same
    weights on the same batch, must differ (bf16 matmuls), or the option never reached the step."""
    model, encoded = demo
    weights = []
    for on in (False, True):
        draft = draft_for(model, "ctc")
        cfg = TrainConfig(steps=1, anchors_per_conversation=8, warmup=1, max_tokens_per_batch=200,
                          hidden_states=HiddenStates.ONLINE, autocast_bf16=on)
        train(draft, token_set(encoded), tmp_path / str(on), cfg, base=model)
        weights.append(draft.state_dict())
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


DDP_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, {repo!r})
import drafter.train
from drafter import cli

def train_and_keep(draft, *args, **kwargs):  # the CLI's own train(), keeping each rank's weights
    rank = os.environ["RANK"]  # train() starts the process group
    torch.save(draft.state_dict(), {tmp!r} + f"/init{{rank}}.pt")
    metrics = drafter.train.real_train(draft, *args, **kwargs)
    torch.save(draft.state_dict(), {tmp!r} + f"/rank{{rank}}.pt")
    return metrics

drafter.train.real_train, drafter.train.train = drafter.train.train, train_and_keep
code = cli.main(["train", "--model", {model!r}, "--data", {data!r}, "--out", {out!r}, "--threads", "1",
                 "--hidden-states", "online", "--dtype", "bfloat16", "--autocast", "bf16",
                 "--max-tokens-per-batch", "160", "--steps", "3", "--anchors", "4", "--frames", "4",
                 "--labels", "3", "--layers", "1"])
torch.distributed.destroy_process_group()
sys.exit(code)
"""


@pytest.mark.slow
def test_ddp_two_processes_online_bf16_packed_stay_in_sync(demo, tmp_path):
    from drafter import cli
    from drafter.loading import load_drafter

    data = tmp_path / "data"
    assert cli.main(["distill", "--model", str(DEMO_MODEL), "--out", str(data), "--hidden-states", "online",
                     "--max-conversations", "8", "--max-len", "96"]) == 0
    with safe_open(str(data / "shard-0000.safetensors"), framework="pt") as shard:
        assert set(shard.keys()) == {"tokens", "assistant", "offsets"}  # no hidden states, no labels
    out = tmp_path / "drafter"
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), model=str(DEMO_MODEL), data=str(data), out=str(out),
                                        tmp=str(tmp_path)))
    run_two_ranks(script)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    init = torch.load(tmp_path / "init0.pt")  # DDP starts every rank from rank 0's weights
    assert all(torch.equal(a[k], b[k]) for k in a)  # and kept them in sync
    assert any(not torch.equal(a[k], init[k]) for k in a), "training changed nothing"
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() == a.keys() and all(torch.equal(saved[k], a[k]) for k in a)
    training = json.loads((out / "config.json").read_text())["training"]
    assert (training["hidden_states"], training["autocast_bf16"], training["max_tokens_per_batch"]) == ("online", True, 160)
    load_drafter(out, demo[0], max_slots=1, max_len=64)  # it serves next to the base model


def test_a_torchrun_rank_keeps_a_cpu_device(monkeypatch):
    from drafter.cli import rank_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert rank_device("auto") == "auto"  # resolved to the CPU by the loader, as without torchrun
