"""End to end: a real `ctc-serve` process on the demo model, driven by the official `openai` client.

Nothing is faked here: the server is started as users start it (`python -m server.cli ...`) on a
free loopback port, and the checks are the ones a user would make: stream == non-stream at
temperature 0, usage, errors, 16 concurrent streams each equal to its solo output, a client that
hangs up freeing its slot, metrics that move, an API key, and a clean exit on SIGTERM.
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


def test_errors(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="n=2"):
        chat(client, "hi", n=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024"):
        chat(client, "hi", max_tokens=5000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    raw = httpx.post(f"{server.base}/v1/chat/completions", content=b"{oops", timeout=10)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"


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


def test_api_key_and_graceful_sigterm(tmp_path: Path) -> None:
    keyed = start_server(tmp_path / "keyed.log", "--api-key", "sekrit")
    try:
        with pytest.raises(openai.AuthenticationError):
            keyed.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            keyed.client("wrong").completions.create(model=NAME, prompt="hi", max_tokens=2)
        assert keyed.client("sekrit").completions.create(model=NAME, prompt="hi", max_tokens=2).choices
        assert httpx.get(f"{keyed.base}/health", timeout=10).status_code == 200  # probes need no key
    finally:
        code = keyed.stop()
    # uvicorn re-raises the SIGTERM it caught once its graceful shutdown is done: -15 is a clean exit.
    log = keyed.log.read_text()
    assert code in (0, -signal.SIGTERM), log[-4000:]
    assert "engine worker stopped" in log and "Application shutdown complete" in log
