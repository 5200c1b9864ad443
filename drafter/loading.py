"""Drafter checkpoints: config.json (kind, N, the base model's architecture, hidden and vocabulary
sizes, ...) + model.safetensors holding only the drafter's own weights (the base model's frozen
embedding and LM head are borrowed at load time). A registry maps `kind` to its classes; loading
against a base model of another shape is refused with a message that says which number differs.
"""

from __future__ import annotations

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
    from drafter.medusa import MedusaConfig, MedusaDrafter, MedusaHeads

    return {
        "ctc": DrafterKind(CTCDrafterConfig, CTCDraftModel, CTCDrafter),
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


def load_draft_model(path: str | Path, base: CausalLM) -> torch.nn.Module:
    path = Path(path)
    kind, cfg = read_drafter_config(path)
    check_base(cfg, base, path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise DrafterLoadError(f"{weights} not found")
    model = kind.model_cls(cfg)
    param = base.lm_head.weight
    model.load_state_dict(load_file(str(weights)))
    model = model.to(device=param.device, dtype=param.dtype).attach_base(base).eval()
    model.requires_grad_(False)
    return model


def load_drafter(path: str | Path, base: CausalLM, max_slots: int, max_len: int) -> Drafter:
    model = load_draft_model(path, base)
    kind = drafter_kind(model.config.kind)
    log.info("drafter %s (%s) loaded", path, model.config.kind)
    return kind.drafter_cls(model, max_slots=max_slots, max_len=max_len)
