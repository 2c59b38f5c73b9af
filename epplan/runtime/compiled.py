"""A function compiled by ``torch.compile`` on CUDA, run eagerly elsewhere or once compiling failed.

The runtime's few hand-fused elementwise passes (the chunked cross-entropy, the one-pass AdamW)
are plain torch functions that inductor turns into single Triton kernels on GPUs. A compiler
failure must cost speed, never the run: the first failure is warned about once and the eager
function (the same arithmetic) runs from then on. ``TritonKernel`` holds the hand-written
kernels (the cross-entropy's rows, AdamW over many tensors), defined on first use.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch


class CompiledOnCuda:
    """``fn`` compiled (``dynamic=True``, built on first CUDA use) where its first argument is a
    CUDA tensor; eager on other devices and after a compiler failure. ``what`` names it in the
    warning."""

    def __init__(self, fn: Callable[..., Any], what: str) -> None:
        self.fn, self.what = fn, what
        self.compiled: Callable[..., Any] | None = None
        self.failed = False

    def available(self, device: torch.device) -> bool:
        """Whether calls on ``device`` run compiled (CUDA, no failure so far)."""
        return device.type == "cuda" and not self.failed

    def __call__(self, first: torch.Tensor, *args: Any) -> Any:
        if not self.available(first.device):
            return self.fn(first, *args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self.compiled(first, *args)
        except Exception as exc:  # a compiler failure costs speed, never the run
            self.failed = True
            warnings.warn(f"torch.compile of {self.what} failed ({type(exc).__name__}: {exc}); running it eagerly")
            return self.fn(first, *args)


class TritonKernel:
    """A Triton kernel made by ``define(triton, triton.language)`` on first use (triton is there
    only where CUDA is). ``get()``: the kernel, or None where triton is missing or once
    ``fail(reason)`` was called (``failed`` holds the reason): callers then take their fallback."""

    def __init__(self, define: Callable[[Any, Any], Any]) -> None:
        self.define = define
        self.kernel: Any = None
        self.failed: str | None = None

    def get(self) -> Any:
        if self.failed is not None:
            return None
        if self.kernel is None:
            try:
                import triton
                import triton.language as tl
            except ImportError as exc:
                self.failed = repr(exc)
                return None
            self.kernel = self.define(triton, tl)
        return self.kernel

    def fail(self, reason: str) -> None:
        self.failed = reason
