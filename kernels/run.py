"""One entry point: run a Selection through the kernel its ``kernel`` name asks for.

On CUDA (or under ``TRITON_INTERPRET=1``) the Triton kernels run; elsewhere, and for Selections no kernel runs
as they stand (e.g. 16-token blocks), the torch reference over the Selection's dense mask is the fallback. Both
return the same :class:`KernelRun`, which names the backend that ran.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_frontier.policies.selection import (
    BlockMask,
    Dense,
    KeptKeys,
    PageSet,
    Selection,
    TokenSet,
    VerticalSlash,
    expand_heads,
)

from .layout import (
    DecodeLayout,
    PrefillLayout,
    UnsupportedSelection,
    block_sparse_layout,
    cdiv,
    compact_kept,
    page_layout,
    vertical_slash_layout,
)
from .reference import masked_attention, visible

PREFILL_KERNELS = ("dense", "block_sparse", "vertical_slash")
DECODE_KERNELS = ("sparse_decode", "token_gather", "dense_decode_compacted")
DENSE_BLOCK = 128


@dataclass
class KernelRun:
    """A kernel's output [Hq, R, d], log-sum-exp [Hq, R] (float32) and, when counted, the cells it computed
    per query row [Hq, R]."""

    out: Tensor
    lse: Tensor
    cells: Tensor | None
    backend: str


def triton_available(device: torch.device) -> bool:
    """True when the Triton kernels can run for tensors on ``device`` (CUDA, or the CPU interpreter)."""
    if device.type == "cuda":
        return True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Prepared:
    """A Selection turned into what its kernel reads: a prefill layout, or a decode layout (and, for
    eviction, the compacted kept cache). Built once; launched for any q/k/v of the shape it was built for."""

    kind: str
    rows: Tensor
    prefill: PrefillLayout | None = None
    decode: DecodeLayout | None = None
    compacted: tuple[Tensor, Tensor] | None = None


def prepare(selection: Selection, rows: Tensor, k: Tensor, v: Tensor,
            sliding_window: int | None = None) -> Prepared:
    """Convert ``selection`` for the query positions ``rows`` over keys k/v [Hkv, T, d] (on their device)."""
    device, n_keys = k.device, k.shape[1]
    rows = rows.to(device).long()
    selection = _on(selection, device)  # policies may build a Selection, or parts of it, on another device
    if selection.kernel in PREFILL_KERNELS:
        if isinstance(selection, Dense):
            nb = cdiv(n_keys, DENSE_BLOCK)
            selection = BlockMask(torch.ones(selection.heads, nb, nb, dtype=torch.bool, device=device),
                                  DENSE_BLOCK, DENSE_BLOCK)
        if isinstance(selection, BlockMask):
            layout = block_sparse_layout(selection, n_keys, sliding_window)
        elif isinstance(selection, VerticalSlash):
            layout = vertical_slash_layout(selection, n_keys, sliding_window=sliding_window)
        else:
            raise ValueError(f"{type(selection).__name__} is not a prefill selection")
        return Prepared("prefill", rows, prefill=layout.to(device))
    if selection.kernel in DECODE_KERNELS:
        if isinstance(selection, (PageSet, TokenSet)):
            return Prepared("decode", rows, decode=page_layout(selection, rows, n_keys, sliding_window).to(device))
        if isinstance(selection, KeptKeys):
            k_c, v_c, layout = compact_kept(selection, k, v, rows, sliding_window=sliding_window)
            return Prepared("decode", rows, decode=layout, compacted=(k_c, v_c))
        raise ValueError(f"{type(selection).__name__} is not a decode selection")
    raise UnsupportedSelection(f"no kernel runs selections of kind {selection.kernel!r}")


def launch(prepared: Prepared, q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float | None = None,
           sliding_window: int | None = None, count: bool = False) -> KernelRun:
    """Run the Triton kernel of a prepared Selection on q [Hq, R, d] at ``prepared.rows``."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"Triton kernels take float16 or bfloat16 inputs, not {q.dtype}")
    k, v = k.to(q.dtype), v.to(q.dtype)
    if prepared.kind == "prefill":
        return _prefill_launch(prepared.prefill, q, k, v, prepared.rows, scale, softcap, sliding_window, count)
    from .decode import sparse_decode

    if prepared.compacted is not None:
        k, v = (x.to(q.dtype) for x in prepared.compacted)
    steps = len(prepared.rows)
    out, lse, cells = sparse_decode(q.transpose(0, 1), k[None].expand(steps, -1, -1, -1),
                                    v[None].expand(steps, -1, -1, -1), prepared.decode, scale, softcap=softcap,
                                    count=count)
    return KernelRun(out.transpose(0, 1), lse.T, cells.T if cells is not None else None, "triton")


def run_selection(selection: Selection, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, scale: float,
                  softcap: float | None = None, sliding_window: int | None = None, backend: str = "auto",
                  count: bool = False) -> KernelRun:
    """Attention of q [Hq, R, d] at positions ``rows`` over k/v [Hkv, T, d], computing the cells of ``selection``.

    ``backend``: "triton", "torch" (reference over the dense mask) or "auto" (Triton where it can run: on its
    devices, for float16 / bfloat16 inputs and Selections a kernel runs as they stand; the reference otherwise).
    ``count`` also returns the cells computed per row, counted by the kernel itself.
    """
    rows = rows.to(q.device).long()
    if len(rows) != q.shape[1]:
        raise ValueError(f"{len(rows)} rows for {q.shape[1]} queries")
    if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("rows must be strictly ascending")
    if len(rows) and int(rows[-1]) >= k.shape[1]:
        raise ValueError(f"query position {int(rows[-1])} has no key (only {k.shape[1]} keys)")
    if backend == "auto":
        if triton_available(q.device) and q.dtype in (torch.float16, torch.bfloat16):
            try:
                prepared = prepare(selection, rows, k, v, sliding_window)
            except UnsupportedSelection:
                prepared = None
            if prepared is not None:
                return launch(prepared, q, k, v, scale, softcap, sliding_window, count)
        backend = "torch"
    if backend == "torch":
        return _torch_run(selection, q, k, v, rows, scale, softcap, sliding_window, count)
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}: choose triton, torch or auto")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"Triton kernels take float16 or bfloat16 inputs, not {q.dtype}")
    return launch(prepare(selection, rows, k, v, sliding_window), q, k, v, scale, softcap, sliding_window, count)


def _torch_run(selection: Selection, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, scale: float,
               softcap: float | None, sliding_window: int | None, count: bool) -> KernelRun:
    """The fallback: masked dense attention over the Selection's mask (the Selection moved to q's device)."""
    mask = _on(selection, q.device).mask(rows, k.shape[1])
    out, lse = masked_attention(q, k, v, rows, scale, mask, softcap, sliding_window)
    cells = None
    if count:
        full = expand_heads(mask, q.shape[0]) & visible(rows, k.shape[1], sliding_window)[None]
        cells = full.sum(-1).to(torch.int32)
    return KernelRun(out.to(q.dtype), lse, cells, "torch")


def _prefill_launch(layout: PrefillLayout, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, scale: float,
                    softcap: float | None, sliding_window: int | None, count: bool) -> KernelRun:
    """The prefill kernel over the block-aligned span of positions holding ``rows`` (others padded)."""
    from .prefill import sparse_prefill

    q_start = int(rows[0]) // layout.block_q * layout.block_q if len(rows) else 0
    span = int(rows[-1]) + 1 - q_start if len(rows) else 0
    local = rows - q_start
    contiguous = span == len(rows) and (not len(rows) or q_start == int(rows[0]))
    q_span = q if contiguous else q.new_zeros(q.shape[0], span, q.shape[2]).index_copy_(1, local, q)
    out, lse, cells = sparse_prefill(q_span, k, v, layout, scale, q_start=q_start, softcap=softcap,
                                     sliding_window=sliding_window, count=count)
    if not contiguous:
        out, lse = out[:, local], lse[:, local]
        cells = cells[:, local] if cells is not None else None
    return KernelRun(out, lse, cells, "triton")


def _on(selection: Selection, device: torch.device) -> Selection:
    """The Selection with its tensors on ``device``."""
    if isinstance(selection, BlockMask):
        return BlockMask(selection.blocks.to(device), selection.block_q, selection.block_k)
    if isinstance(selection, VerticalSlash):
        return VerticalSlash([c.to(device) for c in selection.columns], [o.to(device) for o in selection.offsets],
                             selection.block)
    if isinstance(selection, KeptKeys):
        return KeptKeys(selection.kept.to(device))
    if isinstance(selection, PageSet):
        return PageSet(selection.rows.to(device), selection.pages.to(device), selection.page_size)
    if isinstance(selection, TokenSet):
        return TokenSet(selection.rows.to(device), selection.indices.to(device))
    return selection
