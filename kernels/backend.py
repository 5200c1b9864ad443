"""Which implementation the hot ops use: Triton kernels or their plain-torch references.

The choice is made once per process by an explicit capability check (`kernel_backend`), never by
catching a failure at call time:
- Triton is used iff CUDA is available and `triton` imports; the environment variable
  `CTC_KERNELS=torch|triton` forces one side (`auto`, the default, means the check decides).
- Even with the Triton backend, an op takes its Triton path only for CUDA tensors
  (`use_triton`); CPU tensors always take the reference.

Device: a Triton launch goes to the *current* CUDA device, not to the device of its tensors, so
with `--device cuda:1` a bare launch would run on cuda:0 against memory on cuda:1. Every `*_triton`
wrapper is therefore decorated with `launches_on_input_device`, which makes the first tensor
argument's device current for the launch (a no-op for CPU tensors, i.e. under the interpreter).

Nothing here imports triton at module import time, so a CPU-only install never touches it.

Testing mode: with `TRITON_INTERPRET=1`, Triton runs kernels in its Python interpreter on CPU
tensors; the tests call the `*_triton` wrappers directly under it. Triton reads that variable when
`triton` is first imported (its own library functions such as `tl.zeros` are jit-wrapped then),
so the op modules import triton lazily, on the first launch of a kernel (`jit_kernel`): merely
importing kernels/ never imports triton, and a test run can still switch to the interpreter
after other test modules imported kernels/. The mode is per process: compiled and interpreted
kernels cannot share one.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

ENV_BACKEND = "CTC_KERNELS"  # torch | triton | auto (default)


class Backend(str, enum.Enum):
    TORCH = "torch"
    TRITON = "triton"


@functools.cache
def triton_available() -> bool:
    """True iff `import triton` works (it is an optional dependency: the `gpu` extra)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except ImportError:
        return False
    return True


@functools.cache
def kernel_backend() -> Backend:
    """The backend for this process, decided once.

    Raises ValueError for an unknown CTC_KERNELS value and RuntimeError when Triton is forced but
    cannot be imported (a forced choice that silently falls back would hide a broken install).
    """
    choice = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{ENV_BACKEND} must be one of auto, torch, triton; got {choice!r}")
    if choice == "torch":
        backend = Backend.TORCH
    elif choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_BACKEND}=triton but triton cannot be imported")
        if not torch.cuda.is_available():
            logger.warning("%s=triton without CUDA: CPU tensors still use the torch references",
                           ENV_BACKEND)
        backend = Backend.TRITON
    else:
        backend = Backend.TRITON if torch.cuda.is_available() and triton_available() else Backend.TORCH
    logger.info("kernel backend: %s", backend.value)
    return backend


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op called on `tensors` should take its Triton path."""
    return kernel_backend() is Backend.TRITON and all(t.is_cuda for t in tensors)


def is_interpreted(kernel: Any) -> bool:
    """Whether a `jit_kernel` result runs in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


@functools.cache
def jit_kernel(fn: Callable[..., Any]) -> Any:
    """`triton.jit(fn)`, built on first use (see the module docstring for why lazily)."""
    import triton  # lazy: only the Triton branch gets here

    return triton.jit(fn)


F = TypeVar("F", bound=Callable[..., Any])


def device_context(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context that makes `tensor`'s CUDA device current (nothing to do for other devices)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def launches_on_input_device(wrapper: F) -> F:
    """Decorate a Triton wrapper: run it with the device of its first tensor argument (positional
    or keyword; the wrappers assert that all of them share one) current, so its kernels launch
    where its inputs live (module docstring, "Device")."""

    @functools.wraps(wrapper)
    def on_device(*args: Any, **kwargs: Any) -> Any:
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with device_context(first):
            return wrapper(*args, **kwargs)

    return on_device  # type: ignore[return-value]
