"""ModelConfig: the few numbers our compact Llama-family forward needs, read from config.json.

Hugging Face config files come in two vintages: transformers < 5 writes `rope_theta` and
`rope_scaling`, transformers >= 5 writes one `rope_parameters` dict. Both are read here, once,
into one typed dataclass; nothing downstream looks at the raw dict again. The per-family
differences (Qwen2's q/k/v bias, Mistral's sliding window) come from the registry in
`registry.py`, which also refuses architectures we do not implement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from server.runtime.registry import ModelConfigError, arch_spec

__all__ = ["ModelConfig", "ModelConfigError"]


# Rope variants whose inverse frequencies we compute (rope.py); others are refused at load time
# rather than silently decoded with the wrong positions.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": ..., factor, ...}; {} = default
    sliding_window: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        archs = raw.get("architectures") or []
        if not archs:
            raise ModelConfigError("config.json has no 'architectures' entry; cannot tell which model this is")
        spec = arch_spec(archs[0])
        heads = raw["num_attention_heads"]
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        if "type" in rope and "rope_type" not in rope:  # the oldest spelling
            rope["rope_type"] = rope.pop("type")
        if rope.get("rope_type") == "default":
            rope = {}
        eos = raw.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        window = raw.get("sliding_window") if spec.uses_sliding_window(raw) else None
        return cls(
            architecture=archs[0],
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=spec.qkv_bias(raw),
            o_bias=spec.o_bias(raw),
            mlp_bias=raw.get("mlp_bias", False),
            rope_theta=float(theta),
            rope_scaling=rope,
            sliding_window=window,
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{path} not found: a model directory needs a Hugging Face config.json")
        return cls.from_dict(json.loads(path.read_text()))
