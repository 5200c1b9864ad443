"""Rotary position embeddings (RoPE), with the Llama-3 and linear frequency scalings.

Positions are explicit per token, not implied by order: in a verification tree every node's
position is prefix length + its depth, so siblings share a position. Keys are stored in the
KV cache already rotated, which is why an accepted node keeps its K/V when it is moved into
place: its depth-based position is exactly the position it ends up at.
"""

from __future__ import annotations

import math

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies theta^(-2i/d), rescaled as `scaling` says."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    return inv_freq.float()


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1's rule: wavelengths longer than old_ctx/low_freq_factor are stretched by
    `factor`, those shorter than old_ctx/high_freq_factor are kept, and the band between is a
    linear blend in 1/wavelength (so the transition is smooth)."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    middle = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(middle, blended, out)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions (T,) -> cos, sin (T, 1, head_dim), computed in fp32 then cast (the 1 broadcasts
    over the heads of a packed (T, H, head_dim) tensor)."""
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (T, hd/2)
    emb = torch.cat((angles, angles), dim=-1)[..., None, :]  # (T, 1, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, hd): rotate pairs (i, i + hd/2), the Hugging Face / Llama layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
