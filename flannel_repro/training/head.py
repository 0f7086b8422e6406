"""The LM head and its loss, computed a few rows at a time, bit for bit as the model computes them.

`GPT2LMHeadModel(..., labels=...)` materialises the (B*T, V) logits, upcasts them to float32,
and runs log_softmax, nll_loss and their backward over the whole (4096 x 10000) matrix: each of
those passes streams 160 MB through memory, and on CPU they cost more than all the matrix
products of the model. `fused_head_loss` produces the same loss and the same gradients from
row chunks that stay in cache, and forms the gradient of the logits during the forward pass (as
the loss's backward is known in advance: d loss / d logits needs only the upstream gradient).

Why the bits are the same. Every step of the model's loss is either elementwise or independent
per row, so cutting the rows into chunks changes no arithmetic:

* logits rows: `mm(h[rows], W.t())` equals the rows of `mm(h, W.t())` (each element is a K = 64
  dot product; checked at run time, see below);
* `.float()`, `log_softmax` over the last dimension, nll's backward (-g at the target) and
  log_softmax's backward (g - exp(out) * sum(g)) are computed per row by ATen's CPU kernels;
* the loss itself is nll_loss's own sum (a cascade summation over rows in row order), so it is
  taken by calling `nll_loss` on the (N, 1) column of picked log-probabilities: same values, same
  order, same result;
* the two products of the backward are the ones autograd issues for `mm(h, W.t())`, on the whole
  gradient: `grad @ W` and `grad.t() @ h` (cutting the latter's K = N reduction would change its
  sums; the former was row-invariant but slower in chunks).

Equality of GEMM row chunks is a property of the BLAS kernels, not a law, so it is checked where
it matters: `verify_fused_head` runs the model's own loss and this one on the same batch and
compares the loss and every parameter gradient bitwise; the harness does that once per process,
batch shape and config before using the fused head (config field `head`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from flannel_repro.bits import same_bits
from flannel_repro.training import explicit

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

IGNORE_INDEX = -100

# Rows per chunk. 32 rows of a 10,000-token vocabulary are 1.25 MB per float32 buffer, which keeps
# the per-row passes in cache. Keep it a multiple of 16: on the reference machine MKL's float32 GEMM
# gives odd row counts (1, 3, 5, 7, ...) edge kernels that sum in another order (oneDNN's bf16 GEMM
# was row-invariant for every count tried), and the run-time check would then fall back.
DEFAULT_CHUNK_ROWS = 32


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """What autocast does to a floating-point argument of a lower-precision op such as linear."""
    return t if dtype is None or t.dtype == dtype or not t.is_floating_point() else t.to(dtype)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """ForCausalLMLoss's targets: labels shifted left by one, the last position ignored, flattened."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)


def _chunk_grads(
    h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, g: torch.Tensor, chunk: int, grad_logits: torch.Tensor
) -> torch.Tensor:
    """Fill grad_logits (N, V) for upstream gradient `g` of the summed loss;
    returns the (N, 1) float32 column of target log-probabilities (any value where ignored)."""
    N, V = grad_logits.shape
    c = min(chunk, N)
    valid = (targets != IGNORE_INDEX).unsqueeze(1)  # (N, 1)
    safe = torch.where(valid, targets.unsqueeze(1), torch.zeros((), dtype=targets.dtype))  # (N, 1)
    # nll_loss's backward writes -grad_output at each counted row's target, 0 elsewhere.
    g_target = torch.where(valid, -g, torch.zeros((), dtype=g.dtype)).to(torch.float32)  # (N, 1)
    picked = torch.empty((N, 1), dtype=torch.float32, device=h.device)
    logits = torch.empty((c, V), dtype=grad_logits.dtype, device=h.device)
    logits32 = torch.empty((c, V), dtype=torch.float32, device=h.device)
    out = torch.empty_like(logits32)
    g_out = torch.empty_like(logits32)
    g_in = torch.empty_like(logits32)
    wide = explicit.active() and logits.dtype == explicit.BF16  # portable numerics: float32 GEMMs, rounded once
    h_mm, Wt = (explicit.widen(h), explicit.widen(W).t()) if wide else (h, W.t())
    for r0 in range(0, N, c):
        r1 = min(N, r0 + c)
        k = r1 - r0
        if wide:
            logits[:k].copy_(torch.mm(h_mm[r0:r1], Wt))  # the rows of lm_head(h), rounded to bf16
        else:
            torch.mm(h_mm[r0:r1], Wt, out=logits[:k])  # the rows of lm_head(h)
        logits32[:k].copy_(logits[:k])  # .float()
        torch._log_softmax(logits32[:k], 1, False, out=out[:k])
        idx = safe[r0:r1]
        torch.gather(out[:k], 1, idx, out=picked[r0:r1])
        g_out[:k].zero_().scatter_(1, idx, g_target[r0:r1])
        torch._log_softmax_backward_data(g_out[:k], out[:k], 1, torch.float32, out=g_in[:k])
        grad_logits[r0:r1].copy_(g_in[:k])  # the backward of .float(): round to the logits' dtype
    return picked


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        W: torch.Tensor,
        targets: torch.Tensor,
        num_items: torch.Tensor,
        chunk: int,
        amp_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            h = _cast(hidden, amp_dtype).reshape(-1, hidden.shape[-1])  # (N, H) as lm_head sees it
            Wc = _cast(W, amp_dtype)
            N, V = h.shape[0], Wc.shape[0]
            grad_logits = torch.empty((N, V), dtype=torch.result_type(h, Wc), device=h.device)
            # Assume the caller backpropagates 1.0 (loss.backward()); backward() checks it.
            g = torch.ones((), dtype=torch.float32, device=h.device) / num_items
            picked = _chunk_grads(h, Wc, targets, g, chunk, grad_logits)
            nll_targets = torch.where(targets != IGNORE_INDEX, torch.zeros_like(targets), targets)
            loss = F.nll_loss(picked, nll_targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items
        ctx.save_for_backward(h, Wc, targets, num_items)
        ctx.grad_logits = grad_logits
        ctx.meta = (chunk, hidden.shape, hidden.dtype, W.dtype)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, Wc, targets, num_items = ctx.saved_tensors
        grad_logits = ctx.grad_logits
        ctx.grad_logits = None
        chunk, hidden_shape, hidden_dtype, W_dtype = ctx.meta
        with torch.autocast(h.device.type, enabled=False):
            if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # not loss.backward(): redo with g
                _chunk_grads(h, Wc, targets, grad_loss / num_items, chunk, grad_logits)
            # The two products autograd issues for mm(h, W.t()): mm_mat1_backward and mm_mat2_backward.
            if explicit.active() and grad_logits.dtype == explicit.BF16:
                # portable numerics (training.explicit): the same products as float32 GEMMs of the widened
                # operands, each rounded to bf16 once; the (N, V) gradient is widened once for both
                g32 = explicit.widen(grad_logits)
                grad_hidden = (
                    torch.mm(g32, explicit.widen(Wc)).to(grad_logits.dtype).view(hidden_shape).to(hidden_dtype)
                )
                grad_W = torch.mm(g32.t(), explicit.widen(h)).to(grad_logits.dtype)
            else:
                grad_hidden = torch.mm(grad_logits, Wc).view(hidden_shape).to(hidden_dtype)
                grad_W = torch.mm(grad_logits.t(), h)
            grad_W = grad_W.to(W_dtype)
        return grad_hidden, grad_W, None, None, None, None


def fused_head_loss(
    hidden: torch.Tensor,
    W: torch.Tensor,
    labels: torch.Tensor,
    num_items: torch.Tensor,
    *,
    chunk: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """`ForCausalLMLoss(lm_head(hidden), labels, num_items_in_batch=num_items)` in row chunks.

    hidden: (B, T, H) last hidden state; W: (V, H) tied LM-head weight; labels: (B, T) as given to
    the model (shifted here); num_items: the float32 divisor the Trainer passes. Autocast, when
    on, is applied to hidden and W exactly as it is to lm_head's arguments.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}.")
    targets = shifted_targets(labels).to(hidden.device)
    return _FusedHeadLoss.apply(hidden, W, targets, num_items, chunk, _autocast_dtype(hidden.device.type))


def model_loss(
    model: "GPT2LMHeadModel",
    inputs: torch.Tensor,
    labels: torch.Tensor,
    num_items: torch.Tensor | None,
    fused: bool,
    chunk: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """The training loss of `model` on one batch, through the model's own head or the fused one.

    `num_items` is the divisor the Trainer hands the model (transformers 5.x); None where it hands none
    (4.x, whose GPT-2 forward takes no loss kwargs): the model's own mean, which only its head computes.
    """
    if num_items is None:
        if fused:
            raise ValueError("the fused head computes sum / num_items; the model's mean needs fused=False.")
        return model(input_ids=inputs, labels=labels).loss
    if not fused:
        return model(input_ids=inputs, labels=labels, num_items_in_batch=num_items).loss
    hidden = model.transformer(input_ids=inputs).last_hidden_state
    return fused_head_loss(hidden, model.lm_head.weight, labels, num_items, chunk=chunk)


def verify_fused_head(
    model: "GPT2LMHeadModel",
    inputs: torch.Tensor,
    labels: torch.Tensor,
    num_items: torch.Tensor | None,
    *,
    amp_dtype: torch.dtype | None,
    chunk: int = DEFAULT_CHUNK_ROWS,
) -> str | None:
    """Run the model's loss and the fused loss on one batch; None if the loss and every parameter
    gradient are bitwise equal, else a description of the first difference. Leaves no gradients."""
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast(inputs.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = model_loss(model, inputs, labels, num_items, fused, chunk)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    model.zero_grad(set_to_none=True)
    (ref_loss, ref_grads), (loss, grads) = results
    if not _same_bits(ref_loss, loss):
        return f"loss {loss.item()!r} != the model's {ref_loss.item()!r}"
    if ref_grads.keys() != grads.keys():
        return f"gradients for {sorted(grads)} != the model's {sorted(ref_grads)}"
    for name, ref in ref_grads.items():
        if not _same_bits(ref, grads[name]):
            return f"gradient of {name} differs from the model's"
    return None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    return a.dtype == b.dtype and same_bits(a, b)
