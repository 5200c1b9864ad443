"""Drafter checkpoints: config.json (kind, N, the base model's architecture, hidden and vocabulary
sizes, ...) + model.safetensors holding only the drafter's own weights (the base model's frozen
embedding and LM head are borrowed at load time). A registry maps `kind` to its classes; loading
against a base model of another shape is refused with a message that says which number differs.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from drafter.base import Drafter, ProposeRequest
from server.runtime.model import CausalLM

log = logging.getLogger(__name__)


class DrafterLoadError(ValueError):
    pass


@dataclass(frozen=True)
class DrafterKind:
    config_cls: type
    model_cls: type
    drafter_cls: type


def _kinds() -> dict[str, DrafterKind]:
    from drafter.ctc import CTCDraftModel, CTCDrafter, CTCDrafterConfig
    from drafter.eagle import EagleConfig, EagleDraftModel, EagleDrafter
    from drafter.hydra import HydraConfig, HydraDrafter, HydraHeads
    from drafter.medusa import MedusaConfig, MedusaDrafter, MedusaHeads

    return {
        "ctc": DrafterKind(CTCDrafterConfig, CTCDraftModel, CTCDrafter),
        "eagle": DrafterKind(EagleConfig, EagleDraftModel, EagleDrafter),
        "hydra": DrafterKind(HydraConfig, HydraHeads, HydraDrafter),
        "medusa": DrafterKind(MedusaConfig, MedusaHeads, MedusaDrafter),
    }


def drafter_kind(name: str) -> DrafterKind:
    kinds = _kinds()
    if name not in kinds:
        raise DrafterLoadError(f"unknown drafter kind {name!r}; known: {', '.join(sorted(kinds))}")
    return kinds[name]


def save_drafter(model: torch.nn.Module, out_dir: str | Path, extra: dict | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**model.config.to_dict(), **(extra or {})}, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))


def read_drafter_config(path: str | Path):
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise DrafterLoadError(f"{cfg_file} not found: a drafter directory needs config.json and model.safetensors")
    raw = json.loads(cfg_file.read_text())
    kind = drafter_kind(raw.get("kind", ""))
    fields = kind.config_cls.__dataclass_fields__
    return kind, kind.config_cls(**{k: v for k, v in raw.items() if k in fields})


def check_base(cfg, base: CausalLM, path: Path) -> None:
    b = base.config
    for name, mine, theirs in (
        ("architecture", cfg.base_architecture, b.architecture),
        ("hidden size", cfg.base_hidden_size, b.hidden_size),
        ("vocabulary size", cfg.base_vocab_size, b.vocab_size),
    ):
        if mine != theirs:
            raise DrafterLoadError(
                f"drafter {path} was trained for a base model with {name} {mine}, but the served model has {theirs}"
            )


def dtype_candidates(base: CausalLM) -> list[torch.dtype]:
    """The dtypes a drafter may run in next to `base`, the base model's first. A float32 base on a
    CPU with native bfloat16 matrix units (AVX512-BF16 or AMX) also allows bfloat16: the drafter's
    precision never touches the output (it only proposes, the base model decides), so the faster
    of the two may serve. Which one is faster depends on the CPU: a one-layer CTC propose on the
    demo model at batch 1 took 1.5 ms in float32 and 1.7 in bfloat16 on one AMX machine, while
    bfloat16 was ahead on another (BENCHMARKS.md), so `load_drafter` times both."""
    param = base.lm_head.weight
    if param.device.type == "cpu" and param.dtype == torch.float32 and _cpu_has_bf16():
        return [torch.float32, torch.bfloat16]
    return [param.dtype]


def _cpu_has_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


# The timed choice: proposes at batch 1 after a 64-token context, each after 3 new committed
# tokens (a typical accepted run), in ROUNDS interleaved rounds of CALLS; the medians decide, and
# the base model's dtype keeps its place unless the other is faster by more than MARGIN.
_TIMING_ROUNDS, _TIMING_CALLS, _TIMING_MARGIN = 5, 6, 0.05


def propose_ms(drafter: Drafter, hidden_size: int, device: torch.device, rounds: int = _TIMING_ROUNDS,
               calls: int = _TIMING_CALLS, context: int = 64) -> Iterator[float]:
    """Milliseconds per batch-1 propose of `drafter` (budget 16) after a `context`-token context,
    each after 3 new committed tokens, one figure per round of `calls`; a generator so that several
    drafters' rounds can be interleaved (bench/bench_verify_cost.py times one drafter with it)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    drafter.start("timing", [])
    try:
        drafter.observe("timing", list(range(1, context + 1)), torch.randn(context, hidden_size, generator=gen).to(device))
        drafter.propose([ProposeRequest("timing", 7, 16)])  # first-call costs stay out
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(calls):
                drafter.observe("timing", [11, 12, 13], torch.randn(3, hidden_size, generator=gen).to(device))
                drafter.propose([ProposeRequest("timing", 7, 16)])
            yield (time.perf_counter() - t0) / calls * 1e3
    finally:
        drafter.release("timing")


def fastest_dtype(path: str | Path, base: CausalLM) -> tuple[torch.dtype, dict[torch.dtype, float]]:
    """The dtype `load_drafter` uses when none is given: the only candidate, or the faster of two
    by a timed batch-1 propose (with the milliseconds per propose it measured, else {})."""
    candidates = dtype_candidates(base)
    if len(candidates) == 1:
        return candidates[0], {}
    device = base.lm_head.weight.device
    timers = {dt: propose_ms(_build(path, base, dt, 1, 256), base.config.hidden_size, device) for dt in candidates}
    rounds: dict[torch.dtype, list[float]] = {dt: [] for dt in candidates}
    for _ in range(_TIMING_ROUNDS):
        for dt, timer in timers.items():
            rounds[dt].append(next(timer))
    for timer in timers.values():
        timer.close()
    ms = {dt: statistics.median(r) for dt, r in rounds.items()}
    first, other = candidates
    return (other if ms[other] < (1 - _TIMING_MARGIN) * ms[first] else first), ms


def borrow(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A base model's module (embedding, LM head) for a drafter running in `dtype`: the module
    itself when the dtypes agree, else a frozen copy in `dtype` (the base keeps its own)."""
    if next(module.parameters()).dtype == dtype:
        return module
    return copy.deepcopy(module).to(dtype).requires_grad_(False)


def load_draft_model(path: str | Path, base: CausalLM, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The drafter at `path`, on the base's device, in `dtype` (None: the base model's)."""
    path = Path(path)
    kind, cfg = read_drafter_config(path)
    check_base(cfg, base, path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise DrafterLoadError(f"{weights} not found")
    model = kind.model_cls(cfg)
    param = base.lm_head.weight
    model.load_state_dict(load_file(str(weights)))
    model = model.to(device=param.device, dtype=dtype or param.dtype).attach_base(base).eval()
    model.requires_grad_(False)
    return model


def _build(path: str | Path, base: CausalLM, dtype: torch.dtype, max_slots: int, max_len: int) -> Drafter:
    model = load_draft_model(path, base, dtype)
    return drafter_kind(model.config.kind).drafter_cls(model, max_slots=max_slots, max_len=max_len)


def load_drafter(path: str | Path, base: CausalLM, max_slots: int, max_len: int,
                 dtype: torch.dtype | None = None) -> Drafter:
    """The drafter at `path`, ready to propose for up to `max_slots` sequences of `max_len` tokens,
    in `dtype`; None: the faster of `dtype_candidates(base)` (`fastest_dtype`)."""
    timed: dict[torch.dtype, float] = {}
    if dtype is None:
        dtype, timed = fastest_dtype(path, base)
    drafter = _build(path, base, dtype, max_slots, max_len)
    how = ", ".join(f"{str(dt).removeprefix('torch.')} {ms:.2f}" for dt, ms in timed.items())
    log.info("drafter %s (%s) loaded, %s%s", path, drafter.model.config.kind, str(dtype).removeprefix("torch."),
             f" (the faster by a timed batch-1 propose, ms: {how})" if how else "")
    return drafter
