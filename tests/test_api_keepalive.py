"""After any error, 4xx or 5xx, the client's keep-alive connection still serves its next request.

A real uvicorn server (in this process, over the fake engine) and one httpx client that holds a
single connection: each bad request is followed by a valid one, and both must have travelled on
the same TCP connection (the same client port). Before the fix, an unexpected exception was
answered with a 500 and then re-raised to uvicorn, which closed the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from server.api.app import create_app
from tests.fakes import FakeEngineCore, chat_body, make_settings

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@contextlib.asynccontextmanager
async def uvicorn_server(core: FakeEngineCore) -> AsyncIterator[tuple[str, FastAPI]]:
    app = create_app(make_settings(max_batch_size=core.max_batch_size), core)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(30):
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await task


def client_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def _raise(*args: Any) -> None:
    raise RuntimeError("boom")


BAD_REQUESTS = [  # (body, status): each once ended in a 500 or a dropped connection
    (json.dumps({"prompt": "boom"}), 500),  # the serving layer raises, unexpectedly
    (json.dumps({"prompt": "\ud800"}), 400),
    (json.dumps({"prompt": "hi", "top_k": 2**63}), 400),
    (json.dumps(chat_body("\ud800")), 400),
    ("{not json", 400),
    (json.dumps({"prompt": "hi", "model": "gpt-9"}), 404),
]


async def test_the_connection_survives_every_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async with uvicorn_server(FakeEngineCore()) as (base, app):
        original = app.state.serving.completion

        async def completion(request: Any) -> Any:
            if request.prompt == "boom":
                _raise()
            return await original(request)

        monkeypatch.setattr(app.state.serving, "completion", completion)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
            for body, status in BAD_REQUESTS:
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                bad = await client.post(path, content=body, headers={"content-type": "application/json"})
                assert bad.status_code == status, bad.text
                assert "connection" not in bad.headers or bad.headers["connection"] != "close"
                good = await client.post("/v1/completions", json={"prompt": "still here"})
                assert good.status_code == 200 and good.json()["choices"][0]["text"] == "still here"
                assert client_port(good) == client_port(bad), f"{body}: the connection was closed"
