"""End to end: a real `ctc-serve` process on the demo model, driven by the official `openai` client.

Nothing is faked here: the server is started as users start it (`python -m server.cli ...`) on a
free loopback port, and the checks are the ones a user would make: stream == non-stream at
temperature 0, usage, logprobs, every kind of bad request, 16 concurrent streams each equal to its
solo output, a client that hangs up freeing its slot, metrics that move, an API key, a full queue,
and a clean exit on SIGTERM with requests in flight.
`CTC_TEST_E2E_MODEL` points the test at another model directory (default models/demo-llama).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
MODEL = Path(os.environ.get("CTC_TEST_E2E_MODEL", REPO / "models" / "demo-llama"))
STARTUP_TIMEOUT_S = 300  # loading on a busy CPU
NAME = MODEL.name

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not (MODEL / "config.json").is_file(),
                       reason=f"{MODEL} has no weights yet (python models/build_demo_model.py)"),
]


@dataclass
class Server:
    base: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0, timeout=300)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        return {
            s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
        }

    def stop(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path, *extra: str) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "--model", str(MODEL), "--device", "cpu", "--max-model-len", "1024",
               "--host", "127.0.0.1", "--port", str(port), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ctc-serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.base}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.stop()
    pytest.fail(f"ctc-serve not healthy after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Without the governor every step drafts, so the speculation metrics move for sure; with it,
    # whether a request drafts depends on timings (outputs never do: tests/test_engine.py).
    running = start_server(tmp_path_factory.mktemp("e2e") / "server.log", "--governor", "false")
    yield running
    running.stop()


def chat(client: openai.OpenAI, content: str, **kwargs: object) -> str:
    response = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                              temperature=0, **kwargs)
    return response.choices[0].message.content or ""


def chat_stream(client: openai.OpenAI, content: str, **kwargs: object) -> str:
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                            temperature=0, stream=True, **kwargs)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_models(server: Server) -> None:
    assert [m.id for m in server.client().models.list().data] == [NAME]


def test_chat_stream_equals_full_with_usage(server: Server) -> None:
    client = server.client()
    full = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "What is 7 times 8?"}],
                                          temperature=0, max_tokens=48)
    chunks = list(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "What is 7 times 8?"}], temperature=0, max_tokens=48,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].message.content and text == full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert 0 < full.usage.completion_tokens <= 48 and full.usage.prompt_tokens > 0


def test_completion_stream_equals_full(server: Server) -> None:
    client = server.client()
    prompt = "The capital of France is"
    full = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=32)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=prompt, temperature=0, max_tokens=32, stream=True) if c.choices)
    assert streamed == full.choices[0].text
    assert full.usage.completion_tokens <= 32 and full.id.startswith("cmpl-")


def test_speculation_is_lossless_and_metrics_move(server: Server) -> None:
    client = server.client()
    prompt = "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3,"  # repetitive: drafts get proposed
    before = server.metrics()
    spec = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=48)
    middle = server.metrics()
    plain = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=48,
                                      extra_body={"speculative": False})
    after = server.metrics()
    assert spec.choices[0].text == plain.choices[0].text
    assert middle["ctc_spec_decode_num_drafts_total"] > before["ctc_spec_decode_num_drafts_total"]
    assert middle["ctc_spec_decode_num_draft_tokens_total"] > before["ctc_spec_decode_num_draft_tokens_total"]
    assert after["ctc_spec_decode_num_drafts_total"] == middle["ctc_spec_decode_num_drafts_total"]
    assert after["ctc_generation_tokens_total"] - middle["ctc_generation_tokens_total"] == \
        plain.usage.completion_tokens
    assert after["ctc_prompt_tokens_total"] > before["ctc_prompt_tokens_total"]
    assert after["ctc_requests_total{status=stop}"] + after["ctc_requests_total{status=length}"] >= 2
    for name in ("ctc_time_to_first_token_seconds_count", "ctc_e2e_request_latency_seconds_count",
                 "ctc_spec_decode_acceptance_length_count"):
        assert after[name] > before[name], name


def test_logprobs_stream_equals_full_and_speculation_does_not_change_them(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "What is 12 plus 30?"}]
    ask = dict(model=NAME, messages=messages, temperature=0, max_tokens=24, logprobs=True, top_logprobs=3)
    full = client.chat.completions.create(**ask)
    plain = client.chat.completions.create(**ask, extra_body={"speculative": False})
    streamed = [e for c in client.chat.completions.create(**ask, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    text = b"".join(bytes(e.bytes) for e in content).decode()
    assert text.startswith(full.choices[0].message.content)  # then the end-of-turn token, if it stopped
    for other in (plain.choices[0].logprobs.content, streamed):
        assert [e.token for e in other] == [e.token for e in content]
        assert [e.logprob for e in other] == pytest.approx([e.logprob for e in content], abs=1e-3)
    for e in content:  # greedy: the chosen token is the likeliest
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.logprob <= 0 and [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs),
                                                                                 reverse=True)
    completion = client.completions.create(model=NAME, prompt="The capital of France is", temperature=0,
                                           max_tokens=8, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_errors(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="less than or equal to 16"):
        chat(client, "hi", n=17)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024"):
        chat(client, "hi", max_tokens=5000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    for bad, param in [({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"),
                       ({"max_tokens": 0}, "max_tokens"), ({"temperature": "hot"}, "temperature"),
                       ({"messages": []}, "messages"), ({"messages": None}, "messages")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**{"model": NAME, "messages": [{"role": "user", "content": "hi"}], **bad})
        assert refused.value.body["param"] == param, bad
    raw = httpx.post(f"{server.base}/v1/chat/completions", content=b"{oops", timeout=10)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(f"{server.base}/v1/chat/completions", json={"model": NAME}, timeout=10)
    assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]


def test_concurrent_streams_match_solo_outputs(server: Server) -> None:
    client = server.client()
    prompts = [f"Write a short sentence about the number {i}." for i in range(16)]
    solo = [chat(client, p, max_tokens=24) for p in prompts]
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda p: chat_stream(client, p, max_tokens=24), prompts))
    assert together == solo


def test_disconnect_frees_the_slot(server: Server) -> None:
    client = server.client()
    aborted_before = server.metrics()["ctc_requests_total{status=abort}"]
    stream = client.completions.create(model=NAME, prompt="Once upon a time", temperature=0, max_tokens=900,
                                       stream=True, extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert server.metrics()["ctc_num_requests_running"] == 1
    stream.close()  # hang up mid-generation
    deadline = time.monotonic() + 30
    while server.metrics()["ctc_num_requests_running"] != 0:
        assert time.monotonic() < deadline, "the aborted request still holds its slot"
        time.sleep(0.2)
    assert server.metrics()["ctc_requests_total{status=abort}"] == aborted_before + 1


def test_api_key_queue_full_and_sigterm_under_load(tmp_path: Path) -> None:
    # One slot and one queue place: a second request waits, a third is turned away.
    small = start_server(tmp_path / "small.log", "--api-key", "sekrit", "--max-batch-size", "1", "--max-queue", "1",
                         "--shutdown-timeout", "1")
    try:
        with pytest.raises(openai.AuthenticationError):
            small.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            small.client("wrong").completions.create(model=NAME, prompt="hi", max_tokens=2)
        client = small.client("sekrit")
        assert client.completions.create(model=NAME, prompt="hi", max_tokens=2).choices
        assert httpx.get(f"{small.base}/health", timeout=10).status_code == 200  # probes need no key

        running = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=1000, stream=True,
                                            extra_body={"ignore_eos": True})
        next(iter(running))
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(client.completions.create, model=NAME, prompt="hi", max_tokens=2)
            deadline = time.monotonic() + 30
            while small.metrics()["ctc_num_requests_waiting"] != 1:
                assert time.monotonic() < deadline and not waiting.done(), "the second request never queued"
                time.sleep(0.05)
            turned_away = httpx.post(f"{small.base}/v1/completions", json={"model": NAME, "prompt": "hi"},
                                     headers={"Authorization": "Bearer sekrit"}, timeout=10)
            assert turned_away.status_code == 429 and int(turned_away.headers["retry-after"]) >= 1
            assert turned_away.json()["error"]["type"] == "rate_limit_error"
            # SIGTERM with one request running and one waiting: each gets a complete response, its
            # answer or (past --shutdown-timeout) an error saying the server is shutting down; never
            # a cut connection. Nothing hangs and the exit is clean.
            small.process.send_signal(signal.SIGTERM)
            try:
                assert len(list(running)) > 0
            except openai.APIError as exc:
                assert "shutting down" in exc.message, exc
            try:
                assert waiting.result(timeout=60).choices
            except openai.APIStatusError as exc:
                assert exc.status_code == 503 and "shutting down" in exc.message, exc
    finally:
        code = small.stop()
    # uvicorn re-raises the SIGTERM it caught once its graceful shutdown is done: -15 is a clean exit.
    log = small.log.read_text()
    assert code in (0, -signal.SIGTERM), log[-4000:]
    assert "engine worker stopped" in log and "Application shutdown complete" in log
    assert "without completing response" not in log and "Traceback" not in log, log[-4000:]
