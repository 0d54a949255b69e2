"""The true attention of scored query rows: exact, float32, a few rows at a time.

Logits are scaled and soft-capped by :func:`kernels.reference.scale_logits_` and visibility comes from
:func:`kernels.reference.visible` (causal and the layer's sliding window), so the simulator's ground truth is
the kernels' reference (a power-of-two scale is applied to q instead, which is exact). Rows go in blocks of
``ROW_BLOCK`` ascending rows, small enough that a block's logits stay in cache: each block only computes the
keys its rows can see (so the cost is proportional to the visible cells, not to rows x keys) into one reused
scratch array, masks only the keys past its first row, takes the softmax in place and copies it once into the
output, whose other cells are zero. The blocks' views are built once per call shape (:class:`RowBlocks`). A
:class:`ProbsBuffer` lets a caller reuse one output's memory and those views from call to call (and one output's
memory from layer to layer).
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


class RowBlocks:
    """The row blocks of one call shape, each with its views: its logits in a scratch array (rows-major:
    [rows, group heads, keys]), the part of them past the block's first row that needs a mask and that mask,
    and its cells of the output for each KV group (taking these views costs more than a short block's work).

    ``blocks``: (start, stop, lo, hi, logits, masked logits, mask, outputs) per block of rows start:stop, which
    see keys lo:hi.
    """

    def __init__(self, probs: Tensor, at: list[int], rows: Tensor, n_kv: int, row_block: int,
                 sliding_window: int | None):
        n_heads, n_rows, n_keys = probs.shape
        group = n_heads // n_kv
        # keys before cut are visible to all of a block's rows unless a window cuts them (then cut = lo)
        spans = []
        for start in range(0, n_rows, row_block):
            stop = min(start + row_block, n_rows)
            lo = first_visible(at[start], sliding_window)
            spans.append((start, stop, lo, at[stop - 1] + 1, lo if sliding_window else at[start] + 1))
        # the masks of keys cut:hi of every block at once: visibility depends on key - row alone
        cuts = torch.tensor([cut for start, stop, *_, cut in spans for _ in range(start, stop)],
                            dtype=rows.dtype, device=rows.device)
        hidden = ~visible(rows - cuts, max((hi - cut for *_, hi, cut in spans), default=0), sliding_window)
        # one block's logits at a time, in one reused array (a fresh one per block costs its allocation)
        scratch = torch.empty(group * min(row_block, n_rows) * n_keys, device=probs.device)
        self.blocks = []
        for start, stop, lo, hi, cut in spans:
            logits = scratch[: (stop - start) * group * (hi - lo)].view(stop - start, group, hi - lo)
            outputs = [probs[h * group : (h + 1) * group, start:stop, lo:hi].transpose(0, 1) for h in range(n_kv)]
            self.blocks.append((start, stop, lo, hi, logits, logits[..., cut - lo :],
                                hidden[start:stop, None, : hi - cut], outputs))


class ProbsBuffer:
    """Output memory :func:`true_attention` reuses from call to call, for a caller done with each result before
    the next call (which overwrites it).

    A call over the same rows, sliding window and row blocks as the one before (the next KV group of a layer)
    writes exactly the cells that one wrote, so the zeros around them stay valid as they are, and its
    :class:`RowBlocks` serve again; any other call zeroes the memory first (one sequential pass over pages
    already mapped, instead of a fresh array).
    """

    def __init__(self):
        self.memory = Reused()
        self.probs: Tensor | None = None
        self.blocks: RowBlocks | None = None
        self.key: tuple | None = None

    def take(self, key: tuple, shape: tuple[int, int, int], device: torch.device) -> Tensor:
        if key != self.key:
            self.probs, self.blocks, self.key = self.memory.take(shape, device).zero_(), None, key
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
        probs = out.take((shape, n_kv, str(q.device), tuple(at), sliding_window, row_block), shape, q.device)
        if out.blocks is None:
            out.blocks = RowBlocks(probs, at, rows, n_kv, row_block, sliding_window)
        blocks = out.blocks
    else:
        probs = _zeros(*shape, device=q.device)
        blocks = RowBlocks(probs, at, rows, n_kv, row_block, sliding_window)
    q, k_t = q.float(), k.float().transpose(-1, -2)
    if math.frexp(scale)[0] == 0.5:  # a power of two scales q exactly: one pass over q instead of over the logits
        q, scale = q * scale, 1.0
    # rows-major queries: a block's rows of one KV group's heads are one contiguous [rows * group, d] slice
    q_rows = q.reshape(n_kv, group, n_rows, d).transpose(1, 2).contiguous()
    for h in range(n_kv):
        for start, stop, lo, hi, logits, masked, mask, outputs in blocks.blocks:
            # one matrix product for the group's heads: their rows against the shared keys
            torch.mm(q_rows[h, start:stop].view(-1, d), k_t[h, :, lo:hi], out=logits.view(-1, hi - lo))
            scale_logits_(logits, scale, softcap)
            masked.masked_fill_(mask, float("-inf"))
            outputs[h].copy_(torch.softmax(logits, dim=-1, out=logits))
    return probs


def visible_cells(rows: Tensor, n_keys: int, sliding_window: int | None = None) -> int:
    """Number of visible (query, key) cells of one head over ``rows``."""
    seen = torch.clamp(rows + 1, max=n_keys)
    if sliding_window:
        seen = torch.clamp(seen, max=sliding_window)
    return int(seen.sum())
