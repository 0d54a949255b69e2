"""Sparse decode attention in Triton: split-K over selected pages with a log-sum-exp merge.

One program handles one (split, mask head, decode step): the query heads that share the mask head's pages
(a whole GQA group when pages are shared) are packed into the rows of one tile, so each selected page is
read once for the group. The last split of a (mask head, step) to finish merges the splits' partial outputs
(a ticket counter) when they are few; many splits are merged by a second kernel, in parallel. A "dense"
layout reads tiles ``0 .. count-1`` of a compacted cache (eviction: SnapKV-style kept keys) without an index.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import DecodeLayout
from .prefill import INTERPRET, _accumulate, _scores, _softmax_step, _unit


@triton.jit
def _decode_split_kernel(
    Q, K, V, O, LSE, OP, LP, CNT, TICKET, PAGES, COUNT, LO, HI,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_pb, stride_ph, n_mask_heads, heads_per_mask, kv_div, tiles_per_split, n_splits, n_slots, sm_scale,
    softcap, PAGE: tl.constexpr, PAGES_PER_TILE: tl.constexpr, QP: tl.constexpr, HEAD_DIM: tl.constexpr,
    DENSE: tl.constexpr, SOFTCAP: tl.constexpr, COUNTING: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT: tl.constexpr, FUSED: tl.constexpr, HP: tl.constexpr, SPLITS: tl.constexpr,
):
    split = tl.program_id(0)
    mh = tl.program_id(1)
    b = tl.program_id(2)
    BLOCK_N: tl.constexpr = PAGE * PAGES_PER_TILE
    offs_g = tl.arange(0, QP)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < heads_per_mask
    qh = mh * heads_per_mask + offs_g
    kvh = (mh * heads_per_mask) // kv_div
    b64 = b.to(tl.int64)  # whole sequences and heads in int64: a batch's cache passes 2**31 elements
    q = tl.load(Q + b64 * stride_qb + qh[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None], other=0.0)

    bh = b * n_mask_heads + mh
    n_pages = tl.load(COUNT + bh)
    lo = tl.load(LO + bh)
    hi = tl.load(HI + bh)
    first = 0
    if DENSE:
        first = lo // BLOCK_N
    p0 = first + split * tiles_per_split * PAGES_PER_TILE
    p1 = tl.minimum(p0 + tiles_per_split * PAGES_PER_TILE, n_pages)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + offs_d[None, :]
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + offs_d[None, :]

    m_i = tl.full([QP], float("-inf"), tl.float32)
    l_i = tl.zeros([QP], tl.float32)
    acc = tl.zeros([QP, HEAD_DIM], tl.float32)
    cnt = tl.zeros([QP], tl.int32)
    unit = _unit(sm_scale, SOFTCAP)
    t_end = p1
    if not DENSE:  # a trip count known before the page count is: the first page indices load beside it
        t_end = p0 + tiles_per_split * PAGES_PER_TILE
        page_ptr = PAGES + b * stride_pb + mh * stride_ph
        page_next = tl.load(page_ptr + p0 + offs_n // PAGE, mask=p0 + offs_n // PAGE < n_slots, other=0)
    for t in range(p0, t_end, PAGES_PER_TILE):
        slot = t + offs_n // PAGE
        slot_ok = slot < p1
        if DENSE:
            page = slot
        else:  # the next tile's page indices load while this tile is computed
            page = page_next
            ahead = slot + PAGES_PER_TILE
            page_next = tl.load(page_ptr + ahead, mask=(ahead < n_slots) & (ahead < t_end), other=0)
        key = page * PAGE + offs_n % PAGE
        key_ok = slot_ok & (key >= lo) & (key < hi)
        k = tl.load(k_base + key[:, None] * stride_kn, mask=key_ok[:, None], other=0.0)
        s = _scores(q, k, sm_scale, softcap, SOFTCAP, UPCAST)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        p, m_i, l_i, acc = _softmax_step(s, unit, m_i, l_i, acc, True)
        v = tl.load(v_base + key[:, None] * stride_vn, mask=key_ok[:, None], other=0.0)
        acc = _accumulate(acc, p, v, UPCAST)
        if COUNTING:
            cnt += tl.sum(key_ok.to(tl.int32), 0)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    out_row = b * n_mask_heads * heads_per_mask + qh
    part = out_row * n_splits + split
    if COUNTING:
        tl.store(CNT + part, cnt, mask=g_ok)
    if not SPLIT:  # one split: this program's result is the output
        tl.store(O + out_row[:, None] * HEAD_DIM + offs_d[None, :], (acc / l_safe[:, None]).to(O.dtype.element_ty),
                 mask=g_ok[:, None])
        tl.store(LSE + out_row, lse, mask=g_ok)
    else:
        tl.store(OP + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=g_ok[:, None])
        tl.store(LP + part, lse, mask=g_ok)
        if FUSED:  # the last split of this (step, mask head) to finish merges all of them
            tl.debug_barrier()  # every thread's partial is stored before the ticket (acq_rel, GPU scope) is taken
            if tl.atomic_add(TICKET + bh, 1) == n_splits - 1:
                _merge_rows(OP, LP, O, LSE, bh * heads_per_mask, heads_per_mask, n_splits, HP, SPLITS, HEAD_DIM)
                tl.store(TICKET + bh, 0)  # ready for the next call


@triton.jit
def _merge_rows(OP, LP, O, LSE, row0, n_rows, n_splits, HP: tl.constexpr, SPLITS: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """Merge the splits' partial outputs of query heads ``row0 .. row0+n_rows-1`` by their log-sum-exp (all
    splits loaded at once)."""
    rows = row0 + tl.arange(0, HP)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (tl.arange(0, HP) < n_rows)[:, None] & (offs_s < n_splits)[None, :]
    part = rows[:, None] * n_splits + offs_s[None, :]
    lse = tl.load(LP + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
    o = tl.load(OP + part[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=ok[:, :, None], other=0.0,
                cache_modifier=".cg")
    m = tl.max(lse, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe[:, None])
    total = tl.sum(w, 1)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(o * w[:, :, None], 1) / total_safe[:, None]
    row_ok = tl.arange(0, HP) < n_rows
    tl.store(O + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + rows, tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total_safe)), mask=row_ok)


@triton.jit
def _merge_kernel(OP, LP, O, LSE, n_splits, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Merge the splits' partial outputs of one (step, query head) by their log-sum-exp."""
    i = tl.program_id(0)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < n_splits
    lse = tl.load(LP + i * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    o = tl.load(OP + (i * n_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(o * w[:, None], 0) / total_safe
    tl.store(O + i * HEAD_DIM + offs_d, out.to(O.dtype.element_ty))
    tl.store(LSE + i, tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total_safe)))


@functools.lru_cache(maxsize=1024)
def _pick_splits(n_programs: int, n_tiles: int, n_sms: int, occupancy: int) -> int:
    """Splits per (step, mask head) that finish soonest when ``occupancy`` programs run at once on each SM:
    the fewest waves of programs times the tiles each reads, plus about one tile of fixed cost a program
    (ties: fewer splits, less to merge)."""
    slots = occupancy * n_sms
    best, best_cost = 1, None
    for splits in range(1, n_tiles + 1):
        per = -(-n_tiles // splits)
        if -(-n_tiles // per) != splits:  # the same tiles per program as a smaller split count
            continue
        cost = -(-n_programs * splits // slots) * (per + 1)
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best


@functools.cache
def _tickets(device: torch.device, n: int) -> Tensor:
    """Zeroed counters, one per (step, mask head), for the fused merge; each call leaves them zero again.
    Kept for good (a captured CUDA graph may hold them), so calls on one device must not overlap on two streams."""
    return torch.zeros(n, dtype=torch.int32, device=device)


def sparse_decode(q: Tensor, k: Tensor, v: Tensor, layout: DecodeLayout, scale: float,
                  softcap: float | None = None, count: bool = False, splits: int | None = None,
                  pages_per_tile: int | None = None, num_warps: int = 4, num_stages: int = 2,
                  occupancy: int = 4, fuse_splits: int = 16, q_rows: int = 16) -> tuple[Tensor, Tensor, Tensor | None]:
    """Decode attention of q [B, Hq, d] over k/v [B, Hk, T, d] (a batch stride of 0 shares one cache).

    Returns (output [B, Hq, d] in q's dtype, log-sum-exp [B, Hq] float32, keys read per query head [B, Hq]).
    Up to ``fuse_splits`` splits, the last split of each (step, mask head) to finish merges the partials (one
    launch instead of two); more are merged by a second kernel. A program's query tile has at least ``q_rows``
    rows (the GQA group's heads, padded).
    """
    batch, n_heads, head_dim = q.shape
    n_mask = layout.heads
    if n_heads % n_mask or n_heads % k.shape[1]:
        raise ValueError(f"{n_heads} query heads do not split over {k.shape[1]} KV heads / {n_mask} mask heads")
    heads_per_mask = n_heads // n_mask
    kv_div = n_heads // k.shape[1]
    page = layout.page_size
    ppt = pages_per_tile or max(1, 64 // page)
    n_tiles = -(-(layout.pages.shape[-1] if layout.pages is not None else int(layout.count.max())) // ppt)
    n_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    n_splits = splits or _pick_splits(batch * n_mask, max(n_tiles, 1), n_sms, occupancy)
    tiles_per_split = max(1, -(-n_tiles // n_splits))
    n_splits = max(1, -(-n_tiles // tiles_per_split))
    device = q.device
    out = torch.empty(batch, n_heads, head_dim, dtype=q.dtype, device=device)
    lse = torch.empty(batch, n_heads, dtype=torch.float32, device=device)
    if n_splits > 1:
        o_part = torch.empty(batch, n_heads, n_splits, head_dim, dtype=torch.float32, device=device)
        l_part = torch.empty(batch, n_heads, n_splits, dtype=torch.float32, device=device)
    else:
        o_part, l_part = out, lse
    cnt = torch.zeros(batch, n_heads, n_splits, dtype=torch.int32, device=device) if count else lse
    fused = 1 < n_splits <= fuse_splits
    tickets = _tickets(device, batch * n_mask) if fused else lse
    pages = layout.pages if layout.pages is not None else layout.count
    q = q if q.stride(-1) == 1 else q.contiguous()
    _decode_split_kernel[(n_splits, n_mask, batch)](
        q, k, v, out, lse, o_part, l_part, cnt, tickets, pages, layout.count, layout.lo, layout.hi,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        pages.stride(0) if layout.pages is not None else 0, pages.stride(1) if layout.pages is not None else 0,
        n_mask, heads_per_mask, kv_div, tiles_per_split, n_splits, pages.shape[-1], float(scale), float(softcap or 1.0),
        PAGE=page, PAGES_PER_TILE=ppt, QP=max(q_rows, triton.next_power_of_2(heads_per_mask)), HEAD_DIM=head_dim,
        DENSE=layout.dense, SOFTCAP=bool(softcap), COUNTING=count, UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        SPLIT=n_splits > 1, FUSED=fused, HP=triton.next_power_of_2(heads_per_mask),
        SPLITS=triton.next_power_of_2(n_splits) if fused else 1, num_warps=num_warps, num_stages=num_stages,
    )
    if n_splits > 1 and not fused:
        _merge_kernel[(batch * n_heads,)](o_part, l_part, out, lse, n_splits,
                                          SPLITS=triton.next_power_of_2(n_splits), HEAD_DIM=head_dim, num_warps=4)
    return out, lse, (cnt.sum(-1) if count else None)
