"""What one rank of a tensor-parallel model holds, and which slice of each checkpoint tensor it reads.

The pass works on the model as built on the meta device, before any weight is allocated: it
rebuilds every decoder layer from a per-rank config (num_heads, num_key_value_heads and
intermediate_size divided by the world size), so q/k/v, gate/up and the KV cache come out with this
rank's sizes, and swaps o_proj and down_proj for `RowParallelLinear`. The loader then allocates
only what the rank holds and reads each checkpoint tensor through safetensors' `get_slice`, so a
rank never holds another rank's rows, not even while loading.

Rank r's query heads [r * Hq/N, (r + 1) * Hq/N) use exactly its key/value heads
[r * Hkv/N, (r + 1) * Hkv/N) (query head h reads kv head h // (Hq/Hkv)), which is why Hkv must
divide by N: a kv head split across ranks, or replicated, is not implemented.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from server.runtime.batch import AttentionMetadata
from server.runtime.config import ModelConfig, ModelConfigError
from server.runtime.kv_cache import KVCache
from server.runtime.model import CausalLM, DecoderLayer
from server.runtime.rope import rope_cos_sin

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # rows split: out features
ROW_PARALLEL = ("o_proj", "down_proj")  # columns split: in features; outputs all-reduced


@dataclass(frozen=True)
class TensorShard:
    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a world of {self.world}")


def check_shardable(cfg: ModelConfig, world: int) -> None:
    """Refuse, in one line, a model whose heads or MLP columns do not split evenly into `world`."""
    for what, n in (("attention heads (num_attention_heads)", cfg.num_heads),
                    ("key/value heads (num_key_value_heads)", cfg.num_kv_heads),
                    ("MLP columns (intermediate_size)", cfg.intermediate_size)):
        if n % world:
            raise ModelConfigError(
                f"--tensor-parallel-size {world} does not divide this model's {n} {what}; "
                f"choose a size that divides {n}"
            )


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config of one rank's layers: its share of the heads and MLP columns."""
    check_shardable(cfg, world)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
                               intermediate_size=cfg.intermediate_size // world)


class RowParallelLinear(nn.Linear):
    """A Linear whose input features are split across the ranks: this rank holds W's columns for
    its own inputs, computes its partial product, and one all-reduce sums the partials, so every
    rank gets the full output. The bias is added once, after the sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (T, out) this rank's share of the sum
        dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


def _row_parallel(linear: nn.Linear) -> RowParallelLinear:
    return RowParallelLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             device=linear.weight.device, dtype=linear.weight.dtype)


@dataclass(frozen=True)
class SourceSlice:
    """Rows or columns [start, start + length) along `dim` of a checkpoint tensor: all the loader
    reads of it (safetensors_io.ChunkedReader.copy_into)."""

    dim: int
    start: int
    length: int


class ShardedCausalLM(CausalLM):
    """A CausalLM holding one rank's part of every decoder layer (and the final norm, a few KiB).
    Rank 0 also holds the embedding and the LM head, and its `forward` drives the other ranks
    through `peers` (group.WorkerGroup); the other ranks call `forward_layers` from their worker loop."""

    def __init__(self, cfg: ModelConfig, shard: TensorShard):
        super().__init__(cfg)  # on the meta device (the loader's): the full layers cost nothing
        self.shard = shard
        self.local = local_config(cfg, shard.world)
        self.model.layers = nn.ModuleList(DecoderLayer(self.local, i) for i in range(cfg.num_layers))
        for layer in self.model.layers:
            layer.self_attn.o_proj = _row_parallel(layer.self_attn.o_proj)
            layer.mlp.down_proj = _row_parallel(layer.mlp.down_proj)
        if shard.rank != 0:  # the vocabulary lives on rank 0
            self.model.embed_tokens = None
            self.lm_head = None
        self.peers = None  # rank 0: the WorkerGroup its forward drives (group.py attaches it)

    def make_cache(self, max_slots: int, max_len: int) -> KVCache:
        """This rank's KV cache (its kv heads only); on rank 0, the workers allocate theirs too."""
        if self.peers is not None:
            return self.peers.make_caches(self, max_slots, max_len)
        return self.local_cache(max_slots, max_len)

    def local_cache(self, max_slots: int, max_len: int, cache_class: type[KVCache] = KVCache, **extra) -> KVCache:
        c, p = self.local, next(self.model.layers.parameters())
        return cache_class(c.num_layers, max_slots, c.num_kv_heads, max_len, c.head_dim, p.dtype, p.device, **extra)

    def forward_layers(self, x: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        """(T, H) embeddings -> (T, H) the last layer's output (every rank gets the same)."""
        cos, sin = rope_cos_sin(meta.positions, self.inv_freq, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, meta, cache)
        return x

    @torch.inference_mode()
    def forward(self, batch, cache: KVCache) -> torch.Tensor:
        """Rank 0: as CausalLM.forward, with the workers computing their heads alongside."""
        if self.peers is None:
            raise RuntimeError("a tensor-parallel model's forward runs on rank 0 with its workers attached")
        x = self.model.embed_tokens(batch.input_ids)  # (T, H)
        with self.peers.step(batch.items, x):
            x = self.forward_layers(x, batch.meta, cache)
        return self.model.norm(x)


def shard_model(cfg: ModelConfig, shard: TensorShard) -> tuple[ShardedCausalLM, dict[str, SourceSlice | None]]:
    """Build rank `shard.rank`'s model on the meta device; return it with, per checkpoint tensor it
    holds, the slice to read (None: the whole tensor)."""
    with torch.device("meta"):
        model = ShardedCausalLM(cfg, shard)
    sources: dict[str, SourceSlice | None] = {}
    for name, _ in model.named_parameters():  # a tied LM head is listed once, as the embedding
        prefix, _, pname = name.rpartition(".")
        module, kind = model.get_submodule(prefix), prefix.rpartition(".")[2]
        if kind in COLUMN_PARALLEL:  # weight (out, in) and bias (out,): this rank's rows
            sources[name] = SourceSlice(0, shard.rank * module.out_features, module.out_features)
        elif kind in ROW_PARALLEL and pname == "weight":  # (out, in): this rank's columns
            sources[name] = SourceSlice(1, shard.rank * module.in_features, module.in_features)
        else:  # norms, a row-parallel bias (added once, after the sum), the vocabulary on rank 0
            sources[name] = None
    return model, sources
