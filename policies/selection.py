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

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

ROW_CHUNK = 1024


def causal(rows: Tensor, n_keys: int) -> Tensor:
    """Boolean [len(rows), n_keys]: key j is visible to the query at position i when j <= i."""
    keys = torch.arange(n_keys, device=rows.device)
    return keys[None, :] <= rows[:, None]


def as_float(mask: Tensor) -> Tensor:
    """A boolean tensor as float32 0 / 1, cast through uint8 (on CPU torch's direct bool -> float cast is about
    ten times slower)."""
    return mask.view(torch.uint8).float()


def row_counts(mask: Tensor) -> Tensor:
    """True cells per head and row of a boolean mask [H, R, T] (int32 [H, R]).

    Counted head by head in int32: on CPU torch's boolean sums are several times slower in int64, and slower
    again past a few million elements per call."""
    return torch.stack([m.sum(-1, dtype=torch.int32) for m in mask])


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
            total += row_counts(self.mask(rows[start : start + ROW_CHUNK], n_keys)).sum(-1).cpu()
        return total

    def density(self, rows: Tensor, n_keys: int) -> Tensor:
        """Realised density per head (float64 [heads]): computed cells / causal cells over ``rows``."""
        causal_cells = torch.clamp(rows + 1, max=n_keys).sum().item()
        return self.cells(rows, n_keys).double() / max(causal_cells, 1)


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

    def cells(self, rows: Tensor, n_keys: int) -> Tensor:
        """Closed form of ``mask(rows, n_keys).sum``: per row, whole kept blocks left of the row plus the
        kept block holding it, cut at the row (no dense mask is built)."""
        n_kblocks = self.blocks.shape[-1]
        if n_kblocks * self.block_k < n_keys:
            raise ValueError(f"block mask covers {n_kblocks * self.block_k} keys, fewer than the {n_keys} asked for")
        rows = rows.to(self.blocks.device)
        seen = torch.clamp(rows + 1, max=n_keys)  # keys visible to each row: 0 .. seen-1
        full, rest = seen // self.block_k, seen % self.block_k
        qblock = rows // self.block_q
        left, at = (full - 1).clamp(min=0), full.clamp(max=n_kblocks - 1)  # full is at most n_kblocks
        total = torch.zeros(self.heads, dtype=torch.int64)
        for h in range(self.heads):
            kept = self.blocks[h]  # [n_qblocks, n_kblocks]
            before = torch.where(full > 0, kept.cumsum(-1, dtype=torch.int32)[qblock, left], 0)  # kept left of full
            holding = kept[qblock, at] & (full < n_kblocks)  # the kept block holding the row
            total[h] = (before.long() * self.block_k + holding.long() * rest).sum().cpu()
        return total


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

    def coverage(self, n_keys: int, device=None) -> tuple[Tensor, Tensor]:
        """Every head's slash coverage and verticals: (covered [heads, n_keys + block - 1] over x = d + block - 1
        for the diagonal d = r0 - j in [-(block-1), n_keys), is a vertical [heads, n_keys + block] over keys)."""
        b, heads = self.block, self.heads
        span = n_keys + b - 1

        def flat(parts: list[Tensor], stride: int) -> Tensor:
            """Every head's entries in [0, n_keys) as indices into a flattened [heads, stride] array."""
            sizes = torch.tensor([len(x) for x in parts], device=device)
            at = torch.cat([x.to(device) for x in parts]).long()
            base = torch.repeat_interleave(torch.arange(heads, device=device) * stride, sizes)
            return (at + base)[(at >= 0) & (at < n_keys)]

        # slash o covers d in [o - block + 1, o], i.e. x in [o, o + block - 1]
        hits = torch.zeros(heads * (span + 1), dtype=torch.int32, device=device)
        at = flat(self.offsets, span + 1)
        hits.index_add_(0, at, torch.ones_like(at, dtype=torch.int32))
        hits.index_add_(0, at + b, -torch.ones_like(at, dtype=torch.int32))
        is_col = torch.zeros(heads * (n_keys + b), dtype=torch.bool, device=device)
        is_col[flat(self.columns, n_keys + b)] = True
        return hits.view(heads, span + 1).cumsum(1)[:, :span] > 0, is_col.view(heads, n_keys + b)

    def key_reader(self, n_keys: int, last_start: int, device=None) -> Callable[[Tensor, int], Tensor]:
        """``read(starts, width)``: the first ``width`` keys every head computes for the query blocks starting at
        ``starts`` (none after ``last_start``), [heads, len(starts), width] bool, causality not applied.

        For the block starting at r0 a slash o covers keys r0 - o .. r0 + block - 1 - o: key j is covered when
        x = r0 - j + block - 1 is in the head's diagonal coverage, so each block's row of keys is a window of
        the reversed coverage, padded with False on both sides (no per-key index arithmetic), or a vertical.
        The coverage is computed once, for any number of reads.
        """
        covered, is_col = self.coverage(n_keys, device)
        front = max(last_start - n_keys + 1, 0)  # blocks starting past the keys
        pad = torch.zeros(self.heads, front + n_keys, dtype=torch.bool, device=device)
        windows = torch.cat([pad[:, :front], covered.flip(1), pad[:, front:]], dim=1).unfold(1, n_keys, 1)

        def read(starts: Tensor, width: int = n_keys) -> Tensor:
            # key j of the block at r0 reads reversed coverage at front + n_keys - 1 - r0 + j
            return windows[:, front + n_keys - 1 - starts, :width] | is_col[:, None, :width]

        return read

    def mask(self, rows: Tensor, n_keys: int) -> Tensor:
        blocks, where = torch.unique(rows // self.block, return_inverse=True)  # the rows of a block share keys
        starts = blocks * self.block
        keys = self.key_reader(n_keys, int(starts.max()) if len(starts) else 0, rows.device)(starts)
        return keys[:, where] & causal(rows, n_keys)

    def cells(self, rows: Tensor, n_keys: int) -> Tensor:
        """Closed form of ``mask(rows, n_keys).sum`` without a dense mask.

        For a row i in the query block starting at r0, the cells are the keys j <= i that a slash covers
        (d = r0 - j in the coverage) or that are verticals. Keys left of r0 are the same for the whole block:
        covered diagonals + verticals - verticals on covered diagonals (counted over the runs of the coverage
        with a prefix count of verticals); keys r0..i are a running count inside the block.
        """
        if len(rows) and int(rows.max()) >= n_keys:
            return super().cells(rows, n_keys)
        if self.columns:  # counted where the selection is
            rows = rows.to(self.columns[0].device)
        if len(rows) == n_keys and bool((rows == torch.arange(n_keys, device=rows.device)).all()):
            return self._prompt_cells(n_keys, rows.device)
        device = rows.device
        b = self.block
        qblock, order = torch.sort(rows // b)
        blocks, inverse = torch.unique_consecutive(qblock, return_inverse=True)
        where = torch.empty_like(inverse)
        where[order] = inverse  # index of each row's block in ``blocks``
        r0 = blocks * b
        total = torch.zeros(self.heads, dtype=torch.int64)
        covered, verticals = self.coverage(n_keys, device)
        for h in range(self.heads):
            cov, is_col = covered[h], verticals[h]  # cov over x = d + b - 1, d in [-(b-1), n_keys)
            cov_before = torch.nn.functional.pad(cov.long().cumsum(0), (1, 0))  # covered x < index
            cols_before = torch.nn.functional.pad(is_col.long().cumsum(0), (1, 0))  # verticals at j < index
            # keys j < r0: diagonals d in [1, r0]
            n_cov = cov_before[r0 + b] - cov_before[b]
            n_cols = cols_before[r0]
            edges = torch.diff(torch.nn.functional.pad(cov.to(torch.int8), (1, 1)))
            start = (edges == 1).nonzero().flatten() - (b - 1)  # runs [start, stop] of covered d
            stop = (edges == -1).nonzero().flatten() - b
            lo = torch.maximum(start, torch.ones_like(start))[None, :]
            both = torch.zeros_like(r0)
            step = max(1, ROW_CHUNK * 1024 // max(len(start), 1))
            for c in range(0, len(r0), step):  # verticals j in [r0 - hi, r0 - lo] for each run
                r = r0[c : c + step, None]
                hi = torch.minimum(stop[None, :], r)
                on_run = cols_before[(r - lo + 1).clamp(min=0)] - cols_before[(r - hi).clamp(min=0)]
                both[c : c + step] = torch.where(hi >= lo, on_run, 0).sum(-1)
            base = n_cov + n_cols - both
            # keys r0 + t for t in [0, b): diagonal d = -t, index b - 1 - t
            t = torch.arange(b, device=device)
            inside = cov[b - 1 - t][None, :] | is_col[r0[:, None] + t[None, :]]
            running = inside.long().cumsum(-1)
            per_row = base[where] + running[where, rows - r0[where]]
            total[h] = per_row.sum().cpu()
        return total


    def _prompt_cells(self, n: int, device=None) -> Tensor:
        """``cells`` over every row 0..n-1, all heads at once (the same sums as ``cells``, per query block)."""
        b, heads = self.block, self.heads
        nb = -(-n // b)
        cov, is_col = self.coverage(n, device)  # index x = d + b - 1
        cov_before = torch.nn.functional.pad(cov.int().cumsum(1), (1, 0))
        cols_before = torch.nn.functional.pad(is_col.int().cumsum(1), (1, 0))
        r0 = torch.arange(nb, device=device) * b
        n_cov = cov_before[:, r0 + b] - cov_before[:, b : b + 1]
        n_cols = cols_before[:, r0]
        edges = torch.diff(torch.nn.functional.pad(cov.to(torch.int8), (1, 1)), dim=1)
        sh, sx = (edges == 1).nonzero(as_tuple=True)
        eh, ex = (edges == -1).nonzero(as_tuple=True)
        per_head = torch.bincount(sh, minlength=heads)
        rank = torch.arange(len(sh), device=device) - (per_head.cumsum(0) - per_head)[sh]
        width = max(int(per_head.max()) if len(sh) else 0, 1)
        start = torch.full((heads, width), n + b, dtype=torch.long, device=device)  # padding runs are empty
        stop = torch.full((heads, width), -1, dtype=torch.long, device=device)
        start[sh, rank] = sx - (b - 1)
        stop[eh, rank] = ex - b
        lo = start.clamp(min=1)[:, None, :]
        hi = torch.minimum(stop[:, None, :], r0[None, :, None])  # [H, nb, runs]
        r = r0[None, :, None]
        gather = cols_before[:, None, :].expand(-1, nb, -1)
        on_run = (torch.gather(gather, 2, (r - lo + 1).clamp(min=0).expand(-1, -1, width))
                  - torch.gather(gather, 2, (r - hi).clamp(min=0)))
        base = n_cov + n_cols - torch.where(hi >= lo, on_run, 0).sum(-1)  # [H, nb]
        t = torch.arange(b, device=device)
        inside = cov[:, :b].flip(1)[:, None, :] | is_col[:, : nb * b].view(heads, nb, b)  # key r0 + t, d = -t
        running = inside.int().cumsum(-1)
        rows_in = torch.clamp(n - r0, max=b)
        in_block = t[None, :] < rows_in[:, None]
        total = (base * rows_in).sum(-1) + (running * in_block).sum((1, 2))
        return total.long().cpu()


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
