"""CUDA graphs for decode and verification forwards: one captured launch sequence per bucket.

At batch 1 an 8B step is hundreds of small kernel launches (per layer: norms, projections, rope,
the K/V write, attention, MLP), and the CPU issuing them can take longer than the GPU runs them.
A CUDA graph replays the whole forward with one launch. A graph fixes every shape and pointer,
so a step is run in a *bucket*: static buffers for `items` sequences of at most `q_len` new tokens
each (the (batch, tree-node budget) pair; plain decode is q_len = 1) in `tokens` packed rows. A
step fits a bucket when it has no more items, no longer item and no more tokens; it is then padded
to the bucket's fixed-size metadata:
- the real items' rows are packed first, exactly as build_batch packs them (same positions,
  masks, K/V targets), and the items after them have no rows (q_len 0: attention skips them);
- the padding rows after the last item belong to no item: token 0, position 0, attention output
  zero (kernels/tree_attention.py), and their K/V go to the cache's scratch position
  (KVCache.scratch_pos), which no sequence reads, so padding never touches a real slot's entries.
Rows are independent everywhere but in attention, so the real rows' hidden states are the ones an
unpadded forward gives. Steps that fit no bucket (prefill chunks longer than the tree budget,
more tokens than the largest bucket) run eagerly.

The runner is the same on the CPU: bucketing, padding and the static buffers run there (that is
how the tests check that padding changes nothing), and only capture and replay need CUDA (with
the Triton kernels: the torch reference reads the metadata on the host, which a graph cannot).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from kernels.backend import device_context, use_triton
from server.runtime.batch import AttentionMetadata, ForwardBatch, ForwardItem, PackedItems, pack_items
from server.runtime.kv_cache import KVCache

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Bucket:
    items: int  # sequences (padded with empty items)
    q_len: int  # most new tokens of one sequence (tree nodes + the pending token); sizes the attention grid
    tokens: int  # packed rows (padded with rows of no item); what the projections and the MLP run on


def default_buckets(max_items: int, max_q_len: int) -> list[Bucket]:
    """Per batch size b = 1, 2, 4, ..., max_items: plain decode (b sequences of 1 token), and trees
    (up to max_q_len tokens each) in b x 2, 4, 8, ... packed tokens up to b x max_q_len. Items and
    tokens are each padded by less than 2x (the projections' cost follows the tokens; extra items
    and rows past an item's q_len cost attention programs that return at once): 30 graphs for 16
    sequences and 16-node trees."""

    def doubling(lo: int, hi: int) -> list[int]:
        return sorted({*(1 << i for i in range(hi.bit_length()) if lo <= 1 << i <= hi), hi})

    buckets = []
    for b in doubling(1, max_items):
        buckets.append(Bucket(b, 1, b))
        if max_q_len > 1:
            buckets += [Bucket(b, max_q_len, t) for t in doubling(b + 1, b * max_q_len)]
    return buckets


def pick_bucket(buckets: list[Bucket], num_items: int, max_q_len: int, num_tokens: int) -> Bucket | None:
    """The bucket with the fewest tokens (then items) that holds the step, or None."""
    fits = [b for b in buckets if b.items >= num_items and b.q_len >= max_q_len and b.tokens >= num_tokens]
    return min(fits, key=lambda b: (b.tokens, b.items, b.q_len), default=None)


class StaticBatch:
    """A bucket's fixed-size ForwardBatch. Every int64 field is a view of one buffer, so loading a
    step is two host-to-device copies (the ints and the tree mask)."""

    FIELDS = ("input_ids", "positions", "write_slot", "write_pos", "cu_seqlens", "slots", "cache_lens",
              "mask_offsets")

    def __init__(self, bucket: Bucket, device: torch.device, scratch_pos: int):
        B, T = bucket.items, bucket.tokens
        self.bucket, self.scratch_pos = bucket, scratch_pos
        self.sizes = (T, T, T, T, B + 1, B, B, B)
        self.ints = torch.zeros(sum(self.sizes), dtype=torch.long, device=device)
        # sum of q_len^2 over the items <= max q_len x sum of q_len
        self.tree_mask = torch.zeros(T * bucket.q_len, dtype=torch.bool, device=device)
        views = dict(zip(self.FIELDS, self.ints.split(self.sizes)))
        meta = AttentionMetadata(
            cu_seqlens=views["cu_seqlens"], slots=views["slots"], cache_lens=views["cache_lens"],
            positions=views["positions"], tree_mask=self.tree_mask, mask_offsets=views["mask_offsets"],
            write_slot=views["write_slot"], write_pos=views["write_pos"],
            host_cu_seqlens=[0] * (B + 1), host_mask_offsets=[0] * B, max_q_len=bucket.q_len,
        )
        self.batch = ForwardBatch(input_ids=views["input_ids"], meta=meta, items=[])

    def load(self, items: list[ForwardItem], max_len: int) -> int:
        """Pad `items` (which must fit the bucket) into the buffers; returns their real row count.
        No items: every row is padding (what capture runs)."""
        B, T, q_len = self.bucket.items, self.bucket.tokens, self.bucket.q_len
        p = pack_items(items, max_len) if items else PackedItems([], [], [], [], [], [0], [], [], [])
        n, k = len(p.ids), len(p.slots)
        if k > B or n > T or (k and p.max_q_len > q_len):
            raise ValueError(f"{k} items of {n} tokens (longest {p.max_q_len if k else 0}) do not fit {self.bucket}")
        pad_rows, pad_items = T - n, B - k
        fields = {
            "input_ids": p.ids + [0] * pad_rows,
            "positions": p.positions + [0] * pad_rows,
            "write_slot": p.write_slot + [0] * pad_rows,  # any slot: padding writes its scratch position
            "write_pos": p.write_pos + [self.scratch_pos] * pad_rows,
            "cu_seqlens": p.offsets + [n] * pad_items,  # empty items after the real ones
            "slots": p.slots + [0] * pad_items,
            "cache_lens": p.cache_lens + [0] * pad_items,
            "mask_offsets": p.mask_offsets + [0] * pad_items,
        }
        self.ints.copy_(torch.tensor([x for name in self.FIELDS for x in fields[name]], dtype=torch.long))
        if p.masks:
            mask = torch.cat(p.masks)  # (sum q_len^2,)
            self.tree_mask[: mask.numel()].copy_(mask)
        meta = self.batch.meta
        meta.host_cu_seqlens, meta.host_mask_offsets = fields["cu_seqlens"], fields["mask_offsets"]
        self.batch.items = items
        return n


class GraphRunner:
    """Runs a model's forwards over one KV cache in buckets: replays a captured CUDA graph when the
    step fits one, else returns None (the caller runs the step eagerly). Attach with
    `model.graph_runner = runner` (CausalLM.forward asks it first)."""

    def __init__(self, model, cache: KVCache, buckets: list[Bucket]):
        self.model, self.cache, self.buckets = model, cache, sorted(set(buckets))
        device = cache.k.device
        self.static = {b: StaticBatch(b, device, cache.scratch_pos) for b in self.buckets}
        self.graphs: dict[Bucket, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[Bucket, torch.Tensor] = {}  # (T, H) hidden states a graph writes

    def bucket_for(self, batch: ForwardBatch) -> Bucket | None:
        return pick_bucket(self.buckets, len(batch.items), batch.meta.max_q_len, batch.meta.num_tokens)

    def run(self, batch: ForwardBatch) -> torch.Tensor | None:
        """(T, H) final-norm hidden states of the batch's rows, or None if it fits no bucket. The
        result is a copy: the graph's output buffer is overwritten by the next replay."""
        bucket = self.bucket_for(batch)
        if bucket is None:
            return None
        static = self.static[bucket]
        n = static.load(batch.items, self.cache.max_len)
        if bucket in self.graphs:
            with device_context(self.cache.k):  # replay goes to the current device's stream (`cuda:N`)
                self.graphs[bucket].replay()
            hidden = self.outputs[bucket]
        else:  # not captured (the CPU, or CUDA with graphs not captured yet): the padded forward, eagerly
            hidden = self.model.forward_eager(static.batch, self.cache)
        return hidden[:n].clone()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per bucket (CUDA only), largest first, all in one memory pool (the
        graphs run one at a time, so they can share their intermediate buffers). Each bucket is run
        eagerly first, on a side stream as CUDA graphs require, which also compiles its Triton
        kernels: capture records launches, it cannot compile."""
        assert self.cache.k.is_cuda, "CUDA graphs need a CUDA device"
        with device_context(self.cache.k):  # streams, pool and capture on the cache's device (`cuda:N`)
            self._capture_all()

    def _capture_all(self) -> None:
        t0, pool = time.perf_counter(), torch.cuda.graph_pool_handle()
        for bucket in sorted(self.buckets, key=lambda b: (b.tokens, b.items), reverse=True):
            static = self.static[bucket]
            static.load([], self.cache.max_len)  # all padding: writes only the scratch position
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model.forward_eager(static.batch, self.cache)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self.model.forward_eager(static.batch, self.cache)
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
        log.info("captured %d CUDA graphs (up to %d sequences x %d tokens) in %.1f s", len(self.graphs),
                 max(b.items for b in self.buckets), max(b.q_len for b in self.buckets), time.perf_counter() - t0)


def can_capture(cache: KVCache) -> bool:
    """CUDA graphs need CUDA tensors and the Triton attention (the torch reference syncs)."""
    return cache.k.is_cuda and use_triton(cache.k)
