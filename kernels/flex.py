"""FlexAttention adapters: the same block layout as our block-sparse kernel, run by PyTorch's FlexAttention.

The peer to measure against: ``flex_block_mask`` turns a block Selection into a FlexAttention BlockMask
with the identical per-query-block lists of full and partial key blocks (partial blocks get the causal
and sliding-window mask_mod), so both kernels compute the same cells.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
from torch.nn.attention.flex_attention import flex_attention

from sparse_frontier.policies.selection import BlockMask

from .layout import PrefillLayout, block_sparse_layout


def _widen(index: Tensor, width: int) -> Tensor:
    """Pad an index list [H, NQB, w] to [H, NQB, width] (FlexAttention wants one slot per key block)."""
    return torch.nn.functional.pad(index, (0, width - index.shape[-1])) if index.shape[-1] < width else index


def _block_table(layout: PrefillLayout, n_kblocks: int) -> Tensor:
    """Dense kept-block table [heads, NQB, NKB] of a block layout (full and partial blocks)."""
    table = torch.zeros(layout.heads, layout.n_qblocks, n_kblocks + 1, dtype=torch.bool,
                        device=layout.full_count.device)
    for count, index in ((layout.full_count, layout.full_index), (layout.part_count, layout.part_index)):
        slots = torch.arange(index.shape[-1], device=index.device)
        table.scatter_(-1, torch.where(slots < count[..., None], index.long(), n_kblocks), True)
    return table[..., :n_kblocks]


def flex_block_mask_from_layout(layout: PrefillLayout, n_query_heads: int, sliding_window: int | None = None,
                                lookup: bool = True) -> FlexBlockMask:
    """A FlexAttention BlockMask with the layout's full and partial key blocks, per query head.

    FlexAttention's compiled kernel skips the blocks the BlockMask leaves out, but its eager fallback
    (CPU without torch.compile) evaluates only ``mask_mod``: with ``lookup`` the mask_mod also reads the
    kept-block table, so both agree. Without it the mask_mod is causal (and window) alone.
    """
    if layout.index_scale == 1:
        raise ValueError("only block layouts have a FlexAttention BlockMask")
    n_kblocks = -(-layout.n_keys // layout.tile)
    repeat = n_query_heads // layout.heads
    table = _block_table(layout, n_kblocks).repeat_interleave(repeat, dim=0) if lookup else None
    block_q, block_k = layout.block_q, layout.tile

    def heads(x: Tensor) -> Tensor:
        return x.repeat_interleave(repeat, dim=0)[None].contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx
        if sliding_window:
            ok = ok & (kv_idx > q_idx - sliding_window)
        if table is not None:
            ok = ok & table[h, q_idx // block_q, kv_idx // block_k]
        return ok

    return FlexBlockMask.from_kv_blocks(
        heads(layout.part_count), heads(_widen(layout.part_index, n_kblocks)),
        heads(layout.full_count), heads(_widen(layout.full_index, n_kblocks)),
        BLOCK_SIZE=(layout.block_q, layout.tile), mask_mod=mask_mod, seq_lengths=(layout.n_keys, layout.n_keys))


def flex_block_mask(sel: BlockMask, n_keys: int, n_query_heads: int, sliding_window: int | None = None,
                    lookup: bool = True) -> FlexBlockMask:
    """A FlexAttention BlockMask computing exactly the cells of a block Selection (causal applied)."""
    return flex_block_mask_from_layout(block_sparse_layout(sel, n_keys, sliding_window), n_query_heads,
                                       sliding_window, lookup)


def flex_prefill(q: Tensor, k: Tensor, v: Tensor, block_mask: FlexBlockMask, scale: float,
                 attention: Callable = flex_attention) -> Tensor:
    """FlexAttention over q [Hq, T, d], k/v [Hkv, T, d] with a BlockMask (pass a compiled ``attention``)."""
    return attention(q[None], k[None], v[None], block_mask=block_mask, scale=scale,
                     enable_gqa=q.shape[0] != k.shape[0])[0]
