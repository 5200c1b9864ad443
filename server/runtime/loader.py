"""Load a Hugging Face checkpoint directory into our CausalLM, plus its tokenizer.

Reads config.json, one model.safetensors or the shards listed in model.safetensors.index.json,
and the tokenizer (with its chat template) through transformers' AutoTokenizer. Weights are
read straight into the requested dtype and device; the model is built on the meta device first,
so no memory is spent on a random initialisation that would be overwritten.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from server.runtime.config import ModelConfig, ModelConfigError
from server.runtime.model import CausalLM, fuse_projections
from server.runtime.rope import inverse_frequencies

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Buffers some older checkpoints carry; we compute them ourselves.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelConfigError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # bf16 where it is fast, fp32 on the CPU
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelConfigError(f"dtype {dtype!r} not supported; choose auto, {', '.join(DTYPES)}") from None


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelConfigError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def read_state_dict(files: list[Path], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if not name.endswith(_IGNORED_SUFFIXES):
                    state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return state


def load_model(model_dir: str | Path, dtype: str = "auto", device: str = "auto") -> CausalLM:
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    state = read_state_dict(safetensors_files(model_dir), dt, dev)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state:
        raise ModelConfigError(f"{model_dir}: untied embeddings but no lm_head.weight in the checkpoint")
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {n for n, _ in model.named_parameters()}  # tied lm_head is not listed twice
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelConfigError(
            f"{model_dir}: checkpoint does not match a {cfg.architecture} of this config "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers built under the meta device hold no data: derive the rope frequencies for real.
    model.inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(dev)
    fuse_projections(model.eval())
    n = sum(p.numel() for p in model.parameters())
    log.info("loaded %s (%s, %.1fM parameters) on %s in %s", model_dir, cfg.architecture, n / 1e6, dev, dt)
    return model


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` in the model's chat template, ready for the assistant's turn.
    The template holds every special token it needs, so the encoding adds none."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
