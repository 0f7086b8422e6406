"""bf16 matrix products as float32 GEMMs with the rounding written out: the portable class's arithmetic.

A bf16 matmul on CPU is whatever kernel oneDNN or MKL dispatches: AMX tiles, AVX-512 BF16 dot products,
or, on a CPU without AVX-512 (a GitHub runner, a laptop), a slow emulation. Each sums the products in its
own order, so each gives other bits, and oneDNN capped at AVX2 runs ten times slower than AVX-512 BF16.

Under `explicit_bf16_matmul()` every product whose operands are (or autocast would make) bfloat16 is
computed as what a bf16 kernel means, with nothing left to the kernel's choice of instructions:

* the operands are rounded to bf16 (as autocast would), then widened to float32, which is exact;
* the product runs as a float32 GEMM (MKL's sgemm, pinned by ``MKL_CBWR`` in portable mode), whose
  products of widened bf16 values are exact, so only MKL's summation order remains, and MKL fixes it
  per CNR branch;
* the float32 result is rounded to bf16 once (round to nearest even), as the bf16 kernel's output is.

Attention (`scaled_dot_product_attention`) is computed the same way, from its definition: scores in
float32, a float32 softmax (an ATen kernel, pinned with ATen's CPU capability), the weighted sum in
float32, rounded to bf16. Autograd differentiates these float32 operations, so the backward products
are float32 GEMMs as well.

This is *another arithmetic* than the native bf16 kernels, not an emulation of one of them: a run in this
mode has its own numerics class. What it buys is that the bits depend only on ATen's capability and
MKL's branch, which portable mode pins to AVX2 on every x86-64 CPU that has it.

The mode is a `TorchFunctionMode`: thread-local, entered around a run's training (forward and backward),
and inert for products of float32 operands outside autocast.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

BF16 = torch.bfloat16


def _lowp() -> bool:
    """Whether CPU autocast would run a matmul in bf16 here."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16


def _wants_bf16(*tensors: Any) -> bool:
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not ts or any(t.device.type != "cpu" for t in ts):
        return False
    if not all(t.is_floating_point() for t in ts):
        return False
    return _lowp() or any(t.dtype == BF16 for t in ts)


def widen(t: torch.Tensor) -> torch.Tensor:
    """bf16 rounding of `t` (what autocast does), widened to float32 (exact)."""
    return t.to(BF16).to(torch.float32)


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    with torch.autocast("cpu", enabled=False):
        yield


def _into(out: torch.Tensor | None, result32: torch.Tensor) -> torch.Tensor:
    """Round the float32 result to bf16 once; into `out` when given (`out=`), in its dtype."""
    if out is None:
        return result32.to(BF16)
    return out.copy_(result32.to(BF16) if out.dtype != torch.float32 else result32)


def _addmm(
    input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta: Any = 1, alpha: Any = 1, out: Any = None
) -> Any:
    if not _wants_bf16(input, mat1, mat2):
        return NotImplemented
    with _no_autocast():
        return _into(out, torch.addmm(widen(input), widen(mat1), widen(mat2), beta=beta, alpha=alpha))


def _binary(op: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    def handler(a: Any, b: Any, *, out: Any = None) -> Any:
        if not _wants_bf16(a, b):
            return NotImplemented
        with _no_autocast():
            return _into(out, op(widen(a), widen(b)))

    return handler


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
    if not _wants_bf16(input, weight, *(() if bias is None else (bias,))):
        return NotImplemented
    with _no_autocast():
        return F.linear(widen(input), widen(weight), None if bias is None else widen(bias)).to(BF16)


def _sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Any:
    if not _wants_bf16(query, key, value):
        return NotImplemented
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"explicit bf16 attention (portable numerics) supports dropout_p = 0 only, got dropout_p={dropout_p}"
        )
    with _no_autocast():
        q, k, v = widen(query), widen(key), widen(value)
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        scores = torch.matmul(q, k.transpose(-2, -1)) * s
        L, S = q.shape[-2], k.shape[-2]
        if is_causal:
            keep = torch.ones(L, S, dtype=torch.bool).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + widen(attn_mask)
        weights = torch.softmax(scores, dim=-1)
        return torch.matmul(weights, v).to(BF16)


_HANDLERS: dict[Any, Callable[..., Any]] = {
    torch.addmm: _addmm,
    torch.Tensor.addmm: _addmm,
    torch.mm: _binary(torch.mm),
    torch.Tensor.mm: _binary(torch.mm),
    torch.bmm: _binary(torch.bmm),
    torch.Tensor.bmm: _binary(torch.bmm),
    torch.matmul: _binary(torch.matmul),
    torch.Tensor.matmul: _binary(torch.matmul),
    torch.Tensor.__matmul__: _binary(torch.matmul),
    F.linear: _linear,
    F.scaled_dot_product_attention: _sdpa,
}


_STATE = threading.local()


def active() -> bool:
    """Whether this thread is inside `explicit_bf16_matmul()`.

    torch switches a mode off while it handles a call, and `loss.backward()` is such a call: the backward
    of a custom autograd Function runs outside the mode. Such code (the fused head) asks `active()` and
    computes its products with `widen` itself.
    """
    return getattr(_STATE, "depth", 0) > 0


class ExplicitBf16Matmul(TorchFunctionMode):
    """Route bf16 products through float32 GEMMs with explicit rounding (see the module docstring)."""

    def __enter__(self) -> "ExplicitBf16Matmul":
        _STATE.depth = getattr(_STATE, "depth", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        _STATE.depth -= 1
        super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            result = handler(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)


def explicit_bf16_matmul(enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """Context manager: `ExplicitBf16Matmul` while inside (a no-op when not `enabled`)."""
    return ExplicitBf16Matmul() if enabled else contextlib.nullcontext()
