"""Build the engine core from server settings: model, tokenizer, drafter, cache, scheduler; then warm
it up (warmup.py), so the server reports ready only once a request can be served at full speed.

The KV cache is sized once the weights are in (runtime/cache_plan.py): on CUDA from the memory
left, with the drafter's cache and weights counted in, before either cache is allocated.
"""

from __future__ import annotations

import logging
from pathlib import Path

from drafter.base import Drafter
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.scheduler import SchedulerConfig, default_tree_nodes
from server.engine.speculate import Acceptance
from server.engine.types import EngineError
from server.engine.warmup import warm_up
from server.runtime.cache_plan import (
    CachePlan,
    activation_reserve,
    device_memory,
    kv_bytes_per_position,
    plan_kv_cache,
)
from server.runtime.loader import load_model, load_tokenizer
from server.runtime.model import CausalLM
from server.runtime.parallel.group import WorkerGroup
from server.settings import HYBRID_SUFFIX

log = logging.getLogger(__name__)


def build_drafter(spec: str | None, model, max_slots: int, max_len: int, dtype=None) -> Drafter | None:
    """`none` -> no speculation; `ngram` -> prompt lookup; a directory -> a trained drafter;
    `DIRECTORY+ngram` -> that trained drafter and prompt lookup merged in one tree (hybrid.py).
    A trained drafter runs in `dtype` (None: loading.load_drafter's choice)."""
    if spec is None or str(spec).lower() == "none":
        return None
    if str(spec).lower() == "ngram":
        from drafter.ngram import NgramDrafter

        return NgramDrafter()
    from drafter.loading import load_drafter

    spec = str(spec)
    if spec.endswith(HYBRID_SUFFIX):
        from drafter.hybrid import LookupHybridDrafter

        learned = load_drafter(Path(spec.removesuffix(HYBRID_SUFFIX)), model, max_slots=max_slots, max_len=max_len,
                               dtype=dtype)
        return LookupHybridDrafter(learned)
    return load_drafter(Path(spec), model, max_slots=max_slots, max_len=max_len, dtype=dtype)


def plan_cache(settings, model: CausalLM, sched: SchedulerConfig) -> CachePlan:
    """Size the KV cache for `settings` now that `model` is loaded (see cache_plan.py); raises
    CacheSizingError with a one-line explanation when the request cannot fit."""
    cfg, weight = model.config, model.lm_head.weight
    kv_heads = cfg.num_kv_heads // getattr(settings, "tensor_parallel_size", 1)  # rank 0 caches its heads only
    per_position = kv_bytes_per_position(cfg.num_layers, kv_heads, cfg.head_dim, weight.dtype)
    drafter_weights = 0
    path = getattr(settings, "drafter_path", None)
    if path is not None:
        from drafter.loading import read_drafter_config

        _, dcfg = read_drafter_config(path)
        if dcfg.kind in ("ctc", "eagle"):  # they keep a KV cache of their own, as long as the base model's
            lc = dcfg.layer_config()
            per_position += kv_bytes_per_position(lc.num_layers, lc.num_kv_heads, lc.head_dim, weight.dtype)
        weights = Path(path) / "model.safetensors"
        drafter_weights = weights.stat().st_size if weights.is_file() else 0  # saved in float32: an upper bound
    context = cfg.max_position_embeddings
    if cfg.sliding_window is not None:  # not implemented: serve within the window (engine.py)
        context = min(context, cfg.sliding_window)
    rows = sched.max_batch_size * (sched.max_tree_nodes + 1)  # every tree node of a full batch
    reserve = drafter_weights + activation_reserve(cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size,
                                                   max(rows, sched.prefill_chunk), rows, weight.dtype)
    return plan_kv_cache(
        bytes_per_position=per_position, max_slots=sched.max_batch_size, model_max_len=context,
        requested_len=settings.max_model_len, memory=device_memory(weight.device),
        utilization=settings.gpu_memory_utilization, reserve=reserve,
    )


def build_engine(settings, workers: WorkerGroup | None = None) -> LLMEngine:
    """The engine for `settings`; with --tensor-parallel-size N > 1, `workers` are its N - 1 other
    ranks, already started (the CLI starts them, watches them and stops them)."""
    if getattr(settings, "tensor_parallel_size", 1) > 1:
        if workers is None:
            raise EngineError("--tensor-parallel-size > 1 needs its worker processes: serve it with ctc-serve")
        model = workers.load_model()
    else:
        model = load_model(settings.model, dtype=settings.dtype, device=settings.device)
    tokenizer = load_tokenizer(settings.model)
    tree_nodes = settings.max_tree_nodes
    if tree_nodes is None:
        tree_nodes = default_tree_nodes(model.lm_head.weight.device)
    sched = SchedulerConfig(max_batch_size=settings.max_batch_size, max_tree_nodes=tree_nodes,
                            spec_token_budget=settings.spec_token_budget, governor=settings.governor,
                            prefill_step_ratio=settings.prefill_step_ratio or None)
    plan = plan_cache(settings, model, sched)
    if plan.budget is not None:
        log.info("KV cache: %d positions x %d slots, %.2f GiB of a %.2f GiB budget (--gpu-memory-utilization %.2f)",
                 plan.max_model_len, sched.max_batch_size, plan.kv_bytes / 2**30, plan.budget / 2**30,
                 settings.gpu_memory_utilization)
    drafter = build_drafter(settings.drafter, model, settings.max_batch_size, plan.max_model_len)
    config = EngineConfig(max_model_len=plan.max_model_len, scheduler=sched,
                          acceptance=Acceptance(settings.acceptance))
    name = getattr(settings, "served_model_name", None) or Path(settings.model).name
    engine = LLMEngine(model, tokenizer, config, drafter=drafter, model_name=name)
    warm_up(engine, cuda_graphs=not getattr(settings, "enforce_eager", False))
    log.info("engine ready: model %s, drafter %s, max_batch_size %d, max_model_len %d, acceptance %s",
             name, drafter.name if drafter else "none", sched.max_batch_size, config.max_model_len,
             engine.acceptance.value)
    return engine
