"""Drafter checkpoints: config.json (kind, N, the base model's architecture, hidden and vocabulary
sizes, ...) + model.safetensors holding only the drafter's own weights (the base model's frozen
embedding and LM head are borrowed at load time). A registry maps `kind` to its classes; loading
against a base model of another shape is refused with a message that says which number differs.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from drafter.base import Drafter
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


def inference_dtype(base: CausalLM) -> torch.dtype:
    """The dtype a drafter runs in next to `base`: the base model's, except that a float32 base on
    a CPU with native bfloat16 matrix units (AVX512-BF16 or AMX) gets a bfloat16 drafter. There it
    is cheaper (a CTC propose on the demo model: 0.91x -> 0.73x a plain step, bench/bench_verify_cost.py),
    and the drafter's precision never touches the output: it only proposes, the base model decides."""
    param = base.lm_head.weight
    if param.device.type == "cpu" and param.dtype == torch.float32 and _cpu_has_bf16():
        return torch.bfloat16
    return param.dtype


def _cpu_has_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def borrow(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A base model's module (embedding, LM head) for a drafter running in `dtype`: the module
    itself when the dtypes agree, else a frozen copy in `dtype` (the base keeps its own)."""
    if next(module.parameters()).dtype == dtype:
        return module
    return copy.deepcopy(module).to(dtype).requires_grad_(False)


def load_draft_model(path: str | Path, base: CausalLM, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The drafter at `path`, on the base's device, in `dtype` (None: `inference_dtype(base)`)."""
    path = Path(path)
    kind, cfg = read_drafter_config(path)
    check_base(cfg, base, path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise DrafterLoadError(f"{weights} not found")
    model = kind.model_cls(cfg)
    param = base.lm_head.weight
    model.load_state_dict(load_file(str(weights)))
    model = model.to(device=param.device, dtype=dtype or inference_dtype(base)).attach_base(base).eval()
    model.requires_grad_(False)
    return model


def load_drafter(path: str | Path, base: CausalLM, max_slots: int, max_len: int,
                 dtype: torch.dtype | None = None) -> Drafter:
    model = load_draft_model(path, base, dtype)
    kind = drafter_kind(model.config.kind)
    log.info("drafter %s (%s) loaded, %s", path, model.config.kind, next(model.parameters()).dtype)
    return kind.drafter_cls(model, max_slots=max_slots, max_len=max_len)
