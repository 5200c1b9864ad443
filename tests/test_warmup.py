"""The start-up warm-up (server/engine/warmup.py) on the real demo model and its CTC drafter:
it serves a drafting request to the end, leaves the engine as new (slot free, timings forgotten,
the next output unchanged), runs inside `build_engine`, and, like the rest of serving, writes
nothing under the model directories (the Docker image mounts them read-only)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from server.engine.factory import build_drafter, build_engine
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.types import EngineError, SamplingParams
from server.engine.warmup import MAX_TOKENS, warm_up
from server.runtime.loader import load_model, load_tokenizer
from server.settings import Settings

from conftest import DEMO_MODEL

DEMO_DRAFTER = DEMO_MODEL.parent / f"{DEMO_MODEL.name}-ctc"

pytestmark = pytest.mark.skipif(not (DEMO_DRAFTER / "model.safetensors").is_file(),
                                reason="the demo model and its CTC drafter are not built")


def greedy(engine: LLMEngine, prompt: list[int], max_tokens: int = 24) -> list[int]:
    engine.add_request("r", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    out: list[int] = []
    while engine.has_work():
        for delta in engine.step():
            assert delta.error is None
            out += delta.token_ids
    return out


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    model = load_model(DEMO_MODEL, device="cpu")
    drafter = build_drafter(str(DEMO_DRAFTER), model, max_slots=2, max_len=256)
    return LLMEngine(model, load_tokenizer(DEMO_MODEL), EngineConfig(max_model_len=256), drafter=drafter)


def test_warm_up_serves_a_request_and_leaves_the_engine_as_new(engine: LLMEngine) -> None:
    prompt = engine.tokenizer.encode("Tom has 3 apples and buys 5 more. How many apples does he have?")
    before = greedy(engine, prompt)
    assert engine.scheduler.governor.cost_samples  # the request taught the governor step times

    assert warm_up(engine) == MAX_TOKENS
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    assert not engine.scheduler.governor.cost_samples and not engine.scheduler.governor.steps
    assert not engine.phase_seconds
    assert greedy(engine, prompt) == before


def test_a_failing_warm_up_fails_loudly(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr("server.engine.speculate.verify", broken)
    with pytest.raises(EngineError, match="warm-up request failed"):
        warm_up(engine)
    assert not engine.has_work()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_build_engine_warms_up_and_nothing_writes_under_the_model_dirs(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    model_dir, drafter_dir = tmp_path / "demo", tmp_path / "demo-ctc"
    shutil.copytree(DEMO_MODEL, model_dir)
    shutil.copytree(DEMO_DRAFTER, drafter_dir)
    before = snapshot(tmp_path)
    settings = Settings(model=model_dir, drafter=f"{drafter_dir}+ngram", device="cpu", max_model_len=256,
                        max_batch_size=2)
    with caplog.at_level(logging.INFO, logger="server.engine.warmup"):
        engine = build_engine(settings)
    assert any(r.getMessage().startswith(f"warmed up: {MAX_TOKENS} tokens") for r in caplog.records)
    assert greedy(engine, engine.tokenizer.encode("How many legs does a spider have?"))
    assert snapshot(tmp_path) == before


def test_build_engine_defaults_to_eight_tree_nodes_on_a_cpu() -> None:
    # The server's default tree budget is the device's (scheduler.default_tree_nodes); a set one stays.
    engine = build_engine(Settings(model=DEMO_MODEL, drafter="ngram", device="cpu", max_model_len=256, max_batch_size=1))
    assert engine.config.scheduler.max_tree_nodes == 8
    engine = build_engine(Settings(model=DEMO_MODEL, drafter="ngram", device="cpu", max_model_len=256, max_batch_size=1,
                                   max_tree_nodes=12))
    assert engine.config.scheduler.max_tree_nodes == 12
