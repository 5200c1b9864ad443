"""Settings (defaults, env, bounds) and the `ctc-serve` command line, without starting a server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.cli import build_parser, load_settings
from server.settings import Settings, default_model_dir

REPO = Path(__file__).resolve().parent.parent


def test_defaults_serve_the_demo_model() -> None:
    settings = Settings()
    assert settings.model == default_model_dir() == REPO / "models" / "demo-llama"
    assert settings.served_model_name == "demo-llama"
    expected_drafter = REPO / "models" / "demo-llama-ctc"
    assert settings.drafter == (str(expected_drafter) + "+ngram" if expected_drafter.is_dir() else "ngram")
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert (settings.max_batch_size, settings.max_model_len) == (16, None)  # None: sized at start-up
    assert settings.gpu_memory_utilization == 0.9
    assert settings.api_key is None


def test_drafter_default_is_the_sibling_ctc_directory_with_lookup(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    assert Settings(model=tmp_path / "m").drafter == "ngram"
    (tmp_path / "m-ctc").mkdir()
    settings = Settings(model=tmp_path / "m")
    assert settings.drafter == str(tmp_path / "m-ctc") + "+ngram" and settings.drafter_path == tmp_path / "m-ctc"
    assert Settings(model=tmp_path / "m", drafter=str(tmp_path / "m-ctc")).drafter == str(tmp_path / "m-ctc")
    assert Settings(model=tmp_path / "m", drafter="NONE").drafter == "none"
    hybrid = Settings(model=tmp_path / "m", drafter=str(tmp_path / "m-ctc") + "+ngram")
    assert hybrid.drafter == str(tmp_path / "m-ctc") + "+ngram" and hybrid.drafter_path == tmp_path / "m-ctc"
    with pytest.raises(ValueError, match="does not exist"):
        Settings(model=tmp_path / "m", drafter=str(tmp_path / "nope") + "+ngram")


def test_env_fallback_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTC_PORT", "9001")
    monkeypatch.setenv("CTC_API_KEY", "sekrit")
    settings = Settings()
    assert settings.port == 9001 and settings.api_key.get_secret_value() == "sekrit"
    assert "sekrit" not in repr(settings)
    assert Settings(prefill_step_ratio=0).prefill_step_ratio == 0  # off: full chunks
    for bad in ({"port": 0}, {"max_batch_size": 0}, {"device": "tpu"}, {"dtype": "int8"}, {"model": "/nonexistent"},
                {"drafter": "/nonexistent"}, {"prefill_step_ratio": 1.0}, {"prefill_step_ratio": -1}):
        with pytest.raises(ValidationError):
            Settings(**bad)


def test_flags_mirror_settings_and_beat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = {a.dest for a in build_parser()._actions}
    assert set(Settings.model_fields) <= flags
    monkeypatch.setenv("CTC_PORT", "9001")
    settings = load_settings(["--port", "9002", "--max-batch-size", "4", "--drafter", "none", "--dtype", "float32"])
    assert (settings.port, settings.max_batch_size, settings.drafter, settings.dtype) == (9002, 4, "none", "float32")
    assert load_settings([]).port == 9001


def test_bad_flag_value_exits_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(["--port", "70000"])
    assert info.value.code == 2
    assert "port" in capsys.readouterr().err


def test_help_runs_without_the_engine() -> None:
    result = subprocess.run([sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--model", "--drafter", "--host", "--port", "--max-batch-size", "--max-model-len", "--device",
                 "--dtype", "--api-key", "CTC_MODEL"):
        assert flag in result.stdout


def test_boolean_flags_alone_mean_true(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings([]).enforce_eager is False
    assert load_settings(["--enforce-eager"]).enforce_eager is True
    assert load_settings(["--enforce-eager", "false", "--governor", "false"]).governor is False
    assert load_settings(["--enforce-eager", "false"]).enforce_eager is False
    monkeypatch.setenv("CTC_ENFORCE_EAGER", "1")
    assert load_settings([]).enforce_eager is True
