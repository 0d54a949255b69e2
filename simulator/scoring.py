"""Scoring Selections against the true attention of one layer's scored rows.

For each KV-head group the true probabilities of the scored rows are computed once; every entry
(policy x budget rule x sparsity) is scored on them in the same pass, without dense [heads, rows, keys]
masks where cheaper sums do:

* recall (the true mass a selection keeps) of a BlockMask / PageSet adds per-block / per-page sums;
  VerticalSlash selections, whose keys are the same for every row of a query block, are scored together:
  per query block one matrix product of the block's rows with every selection's key mask; KeptKeys is a
  matrix-vector product; TokenSet a scatter;
* oracles sort once per (group, granularity) and answer every budget (:class:`policies.oracle.Ranking`);
  the same-budget oracle of a policy keeps, per row (token, page) or query block (block), as many units
  as the policy's selection computes there;
* output error is exact on a subset of the scored rows (the error rows): with ``o_sparse = sum_sel p v /
  sum_sel p`` (the restricted softmax renormalised) against ``o_dense = sum p v``. Block and page
  selections add per-unit sums of p v; an oracle's outputs at every budget come from one cumulative sum
  along its ranking; other selections use their dense mask on the error rows.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor

from sparse_frontier.kernels.reference import first_visible
from sparse_frontier.policies.base import LayerView
from sparse_frontier.policies.oracle import (
    Granularity,
    OracleTopK,
    Ranking,
    causal_unit_cells,
    fraction_per_query_head,
    unit_mass,
)
from sparse_frontier.policies.selection import (
    BlockMask,
    Dense,
    KeptKeys,
    PageSet,
    Selection,
    TokenSet,
    VerticalSlash,
    as_float,
    causal,
)

from .attention import ProbsBuffer, Reused, true_attention, visible_cells


class SelectionError(ValueError):
    """A selection that cannot be scored on these rows (wrong heads, rows it was not built for)."""


@dataclass
class Rows:
    """The scored query rows of one phase of one layer."""

    positions: Tensor  # [R] ascending
    error_index: Tensor  # indices into ``positions`` of the rows output error is computed on
    n_keys: int  # keys in context (the prompt for prefill)
    prefill_len: int  # what the policy is told (the first proxy row for a decode proxy)
    proxy: bool = False

    @property
    def causal_cells(self) -> float:
        return float(torch.clamp(self.positions + 1, max=self.n_keys).sum())


@dataclass
class Entry:
    """One (policy, budget rule, sparsity) on one layer: its selection in, its per-head metrics out."""

    policy: object
    rule: str
    sparsity: float
    budget: object = None
    selection: Selection | None = None
    error: str = ""
    density: Tensor | None = None  # [Hq]
    recall: Tensor | None = None  # [Hq, R]
    output_error: Tensor | None = None  # [Hq, M]
    oracle: str = ""
    oracle_recall: Tensor | None = None  # [Hq, R]
    oracle_output_error: Tensor | None = None  # [Hq, M]
    cells: Tensor | None = field(default=None, repr=False)  # [Hq] kept causal cells over the scored rows

    @property
    def is_oracle(self) -> bool:
        return isinstance(self.policy, OracleTopK)


class Field:
    """Per-row values over keys ``data [F, R, T]`` (F heads, or 1 when shared) with cached unit sums."""

    def __init__(self, data: Tensor, rows: Tensor):
        self.data, self.rows = data, rows
        self._units: dict[int, Tensor] = {}

    def unit_sums(self, size: int) -> Tensor:
        """Sums over key units of ``size``: [F, R, ceil(T / size)] (size 0: the whole row, [F, R])."""
        if size not in self._units:
            self._units[size] = self.data.sum(-1) if size == 0 else unit_mass(self.data, size)
        return self._units[size]


class CausalCells(Field):
    """The Field of ones on every causal cell of ``rows`` over ``n_keys`` keys (the cells a selection computes),
    with its unit sums in closed form and its [1, R, T] data made only when asked for."""

    def __init__(self, rows: Tensor, n_keys: int):
        self.rows, self.n_keys = rows, n_keys
        self._units = {0: torch.clamp(rows + 1, max=n_keys).float()[None]}
        self._data: Tensor | None = None

    @property
    def data(self) -> Tensor:
        if self._data is None:
            self._data = as_float(causal(self.rows, self.n_keys))[None]
        return self._data

    def unit_sums(self, size: int) -> Tensor:
        if size not in self._units:
            self._units[size] = causal_unit_cells(self.rows, size, self.n_keys)[None]
        return self._units[size]


def group_part(sel: Selection, group: int, group_size: int, n_kv: int, device=None) -> Selection:
    """The part of ``sel`` serving KV group ``group`` (its query heads, or its one KV head), on ``device``."""
    if sel.heads == n_kv * group_size:
        heads = slice(group * group_size, (group + 1) * group_size)
    elif sel.heads == n_kv:
        heads = slice(group, group + 1)
    else:
        raise SelectionError(f"selection has {sel.heads} heads; expected {n_kv * group_size} query heads "
                             f"or {n_kv} KV heads")
    if isinstance(sel, Dense):
        return Dense(heads.stop - heads.start)
    if isinstance(sel, BlockMask):
        return replace(sel, blocks=sel.blocks[heads].to(device))
    if isinstance(sel, VerticalSlash):
        return replace(sel, columns=[c.to(device) for c in sel.columns[heads]],
                       offsets=[o.to(device) for o in sel.offsets[heads]])
    if isinstance(sel, TokenSet):
        return replace(sel, rows=sel.rows.to(device), indices=sel.indices[heads].to(device))
    if isinstance(sel, PageSet):
        return replace(sel, rows=sel.rows.to(device), pages=sel.pages[heads].to(device))
    if isinstance(sel, KeptKeys):
        return replace(sel, kept=sel.kept[heads].to(device))
    return _Sliced(sel, heads)


@dataclass
class _Sliced(Selection):
    """Some heads of a selection kind this module does not know (scored through its dense mask)."""

    whole: Selection
    part: slice
    kernel: ClassVar[str] = "unknown"

    @property
    def heads(self) -> int:
        return self.part.stop - self.part.start

    def mask(self, rows: Tensor, n_keys: int) -> Tensor:
        return self.whole.mask(rows, n_keys)[self.part].to(rows.device)


def _row_index(selection_rows: Tensor, rows: Tensor) -> Tensor:
    where = torch.searchsorted(selection_rows, rows).clamp(max=len(selection_rows) - 1)
    if len(selection_rows) == 0 or bool((selection_rows[where] != rows).any()):
        raise SelectionError("selection was not built for every scored row (use view.rows)")
    return where


def kept_units(sel: BlockMask | PageSet, rows: Tensor, n_keys: int) -> Tensor:
    """Kept key blocks / pages of each row [h, R, ceil(T / size)] (bool; causality not applied)."""
    if isinstance(sel, BlockMask):
        n_kblocks = -(-n_keys // sel.block_k)
        if sel.blocks.shape[-1] < n_kblocks:
            raise SelectionError(f"block mask covers {sel.blocks.shape[-1] * sel.block_k} keys, "
                                 f"fewer than the {n_keys} in context")
        return sel.blocks[:, rows // sel.block_q, :n_kblocks]
    pages = sel.pages[:, _row_index(sel.rows, rows)]
    n_pages = -(-n_keys // sel.page_size)
    kept = torch.zeros(*pages.shape[:2], n_pages + 1, dtype=torch.bool, device=pages.device)
    kept.scatter_(-1, torch.where((pages < 0) | (pages >= n_pages), n_pages, pages), True)
    return kept[..., :n_pages]


def unit_size(sel: BlockMask | PageSet) -> int:
    return sel.block_k if isinstance(sel, BlockMask) else sel.page_size


def selected_mass(sel: Selection, values: Field, n_keys: int) -> Tensor:
    """Sum of ``values`` over the cells ``sel`` computes, per head and row: [max(F, h), R].

    ``values`` is zero on cells the rows cannot see, so causality needs no mask here.
    """
    data, rows = values.data, values.rows
    if isinstance(sel, Dense):
        return values.unit_sums(0)
    if isinstance(sel, BlockMask | PageSet):
        return (values.unit_sums(unit_size(sel)) * as_float(kept_units(sel, rows, n_keys))).sum(-1)
    if isinstance(sel, TokenSet):
        index = sel.indices[:, _row_index(sel.rows, rows)]
        kept = torch.zeros(*index.shape[:2], n_keys + 1, dtype=torch.bool, device=index.device)
        kept.scatter_(-1, torch.where((index < 0) | (index >= n_keys), n_keys, index), True)
        return (data * as_float(kept[..., :n_keys])).sum(-1)
    if isinstance(sel, KeptKeys):  # a matrix-vector product per head (batched with one column it is slow on CPU)
        keys = kept_keys(sel, n_keys)
        heads = max(data.shape[0], keys.shape[0])
        return torch.stack([torch.mv(d, k) for d, k in zip(data.expand(heads, -1, -1), keys.expand(heads, -1),
                                                             strict=True)])
    if isinstance(sel, VerticalSlash):
        data = data.expand(max(data.shape[0], sel.heads), -1, -1)
        return vertical_slash_masses([sel], data, rows, n_keys)[0][0]
    out = []
    for start in range(0, len(rows), 256):
        chunk = rows[start : start + 256]
        out.append((data[:, start : start + 256] * as_float(sel.mask(chunk, n_keys))).sum(-1))
    return torch.cat(out, dim=1)


def kept_keys(sel: KeptKeys, n_keys: int) -> Tensor:
    """KeptKeys as a float key vector per head [h, T] (keys after the prompt always kept)."""
    kept = sel.kept[:, :n_keys]
    tail = torch.ones(kept.shape[0], n_keys - kept.shape[1], dtype=torch.bool, device=kept.device)
    return as_float(torch.cat([kept, tail], dim=1))


def vertical_slash_masses(sels: list[VerticalSlash], data: Tensor, rows: Tensor, n_keys: int,
                          counts: bool = False, error_index: Tensor | None = None,
                          chunk_bytes: int = 16 << 20) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Recall of several VerticalSlash selections with one block size, and optionally their kept causal cells
    and their masks on the error rows ``rows[error_index]``.

    ``data [F, R, T]``; every selection has F heads or one (shared). Rows are grouped by query block; per
    block, one batched matrix product of the block's rows with the stacked key masks of all selections (per
    head, or one for all), and the cells as a running count of those masks. Returns recall [S, F, R], cells
    [S, F, R] and masks [S, F, M, T] (each None when not asked for; a shared selection's cells and masks have
    one head).
    """
    b, n_sel, n_heads, device = sels[0].block, len(sels), data.shape[0], data.device
    blocks, sizes = torch.unique_consecutive(rows // b, return_counts=True)
    starts = (blocks * b).tolist()
    lasts = torch.cumsum(sizes, 0).tolist()
    firsts = [0, *lasts[:-1]]
    n_var = 1 if all(sel.heads == 1 for sel in sels) else n_heads  # key masks per block: shared, or per head
    mass = torch.zeros(n_sel, n_heads, len(rows), device=device)
    cells = torch.zeros(n_sel, n_var, len(rows), device=device) if counts else None
    masks = err_at = None
    if error_index is not None:
        masks = torch.zeros(n_sel, n_var, len(error_index), n_keys, dtype=torch.bool, device=device)
        in_block = torch.bucketize(error_index, torch.tensor(lasts, device=device), right=True).tolist()
        err_at = {}  # block -> (indices into the error rows, their positions)
        for m, blk in enumerate(in_block):
            err_at.setdefault(blk, []).append(m)
        err_at = {blk: (torch.tensor(ms, device=device), rows[error_index[ms]]) for blk, ms in err_at.items()}
    keys_at = torch.arange(n_keys, device=device)
    readers = [sel.key_reader(n_keys, starts[-1] if starts else 0, device) for sel in sels]
    per_chunk = max(1, chunk_bytes // (n_keys * n_sel * n_var))
    for c0 in range(0, len(starts), per_chunk):
        chunk = starts[c0 : c0 + per_chunk]
        width = min(chunk[-1] + b, n_keys)  # keys any row of the chunk can see
        chunk_starts = torch.tensor(chunk, device=device)
        keys = torch.stack([read(chunk_starts, width).expand(n_var, -1, -1) for read in readers], dim=1)  # bool
        for i, r0 in enumerate(chunk):
            blk, hi = c0 + i, min(r0 + b, n_keys)
            first, last = firsts[blk], lasts[blk]
            block_keys = as_float(keys[:, :, i, :hi])  # [V, S, hi]
            got = torch.matmul(data[:, first:last, :hi], block_keys.transpose(1, 2))  # [F, rows, S]
            mass[:, :, first:last] = got.permute(2, 0, 1)
            if counts:  # kept causal keys of each row: the block's keys before r0, then a running count inside it
                before = block_keys[..., :r0].sum(-1, keepdim=True)
                inside = before + block_keys[..., r0:hi].cumsum(-1)  # [V, S, hi - r0]
                cells[:, :, first:last] = inside[..., rows[first:last] - r0].transpose(0, 1)
            if err_at is not None and blk in err_at:
                ms, pos = err_at[blk]
                seen_err = keys_at[None, :hi] <= pos[:, None]  # [m, hi]
                masks[:, :, ms, :hi] = (keys[:, :, i, None, :hi] & seen_err).transpose(0, 1)
    return mass, cells, masks


def units_touched(sel: Selection, rows: Tensor, size: int, n_keys: int) -> Tensor:
    """Units of ``size`` keys in which ``sel`` computes at least one causal cell, per head and row: [h, R]."""
    if isinstance(sel, PageSet) and sel.page_size == size:
        causal_page = torch.arange(-(-n_keys // size), device=rows.device)[None, :] <= (rows // size)[:, None]
        return (kept_units(sel, rows, n_keys) & causal_page).sum(-1).float()
    out = []
    for start in range(0, len(rows), 256):
        mask = sel.mask(rows[start : start + 256], n_keys)
        out.append(unit_mass(as_float(mask), size).gt(0).sum(-1).float())
    return torch.cat(out, dim=1)


def block_budget(sel: BlockMask, rows: Tensor, n_keys: int) -> Tensor:
    """Kept causal key blocks of each row's query block: [h, R]."""
    n_kblocks = -(-n_keys // sel.block_k)
    qblocks = sel.blocks.shape[1]
    last = torch.clamp((torch.arange(qblocks, device=rows.device) + 1) * sel.block_q - 1, max=n_keys - 1)
    causal_blocks = torch.arange(n_kblocks, device=rows.device)[None, :] <= (last // sel.block_k)[:, None]
    per_block = (sel.blocks[:, :, :n_kblocks] & causal_blocks).sum(-1)  # [h, query blocks]
    return per_block[:, rows // sel.block_q].float()


def policy_granularity(policy: object, sel: Selection, n_kv: int) -> Granularity:
    """The oracle granularity matching a policy's selection (group sharing only for a shared selection)."""
    unit, size, sharing = Granularity(*getattr(policy, "granularity", ("token", 1, "head")))
    if unit == "block" and not (isinstance(sel, BlockMask) and sel.block_q == sel.block_k == size):
        unit, size = "token", 1
    if sharing == "group" and sel.heads != n_kv:
        sharing = "head"
    return Granularity(unit, size if unit != "token" else 1, sharing)


def relative_error(num: Tensor, mass: Tensor, dense: Tensor) -> Tensor:
    """||num / mass - dense|| / ||dense|| per head and row (num: sum_sel p v; mass: sum_sel p)."""
    sparse = num / mass.clamp(min=torch.finfo(mass.dtype).tiny)[..., None]
    sparse = torch.where(mass[..., None] > 0, sparse, torch.zeros_like(sparse))
    return (sparse - dense).norm(dim=-1) / dense.norm(dim=-1).clamp(min=1e-30)


class Outputs:
    """Output error on the error rows of one KV group: ``p [G, M, T]`` against its values ``v [T, d]``.

    Products over the error rows (at ascending positions ``rows``) go in chunks of at least ``CHUNK_ROWS`` rows, each
    over the keys its rows can see only (p is zero elsewhere): for rows spread over a prompt about half the work of
    whole rows. Chunks whose keys are nearly the same (decode rows) stay one product."""

    CHUNK_ROWS: ClassVar[int] = 8

    def __init__(self, p: Tensor, v: Tensor, rows: Tensor, sliding_window: int | None = None):
        self.p, self.v = p, v
        at = rows.tolist()
        self.chunks: list[tuple[slice, slice]] = []  # (error rows, the keys they see)
        for a in range(0, len(at), self.CHUNK_ROWS):
            b = min(a + self.CHUNK_ROWS, len(at))
            keys = slice(first_visible(at[a], sliding_window), at[b - 1] + 1)
            if self.chunks:
                rows_before, keys_before = self.chunks[-1]
                merged = slice(keys_before.start, keys.stop)
                if keys_before.stop - keys_before.start >= 0.8 * (merged.stop - merged.start):
                    self.chunks[-1] = (slice(rows_before.start, b), merged)
                    continue
            self.chunks.append((slice(a, b), keys))
        self.dense = self._product(p)[0]  # [G, M, d]
        self._unit_pv: dict[int, Tensor] = {}
        self.mass = Field(p, torch.empty(0))  # unit sums of p
        self._ranked: list[tuple[Ranking, Tensor, Tensor, slice]] = []

    def unit_pv(self, size: int) -> Tensor:
        """Sum of p v over each key unit of ``size``: [G, M, U, d]."""
        if size not in self._unit_pv:
            G, M, T = self.p.shape
            pad = -T % size
            p = torch.nn.functional.pad(self.p, (0, pad)).view(G * M, -1, size).transpose(0, 1)  # [U, GM, s]
            v = torch.nn.functional.pad(self.v, (0, 0, 0, pad)).view(-1, size, self.v.shape[-1])  # [U, s, d]
            self._unit_pv[size] = torch.bmm(p, v).transpose(0, 1).reshape(G, M, -1, self.v.shape[-1])
        return self._unit_pv[size]

    def _product(self, p: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(sum p v, sum p)`` [..., M, d], [..., M] over the cells of ``mask [..., M, T]`` (all without it), for
        probabilities ``p [..., M, T]`` of the error rows."""
        shape = torch.broadcast_shapes(p.shape, p.shape if mask is None else mask.shape)[:-1]
        num, mass = p.new_empty(*shape, self.v.shape[-1]), p.new_empty(shape)
        for rs, ks in self.chunks:
            part = p[..., rs, ks] if mask is None else p[..., rs, ks] * as_float(mask[..., rs, ks])
            num[..., rs, :] = part @ self.v[ks]
            mass[..., rs] = part.sum(-1)
        return num, mass

    def masked(self, mask: Tensor) -> Tensor:
        """Error [G, M] of keeping the cells ``mask [h, M, T]``."""
        num, mass = self._product(self.p, mask)  # (float32 x bool is slower on CPU than x float)
        return relative_error(num, mass, self.dense)

    def units(self, kept: Tensor, size: int) -> Tensor:
        """Error [G, M] of keeping the key units ``kept [h, M, U]`` of ``size`` keys."""
        G, M, U = self.p.shape[0], *kept.shape[1:]
        weights = as_float(kept).expand(G, -1, -1)
        num = torch.bmm(weights.reshape(G * M, 1, U), self.unit_pv(size).view(G * M, U, -1)).view(G, M, -1)
        mass = (self.mass.unit_sums(size) * weights).sum(-1)
        return relative_error(num, mass, self.dense)

    def selection(self, sel: Selection, rows: Tensor, n_keys: int) -> Tensor:
        """Error [G, M] of a policy's selection (for this group's heads) on the error rows ``rows``."""
        if isinstance(sel, Dense):
            return torch.zeros(self.p.shape[:2], device=self.p.device)
        if isinstance(sel, BlockMask | PageSet):
            return self.units(kept_units(sel, rows, n_keys), unit_size(sel))
        return self.masked(sel.mask(rows, n_keys))

    def ranked(self, ranking: Ranking, n: Tensor, mass: Tensor, target: Tensor, heads: slice) -> None:
        """Queue the error of an oracle at budget ``n`` [Hr, M] on the error rows, whose kept mass ``mass``
        [G, M] the ranking already gave; it is written to ``target[heads]`` by :meth:`flush`."""
        self._ranked.append((ranking, n, mass, target, heads))

    def flush(self, index: Tensor, chunk_bytes: int = 4 << 20) -> None:
        """Errors of every queued oracle budget: per ranking and head, the kept keys are those whose rank in
        the row's order is below the budget; a few budgets' masked probabilities share one matrix product, and
        budgets queued more than once (the same counts on every error row) are computed once."""
        by_ranking: dict[int, list] = {}
        for item in self._ranked:
            by_ranking.setdefault(id(item[0]), []).append(item)
        self._ranked.clear()
        G, M, T = self.p.shape
        step = max(1, chunk_bytes // (4 * M * T))
        for items in by_ranking.values():
            ranking = items[0][0]
            size, share = ranking.g.size, ranking.group
            order = ranking.order_of(index)  # [Hr, M, U]
            units = torch.arange(order.shape[-1], device=order.device)
            rank = torch.empty_like(order).scatter_(-1, order, units.expand_as(order))
            budgets = torch.stack([ranking.budget_rows(n, index) for _, n, _, _, _ in items])  # [S, Hr, M]
            mass = torch.stack([m for _, _, m, _, _ in items])  # [S, G, M]
            for h in range(G):
                distinct, which = torch.unique(budgets[:, h // share], dim=0, return_inverse=True)  # [s, M], [S]
                num = torch.empty(len(distinct), M, self.v.shape[-1], device=self.p.device)
                for c in range(0, len(distinct), step):
                    keep = rank[h // share][None] < distinct[c : c + step, :, None]  # [s, M, U]
                    if size > 1:
                        per_row = torch.bmm(as_float(keep).transpose(0, 1), self.unit_pv(size)[h])  # [M, s, d]
                        num[c : c + step] = per_row.transpose(0, 1)
                    else:  # p >= 0: p times the float mask is torch.where(keep, p, 0), faster
                        num[c : c + step] = self._product(self.p[h][None], keep)[0]
                errors = relative_error(num[which], mass[:, h], self.dense[h][None])  # [S, M]
                for k, (_, _, _, target, heads) in enumerate(items):
                    target[heads][h] = errors[k]


@dataclass
class Workspace:
    """Memory the layer scorers of one thread reuse from layer to layer: the true probabilities and the token
    oracle's sorted sums, up to [group heads, rows, keys] float32 each (first touching fresh memory is slow)."""

    probs: ProbsBuffer = field(default_factory=ProbsBuffer)
    sorted_sums: Reused = field(default_factory=Reused)


_workspaces = threading.local()


def thread_workspace() -> Workspace:
    """This thread's Workspace (each thread scores its own layers)."""
    if not hasattr(_workspaces, "workspace"):
        _workspaces.workspace = Workspace()
    return _workspaces.workspace


class LayerScorer:
    """Scores every entry of one phase of one layer: recall, output error, and the same-budget oracle.

    A policy entry arrives with its selection checked and its density set (``policies.validate``); an
    oracle entry gets its density here, from the cells its ranking keeps over the scored rows.
    """

    def __init__(self, view: LayerView, rows: Rows, want_output: bool, workspace: Workspace | None = None):
        self.view, self.rows = view, rows
        self.n_q, self.n_kv, self.group = view.n_query_heads, view.n_kv_heads, view.group
        self.want_output = want_output and view.v is not None
        self.queries = view.queries_at(rows.positions)  # [Hq, R, d]
        self.k = view.k[:, : rows.n_keys]
        self.v = view.v[:, : rows.n_keys] if self.want_output else None
        self.ones = CausalCells(rows.positions, rows.n_keys)
        self.scored_cells = 0
        self.workspace = workspace or Workspace()  # each group's probabilities and sums, in reused memory

    def score(self, entries: list[Entry]) -> None:
        """Fill each entry's metrics; an entry whose selection cannot be scored gets its error set instead.

        Entries of one policy that hold the very same Selection object (FlexPrefill at its fixed alpha returns one
        for every requested sparsity) are scored once and share the metrics.
        """
        live, twins, first = [], [], {}
        for entry in entries:
            if entry.error:
                continue
            twin = entry if entry.selection is None else first.setdefault((id(entry.policy), id(entry.selection)),
                                                                            entry)
            if twin is entry:
                live.append(entry)
            else:
                twins.append((entry, twin))
        n_rows, n_err = len(self.rows.positions), len(self.rows.error_index)
        device = self.k.device
        for entry in live:
            entry.recall = torch.zeros(self.n_q, n_rows, device=device)
            entry.oracle_recall = torch.zeros(self.n_q, n_rows, device=device)
            entry.cells = torch.zeros(self.n_q, device=device)
            if self.want_output:
                entry.output_error = torch.zeros(self.n_q, n_err, device=device)
                entry.oracle_output_error = torch.zeros(self.n_q, n_err, device=device)
        for g in range(self.n_kv):
            self._score_group(g, live)
        for entry in live:
            if entry.is_oracle and not entry.error:
                entry.density = entry.cells / max(self.rows.causal_cells, 1.0)
                if self.want_output:
                    entry.oracle_output_error = entry.output_error
        for entry, twin in twins:
            for name in ("error", "recall", "output_error", "oracle", "oracle_recall", "oracle_output_error", "cells"):
                setattr(entry, name, getattr(twin, name))

    def _score_group(self, g: int, entries: list[Entry]) -> None:
        G, rows = self.group, self.rows
        qh = slice(g * G, (g + 1) * G)
        probs = true_attention(self.queries[qh], self.k[g : g + 1], rows.positions, self.view.scale,
                               self.view.softcap, self.view.sliding_window, out=self.workspace.probs)
        self.scored_cells += G * visible_cells(rows.positions, rows.n_keys, self.view.sliding_window)
        group = _Group(self, g, qh, probs)
        vertical_slash: dict[int, list[tuple[Entry, VerticalSlash]]] = {}
        for entry in entries:
            if entry.error:
                continue
            try:
                if entry.is_oracle:
                    group.oracle(entry)
                    continue
                sel = group_part(entry.selection, g, G, self.n_kv, probs.device)
                if isinstance(sel, VerticalSlash):
                    vertical_slash.setdefault(sel.block, []).append((entry, sel))
                    continue
                group.policy(entry, sel, selected_mass(sel, group.probs, rows.n_keys),
                             selected_mass(sel, self.ones, rows.n_keys))
            except (SelectionError, ValueError, IndexError, RuntimeError) as exc:
                entry.error = f"{type(exc).__name__}: {exc}"
        for batch in vertical_slash.values():
            try:
                sels = [sel for _, sel in batch]
                err_index = rows.error_index if group.outputs is not None else None
                mass, cells, masks = vertical_slash_masses(sels, probs, rows.positions, rows.n_keys, True, err_index)
            except (SelectionError, ValueError, IndexError, RuntimeError) as exc:
                for entry, _ in batch:
                    entry.error = f"{type(exc).__name__}: {exc}"
                continue
            for i, (entry, sel) in enumerate(batch):
                try:
                    one = slice(0, 1) if sel.heads == 1 else slice(None)
                    group.policy(entry, sel, mass[i], cells[i][one], None if masks is None else masks[i][one])
                except (SelectionError, ValueError, IndexError, RuntimeError) as exc:
                    entry.error = f"{type(exc).__name__}: {exc}"
        if group.outputs is not None:
            group.outputs.flush(rows.error_index)


class _Group:
    """Scoring state of one KV group: its probabilities, rankings and output pass."""

    def __init__(self, scorer: LayerScorer, g: int, qh: slice, probs: Tensor):
        self.s, self.g, self.qh = scorer, g, qh
        self.probs = Field(probs, scorer.rows.positions)
        self.rankings: dict[Granularity, Ranking] = {}
        self.outputs = None
        if scorer.want_output:
            index = scorer.rows.error_index
            self.outputs = Outputs(probs[:, index], scorer.v[g], scorer.rows.positions[index],
                                   scorer.view.sliding_window)

    def ranking(self, gran: Granularity) -> Ranking:
        if gran not in self.rankings:
            probs = self.probs.data
            memory = self.s.workspace.sorted_sums.take((probs.numel(),), probs.device)  # one token ranking a group
            units = self.probs.unit_sums(gran.size) if gran.size > 1 else None  # shared with the recall sums
            self.rankings[gran] = Ranking(probs, self.s.rows.positions, gran, self.s.group,
                                          self.s.view.sliding_window, memory, units)
        return self.rankings[gran]

    def _expand(self, x: Tensor) -> Tensor:
        """[1, ...] (one KV head) -> [G, ...]; [G, ...] unchanged."""
        return x.expand(self.s.group, *x.shape[1:]) if x.shape[0] == 1 else x

    def oracle(self, entry: Entry) -> None:
        """A standalone oracle: its own budget, recall, cells and output error."""
        gran = entry.policy.granularity
        rank = self.ranking(gran)
        fraction = fraction_per_query_head(entry.budget, self.s.n_q)[self.qh]
        n = entry.policy.units(rank, entry.budget, rank.share_mean(fraction))
        entry.recall[self.qh] = rank.mass_at(n)
        entry.oracle_recall[self.qh] = entry.recall[self.qh]
        entry.cells[self.qh] = self._expand(rank.cells_at(n).sum(-1))
        entry.oracle = f"{entry.policy.name}:{gran.label}"
        if self.outputs is not None:
            self.outputs.ranked(rank, n, entry.recall[self.qh][:, self.s.rows.error_index], entry.output_error,
                                self.qh)

    def policy(self, entry: Entry, sel: Selection, mass: Tensor, counts: Tensor,
               err_mask: Tensor | None = None) -> None:
        """A policy's selection (this group's heads): recall, output error and its same-budget oracle.

        ``err_mask`` is the selection's mask on the error rows when the caller already has it."""
        rows = self.s.rows
        entry.recall[self.qh] = self._expand(mass)
        entry.cells[self.qh] = self._expand(counts.sum(-1))
        gran = policy_granularity(entry.policy, entry.selection, self.s.n_kv)
        rank = self.ranking(gran)
        if gran.unit == "token":
            n = torch.round(counts).long()
        elif gran.unit == "page":
            n = units_touched(sel, rows.positions, gran.size, rows.n_keys).long()
        else:
            n = block_budget(sel, rows.positions, rows.n_keys).long()
        n = n[:1] if gran.sharing == "group" else self._expand(n)
        entry.oracle_recall[self.qh] = rank.mass_at(n)
        entry.oracle = f"oracle_topk:{gran.label}"
        if self.outputs is not None:
            if err_mask is not None:
                entry.output_error[self.qh] = self.outputs.masked(err_mask)
            else:
                err_rows = rows.positions[rows.error_index]
                entry.output_error[self.qh] = self.outputs.selection(sel, err_rows, rows.n_keys)
            self.outputs.ranked(rank, n, entry.oracle_recall[self.qh][:, rows.error_index],
                                entry.oracle_output_error, self.qh)


def mean_ci(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over the last axis and its 95% confidence half-width (normal approximation; NaN for one sample)."""
    n = x.shape[-1]
    mean = x.double().mean(-1)
    if n < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, 1.96 * x.double().std(-1) / math.sqrt(n)
