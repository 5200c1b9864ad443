"""How long a context the KV cache can hold: `--max-model-len` and `--gpu-memory-utilization`.

The cache is `max_slots` (= --max-batch-size) slots x `max_model_len` positions, allocated once. On
CUDA its size comes from the memory left after loading, as in vLLM: this process may use
`utilization` x the card's total memory; what is in use when the weights are in (ours and anyone
else's), what one step's activations may need and the drafter's weights are taken off that, and
the rest is the cache's budget. Then
  - `--max-model-len` given: it must fit (slots x len x bytes per position <= budget), else start-up
    stops with one line that gives the numbers;
  - not given: the model's context (`max_position_embeddings`, and its sliding window if it has one,
    since we do not implement one), lowered to what fits, in whole blocks of 16 positions.
On the CPU there is no device-memory query worth trusting on a shared host, so the cache keeps
today's rule: slots x len, with len = `--max-model-len` or the model's context capped at
`CPU_DEFAULT_LEN`.

`plan_kv_cache` is a pure function of those numbers (unit-tested); `device_memory` measures them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_DEFAULT_LEN = 2048  # the default context on the CPU (ctc-serve's default before sizing existed)
LEN_ALIGN = 16  # a computed context is a multiple of this many positions
MIN_LEN = 16  # the smallest context worth starting with (Settings' lower bound for --max-model-len)
GiB = 2**30


class CacheSizingError(ValueError):
    """The requested cache cannot fit; the message is one line with the numbers."""


@dataclass(frozen=True)
class DeviceMemory:
    free: int  # bytes free on the device now (after loading the model)
    total: int  # bytes on the device


@dataclass(frozen=True)
class CachePlan:
    max_model_len: int
    kv_bytes: int  # K and V of every slot and position (the base model's cache and a CTC drafter's)
    budget: int | None  # bytes the cache could have had (None on the CPU: not sized by memory)


def plan_kv_cache(
    *,
    bytes_per_position: int,  # K and V of one position in every layer (base + drafter caches)
    max_slots: int,
    model_max_len: int,  # the model's context: max_position_embeddings (or its sliding window)
    requested_len: int | None,  # --max-model-len, None = choose
    memory: DeviceMemory | None,  # None on the CPU
    utilization: float = 0.9,
    reserve: int = 0,  # bytes kept free for activations and the drafter's weights
) -> CachePlan:
    if requested_len is not None and requested_len > model_max_len:
        raise CacheSizingError(
            f"--max-model-len {requested_len} is longer than this model's context of {model_max_len} positions "
            f"(max_position_embeddings, or its sliding window); lower it to {model_max_len} or less"
        )
    if memory is None:
        length = requested_len if requested_len is not None else min(model_max_len, CPU_DEFAULT_LEN)
        return CachePlan(length, max_slots * length * bytes_per_position, None)

    used = memory.total - memory.free
    budget = int(utilization * memory.total) - used - reserve
    per_len = max_slots * bytes_per_position  # bytes per position of context, all slots
    fits = max(budget, 0) // per_len
    if requested_len is not None:
        length = requested_len
        if length > fits:
            raise CacheSizingError(
                f"KV cache does not fit: {max_slots} slots x {length} positions x {bytes_per_position / 2**10:.1f} KiB "
                f"= {length * per_len / GiB:.2f} GiB, but {utilization:.2f} x {memory.total / GiB:.1f} GiB total "
                f"- {used / GiB:.1f} GiB in use (weights, other processes) - {reserve / GiB:.2f} GiB reserved "
                f"leaves {budget / GiB:.2f} GiB: at most {fits} positions fit; lower --max-model-len or "
                f"--max-batch-size, or raise --gpu-memory-utilization"
            )
    else:
        length = min(model_max_len, fits // LEN_ALIGN * LEN_ALIGN)
        if length < MIN_LEN:
            raise CacheSizingError(
                f"no room for a KV cache: {utilization:.2f} x {memory.total / GiB:.1f} GiB total - "
                f"{used / GiB:.1f} GiB in use (weights, other processes) - {reserve / GiB:.2f} GiB reserved leaves "
                f"{budget / GiB:.2f} GiB, less than {MIN_LEN} positions x {max_slots} slots x "
                f"{bytes_per_position / 2**10:.1f} KiB; lower --max-batch-size or raise --gpu-memory-utilization"
            )
    return CachePlan(length, length * per_len, budget)


def device_memory(device: torch.device) -> DeviceMemory | None:
    """Free and total bytes of a CUDA device, measured now; None for other devices."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # cached blocks of the loading would count as used
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(free=free, total=total)


def kv_bytes_per_position(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one position of one slot, all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def activation_reserve(hidden: int, intermediate: int, vocab: int, tokens_per_step: int, logit_rows: int,
                       dtype: torch.dtype) -> int:
    """A generous bound on one step's transient memory: per token the widest activations of a layer
    (hidden stream, fused q|k|v and gate|up outputs) twice over, for the allocator's overlap of
    inputs and outputs, plus float32 logits and their log-softmax for `logit_rows` rows."""
    item = torch.empty(0, dtype=dtype).element_size()
    per_token = (4 * hidden + 2 * intermediate) * item
    return 2 * tokens_per_step * per_token + 2 * logit_rows * vocab * 4
