"""The true attention of scored query rows: exact, float32, a few rows at a time.

Logits are scaled and soft-capped by :func:`kernels.reference.scale_logits_` and visibility comes from
:func:`kernels.reference.visible` (causal and the layer's sliding window), so the simulator's ground truth is
the kernels' reference (a power-of-two scale is applied to q instead, which is exact). Rows go in blocks of
``ROW_BLOCK`` ascending rows, small enough that a block's logits stay in cache: each block only computes the
keys its rows can see (so the cost is proportional to the visible cells, not to rows x keys) into one reused
scratch array, masks only the keys past its first row, takes the softmax in place and copies it once into the
output, whose other cells are zero. A :class:`ProbsBuffer` lets a caller reuse one output's memory from call
to call (and from layer to layer).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from sparse_frontier.kernels.reference import first_visible, scale_logits_, visible

ROW_BLOCK = 16


def _zeros(*shape: int, device: torch.device | str = "cpu") -> Tensor:
    """A zeroed float32 tensor. On CPU it comes from numpy, whose large arrays get transparent huge pages and
    kernel-zeroed memory: first touching a 100 MB output then costs a fraction of torch.zeros's page faults."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(np.zeros(shape, dtype=np.float32))
    return torch.zeros(shape, device=device)


class Reused:
    """One flat float32 array handed out again and again as a view of the asked shape, grown when too small.

    A layer's scoring needs the same few arrays of up to [group heads, rows, keys] for each KV group and layer;
    taking them from memory already touched saves their page faults. A view is valid until the next ``take``.
    """

    def __init__(self):
        self.memory: Tensor | None = None

    def take(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
        """A view of ``shape`` on this memory (contents left from earlier use; zeros when just allocated)."""
        n = math.prod(shape)
        if self.memory is None or self.memory.numel() < n or self.memory.device != torch.device(device):
            self.memory = None  # let the old array go before allocating its successor
            self.memory = _zeros(n, device=device)
        return self.memory[:n].view(shape)


class ProbsBuffer:
    """Output memory :func:`true_attention` reuses from call to call, for a caller done with each result before
    the next call (which overwrites it).

    A call over the same rows, sliding window and row blocks as the one before (the next KV group of a layer)
    writes exactly the cells that one wrote, so the zeros around them stay valid as they are; any other call
    zeroes the memory first (one sequential pass over pages already mapped, instead of a fresh array).
    """

    def __init__(self):
        self.memory = Reused()
        self.probs: Tensor | None = None
        self.key: tuple | None = None

    def take(self, key: tuple, shape: tuple[int, int, int], device: torch.device) -> Tensor:
        if key != self.key:
            self.probs, self.key = self.memory.take(shape, device).zero_(), key
        return self.probs


def true_attention(q: Tensor, k: Tensor, rows: Tensor, scale: float, softcap: float | None = None,
                   sliding_window: int | None = None, row_block: int = ROW_BLOCK,
                   out: ProbsBuffer | None = None) -> Tensor:
    """Probabilities [Hq, R, T] of queries q [Hq, R, d] at ascending positions ``rows`` over keys k [Hkv, T, d].

    Invisible cells (future keys, keys outside the sliding window) are exactly zero. With ``out`` the result is
    that buffer's tensor, overwritten by the next call with it.
    """
    n_heads, n_rows, n_keys = q.shape[0], len(rows), k.shape[1]
    n_kv, group, d = k.shape[0], n_heads // k.shape[0], q.shape[-1]
    shape = (n_heads, n_rows, n_keys)
    at = rows.tolist()
    if out is not None:
        probs = out.take((shape, str(q.device), tuple(at), sliding_window, row_block), shape, q.device)
    else:
        probs = _zeros(*shape, device=q.device)
    q, k_t = q.float(), k.float().transpose(-1, -2)
    if math.frexp(scale)[0] == 0.5:  # a power of two scales q exactly: one pass over q instead of over the logits
        q, scale = q * scale, 1.0
    # each block: its rows start:stop see keys lo:hi; keys before cut are visible to all of them unless a window
    # cuts them (then cut = lo), so only keys cut:hi need a mask
    blocks = []
    for start in range(0, n_rows, row_block):
        stop = min(start + row_block, n_rows)
        lo = first_visible(at[start], sliding_window)
        blocks.append((start, stop, lo, at[stop - 1] + 1, lo if sliding_window else at[start] + 1))
    # the masks of keys cut:hi of every block at once: visibility depends on key - row alone
    cuts = torch.tensor([cut for start, stop, *_, cut in blocks for _ in range(start, stop)],
                        dtype=rows.dtype, device=rows.device)
    hidden = ~visible(rows - cuts, max((hi - cut for *_, hi, cut in blocks), default=0), sliding_window)
    # one block's logits at a time, in one reused array (a fresh one per block costs its allocation)
    scratch = torch.empty(group * min(row_block, n_rows) * n_keys, device=q.device)
    for h in range(n_kv):
        heads = slice(h * group, (h + 1) * group)
        for start, stop, lo, hi, cut in blocks:
            n = group * (stop - start)
            logits = scratch[: n * (hi - lo)].view(n, hi - lo)
            # one matrix product for the group's heads: their rows against the shared keys
            torch.mm(q[heads, start:stop].reshape(n, d), k_t[h, :, lo:hi], out=logits)
            logits = scale_logits_(logits, scale, softcap).view(group, stop - start, hi - lo)
            logits[..., cut - lo :].masked_fill_(hidden[start:stop, : hi - cut], float("-inf"))
            probs[heads, start:stop, lo:hi] = torch.softmax(logits, dim=-1, out=logits)
    return probs


def visible_cells(rows: Tensor, n_keys: int, sliding_window: int | None = None) -> int:
    """Number of visible (query, key) cells of one head over ``rows``."""
    seen = torch.clamp(rows + 1, max=n_keys)
    if sliding_window:
        seen = torch.clamp(seen, max=sliding_window)
    return int(seen.sum())
