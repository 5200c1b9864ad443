"""The drain after SIGTERM, against a real `ctc-serve` process: the server keeps listening while
requests in flight finish, `/health` answers 503 (so a load balancer takes it out of rotation) and
new requests get a 503 that says why, where before the fix new connections were refused at once."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.test_e2e_server import MODEL, NAME, start_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason=f"{MODEL} has no weights yet"),
]


def test_sigterm_drains_with_health_503_while_requests_in_flight_finish(tmp_path: Path) -> None:
    server = start_server(tmp_path / "server.log", "--shutdown-timeout", "300", "--max-model-len", "2048")
    try:
        # A long answer whose reader stalls after the first chunk: each chunk carries 20 alternatives
        # per token (~2 KB), so the server cannot finish it into socket buffers while we look.
        body = {"model": NAME, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 1900,
                "stream": True, "logprobs": True, "top_logprobs": 20, "ignore_eos": True}
        with httpx.Client(base_url=server.base, timeout=300) as streaming, \
                streaming.stream("POST", "/v1/chat/completions", json=body) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))

            server.process.send_signal(signal.SIGTERM)
            # New connections are still accepted, and told the truth once uvicorn has seen the signal.
            health = httpx.get(f"{server.base}/health", timeout=30)
            deadline = time.monotonic() + 30
            while health.status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
                health = httpx.get(f"{server.base}/health", timeout=30)
            assert health.status_code == 503 and health.json()["error"]["code"] == "unavailable"
            refused = httpx.post(f"{server.base}/v1/completions", json={"model": NAME, "prompt": "hi"}, timeout=30)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            assert server.process.poll() is None

            # The request in flight finishes normally within --shutdown-timeout.
            payloads = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
            assert payloads[-1] == "[DONE]"
            finish = [json.loads(p)["choices"][0]["finish_reason"] for p in payloads[:-1] if json.loads(p)["choices"]]
            assert finish[-1] == "length"
        code = server.process.wait(timeout=60)
    finally:
        server.stop()
    log = server.log.read_text()
    assert code in (0, -signal.SIGTERM), log[-4000:]
    assert "engine worker stopped" in log and "Traceback" not in log, log[-4000:]
    with pytest.raises(httpx.TransportError):  # and once drained, it stops listening
        httpx.get(f"{server.base}/health", timeout=5)
