"""Kernel layouts: what a Triton kernel reads to run a Selection (torch only, no Triton).

Prefill kernels take, per (mask head, query block), a count and an ascending list of key tiles that need
no mask ("full") and a list that does ("partial": causal diagonal, sequence end, sliding window), plus,
for vertical-slash, gathered key columns: the layout FlexAttention's BlockMask uses. Decode kernels take,
per (decode step, mask head), a list of selected pages and the key index bounds each step may see.

Every converter reproduces ``Selection.mask`` exactly (intersected with the layer's visible keys), so the
kernel computes the cells the simulator scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparse_frontier.policies.selection import BlockMask, KeptKeys, PageSet, TokenSet, VerticalSlash

KERNEL_BLOCKS = (64, 128)


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def pack(group: Tensor, n_groups: int, *values: Tensor) -> tuple[Tensor, ...]:
    """Scatter flat items (sorted by ``group``) into padded rows: (counts [n_groups], padded values...)."""
    counts = torch.bincount(group, minlength=n_groups).to(torch.int32)
    width = max(int(counts.max()) if n_groups else 0, 1)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(group), device=group.device) - first[group]
    out = []
    for value in values:
        padded = torch.zeros(n_groups, width, dtype=torch.int32, device=group.device)
        padded[group, slot] = value.to(torch.int32)
        out.append(padded)
    return (counts, *out)


def pack_rows(keep: Tensor) -> tuple[Tensor, Tensor]:
    """For boolean rows [..., N]: (count [...], ascending kept positions padded with 0 [..., max count])."""
    counts = keep.sum(-1).to(torch.int32)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :width]
    return counts, order.to(torch.int32)


@dataclass
class PrefillLayout:
    """Per (mask head, query block of ``block_q`` rows): tiles of keys to compute.

    ``full_*``/``part_*`` index key tiles: tile ``i`` covers keys ``[i * index_scale, + tile)`` where
    ``tile = index_scale`` for block-sparse (FlexAttention's block indices) and the tile start itself for
    vertical-slash (``index_scale = 1``, ``part_end`` gives each partial tile's exclusive end). ``col_*``
    are gathered key columns (vertical-slash only); the first ``col_seen`` of them are visible to every row
    of the block (no mask needed). ``n_keys`` is the length the layout was built for.
    """

    full_count: Tensor
    full_index: Tensor
    part_count: Tensor
    part_index: Tensor
    block_q: int
    tile: int
    index_scale: int
    n_keys: int
    part_end: Tensor | None = None
    col_count: Tensor | None = None
    col_index: Tensor | None = None
    col_seen: Tensor | None = None
    schedules: dict = field(default_factory=dict, repr=False, compare=False)  # launch orders, by shape

    @property
    def heads(self) -> int:
        return self.full_count.shape[0]

    @property
    def n_qblocks(self) -> int:
        return self.full_count.shape[1]

    def to(self, device) -> PrefillLayout:
        """The same layout with its tensors on ``device``."""
        moved = {name: (value.to(device) if isinstance(value, Tensor) else value)
                 for name, value in vars(self).items() if name != "schedules"}
        return PrefillLayout(**moved)

    def weight(self) -> Tensor:
        """Key tiles each (head, query block) computes: the schedule puts the heaviest first."""
        w = self.full_count + self.part_count
        if self.col_count is not None:
            w = w + (self.col_count + self.tile - 1) // self.tile
        return w


class UnsupportedSelection(ValueError):
    """A valid Selection no kernel runs as it stands (its block sizes, or its kind); the torch reference can."""


def block_sparse_layout(sel: BlockMask, n_keys: int, sliding_window: int | None = None) -> PrefillLayout:
    """FlexAttention-style layout of a block Selection, at the Selection's own block sizes (64 or 128)."""
    for name, size in (("block_q", sel.block_q), ("block_k", sel.block_k)):
        if size not in KERNEL_BLOCKS:
            raise UnsupportedSelection(
                f"block-sparse kernel runs blocks of {KERNEL_BLOCKS}, but the selection's {name} is {size}: "
                "set the policy's block size to 64 or 128, or coarsen the selection explicitly "
                "(sparse_frontier.kernels.layout.coarsen)")
    bq, bk = sel.block_q, sel.block_k
    nqb, nkb = cdiv(n_keys, bq), cdiv(n_keys, bk)
    if sel.blocks.shape[1] < nqb or sel.blocks.shape[2] < nkb:
        raise ValueError(f"block selection covers {tuple(sel.blocks.shape[1:])} blocks, fewer than the "
                         f"{(nqb, nkb)} that {n_keys} keys need")
    blocks = sel.blocks[:, :nqb, :nkb].bool()
    device = blocks.device
    q_first = torch.arange(nqb, device=device) * bq
    q_last = torch.clamp(q_first + bq - 1, max=n_keys - 1)
    k_first = torch.arange(nkb, device=device) * bk
    k_last = torch.clamp(k_first + bk - 1, max=n_keys - 1)
    seen = k_first[None, :] <= q_last[:, None]
    whole = (k_last[None, :] <= q_first[:, None]) & (k_first + bk <= n_keys)[None, :]
    if sliding_window:
        seen &= k_last[None, :] > q_first[:, None] - sliding_window
        whole &= k_first[None, :] > q_last[:, None] - sliding_window
    full = blocks & whole[None]
    part = blocks & (seen & ~whole)[None]
    full_count, full_index = pack_rows(full)
    part_count, part_index = pack_rows(part)
    return PrefillLayout(full_count, full_index, part_count, part_index, block_q=bq, tile=bk, index_scale=bk,
                         n_keys=n_keys)


def coarsen(sel: BlockMask, block: int) -> BlockMask:
    """A BlockMask at a larger block size keeping a block when any of its sub-blocks is kept (a superset)."""
    if block % sel.block_q or block % sel.block_k:
        raise ValueError(f"block {block} is not a multiple of the selection's blocks {sel.block_q}x{sel.block_k}")
    fq, fk = block // sel.block_q, block // sel.block_k
    heads, nq, nk = sel.blocks.shape
    padded = torch.zeros(heads, cdiv(nq, fq) * fq, cdiv(nk, fk) * fk, dtype=torch.bool, device=sel.blocks.device)
    padded[:, :nq, :nk] = sel.blocks
    coarse = padded.view(heads, cdiv(nq, fq), fq, cdiv(nk, fk), fk).any(dim=4).any(dim=2)
    return BlockMask(coarse, block_q=block, block_k=block)


def _slash_intervals(offsets: Tensor, n_keys: int, block: int) -> tuple[Tensor, Tensor]:
    """Merged intervals [lo, hi] of ``d = r0 - key`` covered by the slashes, ascending."""
    offs = torch.unique(offsets[(offsets >= 0) & (offsets < n_keys)].long())  # ascending
    if not len(offs):
        return offs, offs
    starts = torch.ones(len(offs), dtype=torch.bool, device=offs.device)
    starts[1:] = offs[1:] - offs[:-1] > block
    first = torch.nonzero(starts).flatten()
    last = torch.cat([first[1:] - 1, first.new_tensor([len(offs) - 1])])
    return offs[first] - block + 1, offs[last]


def vertical_slash_layout(sel: VerticalSlash, n_keys: int, tile: int | None = None,
                          sliding_window: int | None = None) -> PrefillLayout:
    """MInference's layout: merged slash ranges per query block in tiles of ``tile`` keys (default 64: on an
    H200 the kernel is faster with them), plus the kept columns those ranges do not already cover."""
    if sel.block not in KERNEL_BLOCKS:
        raise UnsupportedSelection(f"vertical-slash kernel runs query blocks of {KERNEL_BLOCKS}, not {sel.block}")
    device = sel.offsets[0].device if sel.heads else torch.device("cpu")
    block = sel.block
    tile = tile or 64
    nqb = cdiv(n_keys, block)
    r0 = torch.arange(nqb, device=device) * block
    r_last = r0 + block - 1
    key_hi = torch.clamp(r_last, max=n_keys - 1) + 1  # exclusive causal bound per query block
    key_lo = torch.clamp(r0 - sliding_window + 1, min=0) if sliding_window else torch.zeros_like(r0)
    whole_lo = r_last - sliding_window + 1 if sliding_window else None
    parts = {name: [] for name in ("fc", "fi", "pc", "pi", "pe", "cc", "ci", "cs")}
    for h in range(sel.heads):
        lo_up, hi_up = _slash_intervals(sel.offsets[h].to(device), n_keys, block)
        lo, hi = lo_up.flip(0), hi_up.flip(0)  # descending d: key ranges [a, b) come ascending in keys
        a = torch.maximum(r0[:, None] - hi[None, :], key_lo[:, None])
        b = torch.minimum(r0[:, None] - lo[None, :] + 1, key_hi[:, None])
        n_tiles = torch.clamp(b - a, min=0).add(tile - 1).div(tile, rounding_mode="floor")
        qb = torch.arange(nqb, device=device)[:, None].expand_as(a)
        flat_n = n_tiles.flatten()
        qb_t = torch.repeat_interleave(qb.flatten(), flat_n)
        a_t = torch.repeat_interleave(a.flatten(), flat_n)
        b_t = torch.repeat_interleave(b.flatten(), flat_n)
        within = torch.arange(len(a_t), device=device) - torch.repeat_interleave(torch.cumsum(flat_n, 0) - flat_n,
                                                                                  flat_n)
        start = a_t + within * tile
        end = torch.minimum(start + tile, b_t)
        whole = (end - start == tile) & (end - 1 <= r0[qb_t])
        if sliding_window:
            whole &= start >= whole_lo[qb_t]
        fc, fi = pack(qb_t[whole], nqb, start[whole])
        pc, pi, pe = pack(qb_t[~whole], nqb, start[~whole], end[~whole])
        cols = torch.unique(sel.columns[h].to(device).long())
        cols = cols[(cols >= 0) & (cols < n_keys)]
        d = r0[:, None] - cols[None, :]
        where = torch.searchsorted(lo_up, d.contiguous(), right=True) - 1
        covered = (where >= 0) & (d <= hi_up[where.clamp(min=0)]) if len(lo) else torch.zeros_like(d, dtype=torch.bool)
        keep = (cols[None, :] < key_hi[:, None]) & (cols[None, :] >= key_lo[:, None]) & ~covered
        cc, order = pack_rows(keep)
        ci = torch.gather(cols[None, :].expand(nqb, -1), 1, order.long()).to(torch.int32) if len(cols) else order
        # kept columns at or before the block's first row: every row sees them (a prefix, as they ascend);
        # none under a sliding window, which can hide the earliest columns from the later rows
        seen = keep & (cols[None, :] <= r0[:, None]) & (not sliding_window)
        cs = seen.sum(-1).to(torch.int32)
        for name, value in zip(parts, (fc, fi, pc, pi, pe, cc, ci, cs), strict=True):
            parts[name].append(value)
    stacked = {name: _stack_padded(values) for name, values in parts.items()}
    return PrefillLayout(stacked["fc"], stacked["fi"], stacked["pc"], stacked["pi"], block_q=block, tile=tile,
                         index_scale=1, n_keys=n_keys, part_end=stacked["pe"], col_count=stacked["cc"],
                         col_index=stacked["ci"], col_seen=stacked["cs"])


def _stack_padded(values: list[Tensor]) -> Tensor:
    """Stack per-head tensors, padding their last dimension with zeros."""
    if values[0].dim() == 1:
        return torch.stack(values)
    width = max(v.shape[-1] for v in values)
    return torch.stack([torch.nn.functional.pad(v, (0, width - v.shape[-1])) for v in values])


def layout_cells(layout: PrefillLayout, rows: Tensor, sliding_window: int | None = None,
                 chunk: int = 8192) -> Tensor:
    """Cells per mask head that the layout computes for the query positions ``rows`` (int64 [heads])."""
    total = torch.zeros(layout.heads, dtype=torch.int64)
    rows = rows.to(layout.full_count.device).long()
    for c in range(0, len(rows), chunk):
        total += _layout_cells(layout, rows[c:c + chunk], sliding_window)
    return total


def tile_cells(layout: PrefillLayout, block_c: int = 64) -> int:
    """Cells the prefill kernel computes in whole tiles (query block x key tile, masked cells included): the key
    tiles of every (mask head, query block), then, for vertical-slash, the gathered columns every row sees in
    whole ``block_c`` tiles and the rest in tiles of their own. Over ``layout_cells`` it is the work a layout
    wastes on masked cells (the diagonal's upper half, ragged ends)."""
    tiles = (layout.full_count.long() + layout.part_count.long()) * layout.tile
    if layout.col_count is not None:
        seen = layout.col_seen.long() // block_c if layout.col_seen is not None else 0
        rest = (layout.col_count.long() - seen * block_c + block_c - 1) // block_c
        tiles = tiles + (seen + rest) * block_c
    return int(tiles.sum()) * layout.block_q


def _layout_cells(layout: PrefillLayout, rows: Tensor, sliding_window: int | None) -> Tensor:
    """``layout_cells`` for one chunk of rows."""
    qb = rows // layout.block_q
    first = torch.clamp(rows - sliding_window + 1, min=0) if sliding_window else torch.zeros_like(rows)
    total = torch.zeros(layout.heads, dtype=torch.int64)
    for h in range(layout.heads):
        cells = torch.zeros((), dtype=torch.int64, device=rows.device)
        for count, index, end in ((layout.full_count, layout.full_index, None),
                                  (layout.part_count, layout.part_index, layout.part_end)):
            start = index[h, qb].long() * layout.index_scale
            stop = end[h, qb].long() if end is not None else start + layout.tile
            stop = torch.clamp(torch.minimum(stop, rows[:, None] + 1), max=layout.n_keys)
            n = (stop - torch.maximum(start, first[:, None])).clamp(min=0)
            valid = torch.arange(start.shape[1], device=rows.device)[None, :] < count[h, qb][:, None]
            cells += (n * valid).sum()
        if layout.col_count is not None:
            col = layout.col_index[h, qb].long()
            valid = torch.arange(col.shape[1], device=rows.device)[None, :] < layout.col_count[h, qb][:, None]
            cells += (valid & (col <= rows[:, None]) & (col >= first[:, None])).sum()
        total[h] = cells.cpu()
    return total


@dataclass
class DecodeLayout:
    """Per (decode step, mask head): ``count`` selected pages in ``pages`` (ascending), and the key index
    bounds ``[lo, hi)`` the step may see. ``dense`` layouts read pages ``0 .. count-1`` without an index."""

    pages: Tensor | None
    count: Tensor
    lo: Tensor
    hi: Tensor
    page_size: int
    dense: bool = False

    @property
    def heads(self) -> int:
        return self.count.shape[1]

    def to(self, device) -> DecodeLayout:
        """The same layout with its tensors on ``device``."""
        moved = {name: (value.to(device) if isinstance(value, Tensor) else value)
                 for name, value in vars(self).items()}
        return DecodeLayout(**moved)


def _bounds(rows: Tensor, heads: int, sliding_window: int | None) -> tuple[Tensor, Tensor]:
    """Key bounds [lo, hi) [R, heads] in absolute positions for query rows."""
    hi = (rows + 1)[:, None].expand(-1, heads)
    lo = torch.clamp(hi - sliding_window, min=0) if sliding_window else torch.zeros_like(hi)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def _sorted_unique_pages(pages: Tensor, n_pages: int) -> tuple[Tensor, Tensor]:
    """Per row of [..., P] page ids (-1 = none): (count, ascending distinct valid ids padded with 0)."""
    big = n_pages + 1
    p = torch.where((pages >= 0) & (pages < n_pages), pages.long(), big)
    p, _ = torch.sort(p, dim=-1)
    dup = torch.zeros_like(p, dtype=torch.bool)
    dup[..., 1:] = p[..., 1:] == p[..., :-1]
    p = torch.where(dup, big, p)
    p, _ = torch.sort(p, dim=-1)
    keep = p < big
    counts = keep.sum(-1).to(torch.int32)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    return counts, torch.where(keep, p, 0)[..., :width].to(torch.int32)


def page_layout(sel: PageSet | TokenSet, rows: Tensor, n_keys: int,
                sliding_window: int | None = None) -> DecodeLayout:
    """Decode layout of a page (or token: page size 1) Selection for the decode steps ``rows``."""
    page_size = sel.page_size if isinstance(sel, PageSet) else 1
    ids = sel.pages if isinstance(sel, PageSet) else sel.indices
    where = TokenSet._row_index(sel, rows.to(sel.rows.device))
    picked = ids[:, where].to(rows.device).transpose(0, 1)  # [R, heads, P]
    count, pages = _sorted_unique_pages(picked, cdiv(n_keys, page_size))
    lo, hi = _bounds(rows, sel.heads, sliding_window)
    return DecodeLayout(pages.contiguous(), count.contiguous(), lo, hi, page_size)


def compact_kept(sel: KeptKeys, k: Tensor, v: Tensor, rows: Tensor, tile: int = 64,
                 sliding_window: int | None = None) -> tuple[Tensor, Tensor, DecodeLayout]:
    """Gather each mask head's kept keys (prompt keys kept, every later key) into a compacted cache.

    Returns (k_c, v_c [heads, Tc, d], a dense DecodeLayout over them for the decode steps ``rows``).
    """
    n_keys = k.shape[1]
    heads = sel.heads
    group_kv = heads // k.shape[0] if heads >= k.shape[0] else 1
    kept = torch.ones(heads, n_keys, dtype=torch.bool, device=k.device)
    width = min(sel.prefill_len, n_keys)
    kept[:, :width] = sel.kept[:, :width].to(k.device).bool()
    counts, positions = pack_rows(kept)  # [heads], [heads, Tc] ascending positions
    kv_head = torch.arange(heads, device=k.device) // group_kv
    index = positions.long()[..., None].expand(-1, -1, k.shape[2])
    k_c = torch.gather(k[kv_head], 1, index)
    v_c = torch.gather(v[kv_head], 1, index)
    pos = torch.where(torch.arange(positions.shape[1], device=k.device)[None, :] < counts[:, None].long(),
                      positions.long(), n_keys + 1)
    hi = torch.searchsorted(pos, (rows.to(k.device) + 1)[None, :].expand(heads, -1).contiguous()).T
    if sliding_window:
        first = torch.clamp(rows.to(k.device) + 1 - sliding_window, min=0)
        lo = torch.searchsorted(pos, first[None, :].expand(heads, -1).contiguous()).T
    else:
        lo = torch.zeros_like(hi)
    count = (hi + tile - 1) // tile
    return k_c, v_c, DecodeLayout(None, count.to(torch.int32).contiguous(), lo.to(torch.int32).contiguous(),
                                  hi.to(torch.int32).contiguous(), page_size=tile, dense=True)
