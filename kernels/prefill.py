"""Sparse prefill attention in Triton: block-sparse and vertical-slash layouts, one kernel.

One program computes one (query head, query block), or a part of its rows (``M_SPLIT``): it walks the
layout's full key tiles (no mask), then its partial tiles (causal, sequence end, sliding window), then its
gathered columns, with an online softmax in float32 (bf16/fp16 inputs). K/V are read at
``query head // group``: GQA without repeating them. Programs are launched KV head by KV head, so the
programs running at once share their keys and values in L2, and heaviest query block first within each, so
the long causal rows do not trail at the end.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import PrefillLayout

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _scores(q, k, sm_scale, softcap, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    """Logits of a query tile against a key tile (keys as rows), in log2 units once multiplied by ``_unit``: the
    plain product (the scale goes into the exponent's fused multiply-add), or soft-capped in log2 units."""
    if UPCAST:  # the CPU interpreter multiplies bf16 wrongly; emulate in float32
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        s = tl.dot(q, tl.trans(k))
    if SOFTCAP:
        x = s * (sm_scale / softcap)
        s = (2.0 * tl.sigmoid(2.0 * x) - 1.0) * (softcap * 1.4426950408889634)
    return s


@triton.jit
def _unit(sm_scale, SOFTCAP: tl.constexpr):
    """Factor from ``_scores``' logits to log2 units."""
    if SOFTCAP:
        return 1.0
    return sm_scale * 1.4426950408889634


@triton.jit
def _accumulate(acc, p, v, UPCAST: tl.constexpr):
    """acc += p @ v with p rounded to v's dtype."""
    if UPCAST:
        return tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
    return tl.dot(p.to(v.dtype), v, acc)


@triton.jit
def _softmax_step(s, c, m_i, l_i, acc, MASKED: tl.constexpr):
    """Online softmax over a tile of logits ``s`` (log2 units / ``c``): the tile's probabilities p, and m_i, l_i,
    acc moved to the new running max with p's sum added to l_i (p @ v is still to add to acc). MASKED: rows may
    see no key yet (-inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * c)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new) if MASKED else m_new
    p = tl.math.exp2(s * c - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def _masked_step(q, k, v_ptrs, v_desc, v_row, key, key_ok, pos_m, m_i, l_i, acc, cnt, sm_scale, softcap, window,
                 SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
                 COUNT: tl.constexpr):
    """One online-softmax step over a key tile that needs masking (keys may be invalid or not visible)."""
    s = _scores(q, k, sm_scale, softcap, SOFTCAP, UPCAST)
    ok = key_ok[None, :] & (key[None, :] <= pos_m[:, None])
    if WINDOW:
        ok = ok & (key[None, :] > pos_m[:, None] - window)
    s = tl.where(ok, s, float("-inf"))
    p, m_i, l_i, acc = _softmax_step(s, _unit(sm_scale, SOFTCAP), m_i, l_i, acc, True)
    if TMA:  # a tile past the end reads rows beyond the keys (any bits, even NaN) or zeros: clear them
        v = tl.where(key_ok[:, None], v_desc.load([v_row, 0]), 0.0)
    else:
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    acc = _accumulate(acc, p, v, UPCAST)
    if COUNT:
        cnt += tl.sum(ok.to(tl.int32), 1)
    return m_i, l_i, acc, cnt


@triton.jit
def _unmasked_step(q, k, v_ptrs, m_i, l_i, acc, sm_scale, softcap, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over gathered keys that every row sees."""
    s = _scores(q, k, sm_scale, softcap, SOFTCAP, UPCAST)
    p, m_i, l_i, acc = _softmax_step(s, _unit(sm_scale, SOFTCAP), m_i, l_i, acc, False)
    return m_i, l_i, _accumulate(acc, p, tl.load(v_ptrs), UPCAST)


@triton.jit
def _sparse_prefill_kernel(
    Q, K, V, K_DESC, V_DESC, O, LSE, CNT, SCHED,
    FULL_N, FULL_I, PART_N, PART_I, PART_E, COL_N, COL_I, COL_S,
    stride_qh, stride_qm, stride_kh, stride_kn, stride_vh, stride_vn, stride_oh, stride_om,
    n_rows, n_keys, qblock0, n_local_qblocks, n_layout_qblocks, max_full, max_part, max_col,
    heads_per_mask, group, kv_rows, sm_scale, softcap, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, SUB: tl.constexpr,
    INDEX_SCALE: tl.constexpr, HAS_END: tl.constexpr, HAS_COLS: tl.constexpr, SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr, COUNT: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, BLOCK_C: tl.constexpr,
    COL_SPLIT: tl.constexpr, M_SPLIT: tl.constexpr,
):
    # one program: BLOCK_M rows, 1 / M_SPLIT of a layout query block
    item = tl.load(SCHED + tl.program_id(0))
    h = item // n_local_qblocks
    mb = item % n_local_qblocks
    qb = qblock0 + mb // M_SPLIT
    row = (h // heads_per_mask) * n_layout_qblocks + qb
    kvh = h // group

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_m = qblock0 * BLOCK_M * M_SPLIT + offs_m
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < n_rows
    # offsets of whole heads and rows in int64: a long prompt or a large cache passes 2**31 elements
    q_rows = h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm
    # q is read once and o written once: leave L2 to the keys and values the other programs of this KV head read
    q = tl.load(Q + q_rows + offs_d[None, :], mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
    k_base = K + kvh.to(tl.int64) * stride_kh + offs_d[None, :]
    v_base = V + kvh.to(tl.int64) * stride_vh + offs_d[None, :]
    desc_row = kvh * kv_rows  # first row of this KV head in the [heads * kv_rows, d] descriptors

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    cnt = tl.zeros([BLOCK_M], tl.int32)
    unit = _unit(sm_scale, SOFTCAP)

    # every loop's tile count at once, so no loop waits for its count behind the loop before it
    n_full = tl.load(FULL_N + row)
    n_part = tl.load(PART_N + row)
    if HAS_COLS:
        n_col = tl.load(COL_N + row)
        n_col_seen = tl.load(COL_S + row)

    # full tiles: every key visible to every row of the block
    for j in range(0, n_full * SUB):
        start = tl.load(FULL_I + row * max_full + j // SUB) * INDEX_SCALE + (j % SUB) * BLOCK_N
        key = start + offs_n
        if TMA:
            k = K_DESC.load([desc_row + start, 0])
        else:
            k = tl.load(k_base + key[:, None] * stride_kn)
        s = _scores(q, k, sm_scale, softcap, SOFTCAP, UPCAST)
        p, m_i, l_i, acc = _softmax_step(s, unit, m_i, l_i, acc, False)
        if TMA:
            v = V_DESC.load([desc_row + start, 0])
        else:
            v = tl.load(v_base + key[:, None] * stride_vn)
        acc = _accumulate(acc, p, v, UPCAST)
        if COUNT:
            cnt += BLOCK_N

    # partial tiles: causal diagonal, sequence end, sliding window
    n_sub = n_part * SUB
    if M_SPLIT > 1:  # skip the last tile's key sub-tiles that start after this program's last row
        last_row = qblock0 * BLOCK_M * M_SPLIT + mb * BLOCK_M + BLOCK_M - 1
        last_start = tl.load(PART_I + row * max_part + tl.maximum(n_part - 1, 0)) * INDEX_SCALE
        seen = tl.where(last_row >= last_start, tl.minimum((last_row - last_start) // BLOCK_N + 1, SUB), 0)
        n_sub = tl.where(n_part > 0, (n_part - 1) * SUB + seen, 0)
    for j in range(0, n_sub):
        slot = row * max_part + j // SUB
        start = tl.load(PART_I + slot) * INDEX_SCALE + (j % SUB) * BLOCK_N
        if HAS_END:
            end = tl.minimum(tl.load(PART_E + slot), n_keys)
        else:
            end = tl.minimum(start + BLOCK_N, n_keys)
        key = start + offs_n
        key_ok = key < end
        if TMA:
            k = K_DESC.load([desc_row + start, 0])
        else:
            k = tl.load(k_base + key[:, None] * stride_kn, mask=key_ok[:, None], other=0.0)
        m_i, l_i, acc, cnt = _masked_step(q, k, v_base + key[:, None] * stride_vn, V_DESC, desc_row + start, key,
                                          key_ok, pos_m, m_i, l_i, acc, cnt, sm_scale, softcap, window,
                                          SOFTCAP, WINDOW, UPCAST, TMA, COUNT)

    # gathered columns (vertical-slash verticals not covered by a slash range), BLOCK_C at a time: first the
    # whole tiles of those every row sees (no mask), then the rest
    if HAS_COLS:
        offs_c = tl.arange(0, BLOCK_C)
        n_seen = 0
        if COL_SPLIT:
            n_seen = n_col_seen // BLOCK_C * BLOCK_C
            for j in range(0, n_seen, BLOCK_C):
                key = tl.load(COL_I + row * max_col + j + offs_c)
                k = tl.load(k_base + key[:, None] * stride_kn)
                m_i, l_i, acc = _unmasked_step(q, k, v_base + key[:, None] * stride_vn, m_i, l_i, acc, sm_scale,
                                               softcap, SOFTCAP, UPCAST)
                if COUNT:
                    cnt += BLOCK_C
        for j in range(n_seen, n_col, BLOCK_C):
            col_ok = j + offs_c < n_col
            key = tl.load(COL_I + row * max_col + j + offs_c, mask=col_ok, other=0)
            k = tl.load(k_base + key[:, None] * stride_kn, mask=col_ok[:, None], other=0.0)
            m_i, l_i, acc, cnt = _masked_step(q, k, v_base + key[:, None] * stride_vn, V_DESC, 0, key, col_ok,
                                              pos_m, m_i, l_i, acc, cnt, sm_scale, softcap, window, SOFTCAP, WINDOW,
                                              UPCAST, False, COUNT)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * (1.0 / l_safe)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_rows = h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
    tl.store(O + o_rows + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None], cache_modifier=".cs")
    tl.store(LSE + h * n_rows + offs_m, lse, mask=row_ok)
    if COUNT:
        tl.store(CNT + h * n_rows + offs_m, cnt, mask=row_ok)


def _config(block_q: int, tile: int, head_dim: int, gathered: bool, hopper: bool = True) -> dict:
    """Tile widths along keys (``BLOCK_N`` for key ranges, ``BLOCK_C`` for gathered columns) and launch
    settings, tuned on an H200 (benchmarks/RESULTS.md). ``TMA`` None: K/V tiles through TMA descriptors on
    Hopper and newer GPUs, plain loads elsewhere; False: plain loads (faster for the pipelined 128-row
    vertical-slash programs). ``COL_SPLIT``: gathered columns every row sees run unmasked (faster in every
    vertical-slash case measured). ``M_SPLIT``: programs per query block, each of ``block_q / M_SPLIT`` rows.
    ``gathered``: a vertical-slash layout (key tiles at any start). ``hopper``: cap registers a thread
    (``maxnreg``) as tuned on the H200; other GPUs compile with the compiler's own choice."""
    if block_q >= 128 and not gathered:  # 64-key sub-tiles, 4 warps: two programs fit on an SM
        return {"BLOCK_N": min(tile, 64), "num_warps": 4, "num_stages": 2, "TMA": None, "BLOCK_C": 64,
                "COL_SPLIT": False, "M_SPLIT": 1}
    if block_q >= 128 and tile <= 64:  # two warp groups of 64 rows, at most 128 registers: two programs an SM
        return {"BLOCK_N": tile, "num_warps": 8, "num_stages": 2, "TMA": False, "BLOCK_C": 64, "COL_SPLIT": True,
                "M_SPLIT": 1, **({"maxnreg": 128} if hopper else {})}
    if block_q >= 128:
        return {"BLOCK_N": min(tile, 128), "num_warps": 8, "num_stages": 2, "TMA": False, "BLOCK_C": 64,
                "COL_SPLIT": True, "M_SPLIT": 1}
    # 64-row vertical-slash programs: unpipelined loads and at most 168 registers let three run on an SM, not two
    small = {"num_stages": 1, **({"maxnreg": 168} if hopper else {})} if gathered else {"num_stages": 2}
    return {"BLOCK_N": min(tile, 64), "num_warps": 4, "TMA": None, "BLOCK_C": 64, "COL_SPLIT": True, "M_SPLIT": 1,
            **small}


def _has_tma(device: torch.device) -> bool:
    """TMA descriptors exist on compute capability 9.0 and newer (not in the CPU interpreter by default)."""
    return device.type == "cuda" and not INTERPRET and torch.cuda.get_device_capability(device)[0] >= 9


def _is_hopper(device: torch.device) -> bool:
    """Compute capability 9.x (H100, H200), where the launch settings were tuned."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _rows_descriptor(x: Tensor, rows_per_head: int, block_n: int):
    """A TMA descriptor over k or v [H, T, d] seen as rows [H * rows_per_head, d] (tiles of block_n rows)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows = (x.shape[0] - 1) * rows_per_head + x.shape[1]
    return TensorDescriptor(x, shape=[rows, x.shape[2]], strides=[x.stride(1), 1], block_shape=[block_n, x.shape[2]])


def schedule(layout: PrefillLayout, n_heads: int, qblock0: int, n_qblocks: int, group: int,
             m_split: int = 1) -> Tensor:
    """Program order: (query head, local query block, part of the block) items, KV head by KV head (``group``
    query heads each) and heaviest first within each (stable: head-major on ties). The programs running at once
    then read one KV head's keys and values, which stay in L2, and the long causal rows do not trail at the end."""
    heads_per_mask = n_heads // layout.heads
    weight = layout.weight()[:, qblock0:qblock0 + n_qblocks].repeat_interleave(heads_per_mask, dim=0)
    weight = weight.repeat_interleave(m_split, dim=1).long()
    kv = torch.arange(n_heads, device=weight.device) // group
    weight = weight - (kv * (int(weight.max()) + 1))[:, None]
    return torch.argsort(weight.flatten(), descending=True, stable=True).to(torch.int32)


def sparse_prefill(q: Tensor, k: Tensor, v: Tensor, layout: PrefillLayout, scale: float, q_start: int = 0,
                   softcap: float | None = None, sliding_window: int | None = None, count: bool = False,
                   config: dict | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run a prefill layout: q [Hq, R, d] holds queries at positions ``q_start .. q_start+R-1``.

    ``q_start`` must be a multiple of the layout's query block. k/v [Hkv, T, d]. Returns (output [Hq, R, d]
    in q's dtype, log-sum-exp [Hq, R] float32, computed cells per row [Hq, R] int32 when ``count``).
    """
    n_heads, n_rows, head_dim = q.shape
    n_kv, n_keys = k.shape[0], k.shape[1]
    if q_start % layout.block_q:
        raise ValueError(f"query start {q_start} is not a multiple of the query block {layout.block_q}")
    if n_keys != layout.n_keys:
        raise ValueError(f"layout built for {layout.n_keys} keys, got {n_keys}")
    if n_heads % n_kv or n_heads % layout.heads:
        raise ValueError(f"{n_heads} query heads do not split over {n_kv} KV heads / {layout.heads} mask heads")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {head_dim} is not supported (16, 32, 64, 128 or 256)")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cfg = {**_config(layout.block_q, layout.tile, head_dim, layout.index_scale == 1, _is_hopper(q.device)),
           **(config or {})}
    block_n = min(cfg.pop("BLOCK_N"), layout.tile)
    sub = layout.tile // block_n if layout.index_scale > 1 else 1
    if layout.index_scale == 1:
        block_n = layout.tile
    tma = cfg.pop("TMA")
    tma = _has_tma(q.device) if tma is None else tma
    k_desc = v_desc = None
    kv_rows = 0
    if tma:  # descriptors see k/v as rows [heads * kv_rows, d]: same row strides, whole rows
        if k.stride(1) != head_dim or v.stride(1) != head_dim or k.stride(0) != v.stride(0) \
                or k.stride(0) % head_dim:
            k, v = k.contiguous(), v.contiguous()
        kv_rows = k.stride(0) // head_dim
        k_desc, v_desc = (_rows_descriptor(x, kv_rows, block_n) for x in (k, v))
    qblock0 = q_start // layout.block_q
    n_local = -(-n_rows // layout.block_q)
    device = q.device
    out = torch.empty_like(q)
    lse = torch.empty(n_heads, n_rows, dtype=torch.float32, device=device)
    cnt = torch.zeros(n_heads, n_rows, dtype=torch.int32, device=device) if count else lse
    m_split = cfg.pop("M_SPLIT")
    key = (n_heads, n_kv, qblock0, n_local, m_split, str(device))
    if key not in layout.schedules:
        layout.schedules[key] = schedule(layout, n_heads, qblock0, n_local, n_heads // n_kv, m_split).to(device)
    order = layout.schedules[key]
    has_cols = layout.col_count is not None
    part_end = layout.part_end if layout.part_end is not None else layout.part_index
    col_count = layout.col_count if has_cols else layout.full_count
    col_index = layout.col_index if has_cols else layout.full_index
    col_seen = layout.col_seen if has_cols and layout.col_seen is not None else col_count
    col_split = bool(cfg.pop("COL_SPLIT")) and has_cols and layout.col_seen is not None
    _sparse_prefill_kernel[(len(order),)](
        q, k, v, k_desc, v_desc, out, lse, cnt, order,
        layout.full_count, layout.full_index, layout.part_count, layout.part_index, part_end, col_count, col_index,
        col_seen,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        n_rows, n_keys, qblock0, n_local * m_split, layout.n_qblocks, layout.full_index.shape[-1],
        layout.part_index.shape[-1], col_index.shape[-1],
        n_heads // layout.heads, n_heads // n_kv, kv_rows, float(scale), float(softcap or 1.0),
        int(sliding_window or 0),
        BLOCK_M=layout.block_q // m_split, BLOCK_N=block_n, HEAD_DIM=head_dim, SUB=sub, INDEX_SCALE=layout.index_scale,
        HAS_END=layout.part_end is not None, HAS_COLS=has_cols, SOFTCAP=bool(softcap), WINDOW=bool(sliding_window),
        COUNT=count, UPCAST=INTERPRET and q.dtype == torch.bfloat16, TMA=tma, COL_SPLIT=col_split, M_SPLIT=m_split,
        **cfg,
    )
    return out, lse, (cnt if count else None)
