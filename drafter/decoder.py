"""What the CTC and EAGLE-style draft modules share: Llama decoder layers (the runtime's own) over
the frozen base model's hidden states fused with token embeddings, c = W [h ; E(x)], reading out
through the base model's borrowed embedding and LM head.

A subclass sets `config` (with `layer_config()`, `rope_theta`, `base_hidden_size`,
`base_vocab_size`), `fuse` (Linear 2H -> H), `layers` and `norm`, then calls `init_rope()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from drafter.base import Drafter, ProposeRequest
from drafter.loading import borrow
from server.runtime.config import ModelConfig
from server.runtime.kv_cache import KVCache
from server.runtime.model import CausalLM, fuse_projections
from server.runtime.rope import inverse_frequencies, rope_cos_sin


class DraftLayersConfig:
    """Mixed into a drafter's config dataclass, whose fields include base_architecture,
    base_hidden_size, base_vocab_size, num_layers, num_heads, num_kv_heads, intermediate_size,
    rms_norm_eps and rope_theta."""

    @property
    def blank(self) -> int:
        return self.base_vocab_size  # the extra output after the base vocabulary

    def layer_config(self) -> ModelConfig:
        """The drafter's decoder layers as a ModelConfig (same family of layer as the base)."""
        return ModelConfig(
            architecture="LlamaForCausalLM", vocab_size=self.base_vocab_size, hidden_size=self.base_hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.base_hidden_size // self.num_heads,
            rms_norm_eps=self.rms_norm_eps, max_position_embeddings=0, tie_word_embeddings=False,
            qkv_bias=False, o_bias=False, mlp_bias=False, rope_theta=self.rope_theta,
        )

    @classmethod
    def for_base(cls, base: ModelConfig, **overrides):
        """The config for drafting for `base`: its sizes, overridden by `overrides`."""
        defaults = dict(
            base_architecture=base.architecture, base_hidden_size=base.hidden_size,
            base_vocab_size=base.vocab_size, num_heads=base.num_heads, num_kv_heads=base.num_kv_heads,
            intermediate_size=base.intermediate_size, rms_norm_eps=base.rms_norm_eps, rope_theta=base.rope_theta,
        )
        return cls(**{**defaults, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


class DecoderOverBase(nn.Module):
    config: object
    fuse: nn.Linear
    layers: nn.ModuleList
    norm: nn.Module

    def init_rope(self) -> None:
        self.register_buffer("inv_freq", self._rope_frequencies(), persistent=False)
        self._base: tuple[nn.Embedding, nn.Linear] | None = None

    def _rope_frequencies(self, device: torch.device | str | None = None) -> torch.Tensor:
        lc = self.config.layer_config()
        return inverse_frequencies(lc.head_dim, self.config.rope_theta, {}).to(device)  # (hd/2,) float32

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` casts every floating buffer; the rope frequencies must stay float32: in
        bfloat16 they are off by up to 4e-3 relative, and the angle error (position x that) grows
        linearly along the context, so drafts would get worse the longer a conversation runs.
        Rebuilt exactly after any cast or move; cos/sin are computed from them in float32
        (rope_cos_sin) and only the final tables take the activations' dtype."""
        super()._apply(fn, recurse)
        if "inv_freq" in self._buffers and not self.inv_freq.is_meta:
            self.inv_freq = self._rope_frequencies(self.inv_freq.device)
        return self

    def attach_base(self, base: CausalLM):
        if (base.config.hidden_size, base.config.vocab_size) != (self.config.base_hidden_size, self.config.base_vocab_size):
            raise ValueError("drafter and base model disagree on hidden or vocabulary size")
        # A tuple: not registered, not saved. In the drafter's dtype (a copy if the base differs).
        dtype = self.fuse.weight.dtype
        self._base = (borrow(base.model.embed_tokens, dtype), borrow(base.lm_head, dtype))
        return self

    @property
    def base(self) -> tuple[nn.Embedding, nn.Linear]:
        if self._base is None:
            raise RuntimeError("call attach_base(base_model) before using the drafter")
        return self._base

    def inputs(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """c_t = W [h_t ; E(x_{t+1})]: hidden (..., H), next_tokens (...) -> (..., H)."""
        embed, _ = self.base
        return self.fuse(torch.cat([hidden.to(self.fuse.weight.dtype), embed(next_tokens)], dim=-1))

    def run(self, x: torch.Tensor, meta, cache: KVCache | None) -> torch.Tensor:
        """Decoder layers over packed inputs x (T, H) laid out as `meta` says; returns normed (T, H)."""
        cos, sin = rope_cos_sin(meta.positions, self.inv_freq, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, meta, cache)
        return self.norm(x)


@dataclass
class _SeqState:
    slot: int
    tokens: list[int] = field(default_factory=list)  # committed tokens not yet in the drafter cache
    hidden: list[torch.Tensor] = field(default_factory=list)  # their base hidden states, (n, H) each


class CachedContextDrafter(Drafter):
    """Inference for a DecoderOverBase: a slot KV cache of its own over the committed context,
    fed each step with the positions committed since the last (ctc.py, "Catching up": after a
    plain stretch only the last `catch_up` of them)."""

    needs_hidden = True

    def __init__(self, model: DecoderOverBase, max_slots: int, cache_len: int, catch_up: int):
        self.model = fuse_projections(model.eval())  # inference only from here on
        self.catch_up = catch_up
        lc, p = model.config.layer_config(), model.fuse.weight
        self.cache = KVCache(model.config.num_layers, max_slots, lc.num_kv_heads, cache_len, lc.head_dim,
                             p.dtype, p.device)
        self.state: dict[str, _SeqState] = {}

    def start(self, seq_id: str, prompt_ids: list[int]) -> None:
        self.state[seq_id] = _SeqState(slot=self.cache.allocate())

    def observe(self, seq_id: str, token_ids: list[int], hidden: torch.Tensor | None) -> None:
        st = self.state[seq_id]
        st.tokens += token_ids
        st.hidden.append(hidden)

    def release(self, seq_id: str) -> None:
        st = self.state.pop(seq_id, None)
        if st is not None:
            self.cache.free(st.slot)

    def new_context(self, requests: list[ProposeRequest]) -> tuple[list[_SeqState], list[int], torch.Tensor]:
        """Each request's state, its number n of new context positions, and their inputs
        (sum n, H) in one fuse call: h_t with the token after t (the pending token after the last)."""
        m = self.model
        device = m.fuse.weight.device
        states = [self.state[r.seq_id] for r in requests]
        for st in states:
            if self.cache.lengths[st.slot] and len(st.tokens) > self.catch_up:  # see "Catching up" in ctc.py
                st.tokens = st.tokens[-self.catch_up :]
                st.hidden = [torch.cat(st.hidden)[-self.catch_up :]]
        lens = [len(st.tokens) for st in states]
        hidden = torch.cat([h for st in states for h in st.hidden]).to(device)  # (sum n, H)
        nxt = [t for st, r in zip(states, requests) for t in (*st.tokens[1:], r.pending_token)]
        return states, lens, m.inputs(hidden, torch.tensor(nxt, device=device))
