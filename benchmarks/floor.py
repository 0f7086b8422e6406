"""The arithmetic floor of one training step: the kernels a bitwise-faithful step cannot avoid.

    python benchmarks/floor.py [--threads 1] [--repeats 10]

A trajectory that is bitwise equal to the notebook's must run the same kernels on the same shapes
(the same BLAS GEMMs, the same softmax and attention kernels): making it faster can only remove
work around them. Per-row kernels are timed in the row chunks the fused head uses (faster in cache,
same bits). This times those kernels alone at the notebook's shapes (batch 32 x seq 128 =
4096 rows, vocabulary 10,000, hidden 64, 2 heads, bf16) and turns the sum into a lower bound on the
wall time of the 10-run x 1000-step experiment on this machine's cores.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from flannel_repro.training.allocator import tune_malloc

N, V, H, B, T, HEADS = 4096, 10_000, 64, 32, 128, 2


def timed(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).bfloat16()
    W = (torch.randn(V, H, generator=g) * 0.02).bfloat16()
    G = (torch.randn(N, V, generator=g) * 1e-4).bfloat16()
    x32 = torch.randn(N, V, generator=g)
    out32 = torch._log_softmax(x32, 1, False)
    q, k, v = (torch.randn(B, HEADS, T, H // HEADS, generator=g).bfloat16().requires_grad_() for _ in range(3))
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grad_att = torch.randn_like(att)

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_bwd():
        torch.autograd.grad(att, (q, k, v), grad_att, retain_graph=True)

    rows = [
        ("LM head forward: logits = h @ W.T (bf16 GEMM, 4096 x 64 x 10000)", 1, lambda: torch.mm(h, W.t())),
        ("LM head backward: grad_h = G @ W", 1, lambda: torch.mm(G, W)),
        ("LM head backward: grad_W = G.T @ h", 1, lambda: torch.mm(G.t(), h)),
        (
            "log_softmax over 4096 x 10000 (float32), in 32-row chunks as the fused head runs it",
            1,
            lambda: [torch._log_softmax(x32[r : r + 32], 1, False) for r in range(0, N, 32)],
        ),
        (
            "log_softmax backward, in 32-row chunks",
            1,
            lambda: [
                torch._log_softmax_backward_data(x32[r : r + 32], out32[r : r + 32], 1, torch.float32)
                for r in range(0, N, 32)
            ],
        ),
        ("attention forward (SDPA, per layer)", 2, sdpa_fwd),
        ("attention backward (SDPA, per layer)", 2, sdpa_bwd),
    ]
    flops = 2 * N * H * V
    print(f"threads: {args.threads}; repeats: {args.repeats}; torch {torch.__version__}\n")
    print("| kernel | per call (ms) | calls per step | per step (ms) | GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    total = 0.0
    for name, calls, fn in rows:
        ms = timed(fn, args.repeats)
        total += ms * calls
        rate = f"{flops / ms / 1e6:.0f}" if "GEMM" in name or "grad_" in name else ""
        print(f"| {name} | {ms:.1f} | {calls} | {ms * calls:.1f} | {rate} |")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parallel = max(1, cores // args.threads)
    floor_s = 10 * 1000 * total / 1000 / parallel
    print(f"| **sum of these kernels** | | | **{total:.1f}** | |")
    print(
        f"\nFloor for 10 runs x 1000 steps with {parallel} run(s) side by side on {cores} cores: "
        f"{floor_s:.0f} s = {floor_s / 60:.1f} min, before the transformer blocks' other kernels, AdamW, "
        "clipping and recording."
    )


if __name__ == "__main__":
    main()
