"""One vertical-slash prefill call on the layout `kernels.py` times, after warm-up calls: a target for a profiler.

    ncu -k regex:_sparse_prefill_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight \
        python3 benchmarks/profile_vs.py --length 16384 --block 128 --sparsity 0.95
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as kb  # noqa: E402
from sparse_frontier.kernels.layout import vertical_slash_layout  # noqa: E402
from sparse_frontier.kernels.prefill import sparse_prefill  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--block", type=int, default=128, choices=(64, 128))
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--warmup", type=int, default=3, help="calls before the profiled one (ncu --launch-skip)")
    args = parser.parse_args()
    n = args.length
    gen = torch.Generator(device=kb.DEVICE).manual_seed(1)
    q, k, v = (torch.randn(heads, n, kb.D, device=kb.DEVICE, dtype=kb.DTYPE, generator=gen)
               for heads in (kb.HQ, kb.HKV, kb.HKV))
    n_slash, n_vertical, sel = kb.vs_counts_at(n, args.block, 1 - args.sparsity, torch.arange(n, device=kb.DEVICE))
    layout = vertical_slash_layout(sel, n)
    for _ in range(args.warmup + 1):
        sparse_prefill(q, k, v, layout, kb.SCALE)
    torch.cuda.synchronize()
    print(f"{n} tokens, block {args.block}: {64 + n_slash} slashes, {4 + n_vertical} verticals; "
          f"{args.warmup} warm-up calls, then the profiled one")


if __name__ == "__main__":
    main()
