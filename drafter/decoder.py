"""What the CTC and EAGLE-style draft modules share: Llama decoder layers (the runtime's own) over
the frozen base model's hidden states fused with token embeddings, c = W [h ; E(x)], reading out
through the base model's borrowed embedding and LM head.

A subclass sets `config` (with `layer_config()`, `rope_theta`, `base_hidden_size`,
`base_vocab_size`), `fuse` (Linear 2H -> H), `layers` and `norm`, then calls `init_rope()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from drafter.base import Drafter, LookAhead, ProposeRequest
from drafter.loading import borrow
from server.runtime.batch import ForwardBatch, ForwardItem, build_batch
from server.runtime.config import ModelConfig
from server.runtime.host import to_device
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
    ready: torch.Tensor | None = None  # the next propose's device output, computed by the look-ahead
    last_input: torch.Tensor | None = None  # (H,) the input of the last position in the drafter cache


class CachedContextDrafter(Drafter):
    """Inference for a DecoderOverBase: a slot KV cache of its own over the committed context,
    fed each step with the positions committed since the last (ctc.py, "Catching up": after a
    plain stretch only the last `catch_up` of them).

    Look-ahead (base.Drafter.look_ahead): the forward that `propose` would run next step over the
    new context positions and the subclass's `tail` rows (the CTC frames) runs at the end of this
    step instead, over this step's accepted path while it is still on the device. The path is
    padded to the deepest tree + 1; the tail rows see only its first `length` positions (the
    visibility mask and the tail's positions are set on the device), and the padding rows' K/V,
    written past the committed length, are overwritten later. `observe` then commits the rows the
    look-ahead took in, and the next `propose` uses its output (`_SeqState.ready`)."""

    needs_hidden = True

    def __init__(self, model: DecoderOverBase, max_slots: int, cache_len: int, catch_up: int):
        self.model = fuse_projections(model.eval())  # inference only from here on
        self.catch_up = catch_up
        lc, p = model.config.layer_config(), model.fuse.weight
        self.cache = KVCache(model.config.num_layers, max_slots, lc.num_kv_heads, cache_len, lc.head_dim,
                             p.dtype, p.device)
        self.state: dict[str, _SeqState] = {}
        self._ahead: dict[str, int] = {}  # sequence -> context rows of the look-ahead before its path
        self._ahead_order: list[str] = []  # the look-ahead output's rows

    def start(self, seq_id: str, prompt_ids: list[int]) -> None:
        self.state[seq_id] = _SeqState(slot=self.cache.allocate())

    def observe(self, seq_id: str, token_ids: list[int], hidden: torch.Tensor | None) -> None:
        st = self.state[seq_id]
        before_path = self._ahead.pop(seq_id, None)
        if before_path is not None:  # the look-ahead's forward wrote these positions already
            self.cache.advance(st.slot, before_path + len(token_ids))
            st.tokens, st.hidden = [], []
            return
        st.tokens += token_ids
        st.hidden.append(hidden)
        st.ready = None  # it was computed without these tokens

    def release(self, seq_id: str) -> None:
        self._ahead.pop(seq_id, None)
        st = self.state.pop(seq_id, None)
        if st is not None:
            self.cache.free(st.slot)

    def take_look_ahead(self, values: torch.Tensor) -> None:
        for seq_id, row in zip(self._ahead_order, values):
            if seq_id in self._ahead:
                self.state[seq_id].ready = row
        self._ahead_order = []

    def drop_look_ahead(self) -> None:
        for seq_id, before_path in self._ahead.items():  # those rows' K/V are right whatever the path
            self.cache.advance(self.state[seq_id].slot, before_path)
        self._ahead, self._ahead_order = {}, []
        for st in self.state.values():
            st.ready = None

    def take_ready(self, requests: list[ProposeRequest]) -> dict[int, torch.Tensor]:
        """The look-ahead outputs the requests can use (index -> output), each used once."""
        ready = {}
        for i, r in enumerate(requests):
            st = self.state[r.seq_id]
            if st.ready is not None and not st.tokens:
                ready[i] = st.ready
            st.ready = None
        return ready

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
        if not sum(lens):
            return states, lens, m.fuse.weight.new_zeros(0, m.fuse.out_features)
        hidden = torch.cat([h for st in states for h in st.hidden]).to(device)  # (sum n, H)
        nxt = [t for st, r in zip(states, requests) if st.tokens for t in (*st.tokens[1:], r.pending_token)]
        return states, lens, m.inputs(hidden, to_device(nxt, device))

    def ahead_forward(self, ahead: LookAhead, n_tail: int, tail: Callable[[torch.Tensor], torch.Tensor],
                      ) -> tuple[list[str], torch.Tensor] | None:
        """Run the layers over each sequence's new context, its accepted path and its n_tail tail
        rows, `tail(last)` (S', n_tail, H) from the inputs of each accepted path's last position
        `last` (S', H), for the sequences whose cache has room; returns (their ids, the tail rows'
        outputs (S', n_tail, H)) and records the look-ahead (observe commits it), or None if no
        sequence qualifies."""
        m = self.model
        width = ahead.tokens.shape[1]  # D + 1
        chosen = [k for k, sid in enumerate(ahead.seq_ids)
                  if sid in self.state and sid not in self._ahead and self._room(sid, width + n_tail)]
        if not chosen:
            return None
        ids = [ahead.seq_ids[k] for k in chosen]
        states, lens, ctx = self.new_context([ProposeRequest(ahead.seq_ids[k], ahead.roots[k], 1) for k in chosen])
        device = ctx.device
        pick = to_device(chosen, ahead.tokens.device)
        path = m.inputs(ahead.hidden[pick], ahead.tokens[pick].clamp(min=0))  # (S', D + 1, H)
        ctx = ctx.split(lens)
        lengths = ahead.lengths[pick].to(device)
        last = path[torch.arange(len(chosen), device=device), lengths - 1]  # (S', H)
        rows = tail(last)  # (S', N, H)
        x = torch.cat([t for c, p, r in zip(ctx, path, rows) for t in (c, p, r)])
        items = [ForwardItem(st.slot, self.cache.lengths[st.slot], [0] * (n + width + n_tail)) for st, n in zip(states, lens)]
        batch = build_batch(items, self.cache.max_len, device)
        self._hide_path_padding(batch, lens, width, n_tail, lengths)
        y = m.run(x, batch.meta, self.cache)
        first = to_device([o + n + width for o, n in zip(batch.offsets, lens)], device)  # first tail row
        y = y[first[:, None] + torch.arange(n_tail, device=device)]  # (S', N, H)
        for sid, st, n, row in zip(ids, states, lens, last):
            self._ahead[sid] = n
            st.tokens, st.hidden = [], []  # in the forward now; `observe` commits them with the path
            st.last_input = row
        self._ahead_order = ids
        return ids, y

    def _room(self, seq_id: str, rows: int) -> bool:
        st = self.state[seq_id]
        return self.cache.lengths[st.slot] + len(st.tokens) + rows <= self.cache.max_len

    @staticmethod
    def _hide_path_padding(batch: ForwardBatch, lens: list[int], width: int, n_tail: int, lengths: torch.Tensor) -> None:
        """Item b is [lens[b] context rows | `width` path rows | n_tail tail rows], laid out causally
        by build_batch. On the device: the tail rows see only the first lengths[b] path rows, and
        tail row j sits at position cache_len + lens[b] + lengths[b] + j (not + width)."""
        meta = batch.meta
        mask_at, path_col, mask_item, tail_rows, tail_item = [], [], [], [], []
        for b, n in enumerate(lens):
            q, start, row0 = n + width + n_tail, meta.host_mask_offsets[b], meta.host_cu_seqlens[b]
            for r in range(n + width, q):
                mask_at += range(start + r * q + n, start + r * q + n + width)
                path_col += range(width)
                mask_item += [b] * width
                tail_rows.append(row0 + r)
                tail_item.append(b)
        device = meta.positions.device
        mask_at, path_col, mask_item = (to_device(v, device) for v in (mask_at, path_col, mask_item))
        meta.tree_mask[mask_at] = path_col < lengths[mask_item]
        tail_rows, tail_item = to_device(tail_rows, device), to_device(tail_item, device)
        meta.positions[tail_rows] += lengths[tail_item] - width
