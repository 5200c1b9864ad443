"""Rank 0's side of tensor parallelism: start the workers, send them each step, watch them, stop them.

Each worker (worker.py) is a spawned process with a pipe to rank 0. Commands go down the pipes in
the order rank 0 issues them (one engine thread issues them all; a lock keeps them whole), and the
collectives that follow a Forward run in the same order on every rank. Bulk tensors never go down
a pipe: a step's embeddings go by one broadcast, partial sums by all-reduces.

Failure never hangs. A collective waits at most `timeout_s` for a rank (the process group's
timeout; on the CPU, gloo fails at once when a peer's socket closes). A watchdog thread waits on
the workers' process sentinels: when one exits unasked, the group is marked failed, the remaining
workers are ended (so no rank waits out a timeout), and the `on_failure` callbacks run (the CLI's
stops the server, which then exits non-zero). Every later forward raises `WorkerFailed` at once,
so requests in flight end with an error. A forward that fails on rank 0 after the step was sent
fails the group too: the other ranks are inside its collectives, and a next step could only
mismatch them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path

import torch
import torch.distributed as dist

from server.runtime.batch import ForwardItem
from server.runtime.config import ModelConfig, ModelConfigError
from server.runtime.kv_cache import KVCache
from server.runtime.loader import load_model, resolve_device
from server.runtime.parallel.shard import ShardedCausalLM, TensorShard, check_shardable
from server.runtime.parallel.worker import (
    ALLOCATED, JOINING, LOADED, Allocate, Commit, Forward, Stop, WorkerSpec, join_group, worker_main,
)

log = logging.getLogger(__name__)

# A collective waits this long for the slowest rank: far above one step's compute on any device we
# serve (a long prefill chunk on the CPU takes seconds), so only a stuck rank ever reaches it.
COLLECTIVE_TIMEOUT_S = 120.0
# Spawning a worker, importing torch and loading its shard, on a busy host.
START_TIMEOUT_S = 600.0
DEATH_GRACE_S = 1.0  # how long a failed collective waits to see whether a worker died (to name it)
STOP_TIMEOUT_S = 10.0  # a worker asked to stop gets this long before it is terminated


class WorkerFailed(RuntimeError):
    """The tensor-parallel group cannot serve: a worker died, or a forward failed half-way."""


class WorkerGroup:
    """The N - 1 worker processes of a tensor-parallel model, seen from rank 0."""

    def __init__(self, model_dir: str | Path, dtype: str, device: str, world: int,
                 timeout_s: float = COLLECTIVE_TIMEOUT_S, log_level: str = "info"):
        """Start the workers and join the process group with them (they load their shards meanwhile);
        `load_model` then loads rank 0's. Raises ModelConfigError for a model or device that cannot
        be split `world` ways, WorkerFailed if a worker fails to start."""
        if world < 2:
            raise ValueError("a worker group needs a world of at least 2 ranks")
        self.model_dir, self.dtype, self.world = str(model_dir), dtype, world
        check_shardable(ModelConfig.from_dir(model_dir), world)
        self.device = _rank0_device(device, world)
        self.failure: str | None = None
        self._lock = threading.Lock()  # keeps each command whole on the pipes
        self._fail_lock = threading.Lock()  # one failure is recorded, and acted on, once
        self._reap_lock = threading.Lock()  # two threads reaping one child: the loser's waitpid sees ECHILD
        self._callbacks: list[Callable[[], None]] = []
        self._closing = False
        self._rendezvous = Path(tempfile.mkdtemp(prefix="ctc-tp-"))
        spec = WorkerSpec(
            model_dir=self.model_dir, dtype=dtype, device_type=self.device.type, world=world,
            init_method=(self._rendezvous / "store").as_uri(), backend="nccl" if self.device.type == "cuda" else "gloo",
            timeout_s=timeout_s, threads=torch.get_num_threads(), log_level=log_level,
        )
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA context or threads inherited
        self._procs, self._conns = [], []
        for rank in range(1, world):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(rank, spec, theirs), name=f"ctc-tp-rank{rank}", daemon=True)
            proc.start()
            theirs.close()  # only the worker holds its end: its exit reads as EOF here
            log.info("tensor-parallel worker rank %d started, pid %d", rank, proc.pid)
            self._procs.append(proc)
            self._conns.append(ours)
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()
        try:
            self._expect(JOINING, "starting")
            join_group(spec, 0)  # waits for every worker to join (at most timeout_s)
        except WorkerFailed:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise WorkerFailed(self.failure or f"the tensor-parallel process group did not form: {exc}") from exc
        except BaseException:
            self.close()
            raise

    # -- start-up ---------------------------------------------------------------------------------
    def load_model(self) -> ShardedCausalLM:
        """Rank 0's part of the model, once every worker has loaded its own; its forward drives them."""
        model = load_model(self.model_dir, self.dtype, str(self.device), shard=TensorShard(0, self.world))
        self._expect(LOADED, "loading its shard")
        model.peers = self
        return model

    def make_caches(self, model: ShardedCausalLM, max_slots: int, max_len: int) -> KVCache:
        """Every worker allocates its KV cache (its kv heads); returns rank 0's."""
        self._send(Allocate(max_slots, max_len))
        self._expect(ALLOCATED, "allocating its KV cache")
        return model.local_cache(max_slots, max_len, LeaderCache, peers=self)

    def _expect(self, reply: str, doing: str) -> None:
        """Wait for `reply` from every worker; raise WorkerFailed if one fails or exits first."""
        for rank, conn in enumerate(self._conns, start=1):
            try:
                if not conn.poll(START_TIMEOUT_S):
                    raise WorkerFailed(f"tensor-parallel worker rank {rank} did not finish {doing} "
                                       f"within {START_TIMEOUT_S:.0f} s")
                got = conn.recv()
            except (EOFError, OSError):
                raise WorkerFailed(f"tensor-parallel worker rank {rank} exited with code "
                                   f"{self._reap(self._procs[rank - 1])} while {doing}") from None
            if got != reply:
                raise WorkerFailed(got[1] if isinstance(got, tuple) else f"rank {rank} answered {got!r}")

    # -- serving ------------------------------------------------------------------------------------
    @contextmanager
    def step(self, items: list[ForwardItem], x: torch.Tensor) -> Iterator[None]:
        """Send a forward's items and its embeddings x (T, H); the body runs rank 0's layers. An
        error after the items went out fails the group (see the module docstring)."""
        self._send(Forward(items))
        try:
            dist.broadcast(x, src=0)
            yield
        except Exception as exc:
            self.fail(self._dead_worker() or f"a tensor-parallel forward failed half-way ({type(exc).__name__}: {exc})")
            raise WorkerFailed(self.failure) from exc
        except BaseException:
            self.fail("a tensor-parallel forward was interrupted half-way")
            raise

    def commit(self, slots: list[int], lengths: list[int], paths: list[list[int]]) -> None:
        self._send(Commit(slots, lengths, paths))

    def _send(self, command) -> None:
        with self._lock:
            if self.failure is not None:
                raise WorkerFailed(self.failure)
            try:
                for conn in self._conns:
                    conn.send(command)
            except OSError as exc:
                self.fail(self._dead_worker() or f"a tensor-parallel worker's pipe closed ({exc})")
                raise WorkerFailed(self.failure) from exc

    # -- failure and shutdown ---------------------------------------------------------------------
    def on_failure(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from another thread) once the group fails; at once if it has."""
        self._callbacks.append(callback)
        if self.failure is not None:
            callback()

    def fail(self, reason: str) -> None:
        """Mark the group failed (the first reason is kept), end the workers, run the callbacks."""
        with self._fail_lock:
            if self.failure is not None or self._closing:
                return
            self.failure = reason
        log.error("tensor parallelism failed: %s; stopping", self.failure)
        for proc in self._procs:
            with self._reap_lock:
                alive = proc.is_alive()
            if alive:
                proc.terminate()  # a rank left inside a collective would wait out its timeout
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                log.exception("a tensor-parallel failure callback failed")

    def _dead_worker(self, timeout: float | None = DEATH_GRACE_S) -> str | None:
        """Which worker exited, waiting up to `timeout` for one to (None: none did). A collective
        fails as soon as a peer's socket closes, often before its exit is visible: this names the
        cause rather than the symptom."""
        sentinels = {p.sentinel: rank for rank, p in enumerate(self._procs, start=1)}
        ready = wait(list(sentinels), timeout)
        if not ready:
            return None
        rank = sentinels[ready[0]]
        proc = self._procs[rank - 1]
        return f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code {self._reap(proc)}"

    def _reap(self, proc: mp.Process) -> int | None:
        """Wait (briefly) for a worker that exited and return its exit code. The watchdog and a
        failed step both get here when a worker dies; one lock, or the second waitpid sees ECHILD and
        the exit code reads None."""
        with self._reap_lock:
            proc.join(DEATH_GRACE_S)
            return proc.exitcode

    def _watch(self) -> None:
        """The watchdog: wait for any worker to exit; unless we are closing, that fails the group."""
        dead = self._dead_worker(timeout=None)
        if not self._closing:
            self.fail(dead)

    def close(self) -> None:
        """Stop the workers (asking first) and leave the process group. Idempotent."""
        if self._closing:
            return
        self._closing = True
        for conn in self._conns:
            try:
                conn.send(Stop())
            except OSError:
                pass
        for proc in self._procs:
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                log.warning("tensor-parallel worker %s did not stop; terminating it", proc.name)
                proc.terminate()
                proc.join(STOP_TIMEOUT_S)
        for conn in self._conns:
            conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self._rendezvous, ignore_errors=True)


class LeaderCache(KVCache):
    """Rank 0's KV cache: a KVCache whose commits the workers replay on theirs."""

    def __init__(self, *args, peers: WorkerGroup, **kwargs):
        super().__init__(*args, **kwargs)
        self.peers = peers

    def commit_paths(self, slots: list[int], paths: list[list[int]]) -> None:
        self.peers.commit(slots, [self.lengths[s] for s in slots], paths)
        super().commit_paths(slots, paths)


def _rank0_device(device: str, world: int) -> torch.device:
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index not in (None, 0):
            raise ModelConfigError(f"with --tensor-parallel-size, rank r runs on cuda:r; "
                                   f"use --device cuda, not {device}")
        if torch.cuda.device_count() < world:
            raise ModelConfigError(f"--tensor-parallel-size {world} needs {world} CUDA devices; "
                                   f"this machine has {torch.cuda.device_count()}")
        return torch.device("cuda", 0)
    if dev.type != "cpu":
        raise ModelConfigError(f"tensor parallelism runs on cpu or cuda, not {device}")
    return dev
