"""The true attention of scored query rows: exact, float32, a few rows at a time.

Logits come from :func:`kernels.reference.attention_logits` (the layer's scale and soft-cap) and visibility
from :func:`kernels.reference.visible` (causal and the layer's sliding window), so the simulator's ground
truth is the kernels' reference. Rows go in blocks of ``ROW_BLOCK`` ascending rows, small enough that a
block's logits stay in cache: each block only computes the keys its rows can see (so the cost is proportional
to the visible cells, not to rows x keys), masks only the keys past its first row, and writes its softmax
once into the output, which starts zeroed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sparse_frontier.kernels.reference import attention_logits, visible

ROW_BLOCK = 16


def key_range(rows: Tensor, sliding_window: int | None) -> tuple[int, int]:
    """Half-open range of keys any of the (ascending) ``rows`` can see."""
    hi = int(rows[-1]) + 1
    lo = max(0, int(rows[0]) - sliding_window + 1) if sliding_window else 0
    return lo, hi


def _zeros(*shape: int, device: torch.device | str = "cpu") -> Tensor:
    """A zeroed float32 tensor. On CPU it comes from numpy, whose large arrays get transparent huge pages and
    kernel-zeroed memory: first touching a 100 MB output then costs a fraction of torch.zeros's page faults."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(np.zeros(shape, dtype=np.float32))
    return torch.zeros(shape, device=device)


def true_attention(q: Tensor, k: Tensor, rows: Tensor, scale: float, softcap: float | None = None,
                   sliding_window: int | None = None, row_block: int = ROW_BLOCK) -> Tensor:
    """Probabilities [Hq, R, T] of queries q [Hq, R, d] at ascending positions ``rows`` over keys k [Hkv, T, d].

    Invisible cells (future keys, keys outside the sliding window) are exactly zero.
    """
    n_heads, n_rows, n_keys = q.shape[0], len(rows), k.shape[1]
    n_kv, group = k.shape[0], n_heads // k.shape[0]
    probs = _zeros(n_heads, n_rows, n_keys, device=q.device)
    q, k = q.float(), k.float()
    for start in range(0, n_rows, row_block):
        stop = min(start + row_block, n_rows)
        block_rows = rows[start:stop]
        lo, hi = key_range(block_rows, sliding_window)
        # keys before the block's first row are visible to all its rows unless a window cuts them
        cut = lo if sliding_window else int(block_rows[0]) + 1
        hidden = ~visible(block_rows, hi, sliding_window)[:, cut:]
        for h in range(n_kv):
            heads = slice(h * group, (h + 1) * group)
            # one matrix product for the group's heads: their rows against the shared keys
            logits = attention_logits(q[heads, start:stop].reshape(1, -1, q.shape[-1]), k[h : h + 1, lo:hi], scale,
                                      softcap)
            logits = logits.view(group, stop - start, hi - lo)
            logits[..., cut - lo :].masked_fill_(hidden, float("-inf"))
            probs[heads, start:stop, lo:hi] = torch.softmax(logits, dim=-1)
    return probs


def visible_cells(rows: Tensor, n_keys: int, sliding_window: int | None = None) -> int:
    """Number of visible (query, key) cells of one head over ``rows``."""
    seen = torch.clamp(rows + 1, max=n_keys)
    if sliding_window:
        seen = torch.clamp(seen, max=sliding_window)
    return int(seen.sum())
