"""Registry of the base-model architectures we serve, keyed by config.json's `architectures[0]`.

All three are the same decoder (RMSNorm, rotary attention with GQA, SwiGLU MLP); they differ
only in which projections carry a bias and whether a sliding window applies. Anything else is
refused with the list of what is supported, never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class ModelConfigError(ValueError):
    """A checkpoint we cannot serve, with a message that says why."""


@dataclass(frozen=True)
class ArchSpec:
    qkv_bias: Callable[[dict], bool]
    o_bias: Callable[[dict], bool]
    uses_sliding_window: Callable[[dict], bool]


ARCHITECTURES: dict[str, ArchSpec] = {
    # Llama 1/2/3: optional bias on all attention projections (False in every released model).
    "LlamaForCausalLM": ArchSpec(
        qkv_bias=lambda c: bool(c.get("attention_bias", False)),
        o_bias=lambda c: bool(c.get("attention_bias", False)),
        uses_sliding_window=lambda c: False,
    ),
    # Mistral: Llama without biases, with an optional sliding window (null in v0.2 and later).
    "MistralForCausalLM": ArchSpec(
        qkv_bias=lambda c: False,
        o_bias=lambda c: False,
        uses_sliding_window=lambda c: c.get("sliding_window") is not None,
    ),
    # Qwen2: bias on q/k/v only; the sliding window is off unless use_sliding_window says so.
    "Qwen2ForCausalLM": ArchSpec(
        qkv_bias=lambda c: True,
        o_bias=lambda c: False,
        uses_sliding_window=lambda c: bool(c.get("use_sliding_window", False)) and c.get("sliding_window") is not None,
    ),
}


def arch_spec(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ModelConfigError(
            f"architecture {name!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
