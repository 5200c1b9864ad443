"""Schemathesis against a real `ctc-serve` on the demo model: the OpenAPI document is the contract.

Every check (`--checks all`: no 5xx, only documented statuses, content types, headers and response
schemas, schema-valid data accepted, schema-invalid data refused, auth enforced, unsupported
methods answered 405) on positive and negative data, in the coverage and fuzzing phases. The real
engine, not the fake, because the engine is where bad values used to end up (a top_k that
overflowed the sampler); its limits are small (256-token context, 16 tokens by default) so that
a run takes about a minute. The seed is fixed so CI is repeatable; `make fuzz` runs a longer,
randomly seeded search. Each finding became a regression test in test_api_errors.py or
test_api_protocol.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.test_e2e_server import MODEL, REPO, start_server

pytest.importorskip("schemathesis")

TIMEOUT_S = int(os.environ.get("CTC_FUZZ_TIMEOUT_S", "900"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(TIMEOUT_S),
    pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason=f"{MODEL} has no weights"),
]
API_KEY = "fuzz-key"
SERVER_FLAGS = ("--api-key", API_KEY, "--max-model-len", "256", "--default-max-tokens", "16", "--max-batch-size", "4")
MAX_EXAMPLES = int(os.environ.get("CTC_FUZZ_EXAMPLES", "25"))  # per operation and phase
SEED = os.environ.get("CTC_FUZZ_SEED", "20261202")  # empty: a random seed (schemathesis prints it)


def schemathesis_command(base: str, max_examples: int, seed: str | None) -> list[str]:
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
        "--header", f"Authorization: Bearer {API_KEY}",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",  # see tests/schemathesis_hooks.py
        "--mode", "all", "--max-examples", str(max_examples), "--workers", "1",
        "--request-timeout", "120", "--no-color", "--continue-on-failure",
    ]
    return command + (["--seed", seed] if seed else [])


def test_schemathesis_finds_nothing(tmp_path) -> None:
    server = start_server(tmp_path / "server.log", *SERVER_FLAGS)
    try:
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(REPO)}
        run = subprocess.run(schemathesis_command(server.base, MAX_EXAMPLES, SEED), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=TIMEOUT_S - 60)
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-4000:]
    assert "No issues found" in run.stdout
    print(run.stdout[-600:])  # the summary (cases, seed), shown with -s or on `make fuzz`
