"""The true attention of scored query rows: exact, float32, row block by row block.

Logits come from :func:`kernels.reference.attention_logits` (the layer's scale and soft-cap) and visibility
from :func:`kernels.reference.visible` (causal and the layer's sliding window), so the simulator's ground
truth is the same arithmetic as the kernels' reference. Each block of rows only touches the keys its rows
can see, so the cost is proportional to the visible cells, not to rows x keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparse_frontier.kernels.reference import attention_logits, visible

ROW_BLOCK = 128


def key_range(rows: Tensor, sliding_window: int | None) -> tuple[int, int]:
    """Half-open range of keys any of the (ascending) ``rows`` can see."""
    hi = int(rows[-1]) + 1
    lo = max(0, int(rows[0]) - sliding_window + 1) if sliding_window else 0
    return lo, hi


def true_attention(q: Tensor, k: Tensor, rows: Tensor, scale: float, softcap: float | None = None,
                   sliding_window: int | None = None, row_block: int = ROW_BLOCK) -> Tensor:
    """Probabilities [Hq, R, T] of queries q [Hq, R, d] at ascending positions ``rows`` over keys k [Hkv, T, d].

    Invisible cells (future keys, keys outside the sliding window) are exactly zero.
    """
    n_heads, n_rows, n_keys = q.shape[0], len(rows), k.shape[1]
    probs = torch.empty(n_heads, n_rows, n_keys, dtype=torch.float32, device=q.device)
    for start in range(0, n_rows, row_block):
        stop = min(start + row_block, n_rows)
        block_rows = rows[start:stop]
        lo, hi = key_range(block_rows, sliding_window)
        probs[:, start:stop, :lo] = 0
        probs[:, start:stop, hi:] = 0
        # one matrix product for the whole group: the heads' rows against the shared keys (no copy of k)
        block_q = q[:, start:stop].reshape(k.shape[0], -1, q.shape[-1])
        logits = attention_logits(block_q, k[:, lo:hi], scale, softcap).view(n_heads, stop - start, hi - lo)
        # keys before the block's first row are visible to all its rows unless a window cuts them
        cut = lo if sliding_window else int(block_rows[0]) + 1
        seen = visible(block_rows, hi, sliding_window)[:, cut:]
        logits[..., cut - lo :].masked_fill_(~seen, float("-inf"))
        probs[:, start:stop, lo:hi] = torch.softmax(logits, dim=-1)
    return probs


def visible_cells(rows: Tensor, n_keys: int, sliding_window: int | None = None) -> int:
    """Number of visible (query, key) cells of one head over ``rows``."""
    seen = torch.clamp(rows + 1, max=n_keys)
    if sliding_window:
        seen = torch.clamp(seen, max=sliding_window)
    return int(seen.sum())
