"""End to end: a real `ctc-serve --tensor-parallel-size 2` on the CPU, driven by the official client.

The server starts its second rank itself (a spawned process, gloo). It answers through the openai
client, speculative output equals plain output (`speculative: false`), streaming equals the full
answer, SIGTERM stops both processes with the usual status; and when the worker is killed mid-answer,
the client gets an error instead of hanging and the server exits with code 4 (cli.WORKER_FAILED_EXIT).
A model that cannot be split is refused before any worker starts, in one line, with exit code 3.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from server.cli import STARTUP_FAILED_EXIT, WORKER_FAILED_EXIT
from tests.test_e2e_server import MODEL, NAME, Server, chat, chat_stream, start_server
from tests.test_tensor_parallel import checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason=f"{MODEL} has no weights yet"),
]
DEATH_TIMEOUT_S = 120  # the client's error and the server's exit must come well within this


def start_tp_server(log: Path) -> Server:
    return start_server(log, "--tensor-parallel-size", "2", "--governor", "false")


def worker_pid(server: Server) -> int:
    found = re.search(r"tensor-parallel worker rank 1 started, pid (\d+)", server.log.read_text())
    assert found, server.log.read_text()[-3000:]
    return int(found.group(1))


def pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def test_tp2_server_answers_speculates_losslessly_and_stops_both_processes(tmp_path: Path) -> None:
    server = start_tp_server(tmp_path / "server.log")
    worker = worker_pid(server)
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == [NAME]
        question = "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3,"  # repetitive: prompt lookup drafts
        spec = chat(client, question, max_tokens=40)
        plain = chat(client, question, max_tokens=40, extra_body={"speculative": False})
        assert spec and spec == plain
        assert chat_stream(client, question, max_tokens=40) == spec
        assert server.metrics()["ctc_spec_decode_num_drafts_total"] > 0
    finally:
        code = server.stop()
    assert code in (0, -signal.SIGTERM), server.log.read_text()[-3000:]
    assert not pid_alive(worker), "the worker outlived the server"


def test_a_dying_worker_fails_the_request_in_flight_and_ends_the_server(tmp_path: Path) -> None:
    server = start_tp_server(tmp_path / "server.log")
    worker = worker_pid(server)
    first_chunk = threading.Event()
    outcome: list[BaseException | str] = []

    def stream_long_answer() -> None:
        try:
            stream = server.client().completions.create(
                model=NAME, prompt="Once upon a time", temperature=0, max_tokens=450, stream=True,
                extra_body={"ignore_eos": True}, timeout=DEATH_TIMEOUT_S)
            for _ in stream:
                first_chunk.set()
            outcome.append("the stream finished without an error")
        except Exception as exc:  # what the user sees
            outcome.append(exc)
        finally:
            first_chunk.set()

    reader = threading.Thread(target=stream_long_answer)
    reader.start()
    try:
        assert first_chunk.wait(DEATH_TIMEOUT_S)
        os.kill(worker, signal.SIGKILL)
        reader.join(DEATH_TIMEOUT_S)
        assert not reader.is_alive(), "the client hangs"
        code = server.process.wait(timeout=DEATH_TIMEOUT_S)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.log.read_text()
    assert isinstance(outcome[0], openai.APIError), outcome
    assert code == WORKER_FAILED_EXIT, log[-3000:]
    assert f"tensor-parallel worker rank 1 (pid {worker}) exited with code -9" in log


def test_a_model_that_does_not_split_is_refused_with_one_line_and_exit_code_3(tmp_path: Path) -> None:
    path = checkpoint("qwen2", tmp_path / "qwen2")  # 2 key/value heads
    done = subprocess.run([sys.executable, "-m", "server.cli", "--model", str(path), "--device", "cpu",
                           "--tensor-parallel-size", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == STARTUP_FAILED_EXIT, done.stderr[-3000:]
    assert ("cannot start: --tensor-parallel-size 4 does not divide this model's 2 key/value heads "
            "(num_key_value_heads); choose a size that divides 2\n") in done.stderr
    assert "Traceback" not in done.stderr and "worker rank" not in done.stderr  # refused before any worker
