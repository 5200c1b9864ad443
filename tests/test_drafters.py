"""CTC drafter and Medusa baseline: caching, checkpoints, training, DDP, and losslessness."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from drafter.base import Drafter, LookAhead, ProposeRequest
from drafter.candidates import Candidate
from drafter.ctc import CTCDraftModel, CTCDrafter, CTCDrafterConfig
from drafter.data import DistilledSet, build_distilled
from drafter.hybrid import LookupHybridDrafter
from drafter import loading
from drafter.loading import (DrafterLoadError, dtype_candidates, fastest_dtype, load_draft_model, load_drafter,
                             save_drafter)
from drafter.medusa import MedusaConfig, MedusaHeads
from drafter.tree import build_trie, trie_size
from drafter.train import TrainConfig, anchor_targets, anchors_per_conversation, train
from server.engine.factory import build_drafter
from server.runtime.batch import ForwardItem, build_batch
from server.runtime.loader import load_model
from tests.conftest import REPO
from tests.test_engine import GREEDY, make_engine, prompts_for, run_all


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tests.conftest import make_hf_model

    path = tmp_path_factory.mktemp("base")
    make_hf_model("llama3", seed=1).save_pretrained(path)
    model = load_model(path, dtype="float32", device="cpu")
    model.requires_grad_(False)
    return path, model


def seeded(build, seed: int = 0):
    """build() with the global RNG seeded, which is restored afterwards (no test sees the seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def ctc_model(base_model, **kw) -> CTCDraftModel:
    return seeded(lambda: CTCDraftModel(CTCDrafterConfig.for_base(base_model.config, **kw)).attach_base(base_model))


def reference_frames(m: CTCDraftModel, hidden: torch.Tensor, tokens: list[int], pending: int,
                     following: list[int] | None = None) -> torch.Tensor:
    """All context positions and the frames in one cache-free forward (the training layout).
    `following`: each position's next token, if not the next one in `tokens` (then `pending`)."""
    N = m.config.num_frames
    ctx = m.inputs(hidden, torch.tensor(following or tokens[1:] + [pending]))
    x = torch.cat([ctx, m.frame_inputs(ctx[-1:])[0]])  # (T, H)
    batch = build_batch([ForwardItem(0, 0, [0] * len(x))], 1 << 20)
    y = m.run(x, batch.meta, cache=None)
    return torch.log_softmax(m.frame_logits(y[-N:]), -1)


@pytest.mark.parametrize("frame_inputs", ["queries", "anchored"])
def test_ctc_drafter_incremental_cache_equals_full_forward(base, frame_inputs):
    _, model = base
    m = ctc_model(model, num_frames=5, num_labels=3, frame_inputs=frame_inputs)
    drafter = CTCDrafter(m, max_slots=2, max_len=64)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 160, (30,), generator=g).tolist()
    hidden = torch.randn(30, 64, generator=g)
    drafter.start("a", tokens[:12])
    drafter.start("b", tokens[:7])
    drafter.observe("a", tokens[:12], hidden[:12])
    drafter.observe("b", tokens[:7], hidden[:7])
    seen = {"a": 12, "b": 7}
    for step, grow in enumerate([(3, 1), (1, 4), (2, 2)]):
        reqs = [ProposeRequest(sid, tokens[seen[sid]], budget=8) for sid in ("a", "b")]
        got = drafter.frames(reqs)
        for b, sid in enumerate(("a", "b")):
            n = seen[sid]
            want = reference_frames(m, hidden[:n], tokens[:n], tokens[n])
            torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5, msg=f"step {step} seq {sid}")
        for sid, k in zip(("a", "b"), grow):  # commit the pending token + k-1 more
            n = seen[sid]
            drafter.observe(sid, tokens[n : n + k], hidden[n : n + k])
            seen[sid] = n + k
    drafter.release("a")
    drafter.release("b")
    assert drafter.cache.num_used_slots == 0


@pytest.mark.parametrize("frame_inputs", ["queries", "anchored"])
def test_ctc_look_ahead_frames_equal_the_next_steps_frames_whatever_the_paths_lengths(base, frame_inputs):
    """The look-ahead (base.Drafter.look_ahead) runs next step's forward at the end of this one,
    over this step's accepted paths padded to the deepest tree + 1 (width 4 here) with junk past
    each path's length. Its frames equal a cache-free forward over exactly the accepted context,
    and `observe` then commits exactly the accepted positions: round after round, for sequences
    with context rows still pending from before (the prompt; a step without look-ahead) too."""
    _, model = base
    m = ctc_model(model, num_frames=5, num_labels=3, frame_inputs=frame_inputs)
    drafter = CTCDrafter(m, max_slots=3, max_len=64)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 160, (48,), generator=g).tolist()
    hidden = torch.randn(48, 64, generator=g)
    seen = {"a": 10, "b": 7, "c": 12}
    for sid, n in seen.items():
        drafter.start(sid, tokens[:n])
        drafter.observe(sid, tokens[:n], hidden[:n])
    width = 4
    rounds = [{"a": 1, "b": 3, "c": 4}, {"a": 4, "b": 1}, {"a": 2, "b": 2, "c": 1}]  # c skips round 2
    for step, lengths in enumerate(rounds):
        ids = list(lengths)
        path_hidden = torch.randn(len(ids), width, 64, generator=g)  # junk past each path
        path_tokens = torch.randint(0, 160, (len(ids), width), generator=g)
        for k, sid in enumerate(ids):
            n, L = seen[sid], lengths[sid]
            path_hidden[k, :L] = hidden[n : n + L]
            path_tokens[k, :L] = torch.tensor(tokens[n + 1 : n + 1 + L])  # the token after each path node
        ahead = LookAhead(ids, [tokens[seen[sid]] for sid in ids], path_hidden, path_tokens,
                          torch.tensor([lengths[sid] for sid in ids]))
        with torch.inference_mode():
            got_ids, y = drafter.ahead_forward(ahead, m.config.num_frames, m.frame_inputs)
            got = torch.log_softmax(m.frame_logits(y), dim=-1)
        assert got_ids == ids
        for k, sid in enumerate(ids):
            n = seen[sid] + lengths[sid]  # the context after this step; tokens[n] is the next pending token
            want = reference_frames(m, hidden[:n], tokens[:n], tokens[n])
            torch.testing.assert_close(got[k], want, atol=1e-5, rtol=1e-5, msg=f"round {step} seq {sid}")
        drafter.take_look_ahead(drafter._device_half(got))
        for sid in ids:
            n = seen[sid]
            drafter.observe(sid, tokens[n : n + lengths[sid]], hidden[n : n + lengths[sid]])
            seen[sid] = n + lengths[sid]
            assert drafter.cache.lengths[drafter.state[sid].slot] == seen[sid]
        if "c" not in ids:  # a step without look-ahead for c: two tokens wait for its next forward
            drafter.observe("c", tokens[seen["c"] : seen["c"] + 2], hidden[seen["c"] : seen["c"] + 2])
            seen["c"] += 2
    ready = drafter.take_ready([ProposeRequest(sid, tokens[n], budget=8) for sid, n in seen.items()])
    assert sorted(ready) == [0, 1, 2]  # every sequence's next propose needs no forward and no copy
    for sid in seen:
        drafter.release(sid)
    assert drafter.cache.num_used_slots == 0


def test_ctc_drafter_catches_up_on_recent_tokens_only_after_a_long_plain_run(base):
    _, model = base
    m = ctc_model(model, num_frames=5, num_labels=3)
    drafter = CTCDrafter(m, max_slots=1, max_len=96, catch_up=6)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 160, (60,), generator=g).tolist()
    hidden = torch.randn(60, 64, generator=g)
    drafter.start("a", tokens[:20])
    drafter.observe("a", tokens[:20], hidden[:20])  # the prompt: taken in whole, whatever its length
    drafter.frames([ProposeRequest("a", tokens[20], budget=8)])
    assert drafter.cache.lengths[drafter.state["a"].slot] == 20
    drafter.observe("a", tokens[20:50], hidden[20:50])  # 30 tokens decoded without drafts
    got = drafter.frames([ProposeRequest("a", tokens[50], budget=8)])[0]
    assert drafter.cache.lengths[drafter.state["a"].slot] == 26  # the prompt, then the last 6 of the 30
    # The same frames as a drafter that saw exactly that context: prompt + tokens[44:50], each
    # position fused with the token that really followed it.
    keep = list(range(20)) + list(range(44, 50))
    want = reference_frames(m, hidden[keep], [tokens[i] for i in keep], tokens[50], [tokens[i + 1] for i in keep])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ctc", "medusa"])
def test_drafter_runs_in_the_faster_dtype_beside_a_float32_base(base, tmp_path, kind, monkeypatch):
    """On a CPU with native bfloat16 a float32 base allows a bfloat16 drafter; loading times a
    propose in each and keeps the faster (float32, the base's, unless bfloat16 wins by 5%)."""
    path, model = base
    m = ctc_model(model, num_frames=4, num_labels=2) if kind == "ctc" else MedusaHeads(
        MedusaConfig.for_base(model.config, num_heads=2)).attach_base(model)
    save_drafter(m, tmp_path / "d")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert dtype_candidates(model) == ([torch.float32, torch.bfloat16] if native else [torch.float32])
    monkeypatch.setattr(loading, "_cpu_has_bf16", lambda: True)  # both candidates, whatever this CPU has
    chosen, ms = fastest_dtype(tmp_path / "d", model)
    assert set(ms) == {torch.float32, torch.bfloat16} and all(t > 0 for t in ms.values())
    assert chosen == (torch.bfloat16 if ms[torch.bfloat16] < 0.95 * ms[torch.float32] else torch.float32)
    for dt in (torch.float32, torch.bfloat16):  # whichever the timing picks, it drafts
        drafter = load_drafter(tmp_path / "d", model, max_slots=1, max_len=32, dtype=dt)
        assert {p.dtype for p in drafter.model.parameters()} == {dt}
        assert model.lm_head.weight.dtype == torch.float32  # the base keeps its own weights
        drafter.start("a", [])
        drafter.observe("a", [5, 6, 7], torch.randn(3, model.config.hidden_size))
        (tree,) = drafter.propose([ProposeRequest("a", 8, budget=4)])
        assert 1 <= tree.num_nodes <= 5


def test_the_dtype_timing_keeps_the_base_dtype_unless_the_other_is_clearly_faster(base, tmp_path, monkeypatch):
    path, model = base
    save_drafter(ctc_model(model, num_frames=4, num_labels=2), tmp_path / "d")
    monkeypatch.setattr(loading, "_cpu_has_bf16", lambda: True)
    for fp32_ms, bf16_ms, want in [(1.0, 0.97, torch.float32), (1.0, 0.90, torch.bfloat16), (1.0, 1.3, torch.float32)]:
        fake = {torch.float32: fp32_ms, torch.bfloat16: bf16_ms}

        def timer(drafter, hidden_size, device, fake=fake):
            dt = next(drafter.model.parameters()).dtype
            while True:
                yield fake[dt]

        monkeypatch.setattr(loading, "propose_ms", timer)
        assert fastest_dtype(tmp_path / "d", model) == (want, fake)
    monkeypatch.setattr(loading, "_cpu_has_bf16", lambda: False)
    assert fastest_dtype(tmp_path / "d", model) == (torch.float32, {})  # one candidate: nothing timed


def test_checkpoint_round_trip_and_mismatch_refused(base, tmp_path):
    path, model = base
    m = ctc_model(model, num_frames=4, num_labels=2)
    save_drafter(m, tmp_path / "d")
    loaded = load_draft_model(tmp_path / "d", model, dtype=torch.float32)
    for (k, v), (k2, v2) in zip(m.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert isinstance(load_drafter(tmp_path / "d", model, max_slots=1, max_len=32), CTCDrafter)
    from tests.conftest import make_hf_model

    other_path = tmp_path / "other"
    make_hf_model("qwen2").save_pretrained(other_path)
    other = load_model(other_path, dtype="float32", device="cpu")
    with pytest.raises(DrafterLoadError, match="architecture LlamaForCausalLM.*Qwen2ForCausalLM"):
        load_drafter(tmp_path / "d", other, max_slots=1, max_len=32)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"kind": "lookahead"}')
    with pytest.raises(DrafterLoadError, match="unknown drafter kind 'lookahead'"):
        load_drafter(tmp_path / "bad", model, max_slots=1, max_len=32)


def synthetic_data(model, n: int = 12, T: int = 40) -> DistilledSet:
    """Conversations whose second half is 'assistant'; labels from the base model itself."""
    seqs = prompts_for(n, seed=21)
    encoded = []
    g = torch.Generator().manual_seed(22)
    for _ in range(n):
        ids = torch.randint(0, 160, (T,), generator=g).tolist()
        encoded.append((ids, [0] * (T // 2) + [1] * (T - T // 2)))
    del seqs
    return build_distilled(model, encoded)


def test_distilled_data_from_several_directories_loads_as_one_set(base, tmp_path):
    from drafter.data import load_distilled

    _, model = base
    g = torch.Generator().manual_seed(5)
    encoded = [(torch.randint(0, 160, (20 + i,), generator=g).tolist(), [0] * 10 + [1] * (10 + i)) for i in range(5)]
    for name, part in (("a", encoded[:3]), ("b", encoded[3:])):
        (tmp_path / name).mkdir()
        build_distilled(model, part).save(tmp_path / name / "shard-0000.safetensors")
    (tmp_path / "empty").mkdir()
    both, whole = load_distilled([tmp_path / "a", tmp_path / "b"]), build_distilled(model, encoded)
    assert len(both) == 5
    for i in range(5):
        got, want = both.conversation(i), whole.conversation(i)
        assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    with pytest.raises(FileNotFoundError, match="empty"):
        load_distilled([tmp_path / "a", tmp_path / "empty"])


def test_perturb_numbers_changes_user_numbers_only():
    import random
    import re

    from drafter.data import perturb_numbers

    conv = [{"role": "system", "content": "Be brief, 3 lines."},
            {"role": "user", "content": "Tom has 12 apples and 3 pears; each costs $4.50 in 2024."},
            {"role": "assistant", "content": "12 + 3 = 15"}]
    out = perturb_numbers(conv, random.Random(0))
    assert out[0] == conv[0] and out[2] == conv[2] and conv[1]["content"].startswith("Tom has 12")
    before, after = conv[1]["content"], out[1]["content"]
    nums_before, nums_after = re.findall(r"\d+", before), re.findall(r"\d+", after)
    assert [len(n) for n in nums_before] == [len(n) for n in nums_after]
    assert all(a != b for a, b in zip(nums_before, nums_after))
    assert re.sub(r"\d", "#", before) == re.sub(r"\d", "#", after)  # only the digits moved
    assert all(len(n) == 1 or not n.startswith("0") for n in nums_after)


def test_regenerate_rewrites_assistant_turns_greedily_or_sampled_and_seeded():
    from drafter.data import regenerate
    from server.engine.engine import EngineConfig, LLMEngine
    from server.runtime.loader import load_model, load_tokenizer
    from tests.conftest import DEMO_MODEL

    model, tok = load_model(DEMO_MODEL, dtype="float32", device="cpu"), load_tokenizer(DEMO_MODEL)
    convs = [[{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": "teacher"},
              {"role": "user", "content": "Are you sure?"}, {"role": "assistant", "content": "teacher"}]
             for a, b in [(2, 3), (2, 3), (40, 17)]]

    def run(**kw):
        engine = LLMEngine(model, tok, EngineConfig(max_model_len=256))
        return regenerate(engine, tok, convs, max_tokens=24, **kw)

    greedy, sampled, again = run(), run(temperature=1.0, seed=7), run(temperature=1.0, seed=7)
    for out in (greedy, sampled):
        assert [m["role"] for m in out[0]] == ["user", "assistant", "user", "assistant"]
        assert all(m["content"] != "teacher" for c in out for m in c if m["role"] == "assistant")
        assert all(o[k] == c[k] for o, c in zip(out, convs) for k in (0, 2))  # user turns untouched
    assert greedy[0] == greedy[1]  # one question, one greedy answer
    assert sampled == again and sampled[0] != sampled[1]  # seeded per conversation
    assert sampled != greedy


def test_anchor_targets_stay_inside_assistant_turns():
    conv = {"assistant": torch.tensor([0, 0, 1, 1, 1, 0, 1]), "labels": torch.arange(10, 17)}
    got = anchor_targets(conv, K=2)
    assert got == [(1, [12, 13]), (2, [13, 14]), (3, [14]), (5, [16])]


def fixed_loss(draft, data) -> float:
    """The objective on a fixed set of conversations and anchors (no sampling, no noise)."""
    from drafter.train import CTCObjective, MedusaObjective

    objective = CTCObjective(draft) if isinstance(draft, CTCDraftModel) else MedusaObjective(draft)
    convs = [data.conversation(i) for i in range(len(data))]
    anchors = [anchor_targets(c, draft.config.num_labels)[::3] for c in convs]
    with torch.no_grad():
        return float(objective(convs, anchors)[0])


@pytest.mark.parametrize("kind", ["ctc", "ctc-anchored", "medusa"])
def test_training_reduces_loss_and_resumes(base, tmp_path, kind):
    _, model = base
    data = synthetic_data(model)
    if kind.startswith("ctc"):
        draft = ctc_model(model, num_frames=4, num_labels=3,
                          frame_inputs="anchored" if kind == "ctc-anchored" else "queries")
    else:
        draft = seeded(lambda: MedusaHeads(MedusaConfig.for_base(model.config, num_heads=3)).attach_base(model))
    before = fixed_loss(draft, data)
    cfg = TrainConfig(steps=1, conversations_per_step=4, anchors_per_conversation=8 if kind.startswith("ctc") else None,
                      lr=1e-2, warmup=1, checkpoint_every=1, weight_decay=0.0)  # a fitting test: no regularisation
    train(draft, data, tmp_path / kind, cfg)
    cfg.steps = 40
    train(draft, data, tmp_path / kind, cfg)  # resumes at step 1
    after = fixed_loss(draft, data)
    assert after < 0.9 * before, (before, after)
    state = torch.load(tmp_path / kind / ".train" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 40
    assert (tmp_path / kind / "model.safetensors").is_file()


def test_train_init_starts_from_a_trained_drafter_and_keeps_its_architecture(base, tmp_path, caplog):
    from drafter import cli

    path, model = base
    data = synthetic_data(model)
    (tmp_path / "data").mkdir()
    data.save(tmp_path / "data" / "shard-0000.safetensors")
    start = ctc_model(model, num_frames=4, num_labels=3, frame_inputs="anchored")
    save_drafter(start, tmp_path / "start")
    common = ["train", "--model", str(path), "--data", str(tmp_path / "data"), "--init", str(tmp_path / "start"),
              "--threads", str(torch.get_num_threads()), "--anchors", "8", "--conversations-per-step", "4",
              "--weight-decay", "0"]
    # --frames/--labels/--frame-inputs are the init's, whatever the flags say
    assert cli.main(common + ["--out", str(tmp_path / "more"), "--steps", "30", "--lr", "1e-2", "--frames", "6"]) == 0
    more = load_draft_model(tmp_path / "more", model, dtype=torch.float32)
    assert (more.config.num_frames, more.config.num_labels, more.config.frame_inputs) == (4, 3, "anchored")
    recorded = json.loads((tmp_path / "more" / "config.json").read_text())["training"]
    assert recorded["init"] == str(tmp_path / "start") and recorded["steps"] == 30
    assert fixed_loss(more, data) < 0.9 * fixed_loss(start, data)
    # at learning rate 0 the weights it starts from are the init's, not a fresh draw
    assert cli.main(common + ["--out", str(tmp_path / "same"), "--steps", "1", "--lr", "0"]) == 0
    same = load_draft_model(tmp_path / "same", model, dtype=torch.float32)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in start.state_dict().items())
    assert cli.main(common + ["--out", str(tmp_path / "x"), "--steps", "1", "--kind", "medusa"]) == 2
    assert "is a ctc drafter, but --kind is medusa" in caplog.text


def test_anchors_per_conversation_defaults_by_kind_and_obeys_the_flag():
    # The per-anchor objectives sample 24 by default; the head drafters take every anchor (None).
    assert anchors_per_conversation("ctc", TrainConfig()) == 24
    assert anchors_per_conversation("eagle", TrainConfig()) == 24
    assert anchors_per_conversation("hydra", TrainConfig()) is None
    assert anchors_per_conversation("medusa", TrainConfig()) is None
    # Given, it holds for every kind (an equal-examples comparison); 0 means every anchor.
    assert anchors_per_conversation("hydra", TrainConfig(anchors_per_conversation=5)) == 5
    assert anchors_per_conversation("ctc", TrainConfig(anchors_per_conversation=0)) is None
    with pytest.raises(ValueError, match="--anchors"):
        TrainConfig(anchors_per_conversation=-1)


DDP_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, {repo!r})
from tests.test_drafters import ctc_model, synthetic_data
from server.runtime.loader import load_model
from drafter.train import TrainConfig, train
torch.set_num_threads(1)
model = load_model({base!r}, dtype="float32", device="cpu"); model.requires_grad_(False)
m = ctc_model(model, num_frames=4, num_labels=3)
train(m, synthetic_data(model), __import__("pathlib").Path({out!r}),
      TrainConfig(steps=4, conversations_per_step=2, anchors_per_conversation=4, warmup=1, checkpoint_every=100))
rank = torch.distributed.get_rank()
torch.save(m.state_dict(), {out!r} + f"/rank{{rank}}.pt")
torch.distributed.destroy_process_group()
"""


def run_two_ranks(script) -> None:
    """`script` under torchrun with 2 processes, one thread each; fails the test on a non-zero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    # Own process group, so a hang kills the workers too, not only the launcher.
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(base, tmp_path):
    path, _ = base
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), base=str(path), out=str(tmp_path)))
    run_two_ranks(script)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    init = ctc_model(load_model(path, dtype="float32", device="cpu"), num_frames=4, num_labels=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a), "training changed nothing"


@pytest.mark.parametrize("acceptance", ["path", "all-nodes"])
@pytest.mark.parametrize("kind", ["ctc-beam", "ctc-static", "ctc-anchored", "medusa", "ctc-beam+ngram", "medusa+ngram"])
def test_engine_with_trained_drafter_kinds_is_lossless(base, tmp_path, kind, acceptance):
    """Random-init drafters propose mostly wrong trees: outputs must still equal plain greedy, on
    both acceptance paths."""
    path, model = base
    learned = kind.removesuffix("+ngram")
    if learned.startswith("ctc"):
        variant = learned.split("-")[1]  # a candidate search, or "anchored" frame inputs (with beam search)
        m = ctc_model(model, num_frames=5, num_labels=3, **(
            {"frame_inputs": "anchored"} if variant == "anchored" else {"candidates": variant}))
    else:
        m = MedusaHeads(MedusaConfig.for_base(model.config, num_heads=3)).attach_base(model)
    save_drafter(m, tmp_path / learned)
    drafter = build_drafter(str(tmp_path / kind), model, max_slots=4, max_len=96)
    assert drafter.name == {"ctc-beam": "ctc", "ctc-static": "ctc", "ctc-anchored": "ctc", "medusa": "medusa"}.get(
        kind, learned.split("-")[0] + "+ngram")
    reqs = {f"r{i}": (p, GREEDY) for i, p in enumerate(prompts_for(5, seed=23))}
    plain = run_all(make_engine(model, None), reqs)
    spec = run_all(make_engine(model, drafter, max_tree_nodes=8, acceptance=acceptance), reqs)
    for rid in reqs:
        assert spec[rid]["tokens"] == plain[rid]["tokens"], rid
    assert sum(o["drafts"] for o in spec.values()) > 0
    assert drafter_free(drafter)


def drafter_free(drafter) -> bool:
    drafter = getattr(drafter, "learned", drafter)
    cache = getattr(drafter, "cache", None)
    return cache is None or cache.num_used_slots == 0


class _ScriptedDrafter(Drafter):
    """A learned drafter stand-in that offers fixed candidates and records who asked."""

    name = "scripted"

    def __init__(self, cands: list[Candidate]):
        self.cands, self.asked, self.seen = cands, [], []

    def observe(self, seq_id, token_ids, hidden):
        self.seen += token_ids

    def candidates(self, requests):
        self.asked += [r.seq_id for r in requests]
        return [list(self.cands) for _ in requests]

    def propose(self, requests):  # pragma: no cover - the hybrid only calls candidates()
        raise AssertionError


def test_hybrid_ranks_strong_lookup_first_and_skips_the_learned_drafter_on_long_matches():
    learned = _ScriptedDrafter([Candidate([70, 71], -0.1), Candidate([72], -0.5)])
    hybrid = LookupHybridDrafter(learned, lookup_min_ngram=2, skip_learned_ngram=3)
    hybrid.start("a", [])
    hybrid.observe("a", [1, 2, 3, 4, 5, 9, 1, 2], None)  # with the pending 3, "1 2 3" recurs
    assert learned.seen == [1, 2, 3, 4, 5, 9, 1, 2]

    # A 3-gram match (1 2 3): lookup drafts alone, the learned drafter is not asked.
    tree = hybrid.propose([ProposeRequest("a", 3, budget=3)])[0]
    assert tree.tokens == [3, 4, 5, 9] and learned.asked == []
    assert hybrid.learned_skipped == 1

    # Pending 9 after "... 2 3": only the 1-gram "9" matches (continuation 1 2 3), weak evidence, so
    # the learned drafter is asked and its candidates take the budget first.
    hybrid.observe("a", [3], None)
    tree = hybrid.propose([ProposeRequest("a", 9, budget=4)])[0]
    assert learned.asked == ["a"]
    assert tree.tokens == [9, 70, 71, 72, 1] and tree.parents == [-1, 0, 1, 0, 0]  # best first


def test_hybrid_skips_the_learned_drafter_where_strong_lookup_fills_the_budget():
    learned = _ScriptedDrafter([Candidate([70, 71], -0.1), Candidate([72], -0.5)])
    hybrid = LookupHybridDrafter(learned, lookup_min_ngram=2, skip_learned_ngram=None)  # no length rule
    hybrid.start("a", [])
    hybrid.observe("a", [5, 1, 2, 3, 4, 6, 7, 5], None)  # with the pending 1, "5 1" recurs (a 2-gram)

    # Budget 4: lookup drafts 2 3 4 6, four strong nodes, and every learned node would rank below
    # them: the learned drafter is not asked, and the tree is the one it would have made anyway.
    tree = hybrid.propose([ProposeRequest("a", 1, budget=4)])[0]
    assert learned.asked == [] and hybrid.learned_skipped == 1
    asked_anyway = build_trie(1, [[2, 3, 4, 6], [70, 71], [72]], [1.0, -0.1, -0.5], max_nodes=4)
    assert (tree.tokens, tree.parents) == (asked_anyway.tokens, asked_anyway.parents) == ([1, 2, 3, 4, 6], [-1, 0, 1, 2, 3])
    assert tree.forward_above == 6  # for the governor: lookup's full-depth draft fills budgets up to 6

    # Budget 8: lookup's six nodes (the text ends there) leave room: the learned drafter is asked
    # and its best nodes fill the rest.
    tree = hybrid.propose([ProposeRequest("a", 1, budget=8)])[0]
    assert learned.asked == ["a"]
    assert tree.tokens == [1, 2, 3, 4, 6, 7, 5, 70, 71] and tree.forward_above == 6


def test_trie_size_counts_distinct_prefixes():
    assert trie_size([]) == trie_size([[]]) == 0
    assert trie_size([[1, 2, 3], [1, 2, 4], [1, 2, 3], [5]]) == 5  # 1, 12, 123, 124, 5
    assert trie_size([[1, 2, 3], [1, 2, 4], [5]]) == len(build_trie(0, [[1, 2, 3], [1, 2, 4], [5]]).tokens) - 1


def test_hybrid_ranks_a_weak_lookup_match_at_its_weak_score_among_learned_candidates():
    """A 1-token match's candidate gets `weak_score` (a log-probability): learned candidates above
    it take the budget first, those below it come after it."""
    learned = _ScriptedDrafter([Candidate([70], -4.0), Candidate([72], -5.0)])
    for weak, first in ((-4.5, [70, 1, 2]), (-3.0, [1, 2, 70]), (-6.0, [70, 72, 1])):
        hybrid = LookupHybridDrafter(learned, lookup_min_ngram=2, weak_score=weak)
        hybrid.start("a", [])
        hybrid.observe("a", [5, 9, 1, 2], None)  # pending 9: only the 1-gram "9" matches, then 1 2
        tree = hybrid.propose([ProposeRequest("a", 9, budget=3)])[0]
        assert tree.tokens == [9, *first], weak
    assert LookupHybridDrafter(learned).weak_score == -4.5  # the default, BENCHMARKS.md


def test_hybrid_extends_a_learned_candidate_by_what_followed_its_last_tokens_earlier():
    learned = _ScriptedDrafter([Candidate([70, 71], -0.5), Candidate([72], -1.2)])
    hybrid = LookupHybridDrafter(learned, lookup_min_ngram=2)
    hybrid.start("a", [])
    hybrid.observe("a", [5, 70, 71, 40, 41, 42, 6, 9, 70, 71, 50], None)  # "70 71" occurred twice
    # Pending 8: no lookup match. The candidate 8 70 71 ends in the 2-gram "70 71", followed most
    # recently by 50 (then the text ends) and before that by 40 41 42 6: the most recent occurrence
    # with a continuation wins, so 70 71 grows into 70 71 50; 72 has no 2-gram to continue.
    tree = hybrid.propose([ProposeRequest("a", 8, budget=8)])[0]
    paths = {tuple(tree.tokens[j] for j in tree.path_to(i)) for i in range(tree.num_nodes)}
    assert (8, 70, 71, 50) in paths and (8, 72) in paths and len(paths) == 5
    # Ranked EXTEND_PENALTY below its candidate: at budget 3 the other candidate (-1.2) comes first.
    assert sorted(hybrid.propose([ProposeRequest("a", 8, budget=3)])[0].tokens) == [8, 70, 71, 72]
    # A candidate as long as the budget leaves its extension no room: not even looked up.
    looked = []
    hybrid.lookup.continuation = lambda *a, real=hybrid.lookup.continuation: looked.append(a[1]) or real(*a)
    assert hybrid.propose([ProposeRequest("a", 8, budget=2)])[0].tokens == [8, 70, 71]
    assert looked == [[8, 72]]
    del hybrid.lookup.continuation
    hybrid.observe("a", [8], None)
    hybrid.extend_depth = 0  # `ctc-drafter eval --lookup-extend 0`
    assert sorted(hybrid.propose([ProposeRequest("a", 3, budget=8)])[0].tokens) == [3, 70, 71, 72]
    hybrid.extend_depth = 2  # at most 2 tokens: "71 40" occurs once, followed by 41 42 ...
    learned.cands = [Candidate([70, 71, 40], -0.1)]
    tree = hybrid.propose([ProposeRequest("a", 3, budget=8)])[0]
    assert tree.tokens == [3, 70, 71, 40, 41, 42]


def test_hybrid_that_never_skips_asks_the_learned_drafter_on_long_matches_too():
    from drafter.cli import set_lookup_skip

    learned = _ScriptedDrafter([Candidate([70, 71], -0.1)])
    hybrid = LookupHybridDrafter(learned, lookup_min_ngram=2)
    set_lookup_skip(hybrid, 0)  # `ctc-drafter eval --lookup-skip 0`
    assert hybrid.skip_learned_ngram is None
    hybrid.start("a", [])
    hybrid.observe("a", [1, 2, 3, 4, 5, 9, 1, 2], None)
    tree = hybrid.propose([ProposeRequest("a", 3, budget=8)])[0]  # the 3-gram match of the test above
    assert learned.asked == ["a"] and hybrid.learned_skipped == 0
    assert {4, 70} <= set(tree.tokens)  # lookup's continuation and the learned drafter's, in one tree
    with pytest.raises(SystemExit, match="0 or >= 2"):
        set_lookup_skip(hybrid, 1)
    with pytest.raises(ValueError, match="lookup_min_ngram"):
        LookupHybridDrafter(learned, lookup_min_ngram=2, skip_learned_ngram=1)


def test_hybrid_without_any_lookup_match_is_the_learned_drafter():
    learned = _ScriptedDrafter([Candidate([70, 71], -0.1), Candidate([72], -0.5)])
    hybrid = LookupHybridDrafter(learned)
    hybrid.start("a", [])
    hybrid.observe("a", [1, 2], None)
    tree = hybrid.propose([ProposeRequest("a", 3, budget=8)])[0]
    assert sorted(zip(tree.tokens, tree.parents)) == sorted([(3, -1), (70, 0), (72, 0), (71, 1)])
    hybrid.release("a")


def test_hybrids_second_tier_is_lookup_alone():
    learned = _ScriptedDrafter([Candidate([70, 71], -0.1)])
    hybrid = LookupHybridDrafter(learned)
    assert len(hybrid.tiers) == 2 and len(learned.tiers) == 1
    hybrid.start("a", [])
    hybrid.observe("a", [1, 2, 3, 9, 1], None)
    # Pending 2 after "... 1": "1 2" recurs (continuation 3 9 1) and no long match, so tier 0 asks
    # the learned drafter; tier 1 never does, and drafts what lookup has (nothing when it has none).
    assert hybrid.propose([ProposeRequest("a", 2, budget=4, tier=1)])[0].tokens == [2, 3, 9, 1]
    assert learned.asked == [] and hybrid.learned_skipped == 0
    assert 70 in hybrid.propose([ProposeRequest("a", 2, budget=4)])[0].tokens and learned.asked == ["a"]
    assert hybrid.propose([ProposeRequest("a", 8, budget=4, tier=1)])[0].num_nodes == 1
