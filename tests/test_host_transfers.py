"""Device -> host copies per decode step, counted through server/runtime/host.py.

Batch 16 on the demo model with its CTC drafter, greedy. What a decode step copies today: the
drafter's frame log-probs (B, N, V+1) float32 for candidate search, once, then one int64 per
walking sequence per acceptance round (one round per tree depth the walks reach), plus one
float64 row per decided token for requests that ask for logprobs. The bounds below are that,
exactly as counted, so a new copy in the hot path fails them; issue 14's target (one transfer of
O(batch x tree nodes) integers, independent of the vocabulary) is not met yet, and the figures
print under `-s`.
"""

from __future__ import annotations

import pytest
import torch

from drafter.loading import load_drafter
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


@pytest.mark.parametrize("logprobs", [None, 2], ids=["plain", "logprobs"])
def test_transfers_per_decode_step_at_batch_16_with_the_ctc_drafter(demo, logprobs):
    model, drafter = demo
    engine = make_engine(model, drafter, max_len=256, batch=BATCH)
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
            steps.append((moved, rounds, drafted))
    assert len(steps) >= 5
    vocab, frames = model.config.vocab_size, drafter.model.config.num_frames
    per_round = 2 if logprobs else 1  # the decided tokens, and the logprobs rows when asked for
    for moved, rounds, drafted in steps:
        drafter_copies = 1 if drafted else 0
        assert moved.transfers <= drafter_copies + per_round * rounds, (moved, rounds)
        logprob_bytes = BATCH * rounds * (1 + 2 * logprobs) * 8 if logprobs else 0
        assert moved.bytes <= drafter_copies * BATCH * frames * (vocab + 1) * 4 + BATCH * rounds * 8 + logprob_bytes
    n = len(steps)
    print(f"\n[{'logprobs' if logprobs else 'plain'}] batch {BATCH}, {n} decode steps: "
          f"{sum(m.transfers for m, _, _ in steps) / n:.2f} transfers/step, "
          f"{sum(m.bytes for m, _, _ in steps) / n / 1e6:.3f} MB/step, "
          f"{sum(r for _, r, _ in steps) / n:.2f} acceptance rounds/step (vocab {vocab})")
