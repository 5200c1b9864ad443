"""Device -> host copies per decode step, counted through server/runtime/host.py.

Batch 16 on the demo model with its CTC drafter, greedy, on both acceptance paths. What a decode
step copies:
- the drafter: its frames' top-k for candidate search, once (B x N x (k + N k + 1) float32: no
  vocabulary term; it was the full (B, N, V+1) log-probs before issue 14);
- path walk (the CPU's): one int64 per node decided per acceptance round (a walk's node and up to
  PATH_AHEAD nodes below it; one round per tree depth the walks reach), plus, after the walk, one
  copy of the emitted tokens' logprob rows for requests that ask for them;
- all-nodes walk (an accelerator's): ONE copy of the paths and emitted tokens, 2 x B x (deepest
  tree + 1) int64, which also carries the drafter's look-ahead, the next step's top-k (so the
  drafter's own copy is made only in the first decode step), plus one copy of the emitted tokens'
  logprob rows when asked for.
The bounds below are that, so a new copy in the hot path fails them; the figures print under
`-s`. tests/test_device_step.py checks the same exactly on a Llama-3-8B-shaped model.
"""

from __future__ import annotations

import pytest
import torch

from drafter.loading import load_drafter
from server.engine.speculate import PATH_AHEAD
from server.engine.types import SamplingParams
from server.runtime.host import TRANSFERS, host_list, to_host
from server.runtime.loader import load_model
from tests.conftest import DEMO_MODEL
from tests.test_engine import make_engine

BATCH = 16
DRAFTER = DEMO_MODEL.with_name(DEMO_MODEL.name + "-ctc")


def test_helpers_count_transfers_and_bytes():
    before = TRANSFERS.snapshot()
    assert host_list(torch.arange(5)) == [0, 1, 2, 3, 4]
    assert to_host(torch.zeros(2, 3, dtype=torch.float16)).device.type == "cpu"
    moved = TRANSFERS.snapshot() - before
    assert (moved.transfers, moved.bytes) == (2, 5 * 8 + 6 * 2)


@pytest.fixture(scope="module")
def demo():
    if not (DRAFTER / "config.json").is_file():
        pytest.skip(f"{DRAFTER} is not trained")
    model = load_model(DEMO_MODEL, dtype="float32", device="cpu")
    return model, load_drafter(DRAFTER, model, max_slots=BATCH, max_len=256)


@pytest.mark.parametrize("acceptance", ["path", "all-nodes"])
@pytest.mark.parametrize("logprobs", [None, 2], ids=["plain", "logprobs"])
def test_transfers_per_decode_step_at_batch_16_with_the_ctc_drafter(demo, logprobs, acceptance):
    model, drafter = demo
    engine = make_engine(model, drafter, max_len=256, batch=BATCH, acceptance=acceptance)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=logprobs)
    for i in range(BATCH):
        engine.add_request(f"r{i}", torch.randint(5, 4000, (12,), generator=g).tolist(), params)
    decoding: set[str] = set()
    steps = []
    while engine.has_work():
        all_decoding = len(decoding) == BATCH  # every sequence past its prefill: a pure decode step
        before = TRANSFERS.snapshot()
        deltas = engine.step()
        moved = TRANSFERS.snapshot() - before
        decoding |= {d.request_id for d in deltas if d.token_ids}
        if all_decoding and not any(d.finished for d in deltas):  # no output cut short by a stop
            rounds = max(len(d.token_ids) for d in deltas)  # acceptance rounds: the deepest walk + 1
            drafted = sum(d.num_draft_tokens for d in deltas)
            emitted = sum(len(d.token_ids) for d in deltas)
            steps.append((moved, rounds, drafted, emitted))
    assert len(steps) >= 5
    cfg = drafter.model.config
    frames, k, depth = cfg.num_frames, cfg.prune_topk, engine.config.scheduler.max_tree_nodes
    drafter_bytes = BATCH * frames * (k + frames * k + 1) * 4
    for i, (moved, rounds, drafted, emitted) in enumerate(steps):
        drafter_copies = 1 if drafted else 0
        logprob_bytes = emitted * (1 + 2 * logprobs) * 8 if logprobs else 0
        if acceptance == "path":
            # the decided tokens per round; the emitted tokens' logprobs rows once, after the walk
            assert moved.transfers <= drafter_copies + rounds + (1 if logprobs else 0), (moved, rounds)
            # a round decides each walk's node and up to PATH_AHEAD nodes down its likeliest branch
            decided = BATCH * rounds * (1 + PATH_AHEAD)
            assert moved.bytes <= drafter_copies * drafter_bytes + decided * 8 + logprob_bytes
        else:  # the first decode step's trees need the drafter's own copy; later ones came with the last step's
            assert moved.transfers == (i == 0) + 1 + (1 if logprobs else 0), moved
            assert moved.bytes <= 2 * drafter_bytes + 2 * BATCH * (depth + 1) * 8 + logprob_bytes
    n = len(steps)
    vocab = model.config.vocab_size
    print(f"\n[{acceptance}, {'logprobs' if logprobs else 'plain'}] batch {BATCH}, {n} decode steps: "
          f"{sum(m.transfers for m, *_ in steps) / n:.2f} transfers/step, "
          f"{sum(m.bytes for m, *_ in steps) / n / 1e3:.1f} kB/step, "
          f"{sum(r for _, r, *_ in steps) / n:.2f} acceptance rounds/step (vocab {vocab})")
