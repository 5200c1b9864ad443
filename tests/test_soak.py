"""The soak script (bench/soak.py), short: a real `ctc-serve` on the demo model, ~120 mixed requests
(streams, hang-ups, seeded sampling, both endpoints), then its checks: 0 failures, counters equal to
what the clients saw, gauges back to 0, one text per distinct request, bounded RSS growth.
The long run is `python -m bench.soak` (README, BENCHMARKS.md "Soak")."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench import soak

MODEL = Path(__file__).resolve().parent.parent / "models" / "demo-llama"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason=f"{MODEL} has no weights yet"),
]


def test_short_soak_passes_every_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for cache in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):  # see bench/soak.py: RSS
        monkeypatch.setenv(cache, "16")
    out = tmp_path / "soak.json"
    code = soak.main(["--requests", "60", "--concurrency", "8", "--warmup", "8", "--max-tokens", "16",
                      "--disconnect-share", "0.15", "--server-args", f"--model {MODEL} --max-model-len 1024",
                      "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["failures"] == [] and all(report["checks"].values()), report
    assert code == 0 and report["ok"]
    # The mix really had what the checks are about.
    client = report["client"]
    assert client["hung-up"] > 0 and client["stop"] + client["length"] > 100
    assert report["server"]["abort"] == client["hung-up"]
    assert report["server"]["drafts"] > 0  # some requests speculated
    assert report["rss_mb"]["growth"] is not None


def balanced() -> tuple[soak.Tally, dict[str, float], dict[str, float]]:
    tally = soak.Tally(finish=Counter(stop=3, length=2, **{"hung-up": 1}), prompt_tokens=50, completion_tokens=40,
                       hung_up_tokens_seen=2, hung_up_tokens_asked=1000,
                       hung_up_prompts=Counter({("chat", "hi"): 1}), prompt_len={("chat", "hi"): 10})
    server = {"stop": 3, "length": 2, "abort": 1, "error": 0, "prompt_tokens": 60, "generation_tokens": 45}
    gauges = {"ctc_num_requests_running": 0, "ctc_num_requests_waiting": 0, "ctc_kv_cache_usage_ratio": 0}
    return tally, server, gauges


@pytest.mark.parametrize("change", [
    {"error": 1}, {"abort": 0}, {"stop": 4}, {"prompt_tokens": 50}, {"generation_tokens": 41},
    {"generation_tokens": 1041}, {"ctc_num_requests_running": 1}, {"ctc_kv_cache_usage_ratio": 0.01},
    {"failure": "x"}, {"text": "other"}, {"rss": 65.0},
])
def test_each_imbalance_fails_its_check(change: dict) -> None:
    tally, server, gauges = balanced()
    tally.texts[soak.Recipe("chat", "hi", 0.0, None, 4)] = {"same"}
    assert all(soak.evaluate(tally, server, gauges, 10.0, 64.0).values())
    for key, value in change.items():
        if key in server:
            server[key] = value
        elif key in gauges:
            gauges[key] = value
        elif key == "failure":
            tally.failures.append(value)
        elif key == "text":
            tally.texts[soak.Recipe("chat", "hi", 0.0, None, 4)].add(value)
    growth = change.get("rss", 10.0)
    failed = [name for name, passed in soak.evaluate(tally, server, gauges, growth, 64.0).items() if not passed]
    assert len(failed) == 1, failed
