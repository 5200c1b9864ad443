"""The asyncio front end of the engine: one worker thread drives a synchronous `EngineCore`.

Requests enter through `AsyncEngine.generate`, an async iterator of `RequestDelta`s. The worker
thread is the only code that touches the engine: it drains an inbox of submissions and aborts,
calls `step()` while the engine has work and sleeps on a `threading.Event` when it has none. Each
step's deltas go back to the event loop in one `loop.call_soon_threadsafe` call and from there to
each request's `asyncio.Queue`. Closing or cancelling a consumer (client disconnect) sends an
abort, so the engine frees the request's slot at its next drain.

Admission is bounded: once `max_batch_size + max_queue` requests are unfinished (a full batch and
a full queue behind it), `generate` raises `QueueFull` (HTTP 429). Counting in the event loop,
rather than reading the engine's waiting count, keeps the bound exact when requests arrive in a
burst before the worker has scheduled them. After `drain()` or `shutdown()` starts, or if the worker
thread ever dies, it raises `EngineUnavailable` (HTTP 503). An exception escaping the engine fails
the requests it owned with `FinishReason.ERROR` and the worker carries on (the engine isolates
per-request failures itself where it can; this is the last line of defence). Either way every
submitted request gets exactly one final item (a finished delta, or the EngineError refusing it):
a delta taken off the tracked set is posted even if the metrics code after it fails. A request
with n > 1 choices gets one final item per choice (each delta carries its `index`) and is finished
once all n are. The worker also feeds `ServerMetrics` (per request, not per choice).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.api.metrics import ServerMetrics
from server.engine.types import EngineCore, EngineError, EngineStats, FinishReason, RequestDelta, SamplingParams

log = logging.getLogger(__name__)

MAX_FAILURE_BACKOFF_S = 1.0  # cap on the pause after repeated engine failures (no hot error loop)
DRAIN_POLL_S = 0.05  # how often a draining shutdown checks whether the requests in flight are done


class QueueFull(Exception):
    """Too many requests are waiting for a batch slot; the client should retry later."""


class EngineUnavailable(Exception):
    """The engine is not serving: not started, shutting down, or its worker died."""


@dataclass
class _Submit:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float  # time.monotonic()


@dataclass
class _Abort:
    request_id: str


class _Shutdown:
    pass


class _AbortAll:
    pass


_Command = _Submit | _Abort | _AbortAll | _Shutdown


@dataclass
class _Tracked:
    """Worker-side timing of one request inside the engine."""

    arrival: float
    prompt_tokens: int
    unfinished: set[int]  # choices (0 to n - 1) without their final delta yet
    completion_tokens: int = 0
    last_token_at: float | None = None


_Item = RequestDelta | Exception  # what a request's asyncio.Queue carries


class AsyncEngine:
    """Owns the worker thread; safe to use from one asyncio event loop."""

    def __init__(self, core: EngineCore, metrics: ServerMetrics, max_batch_size: int, max_queue: int) -> None:
        self.core = core
        self.metrics = metrics
        self.max_unfinished = max_batch_size + max_queue
        self.stats = EngineStats(num_running=0, num_waiting=0, kv_cache_usage=0.0)  # written by the worker
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._streams: dict[str, asyncio.Queue[_Item]] = {}  # event-loop thread only
        self._tracked: dict[str, _Tracked] = {}  # worker thread only
        self._stopping = False  # worker thread only

    # ------------------------------------------------------------ event-loop side

    def start(self) -> None:
        """Start the worker; call from the event loop that will consume the deltas."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()
        self._accepting = True

    @property
    def is_healthy(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestDelta]:
        """Submit a request and yield its deltas until one is finished.

        Raises QueueFull, EngineUnavailable, or an EngineError the engine raised on admission.
        With n > 1 the deltas of all choices come interleaved, until each has finished.
        """
        self._admit(request_id)
        stream: asyncio.Queue[_Item] = asyncio.Queue()
        self._streams[request_id] = stream
        self._send(_Submit(request_id, prompt_ids, params, time.monotonic()))
        done, left = False, params.n
        try:
            while not done:
                item = await stream.get()
                if isinstance(item, Exception):
                    done = True
                    raise item
                left -= item.finished
                done = left == 0
                yield item
        finally:
            del self._streams[request_id]
            if not done:  # consumer closed or cancelled early: free the engine slot
                self._send(_Abort(request_id))

    async def drain(self, timeout_s: float) -> None:
        """The graceful half of a shutdown: stop admitting (503) and give the requests in flight up
        to `timeout_s` seconds to finish, then abort the rest. Each aborted request ends with
        FinishReason.ABORT, which the API reports to its client as the server shutting down. The
        worker keeps running until `shutdown()`."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self._streams:
            log.warning("shutting down: aborting the %d requests still in flight after %.0f s", len(self._streams),
                        timeout_s)
            self._send(_AbortAll())

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop admitting, abort every request in flight, and join the worker."""
        self._accepting = False
        if self._thread is None:
            return
        self._send(_Shutdown())
        await asyncio.to_thread(self._thread.join, timeout_s)
        if self._thread.is_alive():
            log.warning("engine worker did not stop within %.0f s", timeout_s)

    def _admit(self, request_id: str) -> None:
        if not self.is_healthy:
            raise EngineUnavailable("the server is not accepting requests (starting up or shutting down)")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id}")
        if len(self._streams) >= self.max_unfinished:
            raise QueueFull(f"the server is at capacity ({self.max_unfinished} requests in flight); retry later")

    def _send(self, command: _Command) -> None:
        self._inbox.put(command)
        self._wakeup.set()

    def _deliver(self, items: list[tuple[str, _Item]]) -> None:
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:  # None: the consumer went away; drop
                stream.put_nowait(item)

    # ------------------------------------------------------------ worker thread

    def _run(self) -> None:
        failures = 0
        while not self._stopping:
            self._wakeup.clear()  # before draining, so a submission racing with the drain still wakes us
            try:
                self._drain_inbox()
                if self._stopping:
                    break
                if self.core.has_work():
                    self._step()
                else:
                    self._publish_stats()
                    self._wakeup.wait()
                failures = 0
            except Exception:
                failures += 1
                log.exception("engine failed; failing its %d requests and carrying on", len(self._tracked))
                self._finish_all(FinishReason.ERROR, error="internal engine error")
                self._wakeup.wait(min(MAX_FAILURE_BACKOFF_S, 0.01 * 2**failures))
        self._finish_all(FinishReason.ABORT)
        log.info("engine worker stopped")

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Submit):
                self._add(command)
            elif isinstance(command, _Abort):
                self._abort(command.request_id)
            elif isinstance(command, _AbortAll):
                self._finish_all(FinishReason.ABORT)
            else:
                self._stopping = True

    def _add(self, cmd: _Submit) -> None:
        if self._stopping:
            self._post([(cmd.request_id, d) for d in self._final_deltas(cmd.request_id, FinishReason.ABORT,
                                                                         indices=range(cmd.params.n))])
            return
        try:
            self.core.add_request(cmd.request_id, cmd.prompt_ids, cmd.params)
        except EngineError as exc:  # refused (bad params, too long): the client gets a 400
            self._post([(cmd.request_id, exc)])
            return
        except Exception:
            log.exception("add_request(%s) failed", cmd.request_id)
            self.metrics.observe_finish(FinishReason.ERROR, None)
            failed = self._final_deltas(cmd.request_id, FinishReason.ERROR, "internal engine error", range(cmd.params.n))
            self._post([(cmd.request_id, d) for d in failed])
            return
        self._tracked[cmd.request_id] = _Tracked(arrival=cmd.arrival, prompt_tokens=len(cmd.prompt_ids),
                                                 unfinished=set(range(cmd.params.n)))
        self.metrics.observe_admitted(len(cmd.prompt_ids))

    def _abort(self, request_id: str) -> None:
        if self._tracked.pop(request_id, None) is None:
            return  # finished (or refused) before the abort arrived
        self._release(request_id)
        self.metrics.observe_finish(FinishReason.ABORT, None)

    def _release(self, request_id: str) -> None:
        """Abort in the engine; a failure here is logged, never allowed to stop the worker."""
        try:
            self.core.abort_request(request_id)
        except Exception:
            log.exception("abort_request(%s) failed", request_id)

    def _step(self) -> None:
        step_start = time.monotonic()
        deltas = self.core.step()
        now = time.monotonic()
        out: list[tuple[str, _Item]] = []
        try:
            for delta in deltas:
                tracked = self._tracked.get(delta.request_id)
                if tracked is None:
                    continue  # aborted while the step ran
                done = False
                if delta.finished:  # untracked before anything else can fail: its final delta goes out below
                    tracked.unfinished.discard(delta.index)
                    done = not tracked.unfinished
                    if done:
                        del self._tracked[delta.request_id]
                out.append((delta.request_id, delta))
                self.metrics.observe_delta(delta)
                if delta.token_ids:
                    if tracked.last_token_at is None:
                        self.metrics.observe_first_token(now - tracked.arrival, step_start - tracked.arrival)
                    elif tracked.last_token_at < now:  # once per step: n choices advance together
                        self.metrics.observe_token_gap(now - tracked.last_token_at, len(delta.token_ids))
                    tracked.last_token_at = now
                tracked.completion_tokens = delta.completion_tokens
                if done:
                    self.metrics.observe_finish(delta.finish_reason, now - tracked.arrival)
            self._publish_stats()  # before the deltas go out: a client that finished sees gauges that agree
        finally:  # a delta taken off `_tracked` must reach its client even if metrics failed
            self._post(out)

    def _finish_all(self, reason: FinishReason, error: str | None = None) -> None:
        """End every tracked request with `reason`, releasing it in the engine (best effort)."""
        out: list[tuple[str, _Item]] = [(r, d) for r, t in self._tracked.items()
                                        for d in self._final_deltas(r, reason, error, sorted(t.unfinished))]
        try:
            for request_id in list(self._tracked):
                self._release(request_id)
                self.metrics.observe_finish(reason, None)
        finally:  # whatever failed above, every request gets its final delta
            self._tracked.clear()
            self._post(out)
        try:
            self._publish_stats()
        except Exception:
            log.exception("engine stats failed")

    def _final_deltas(self, request_id: str, reason: FinishReason, error: str | None, indices) -> list[RequestDelta]:
        """A final delta for each of the request's choices in `indices`."""
        tracked = self._tracked.get(request_id)
        return [RequestDelta(
            request_id=request_id,
            index=i,
            token_ids=[],
            text="",
            finish_reason=reason,
            prompt_tokens=tracked.prompt_tokens if tracked else 0,
            completion_tokens=tracked.completion_tokens if tracked else 0,
            error=error,
        ) for i in indices]

    def _publish_stats(self) -> None:
        self.stats = self.core.stats()
        self.metrics.set_stats(self.stats)

    def _post(self, items: list[tuple[str, _Item]]) -> None:
        if not items or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            log.debug("event loop closed; dropped %d deltas", len(items))
