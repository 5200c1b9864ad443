"""GET /metrics: every DESIGN.md metric is exported with help text, and the values move."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api.metrics import ServerMetrics
from tests.fakes import FakeEngineCore, api_client  # noqa: F401 (fixture)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

COUNTERS = [
    "ctc_spec_decode_num_drafts", "ctc_spec_decode_num_draft_tokens", "ctc_spec_decode_num_accepted_tokens",
    "ctc_prompt_tokens", "ctc_generation_tokens", "ctc_requests",
]
HISTOGRAMS = [
    "ctc_spec_decode_acceptance_length", "ctc_time_to_first_token_seconds", "ctc_inter_token_latency_seconds",
    "ctc_e2e_request_latency_seconds", "ctc_request_queue_time_seconds",
]
GAUGES = ["ctc_num_requests_running", "ctc_num_requests_waiting", "ctc_kv_cache_usage_ratio"]


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" not in sample.labels:
                samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def test_names_types_and_help_on_a_private_registry() -> None:
    first, second = ServerMetrics(), ServerMetrics()  # no clash: each has its own registry
    families = {f.name: f for f in text_string_to_metric_families(first.render().decode())}
    for name, kind in [*((n, "counter") for n in COUNTERS), *((n, "histogram") for n in HISTOGRAMS),
                       *((n, "gauge") for n in GAUGES)]:
        assert families[name].type == kind and families[name].documentation, name
    assert second.registry is not first.registry


async def test_values_move_with_traffic() -> None:
    core = FakeEngineCore(tokens_per_step=3)
    async with api_client(core) as (client, _):
        before = await scrape(client)
        assert before["ctc_spec_decode_num_drafts_total"] == 0 and before["ctc_requests_total{status=stop}"] == 0
        # 8 prompt tokens + EOS = 9 output tokens in steps of 3: 3 drafts, 2 accepted each.
        await client.post("/v1/completions", json={"prompt": "a b c d e f g h"})
        await client.post("/v1/completions", json={"prompt": "a b c d e f g h", "speculative": False})
        await client.post("/v1/completions", json={"prompt": "a b c d", "max_tokens": 2})
        after = await scrape(client)
    assert after["ctc_spec_decode_num_drafts_total"] == 3 + 1
    assert after["ctc_spec_decode_num_draft_tokens_total"] == 2 * 4
    assert after["ctc_spec_decode_num_accepted_tokens_total"] == 2 * 3 + 1
    assert after["ctc_spec_decode_acceptance_length_count"] == 4
    assert after["ctc_spec_decode_acceptance_length_sum"] == 3 * 3 + 2
    assert after["ctc_generation_tokens_total"] == 9 + 9 + 2
    assert after["ctc_prompt_tokens_total"] == 8 + 8 + 4
    assert after["ctc_requests_total{status=stop}"] == 2 and after["ctc_requests_total{status=length}"] == 1
    for name in ("ctc_time_to_first_token_seconds", "ctc_e2e_request_latency_seconds",
                 "ctc_request_queue_time_seconds"):
        assert after[f"{name}_count"] == 3, name
    assert after["ctc_inter_token_latency_seconds_count"] > 0
    assert after["ctc_num_requests_running"] == 0 and after["ctc_num_requests_waiting"] == 0
