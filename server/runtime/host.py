"""Every device -> host copy of the serving hot path goes through here, so it can be counted.

On an accelerator each copy to the host is a synchronisation: the CPU waits for the device to
finish everything queued before it, and the device then idles until the CPU queues more work. How
many a step makes, and how many bytes they carry, is what decides whether a step can stay on the
device (issue 14: "what crosses to the host per step is O(batch x tree nodes) integers, in one
transfer"). So the engine, the sampler and the drafters never call `.tolist()`, `.item()`,
`.cpu()` or `.numpy()` on a device tensor themselves: they call `to_host` or `host_list`, and
`TRANSFERS` counts the calls and their bytes, which tests read.

Counted on every device, the CPU included: the count is of the copies the code would make on an
accelerator, which is what a test on a CPU-only machine wants to bound. Host-side code that works
on tensors already copied (candidate search over the drafter's copied log-probs) uses plain
`.tolist()` and is not counted again.

The counter is process-wide, like a Prometheus counter: copies happen deep in helpers that share
no object (sampler, drafters), and threading one through them all would put a parameter on every
hot function for the sake of tests. Reading it is cheap; it never changes what is computed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TransferCount:
    transfers: int = 0
    bytes: int = 0

    def __sub__(self, other: TransferCount) -> TransferCount:
        return TransferCount(self.transfers - other.transfers, self.bytes - other.bytes)


class HostTransfers:
    """Running totals of device -> host copies (thread-safe: the engine runs in a worker thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = TransferCount()

    def record(self, nbytes: int) -> None:
        with self._lock:
            self._count = TransferCount(self._count.transfers + 1, self._count.bytes + nbytes)

    def snapshot(self) -> TransferCount:
        """Totals so far; subtract two snapshots to get what happened in between."""
        return self._count


TRANSFERS = HostTransfers()


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU (one counted copy; the tensor itself if it is already there)."""
    TRANSFERS.record(tensor.numel() * tensor.element_size())
    return tensor.cpu()


def host_list(tensor: torch.Tensor) -> list:
    """`tensor.tolist()` (a Python number for a 0-d tensor) as one counted copy."""
    return to_host(tensor).tolist()


def host_parts(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Several device tensors (any dtypes and shapes) on the CPU in ONE counted copy: their bytes
    are laid end to end on the device, copied once, and cut apart again on the host. A step that
    has more than one thing for the host (the accepted paths, the drafter's look-ahead frames)
    pays one synchronisation, not one per thing."""
    if not tensors:
        return []
    flat = [t.contiguous().view(-1).view(torch.uint8) for t in tensors]
    host = to_host(torch.cat(flat)) if len(flat) > 1 else to_host(flat[0])
    parts, start = [], 0
    for t, f in zip(tensors, flat):
        part = host[start : start + f.numel()]
        if start % t.element_size():  # a view of wider elements must start at a multiple of their size
            part = part.clone()
        parts.append(part.view(t.dtype).view(t.shape))
        start += f.numel()
    return parts


def to_device(values: list | torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host numbers (a list, or a CPU tensor, whose dtype is kept) as a tensor on `device`, without
    waiting for the device. A plain copy to CUDA from ordinary (pageable) memory makes PyTorch
    synchronise the stream, so the CPU would wait for every kernel queued before it (the verify
    forward, mid-step); from pinned memory the copy is queued like a kernel (the caching host
    allocator keeps the buffer until it is done)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
