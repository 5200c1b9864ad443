"""A tensor-parallel worker: the process of rank r > 0, started by rank 0 (group.py).

It joins the process group, loads its shard, and then does what rank 0's pipe tells it, in order:
allocate its KV cache, run a step's forward (the items come down the pipe, the embeddings by
broadcast, then one all-reduce per o_proj and down_proj as rank 0 does), keep accepted tree paths
in its cache, stop. It keeps no sequence state of its own: every command carries what it needs
(cache lengths included), so it cannot drift from rank 0. Allocating and freeing slots is rank 0's
bookkeeping alone: a forward names its slots and cache positions, and a freed slot's stale K/V lie
past the length of whoever gets the slot next, like a rejected draft's.

It ends on any error, with a non-zero exit and a line on stderr (the server's log): the other ranks
then see its sockets close and fail too, and rank 0's watchdog takes the server down. It ends as
well when rank 0 goes away (its pipe closes), so no worker outlives the server.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from server.runtime.batch import ForwardItem, build_batch
from server.runtime.loader import load_model
from server.runtime.parallel.shard import ShardedCausalLM, TensorShard

log = logging.getLogger(__name__)

JOINING, LOADED, ALLOCATED = "joining", "loaded", "allocated"  # the worker's replies on its pipe
FAILED_EXIT = 1


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to start (sent once, pickled, to the spawned process)."""

    model_dir: str
    dtype: str
    device_type: str  # "cpu" or "cuda": rank r runs on cuda:r
    world: int
    init_method: str  # the process group's rendezvous (a file:// store)
    backend: str  # gloo on the CPU, nccl on CUDA
    timeout_s: float  # how long a collective waits for the other ranks before failing
    threads: int  # torch threads (CPU)
    log_level: str


@dataclass(frozen=True)
class Allocate:
    max_slots: int
    max_len: int


@dataclass(frozen=True)
class Forward:
    items: list[ForwardItem]  # the step's packed batch, as rank 0 built it (build_batch's input)


@dataclass(frozen=True)
class Commit:
    slots: list[int]
    lengths: list[int]  # each slot's committed length before the commit (rank 0's)
    paths: list[list[int]]


@dataclass(frozen=True)
class Stop:
    pass


def join_group(spec: WorkerSpec, rank: int) -> None:
    dist.init_process_group(spec.backend, init_method=spec.init_method, rank=rank, world_size=spec.world,
                            timeout=timedelta(seconds=spec.timeout_s))


def worker_main(rank: int, spec: WorkerSpec, conn) -> None:
    """The spawned process's entry point."""
    logging.basicConfig(level=spec.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s tp-rank{rank} %(name)s: %(message)s")
    torch.set_num_threads(spec.threads)
    try:
        device = torch.device("cpu")
        if spec.device_type == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        conn.send(JOINING)
        join_group(spec, rank)
        model = load_model(spec.model_dir, spec.dtype, str(device), shard=TensorShard(rank, spec.world))
        conn.send(LOADED)
        serve(model, conn, device)
    except EOFError:
        log.error("rank 0 went away; worker rank %d exits", rank)
        os._exit(FAILED_EXIT)
    except BaseException as exc:
        log.exception("tensor-parallel worker rank %d failed", rank)
        try:
            conn.send(("error", f"tensor-parallel worker rank {rank} failed: {type(exc).__name__}: {exc}"))
        except OSError:
            pass
        # At once, without interpreter teardown (which could wait on the process group): closing
        # this process's sockets is what tells the other ranks, now.
        os._exit(FAILED_EXIT)
    os._exit(0)


@torch.inference_mode()
def serve(model: ShardedCausalLM, conn, device: torch.device) -> None:
    """Run rank 0's commands until Stop."""
    cache = None
    hidden, dtype = model.config.hidden_size, next(model.parameters()).dtype
    while True:
        cmd = conn.recv()
        if isinstance(cmd, Forward):
            batch = build_batch(cmd.items, cache.max_len, device)
            x = torch.empty(batch.input_ids.shape[0], hidden, dtype=dtype, device=device)  # (T, H)
            dist.broadcast(x, src=0)  # rank 0's embeddings of the step's tokens
            model.forward_layers(x, batch.meta, cache)
        elif isinstance(cmd, Commit):
            for slot, length in zip(cmd.slots, cmd.lengths):
                cache.lengths[slot] = length
            cache.commit_paths(cmd.slots, cmd.paths)
        elif isinstance(cmd, Allocate):
            cache = None  # the old cache's memory first
            cache = model.local_cache(cmd.max_slots, cmd.max_len)
            conn.send(ALLOCATED)
        elif isinstance(cmd, Stop):
            return
        else:
            raise TypeError(f"unknown command {cmd!r}")
