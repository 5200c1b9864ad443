"""The worker loop: delivery, abort on cancel, failure isolation, admission bounds, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from server.api.async_engine import AsyncEngine, EngineUnavailable, QueueFull
from server.api.metrics import ServerMetrics
from server.engine.types import EngineError, FinishReason, RequestDelta, SamplingParams
from tests.fakes import FakeEngineCore

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def started(core: FakeEngineCore, max_queue: int = 8) -> AsyncEngine:
    engine = AsyncEngine(core, ServerMetrics(), max_batch_size=core.max_batch_size, max_queue=max_queue)
    engine.start()
    return engine


async def collect(deltas: AsyncIterator[RequestDelta]) -> list[RequestDelta]:
    return [d async for d in deltas]


async def wait_until(predicate: object, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.005)


def ids(core: FakeEngineCore, text: str) -> list[int]:
    return core.tokenizer.encode(text)


async def test_deltas_reach_the_consumer_in_order() -> None:
    core = FakeEngineCore(tokens_per_step=3)
    engine = await started(core)
    prompt = ids(core, "one two three four five")
    deltas = await collect(engine.generate("r1", prompt, SamplingParams(max_tokens=50)))
    assert [t for d in deltas for t in d.token_ids] == prompt + [core.tokenizer.eos_token_id]
    assert deltas[-1].finish_reason is FinishReason.STOP and all(not d.finished for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == "one two three four five"
    await engine.shutdown()


async def test_cancelled_consumer_aborts_and_frees_the_slot() -> None:
    core = FakeEngineCore()
    engine = await started(core)
    core.paused.set()
    consumer = asyncio.create_task(collect(engine.generate("r1", ids(core, "hello"), SamplingParams())))
    await wait_until(lambda: core.running)
    consumer.cancel()
    await wait_until(lambda: "r1" in core.aborted)
    await wait_until(lambda: engine.stats.num_running == 0 and not core.has_work())
    assert engine.metrics.requests.labels(status="abort")._value.get() == 1
    await engine.shutdown()


async def test_step_exception_fails_its_requests_and_the_worker_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    core = FakeEngineCore()
    core.crash_marker = "boom"
    engine = await started(core)
    deltas = await collect(engine.generate("bad", ids(core, "boom"), SamplingParams()))
    assert deltas[-1].finish_reason is FinishReason.ERROR and deltas[-1].error
    assert "engine failed" in caplog.text
    good = await collect(engine.generate("good", ids(core, "fine"), SamplingParams()))
    assert good[-1].finish_reason is FinishReason.STOP
    assert engine.is_healthy
    await engine.shutdown()


async def test_engine_refusal_is_raised_to_the_caller() -> None:
    core = FakeEngineCore()
    core.refuse_marker = "nope"
    engine = await started(core)
    with pytest.raises(EngineError):
        await collect(engine.generate("r1", ids(core, "nope"), SamplingParams()))
    assert (await collect(engine.generate("r2", ids(core, "yes"), SamplingParams())))[-1].finished
    await engine.shutdown()


async def test_queue_full_once_batch_and_queue_are_full() -> None:
    core = FakeEngineCore(max_batch_size=1)
    engine = await started(core, max_queue=1)
    core.paused.set()
    first = asyncio.create_task(collect(engine.generate("a", ids(core, "a"), SamplingParams())))
    second = asyncio.create_task(collect(engine.generate("b", ids(core, "b"), SamplingParams())))
    await wait_until(lambda: engine.stats.num_running == 1 and engine.stats.num_waiting == 1)
    with pytest.raises(QueueFull):
        await collect(engine.generate("c", ids(core, "c"), SamplingParams()))
    core.paused.clear()
    assert (await first)[-1].finished and (await second)[-1].finished
    await engine.shutdown()


async def test_shutdown_aborts_running_and_refuses_new() -> None:
    core = FakeEngineCore()
    engine = await started(core)
    core.paused.set()
    consumer = asyncio.create_task(collect(engine.generate("r1", ids(core, "x"), SamplingParams())))
    await wait_until(lambda: core.running)
    await engine.shutdown()
    deltas = await consumer
    assert deltas[-1].finish_reason is FinishReason.ABORT and "r1" in core.aborted
    assert not engine.is_healthy
    with pytest.raises(EngineUnavailable):
        await collect(engine.generate("r2", ids(core, "x"), SamplingParams()))


async def test_drain_lets_short_requests_finish_and_aborts_the_rest() -> None:
    core = FakeEngineCore(max_batch_size=1, tokens_per_step=1)
    core.pause_after = 2  # the first request stalls after two tokens
    engine = await started(core)
    stalled = asyncio.create_task(collect(engine.generate("long", ids(core, "a b c d e f"), SamplingParams())))
    await wait_until(core.paused.is_set)
    drain = asyncio.create_task(engine.drain(timeout_s=0.3))
    await wait_until(lambda: not engine.is_healthy)
    with pytest.raises(EngineUnavailable):  # admission is closed from the drain's start
        await collect(engine.generate("late", ids(core, "x"), SamplingParams()))
    await drain
    deltas = await stalled
    assert deltas[-1].finish_reason is FinishReason.ABORT and "long" in core.aborted
    assert engine._thread is not None and engine._thread.is_alive()  # the worker stops in shutdown()
    await engine.shutdown()


async def test_drain_returns_as_soon_as_nothing_is_in_flight() -> None:
    core = FakeEngineCore()
    engine = await started(core)
    consumer = asyncio.create_task(collect(engine.generate("r1", ids(core, "a b"), SamplingParams())))
    await asyncio.wait_for(engine.drain(timeout_s=30), timeout=10)
    assert (await consumer)[-1].finish_reason is FinishReason.STOP and not core.aborted
    await engine.shutdown()


async def test_metrics_follow_the_deltas() -> None:
    core = FakeEngineCore(tokens_per_step=3)
    engine = await started(core)
    prompt = ids(core, "a b c d e f g")  # 7 tokens -> 8 with EOS: steps of 3, 3, 2
    await collect(engine.generate("spec", prompt, SamplingParams()))
    await collect(engine.generate("plain", prompt, SamplingParams(speculative=False)))
    m = engine.metrics
    assert m.num_drafts._value.get() == 3  # only the speculating request's steps
    assert m.num_draft_tokens._value.get() == 3 * 2
    assert m.num_accepted_tokens._value.get() == 2 + 2 + 1
    assert m.generation_tokens._value.get() == 8 + 8
    assert m.prompt_tokens._value.get() == 14
    assert m.requests.labels(status="stop")._value.get() == 2
    await engine.shutdown()
