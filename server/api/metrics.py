"""Prometheus metrics of the server (names fixed by DESIGN.md section 3, prefix `ctc_`).

Each `ServerMetrics` owns its own `CollectorRegistry`, so several apps (tests) can live in one
process. The speculative-decoding counters mean what vLLM's `vllm:spec_decode_*` counters mean:
`num_drafts` counts verification steps of speculating sequences, `num_draft_tokens` the draft
tokens verified, `num_accepted_tokens` the draft tokens accepted (bonus token excluded), so the
mean acceptance length is `1 + accepted / drafts`. The acceptance-length histogram observes, per
speculated step of one sequence, the tokens it emitted (accepted + 1 bonus). A request that does
not speculate moves the generation-token counter only. `ctc_drafter_errors_total` follows the
engine's own count of failed drafter calls (EngineStats.drafter_errors), read with the gauges.

The worker thread is the only writer; prometheus-client metrics are thread-safe for the scrape.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from server.engine.types import EngineStats, FinishReason, RequestDelta

# Tokens per step: 1 (nothing accepted) up to the longest draft the tree can verify plus bonus.
ACCEPTANCE_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)
# Latency buckets (seconds): from a fast GPU token to a long CPU generation.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """All `ctc_*` metrics on a private registry, with one update method per event."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.num_drafts = Counter(
            "ctc_spec_decode_num_drafts", "Verification steps of speculating sequences.", registry=r
        )
        self.num_draft_tokens = Counter(
            "ctc_spec_decode_num_draft_tokens", "Draft tokens verified by the base model.", registry=r
        )
        self.num_accepted_tokens = Counter(
            "ctc_spec_decode_num_accepted_tokens",
            "Draft tokens accepted by verification (bonus token excluded).",
            registry=r,
        )
        self.acceptance_length = Histogram(
            "ctc_spec_decode_acceptance_length",
            "Tokens emitted per speculated step of one sequence (accepted + 1 bonus).",
            buckets=ACCEPTANCE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("ctc_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("ctc_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter(
            "ctc_requests", "Finished requests by finish reason (stop, length, abort, error).", ["status"], registry=r
        )
        for reason in FinishReason:
            self.requests.labels(status=reason.value)  # export every status from the start, at 0
        self.ttft = Histogram(
            "ctc_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "ctc_inter_token_latency_seconds",
            "Time between tokens: each step's gap divided by the tokens it emitted for the request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "ctc_e2e_request_latency_seconds",
            "Time from arrival to the last token of a finished request.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "ctc_request_queue_time_seconds",
            "Time from arrival to the start of the engine step that produced its first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.num_running = Gauge("ctc_num_requests_running", "Requests in the running batch.", registry=r)
        self.num_waiting = Gauge("ctc_num_requests_waiting", "Requests waiting for a batch slot.", registry=r)
        self.kv_cache_usage = Gauge("ctc_kv_cache_usage_ratio", "Used KV-cache positions over capacity.", registry=r)
        self.drafter_errors = Counter(
            "ctc_drafter_errors", "Drafter calls that failed; their requests decoded on without drafts.", registry=r
        )
        self._drafter_errors_seen = 0  # the engine counts since its start; the counter moves by the difference

    def observe_delta(self, delta: RequestDelta) -> None:
        """Token and speculation counters for one request's share of one step."""
        self.generation_tokens.inc(len(delta.token_ids))
        if delta.speculated:
            self.num_drafts.inc()
            self.num_draft_tokens.inc(delta.num_draft_tokens)
            self.num_accepted_tokens.inc(delta.num_accepted_tokens)
            self.acceptance_length.observe(1 + delta.num_accepted_tokens)

    def observe_admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def observe_first_token(self, ttft_s: float, queue_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.queue_time.observe(queue_s)

    def observe_token_gap(self, gap_s: float, num_tokens: int) -> None:
        if num_tokens > 0:
            self.itl.observe(gap_s / num_tokens)

    def observe_finish(self, reason: FinishReason, e2e_s: float | None) -> None:
        self.requests.labels(status=reason.value).inc()
        if e2e_s is not None:
            self.e2e.observe(e2e_s)

    def set_stats(self, stats: EngineStats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        if stats.drafter_errors > self._drafter_errors_seen:
            self.drafter_errors.inc(stats.drafter_errors - self._drafter_errors_seen)
            self._drafter_errors_seen = stats.drafter_errors

    def render(self) -> bytes:
        """The text exposition format, for GET /metrics."""
        return generate_latest(self.registry)
