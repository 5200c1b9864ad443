"""Warm-up: one short request through the whole engine before the server reports ready.

The first steps on a device pay one-time costs: Triton compiles the kernels (tree attention, KV
commit) on their first launch, CUDA creates its context and library handles, the caching
allocator grows. Run at start-up, before `/health` answers 200, these costs fall on no user, so a
health check (Docker's HEALTHCHECK, a load balancer) that passes means the first request is
served at full speed. A broken kernel toolchain (no C compiler for Triton's launcher, an
unwritable cache directory) then fails start-up with its own error, not a user's request.

On CUDA (with the Triton kernels, unless --enforce-eager) the decode/verify CUDA graphs are
captured first (server/runtime/graphs.py): capture runs every bucket once eagerly, which compiles
the kernels for its shapes, and the warm-up request then replays them.

The request drafts when the engine has a drafter, so every phase runs: propose, verify a tree,
accept, commit. Afterwards the engine is as new: its KV slot is free, and its step timings are
forgotten (they include the compilation, and the governor would otherwise judge tree sizes by
them).
"""

from __future__ import annotations

import logging
import time

from server.engine.engine import LLMEngine
from server.engine.types import EngineError, SamplingParams
from server.runtime.graphs import GraphRunner, can_capture, default_buckets
from server.runtime.parallel.shard import ShardedCausalLM

log = logging.getLogger(__name__)

WARMUP_REQUEST_ID = "warm-up"
PROMPT_TOKENS = 32  # long enough for a prefill and for prompt lookup to find a repeat to draft
MAX_TOKENS = 16  # several decode steps: the governor tries its largest tree first, then smaller ones
PATTERN = 8  # the prompt repeats this many distinct token ids, so drafters have something to match


def capture_graphs(engine: LLMEngine) -> GraphRunner | None:
    """Capture CUDA graphs for the engine's decode and verify steps and attach them to its model:
    buckets up to max_batch_size sequences of up to max_tree_nodes + 1 tokens. None (nothing
    attached) where graphs cannot run: the CPU, the torch attention reference on CUDA, or a
    tensor-parallel model (its forward drives other processes' collectives: it runs eagerly)."""
    if not can_capture(engine.cache) or isinstance(engine.model, ShardedCausalLM):
        return None
    sched = engine.config.scheduler
    runner = GraphRunner(engine.model, engine.cache, default_buckets(sched.max_batch_size, sched.max_tree_nodes + 1))
    runner.capture()
    engine.model.graph_runner = runner
    return runner


def warm_up(engine: LLMEngine, cuda_graphs: bool = True) -> int:
    """Capture CUDA graphs where they can run (unless `cuda_graphs` is false: --enforce-eager), then
    serve one greedy request to completion and reset the engine's timings; returns the number of
    tokens it generated. Raises EngineError if the request fails (start-up should fail too)."""
    if cuda_graphs:
        capture_graphs(engine)
    vocab = engine.model.config.vocab_size
    n_prompt = max(1, min(PROMPT_TOKENS, engine.max_model_len // 2))
    prompt = [i % min(PATTERN, vocab) for i in range(n_prompt)]
    params = SamplingParams(max_tokens=max(1, min(MAX_TOKENS, engine.max_model_len - n_prompt)),
                            temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(WARMUP_REQUEST_ID, prompt, params)
    generated = 0
    while engine.has_work():
        for delta in engine.step():
            if delta.error is not None:
                raise EngineError(f"the warm-up request failed: {delta.error}")
            generated += len(delta.token_ids)
    engine.forget_measurements()
    log.info("warmed up: %d tokens in %.2f s", generated, time.perf_counter() - t0)
    return generated
