"""KV-cache sizing (server/runtime/cache_plan.py) as arithmetic, and its one-line refusal at start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.runtime.cache_plan import CPU_DEFAULT_LEN, CacheSizingError, DeviceMemory, plan_kv_cache
from tests.conftest import DEMO_MODEL, REPO

GiB = 2**30
# Llama-3.1-8B in bf16: 32 layers x 8 kv heads x 128 dims x K,V x 2 bytes = 128 KiB per position.
LLAMA8B = dict(bytes_per_position=2 * 32 * 8 * 128 * 2, model_max_len=131072)


def test_cpu_keeps_slots_times_length():
    plan = plan_kv_cache(**LLAMA8B, max_slots=4, requested_len=None, memory=None)
    assert plan.max_model_len == CPU_DEFAULT_LEN and plan.budget is None
    assert plan.kv_bytes == 4 * CPU_DEFAULT_LEN * LLAMA8B["bytes_per_position"]
    assert plan_kv_cache(bytes_per_position=8, max_slots=2, model_max_len=512, requested_len=None,
                         memory=None).max_model_len == 512  # a shorter model context wins
    assert plan_kv_cache(**LLAMA8B, max_slots=4, requested_len=300, memory=None).max_model_len == 300


def test_default_length_is_what_fits_in_the_budget():
    # An 80 GiB card with 16.5 GiB in use after loading: 0.9 x 80 - 16.5 - 1.5 reserved = 54 GiB,
    # 54 GiB / (16 slots x 128 KiB) = 27648 positions.
    mem = DeviceMemory(free=int(63.5 * GiB), total=80 * GiB)
    plan = plan_kv_cache(**LLAMA8B, max_slots=16, requested_len=None, memory=mem, utilization=0.9,
                         reserve=int(1.5 * GiB))
    assert plan.budget == 54 * GiB
    assert plan.max_model_len == 27648 and plan.kv_bytes == 27648 * 16 * LLAMA8B["bytes_per_position"]
    assert plan.kv_bytes <= plan.budget
    # One slot: the model's own context fits (54 GiB / 128 KiB = 442368 > 131072).
    assert plan_kv_cache(**LLAMA8B, max_slots=1, requested_len=None, memory=mem,
                         reserve=int(1.5 * GiB)).max_model_len == 131072


def test_computed_length_is_aligned_and_never_over_budget():
    mem = DeviceMemory(free=10 * GiB + 12345, total=12 * GiB)
    for slots in (1, 3, 7, 16, 64):
        plan = plan_kv_cache(bytes_per_position=99_999, max_slots=slots, model_max_len=1 << 20,
                             requested_len=None, memory=mem, utilization=0.95, reserve=777)
        assert plan.max_model_len % 16 == 0 and plan.kv_bytes <= plan.budget
        assert plan.kv_bytes + 16 * slots * 99_999 > plan.budget  # the next aligned length would not fit


def test_requested_length_that_fits_is_kept_and_one_that_does_not_is_refused_with_numbers():
    mem = DeviceMemory(free=8 * GiB, total=24 * GiB)  # a 24 GiB card holding 16 GiB of weights
    ok = plan_kv_cache(**LLAMA8B, max_slots=4, requested_len=8192, memory=mem, reserve=GiB // 2)
    assert ok.max_model_len == 8192 and ok.kv_bytes == 4 * GiB
    with pytest.raises(CacheSizingError) as refused:
        plan_kv_cache(**LLAMA8B, max_slots=16, requested_len=8192, memory=mem, reserve=GiB // 2)
    message = str(refused.value)
    assert "\n" not in message
    for number in ("16 slots", "8192 positions", "128.0 KiB", "16.00 GiB", "24.0 GiB", "16.0 GiB in use", "5.10 GiB"):
        assert number in message, message
    assert "--max-model-len" in message and "--gpu-memory-utilization" in message


def test_nothing_fits_and_longer_than_the_model_are_refused():
    with pytest.raises(CacheSizingError, match="no room for a KV cache"):
        plan_kv_cache(**LLAMA8B, max_slots=16, requested_len=None,
                      memory=DeviceMemory(free=2 * GiB, total=24 * GiB), utilization=0.9)  # 21.6 - 22 GiB
    with pytest.raises(CacheSizingError, match="longer than this model's context of 131072"):
        plan_kv_cache(**LLAMA8B, max_slots=1, requested_len=200_000, memory=None)


def test_a_start_up_that_cannot_fit_says_so_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "--model", str(DEMO_MODEL), "--drafter", "none", "--device", "cpu",
         "--max-model-len", "4096", "--port", "1"],  # the demo model's context is 2048
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert done.returncode == 3
    errors = [line for line in (done.stdout + done.stderr).splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "4096" in errors[0] and "2048" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
