"""Build the engine core from server settings: model, tokenizer, drafter, cache, scheduler; then warm
it up (warmup.py), so the server reports ready only once a request can be served at full speed."""

from __future__ import annotations

import logging
from pathlib import Path

from drafter.base import Drafter
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.scheduler import SchedulerConfig
from server.engine.warmup import warm_up
from server.runtime.loader import load_model, load_tokenizer
from server.settings import HYBRID_SUFFIX

log = logging.getLogger(__name__)


def build_drafter(spec: str | None, model, max_slots: int, max_len: int) -> Drafter | None:
    """`none` -> no speculation; `ngram` -> prompt lookup; a directory -> a trained drafter;
    `DIRECTORY+ngram` -> that trained drafter and prompt lookup merged in one tree (hybrid.py)."""
    if spec is None or str(spec).lower() == "none":
        return None
    if str(spec).lower() == "ngram":
        from drafter.ngram import NgramDrafter

        return NgramDrafter()
    from drafter.loading import load_drafter

    spec = str(spec)
    if spec.endswith(HYBRID_SUFFIX):
        from drafter.hybrid import LookupHybridDrafter

        learned = load_drafter(Path(spec.removesuffix(HYBRID_SUFFIX)), model, max_slots=max_slots, max_len=max_len)
        return LookupHybridDrafter(learned)
    return load_drafter(Path(spec), model, max_slots=max_slots, max_len=max_len)


def build_engine(settings) -> LLMEngine:
    model = load_model(settings.model, dtype=settings.dtype, device=settings.device)
    tokenizer = load_tokenizer(settings.model)
    drafter = build_drafter(settings.drafter, model, settings.max_batch_size, settings.max_model_len)
    sched = SchedulerConfig(max_batch_size=settings.max_batch_size, max_tree_nodes=settings.max_tree_nodes,
                            spec_token_budget=settings.spec_token_budget, governor=settings.governor)
    config = EngineConfig(max_model_len=settings.max_model_len, scheduler=sched)
    name = getattr(settings, "served_model_name", None) or Path(settings.model).name
    engine = LLMEngine(model, tokenizer, config, drafter=drafter, model_name=name)
    warm_up(engine)
    log.info("engine ready: model %s, drafter %s, max_batch_size %d, max_model_len %d",
             name, drafter.name if drafter else "none", sched.max_batch_size, config.max_model_len)
    return engine
