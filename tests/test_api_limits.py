"""Request-body limits (server/api/limits.py) against a real uvicorn server, over raw sockets, because
only a raw socket can declare more body than it sends, trickle it, or chunk it by hand."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn

from server.api.app import create_app
from tests.fakes import FakeEngineCore, make_settings

pytestmark = pytest.mark.timeout(60)

MAX_BYTES = 2048  # the smallest limit Settings allows is 1024
BODY_TIMEOUT_S = 0.5
VALID = json.dumps({"model": "demo-llama", "prompt": "hi", "max_tokens": 2}).encode()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@pytest.fixture
def address() -> Iterator[tuple[str, int]]:
    core = FakeEngineCore()
    settings = make_settings(max_batch_size=core.max_batch_size, max_request_bytes=MAX_BYTES,
                             request_body_timeout=BODY_TIMEOUT_S)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, core), host="127.0.0.1", port=0, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    yield server.servers[0].sockets[0].getsockname()[:2]
    server.should_exit = True
    thread.join(timeout=10)


def connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=10)


def head(length: int | None = None, chunked: bool = False, path: str = "/v1/completions") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def read_response(sock: socket.socket) -> Response:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"connection closed before a response: {data!r}"
        data += more
    raw_head, body = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = raw_head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        more = sock.recv(65536)
        assert more, "connection closed mid-body"
        body += more
    return Response(int(status_line.split()[1]), headers, body)


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def assert_refused(response: Response, status: int, code: str) -> None:
    assert response.status == status, response
    assert response.headers["connection"] == "close"
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]


def test_a_valid_body_passes_and_the_connection_stays_open(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        sock.sendall(head(len(VALID)) + VALID)
        assert read_response(sock).status == 200
        # Chunked, split across writes, on the same keep-alive connection.
        sock.sendall(head(chunked=True) + chunk(VALID[:10]))
        sock.sendall(chunk(VALID[10:]) + chunk(b""))
        second = read_response(sock)
        assert second.status == 200 and second.json()["choices"], second


def test_a_body_of_exactly_the_limit_passes(address: tuple[str, int]) -> None:
    padded = VALID + b" " * (MAX_BYTES - len(VALID))  # JSON allows trailing whitespace
    with connect(address) as sock:
        sock.sendall(head(len(padded)) + padded)
        assert read_response(sock).status == 200


def test_declared_length_over_the_limit_is_413_before_any_body(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        sock.sendall(head(MAX_BYTES + 1))  # no body sent at all: refused on the header alone
        assert_refused(read_response(sock), 413, "request_too_large")
        assert closed_by_server(sock)


def test_chunked_body_over_the_limit_is_413(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        sock.sendall(head(chunked=True))
        sock.sendall(chunk(b" " * MAX_BYTES))
        sock.sendall(chunk(b"{}"))  # one past the limit, with more still to come
        assert_refused(read_response(sock), 413, "request_too_large")
        assert closed_by_server(sock)


def test_a_body_shorter_than_its_content_length_gets_408_and_is_closed(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        sock.sendall(head(len(VALID) + 10) + VALID)  # 10 bytes promised that never come
        assert_refused(read_response(sock), 408, "request_timeout")
        assert closed_by_server(sock)


def test_a_trickled_body_cannot_extend_the_deadline(address: tuple[str, int]) -> None:
    # One byte every fifth of the deadline: each read is quick, the whole body is not.
    with connect(address) as sock:
        sock.sendall(head(chunked=True))
        sock.settimeout(BODY_TIMEOUT_S / 5)
        for byte in VALID:
            sock.sendall(chunk(bytes([byte])))
            try:
                response = sock.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                continue
            break
        else:
            pytest.fail("the whole trickled body was accepted")
        assert response.startswith(b"HTTP/1.1 408")
        sock.settimeout(10)
        assert_refused(read_response(sock), 408, "request_timeout")


def test_a_stalled_chunked_body_gets_408(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        sock.sendall(head(chunked=True) + chunk(VALID[:5]))
        assert_refused(read_response(sock), 408, "request_timeout")
        assert closed_by_server(sock)


def test_requests_without_a_body_are_untouched(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            response = read_response(sock)
            assert response.status == 200 and response.json() == {"status": "ok"}
