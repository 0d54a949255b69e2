"""Selections: which (query, key) cells a policy computes.

A Selection is the one object that crosses every boundary: policies make them, the simulator scores
them, the kernels execute them and the end-to-end runner plugs them into the model.

Every kind answers the same three questions:
  * ``mask(rows, n_keys)``: the dense boolean mask ``[heads, len(rows), n_keys]`` of the cells it computes
    for the given query positions, causal (key <= query) applied. This is exactly what the kernel computes.
  * ``cells(rows, n_keys)``: how many cells per head it computes over those rows.
  * ``kernel``: the name of the kernel in ``sparse_frontier.kernels`` that runs it.

``heads`` is the number of heads the selection is given for: the query heads, or the KV heads when
one selection is shared by a GQA group (the simulator expands it with :func:`expand_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

ROW_CHUNK = 1024


def causal(rows: Tensor, n_keys: int) -> Tensor:
    """Boolean [len(rows), n_keys]: key j is visible to the query at position i when j <= i."""
    keys = torch.arange(n_keys, device=rows.device)
    return keys[None, :] <= rows[:, None]


def expand_heads(mask: Tensor, n_query_heads: int) -> Tensor:
    """Repeat a per-KV-head mask [Hkv, ...] over the query heads of each GQA group."""
    heads = mask.shape[0]
    if heads == n_query_heads:
        return mask
    if n_query_heads % heads:
        raise ValueError(f"selection has {heads} heads, which does not divide {n_query_heads} query heads")
    return mask.repeat_interleave(n_query_heads // heads, dim=0)


class Selection:
    """Base class of the selection kinds."""

    kernel: ClassVar[str]
    heads: int

    def mask(self, rows: Tensor, n_keys: int) -> Tensor:  # pragma: no cover - abstract
        """Dense boolean mask [heads, len(rows), n_keys] of computed cells, causal applied."""
        raise NotImplementedError

    def cells(self, rows: Tensor, n_keys: int) -> Tensor:
        """Computed cells per head over the given query rows (int64 [heads])."""
        total = torch.zeros(self.heads, dtype=torch.int64)
        for start in range(0, len(rows), ROW_CHUNK):
            total += self.mask(rows[start : start + ROW_CHUNK], n_keys).sum(dim=(1, 2)).cpu()
        return total


@dataclass
class Dense(Selection):
    """Every causal cell."""

    heads: int
    kernel: ClassVar[str] = "dense"

    def mask(self, rows: Tensor, n_keys: int) -> Tensor:
        return causal(rows, n_keys).expand(self.heads, -1, -1)

    def cells(self, rows: Tensor, n_keys: int) -> Tensor:
        per_row = torch.clamp(rows + 1, max=n_keys).sum().cpu()
        return per_row.repeat(self.heads)


@dataclass
class BlockMask(Selection):
    """Per head, query-block x key-block booleans ``blocks [heads, n_qblocks, n_kblocks]``.

    A kept block is computed whole, with the causal mask inside diagonal blocks.
    """

    blocks: Tensor
    block_q: int
    block_k: int
    kernel: ClassVar[str] = "block_sparse"

    @property
    def heads(self) -> int:
        return self.blocks.shape[0]

    def mask(self, rows: Tensor, n_keys: int) -> Tensor:
        per_row = self.blocks[:, rows // self.block_q]  # [H, R, n_kblocks]
        dense = per_row.repeat_interleave(self.block_k, dim=-1)[..., :n_keys]
        if dense.shape[-1] < n_keys:
            raise ValueError(f"block mask covers {dense.shape[-1]} keys, fewer than the {n_keys} asked for")
        return dense & causal(rows, n_keys)


@dataclass
class VerticalSlash(Selection):
    """Per head, kept key columns (verticals) and kept diagonal offsets ``i - j`` (slashes).

    Executed as MInference does: queries in blocks of ``block`` rows; for a query block starting at
    ``r0``, a slash at offset ``o`` is computed as the contiguous key range ``[r0 - o, r0 + block - 1 - o]``
    (so a slash covers a parallelogram, not a single line), verticals are gathered columns. ``mask``
    returns exactly that coverage, so the simulator scores what the kernel computes.
    """

    columns: list[Tensor]
    offsets: list[Tensor]
    block: int = 64
    kernel: ClassVar[str] = "vertical_slash"

    @property
    def heads(self) -> int:
        return len(self.columns)

    def diagonal_coverage(self, head: int, n_keys: int, device=None) -> Tensor:
        """Boolean over ``d = r0 - j`` in [-(block-1), n_keys): does some slash range cover it."""
        span = n_keys + self.block - 1
        hits = torch.zeros(span + 1, dtype=torch.int32, device=device)
        offs = self.offsets[head].to(device)
        offs = offs[(offs >= 0) & (offs < n_keys)]
        # slash o covers d in [o - block + 1, o]; shift by block - 1 to index from 0
        hits.index_add_(0, offs, torch.ones_like(offs, dtype=torch.int32))
        hits.index_add_(0, offs + self.block, -torch.ones_like(offs, dtype=torch.int32))
        return hits.cumsum(0)[:span] > 0

    def mask(self, rows: Tensor, n_keys: int) -> Tensor:
        device = rows.device
        keys = torch.arange(n_keys, device=device)
        r0 = (rows // self.block) * self.block
        d = r0[:, None] - keys[None, :] + self.block - 1  # index into diagonal_coverage
        valid = (d >= 0) & (d < n_keys + self.block - 1)
        out = torch.zeros(self.heads, len(rows), n_keys, dtype=torch.bool, device=device)
        for h in range(self.heads):
            cov = self.diagonal_coverage(h, n_keys, device)
            out[h] = cov[d.clamp(0, n_keys + self.block - 2)] & valid
            cols = self.columns[h].to(device)
            cols = cols[(cols >= 0) & (cols < n_keys)]
            out[h][:, cols] = True
        return out & causal(rows, n_keys)


@dataclass
class TokenSet(Selection):
    """Per head and query row, the kept key indices ``indices [heads, len(rows), k]`` (-1 = padding)."""

    rows: Tensor
    indices: Tensor
    kernel: ClassVar[str] = "token_gather"

    @property
    def heads(self) -> int:
        return self.indices.shape[0]

    def _row_index(self, rows: Tensor) -> Tensor:
        where = torch.searchsorted(self.rows.to(rows.device), rows)
        if (where >= len(self.rows)).any() or (self.rows.to(rows.device)[where] != rows).any():
            raise ValueError("token selection asked for query rows it was not built for")
        return where

    def mask(self, rows: Tensor, n_keys: int) -> Tensor:
        idx = self.indices.to(rows.device)[:, self._row_index(rows)]  # [H, R, k]
        out = torch.zeros(self.heads, len(rows), n_keys + 1, dtype=torch.bool, device=rows.device)
        out.scatter_(-1, torch.where(idx < 0, n_keys, idx), True)
        return out[..., :n_keys] & causal(rows, n_keys)


@dataclass
class PageSet(Selection):
    """Per head and decode step, the kept pages ``pages [heads, len(rows), P]`` of ``page_size`` keys."""

    rows: Tensor
    pages: Tensor
    page_size: int = 16
    kernel: ClassVar[str] = "sparse_decode"

    @property
    def heads(self) -> int:
        return self.pages.shape[0]

    def mask(self, rows: Tensor, n_keys: int) -> Tensor:
        where = TokenSet._row_index(self, rows)  # same lookup of rows
        pages = self.pages.to(rows.device)[:, where]
        n_pages = -(-n_keys // self.page_size)
        out = torch.zeros(self.heads, len(rows), n_pages + 1, dtype=torch.bool, device=rows.device)
        out.scatter_(-1, torch.where(pages < 0, n_pages, pages), True)
        dense = out[..., :n_pages].repeat_interleave(self.page_size, dim=-1)[..., :n_keys]
        return dense & causal(rows, n_keys)


@dataclass
class KeptKeys(Selection):
    """Eviction (SnapKV-style): per head the prompt keys kept after prefill ``kept [heads, prefill_len]``.

    Keys at positions >= ``prefill_len`` (generated tokens) are always kept.
    """

    kept: Tensor
    kernel: ClassVar[str] = "dense_decode_compacted"

    @property
    def heads(self) -> int:
        return self.kept.shape[0]

    @property
    def prefill_len(self) -> int:
        return self.kept.shape[1]

    def mask(self, rows: Tensor, n_keys: int) -> Tensor:
        kept = self.kept.to(rows.device)
        tail = torch.ones(self.heads, max(n_keys - self.prefill_len, 0), dtype=torch.bool, device=rows.device)
        full = torch.cat([kept[:, :n_keys], tail], dim=1)
        return full[:, None, :] & causal(rows, n_keys)
