"""A compact forward of the Llama family (Llama 1-3, Mistral, Qwen2) over the slot KV cache.

Written here rather than forked from a modeling file: the families differ only in biases and
rope scaling, which ModelConfig resolves, so one decoder serves all of them. Parameter names
match Hugging Face's (model.layers.N.self_attn.q_proj.weight, ...) so checkpoints load as they
are. The forward takes a ForwardBatch (prefill chunks, decode tokens and verification trees,
mixed, packed along one token dimension) and returns the final-norm hidden states; logits are
computed only where needed, since a prefill chunk needs one row of them and the vocabulary
projection dominates small models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.tree_attention import tree_attention
from server.runtime.batch import AttentionMetadata, ForwardBatch
from server.runtime.config import ModelConfig
from server.runtime.kv_cache import KVCache
from server.runtime.rope import apply_rope, inverse_frequencies, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype: the order Llama's reference uses, which
        # matters for bit-level agreement in bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.hq, self.hkv, self.hd = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.hq * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.hq * self.hd, cfg.hidden_size, bias=cfg.o_bias)

    def fuse(self) -> None:
        """For inference: one q|k|v matmul instead of three (fewer launches, the same products)."""
        self.qkv_proj = _concat_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, meta: AttentionMetadata, cache: KVCache | None) -> torch.Tensor:
        T = x.shape[0]  # x: (T, hidden), the batch's new tokens packed (server/runtime/batch.py)
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split([self.hq * self.hd, self.hkv * self.hd, self.hkv * self.hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = apply_rope(q.view(T, self.hq, self.hd), cos, sin)  # (T, Hq, hd)
        k = apply_rope(k.view(T, self.hkv, self.hd), cos, sin)  # (T, Hkv, hd)
        v = v.view(T, self.hkv, self.hd)
        if cache is None:
            out = _attention_without_cache(q, k, v, meta, self.hd**-0.5)
        else:
            cache.write(self.layer, meta, k, v)
            out = tree_attention(
                q, cache.k[self.layer], cache.v[self.layer], meta.cu_seqlens, meta.slots, meta.cache_lens,
                meta.tree_mask, meta.mask_offsets, self.hd**-0.5, max_q_len=meta.max_q_len,
            )  # (T, Hq, hd)
        return self.o_proj(out.reshape(T, self.hq * self.hd))


def _attention_without_cache(q, k, v, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """No cache (training, one-shot scoring): each item's new tokens see only each other, through
    its tree mask. One SDPA per item, differentiable, unlike the in-place cache writes."""
    out = []
    for b in range(len(meta.host_cu_seqlens) - 1):
        rows = meta.item_rows(b)
        qb, kb, vb = (t[rows].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, hd)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=meta.item_mask(b), scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
        out.append(o[0].transpose(0, 1))  # (n, Hq, hd)
    return torch.cat(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def fuse(self) -> None:
        """For inference: one gate|up matmul instead of two."""
        self.gate_up_proj = _concat_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def _concat_linears(*linears: nn.Linear) -> nn.Linear:
    first = linears[0]
    out = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                    device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in linears]))
        if first.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in linears]))
    return out.requires_grad_(first.weight.requires_grad)


def fuse_projections(module: nn.Module) -> nn.Module:
    """Fuse every attention's q/k/v and every MLP's gate/up projections in `module`, for inference.
    Parameter names change (qkv_proj, gate_up_proj), so fuse after loading weights, never before
    training or saving."""
    for m in list(module.modules()):
        if isinstance(m, (Attention, MLP)):
            m.fuse()
    return module


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, meta, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer(
            "inv_freq", inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )
        self.graph_runner = None  # a server/runtime/graphs.GraphRunner, asked first by `forward`

    def make_cache(self, max_slots: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        c = self.config
        return KVCache(c.num_layers, max_slots, c.num_kv_heads, max_len, c.head_dim, p.dtype, p.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Run the batch, writing its K/V into `cache`; returns final-norm hidden states (T, H), one
        row per packed token (item b's rows: batch.offsets[b]:batch.offsets[b+1]).
        Lengths are not advanced here: the caller decides what to keep (advance / commit_paths).
        A step that fits a bucket of the attached graph runner (for this cache) replays its graph."""
        runner = self.graph_runner
        if runner is not None and runner.cache is cache and (hidden := runner.run(batch)) is not None:
            return hidden
        return self.forward_eager(batch, cache)

    @torch.inference_mode()
    def forward_eager(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """`forward` without graphs: what a graph captures, and the fallback."""
        x = self.model.embed_tokens(batch.input_ids)
        cos, sin = rope_cos_sin(batch.meta.positions, self.inv_freq, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, batch.meta, cache)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) float32."""
        return self.lm_head(hidden).float()
