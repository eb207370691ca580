"""Where half-precision attention on a CPU should run in fp32: PyTorch's SDPA over bf16 inputs, as given and upcast.

    python bench/attention.py [--tokens 8192] [--heads 4] [--head-dim 64] [--steps 8] [--threads 2]

For each key length N (batch = tokens / N, so every row moves the same number of tokens), the median time of one
attention call on bf16 (B, heads, N, head_dim) inputs, forward + backward ("train") and forward alone ("sample"),
three ways: PyTorch's default kernel on the bf16 inputs, the same call on inputs cast to fp32 (what
`patchflow.models.attention.sdpa` does for a training step with at most SHORT_KEYS keys), and the math kernel on
the bf16 inputs. The crossover in the "train" columns is where SHORT_KEYS belongs on this machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from patchflow.models.attention import SHORT_KEYS


def attend(q, k, v, how: str):
    if how == "fp32":
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    if how == "math":
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def median_ms(shape, how: str, train: bool, steps: int) -> float:
    q, k, v = (torch.randn(shape, dtype=torch.bfloat16, requires_grad=train) for _ in range(3))
    grad = torch.randn(shape, dtype=torch.bfloat16)
    times = []
    for i in range(2 + steps):
        t0 = time.perf_counter()
        out = attend(q, k, v, how)
        if train:
            out.backward(grad)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="batch x keys of every row")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"bf16 inputs, {args.heads} heads of {args.head_dim}, {args.threads} threads; ms per call (median); "
          f"patchflow upcasts training steps at <= {SHORT_KEYS} keys")
    print(f"{'keys':>5} {'batch':>6} | train: {'bf16':>7} {'fp32':>7} {'math':>7} | sample: {'bf16':>7} {'fp32':>7} "
          f"{'math':>7}")
    for n in (8, 16, 32, 64, 128, 192, 256, 512, 1024):
        shape = (max(1, args.tokens // n), args.heads, n, args.head_dim)
        cells = [median_ms(shape, how, train, args.steps)
                 for train in (True, False) for how in ("bf16", "fp32", "math")]
        print(f"{n:>5} {shape[0]:>6} | train: " + " ".join(f"{c:7.1f}" for c in cells[:3]) + " | sample: "
              + " ".join(f"{c:7.1f}" for c in cells[3:]), flush=True)


if __name__ == "__main__":
    main()
