"""A client that goes away frees its engine slot: the app runs under a real uvicorn (in a thread)
over real sockets, because in-process transports cannot hang up mid-response."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import uvicorn

from server.api.app import create_app
from tests.fakes import FakeEngineCore, make_settings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def served() -> Iterator[tuple[str, FakeEngineCore]]:
    core = FakeEngineCore()
    app = create_app(make_settings(max_batch_size=core.max_batch_size), core)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", core
    server.should_exit = True
    thread.join(timeout=10)


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def running_gauge(base: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("ctc_num_requests_running ")))


def test_stream_disconnect_before_the_first_token_aborts(served: tuple[str, FakeEngineCore]) -> None:
    base, core = served
    core.paused.set()  # no token comes, so no response has started when the client gives up
    body = {"prompt": "tell me something long", "stream": True}
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5)):
            pass
    wait_for(lambda: len(core.aborted) == 1 and not core.has_work())
    wait_for(lambda: running_gauge(base) == 0)
    core.paused.clear()
    ok = httpx.post(f"{base}/v1/completions", json={"prompt": "next"}, timeout=10)
    assert ok.json()["choices"][0]["text"] == "next"


def test_stream_disconnect_mid_stream_aborts(served: tuple[str, FakeEngineCore]) -> None:
    base, core = served
    core.tokens_per_step = 1
    core.pause_after = 5  # hold the rest, so the request is certainly still running when we hang up
    body = {"prompt": "word " * 100, "stream": True, "ignore_eos": True, "max_tokens": 800}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        # Hold the line iterator: a temporary one is closed as soon as it is dropped, and closing it
        # closes the response, i.e. hangs up early (on a busy machine, before the 5th token).
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        wait_for(core.paused.is_set)
        request_id = next(iter(core.running))
    wait_for(lambda: request_id in core.aborted and not core.has_work())
    wait_for(lambda: running_gauge(base) == 0)


def test_non_stream_disconnect_aborts(served: tuple[str, FakeEngineCore]) -> None:
    base, core = served
    core.paused.set()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                   timeout=httpx.Timeout(10, read=0.5))
    wait_for(lambda: len(core.aborted) == 1 and not core.has_work())
    wait_for(lambda: running_gauge(base) == 0)
