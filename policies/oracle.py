"""Oracles: the best selection at a granularity and budget, read off the true attention.

``oracle_topk`` keeps, per query row (token or page units) or per query block (block units), the units of
largest true attention mass; ``oracle_topp`` keeps the fewest units whose mass reaches ``p``. Units are
single keys (``token``), pages of ``size`` keys (``page``) or ``size`` x ``size`` blocks (``block``); with
``sharing="group"`` one set is chosen per KV head from the mass summed over its GQA group.

A block oracle ranks key blocks by their mass summed over the scored rows of the query block, so for any
selection that keeps ``n`` key blocks in that query block, the oracle's recall summed over those rows is at
least the selection's: with the oracle's budget equal to a policy's realised one, recall <= oracle recall
is a theorem (per row for token and page units, per query block for blocks, per GQA group when shared).

:class:`Ranking` sorts once and answers every budget; the simulator uses it directly and the policies
below turn it into Selections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sparse_frontier.kernels.reference import first_visible

from .base import Budget, LayerView, PolicyBase
from .selection import BlockMask, PageSet, Selection, TokenSet

Unit = Literal["token", "page", "block"]
Sharing = Literal["head", "group"]
UNITS = ("token", "page", "block")
SHARINGS = ("head", "group")


class Granularity(NamedTuple):
    """What a selection is made of: ``unit`` (token, page, block) of ``size`` keys, chosen per ``sharing``.

    A plain tuple, so a policy may declare ``granularity = ("page", 16, "group")``.
    """

    unit: Unit = "token"
    size: int = 1
    sharing: Sharing = "head"

    def check(self) -> Granularity:
        """Itself, or a ValueError naming the bad field."""
        if self.unit not in UNITS:
            raise ValueError(f"granularity unit {self.unit!r} is not one of {', '.join(UNITS)}")
        if self.sharing not in SHARINGS:
            raise ValueError(f"granularity sharing {self.sharing!r} is not one of {', '.join(SHARINGS)}")
        if self.size < 1 or (self.unit == "token" and self.size != 1):
            raise ValueError(f"granularity size {self.size} does not fit unit {self.unit!r}")
        return self

    @property
    def label(self) -> str:
        """Short name, e.g. ``token:head`` or ``block64:group``."""
        unit = "token" if self.unit == "token" else f"{self.unit}{self.size}"
        return f"{unit}:{self.sharing}"


def unit_mass(values: Tensor, size: int) -> Tensor:
    """Sum of ``values [H, R, T]`` over consecutive units of ``size`` keys: [H, R, ceil(T / size)]."""
    if size == 1:
        return values
    full = values.unfold(-1, size, size).sum(-1)  # whole units, without copying the values
    if values.shape[-1] % size:
        tail = values[..., full.shape[-1] * size :].sum(-1, keepdim=True)
        full = torch.cat([full, tail], dim=-1)
    return full


def causal_unit_cells(rows: Tensor, size: int, n_keys: int) -> Tensor:
    """Causal cells of each row inside each unit of ``size`` keys: [R, ceil(T / size)] (float32)."""
    starts = torch.arange(0, n_keys, size, device=rows.device)
    seen = torch.clamp(rows + 1, max=n_keys)[:, None] - starts[None, :]
    return seen.clamp(min=0, max=size).float()


def sorted_cumsum(x: Tensor, rows: Tensor, sliding_window: int | None = None, chunk: int = 32,
                  memory: Tensor | None = None) -> Tensor:
    """Cumulative sums [H, R, W] of ``x [H, R, T]`` (non-negative) sorted descending along keys, where x is zero
    after each (ascending) row's position and, with ``sliding_window``, before its window: only the keys a block
    of rows can see are sorted (numpy's vectorised sort on CPU). W is the most keys a block sees (T without a
    window); a row's sums past its block's keys repeat the last one.

    ``memory``: a flat float32 tensor on x's device, at least x's size, that the sums are written into (its
    earlier contents are overwritten); without it they go into a fresh array."""
    n_keys = x.shape[-1]
    spans = []
    for start in range(0, x.shape[1], chunk):
        stop = min(start + chunk, x.shape[1])
        hi = min(int(rows[stop - 1]) + 1, n_keys)
        spans.append((start, stop, first_visible(rows[start], sliding_window), hi))
    width = max((hi - lo for *_, lo, hi in spans), default=1)
    shape = (*x.shape[:2], width)
    if memory is not None:
        out = memory[: math.prod(shape)].view(shape)
    elif x.device.type == "cpu":
        # numpy's allocation (transparent huge pages), first touched in one sequential pass: the chunks below
        # write it row by row, and first touching it that way cost several times the sort on a gVisor VM
        out = np.empty(shape, np.float32)
        out.fill(0.0)
        out = torch.from_numpy(out)
    else:
        out = x.new_empty(shape)
    for start, stop, lo, hi in spans:
        part = x[:, start:stop, lo:hi]
        if part.device.type == "cpu":  # x >= 0: its bits sort as int32 in the same order (negated: descending)
            bits = np.negative(part.numpy().view(np.int32))
            bits.sort(axis=-1)
            ranked = torch.from_numpy(np.negative(bits, out=bits).view(np.float32))
        else:
            ranked = torch.sort(part, dim=-1, descending=True).values
        torch.cumsum(ranked, dim=-1, out=out[:, start:stop, : hi - lo])
        out[:, start:stop, hi - lo :] = out[:, start:stop, hi - lo - 1 : hi - lo]
    return out


def argsort_desc(x: Tensor) -> Tensor:
    """Indices sorting ``x`` descending along the last axis (numpy's vectorised sort on CPU; ties in any order)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.argsort(-x.numpy(), axis=-1))
    return torch.argsort(x, dim=-1, descending=True)


class Ranking:
    """Units ranked by true mass, for ``probs [H, R, T]`` of query rows ``rows`` (H = query heads of whole groups).

    Built once; ``mass_at``, ``cells_at`` and ``unit_mask`` answer any budget ``n`` (units kept, per ranking
    head and row, [Hr, R]) where Hr = H (head sharing) or H / group (group sharing). With ``sliding_window``
    (probs zero before each row's window) per-head tokens are sorted over the window's keys only; their sums
    go into ``memory`` when given (see :func:`sorted_cumsum`), which must then outlive the ranking unchanged.
    ``units``: ``unit_mass(probs, size)`` when the caller already has it.
    """

    def __init__(self, probs: Tensor, rows: Tensor, granularity: Granularity, group: int = 1,
                 sliding_window: int | None = None, memory: Tensor | None = None, units: Tensor | None = None):
        self.g = granularity
        self.rows = rows
        self.group = group if granularity.sharing == "group" else 1
        self.n_heads, _, self.n_keys = probs.shape
        self.probs = probs
        size = granularity.size
        mass = unit_mass(probs, size) if units is None else units  # [H, R, U]
        self.n_units = mass.shape[-1]
        if granularity.unit == "block":
            qblock = rows // size
            self.q_ids, self.row_q, counts = torch.unique_consecutive(qblock, return_inverse=True,
                                                                      return_counts=True)
            self.first_row = counts.cumsum(0) - counts  # index of each query block's first row
            score = torch.zeros(self.n_heads, len(self.q_ids), self.n_units, device=probs.device)
            score.index_add_(1, self.row_q, mass)
            last_row = torch.clamp((self.q_ids + 1) * size - 1, max=self.n_keys - 1)
        else:
            self.row_q = torch.arange(len(rows), device=rows.device)
            score, last_row = mass, rows
        score = self._share(score)
        self.causal_units = torch.clamp(last_row, max=self.n_keys - 1) // size + 1  # [Q]
        self._index: Tensor | None = None
        self.fast = granularity.unit == "token" and self.group == 1
        if self.fast:  # per-head token ranking: sorted values are enough (non-causal keys have mass 0)
            self.order = None
            self.own_csum = sorted_cumsum(mass, rows, sliding_window, memory=memory)
            self.score_csum = self.own_csum
            return
        units = torch.arange(self.n_units, device=probs.device)
        score = score.masked_fill(units[None, None, :] >= self.causal_units[None, :, None], float("-inf"))
        self.order = argsort_desc(score)  # [Hr, Q, U]
        row_order = self._heads(self.order[:, self.row_q])  # [H, R, U]
        self.own_csum = mass.gather(-1, row_order).cumsum(-1)
        self.score_csum = score.clamp(min=0).gather(-1, self.order).cumsum(-1)  # [Hr, Q, U]
        if granularity.unit != "token":
            cells = causal_unit_cells(rows, size, self.n_keys)  # [R, U]
            order_r = self.order[:, self.row_q]
            self.cells_csum = cells.expand(order_r.shape[0], -1, -1).gather(-1, order_r).cumsum(-1)

    def _share(self, x: Tensor) -> Tensor:
        if self.group == 1:
            return x
        return x.view(self.n_heads // self.group, self.group, *x.shape[1:]).sum(1)

    def _heads(self, x: Tensor) -> Tensor:
        """Ranking heads -> query heads."""
        return x.repeat_interleave(self.group, dim=0) if self.group > 1 else x

    @property
    def ranking_heads(self) -> int:
        return self.n_heads // self.group

    def share_mean(self, x: Tensor) -> Tensor:
        """Per query head [H] -> per ranking head [Hr] (mean over a shared group)."""
        return x.view(self.ranking_heads, self.group).mean(1)

    def causal_budget(self, n: Tensor) -> Tensor:
        """``n`` [Hr, R] clamped to the causal units of each row's query (block)."""
        return torch.minimum(n.long(), self.causal_units[self.row_q][None, :]).clamp(min=0)

    def budget_rows(self, n: Tensor, index: Tensor) -> Tensor:
        """``n`` [Hr, R] clamped to the causal units, for the rows ``rows[index]``: [Hr, len(index)]."""
        return self.causal_budget(n)[:, index]

    def fraction_budget(self, fraction: Tensor) -> Tensor:
        """Units per row [Hr, R] keeping ``fraction`` [Hr] of each query (block)'s causal units (at least 1)."""
        causal = self.causal_units.float()
        n = torch.round(fraction[:, None].float() * causal[None, :]).long()
        n = torch.minimum(n.clamp(min=1), self.causal_units[None, :])
        return n[:, self.row_q]

    def mass_budget(self, p: float) -> Tensor:
        """Fewest units per row [Hr, R] whose ranked mass reaches ``p`` of the query (block)'s total."""
        total = self.score_csum[..., -1:]
        n = torch.searchsorted(self.score_csum.contiguous(), (p * total).contiguous() * (1 - 1e-6)) + 1
        n = torch.minimum(n.squeeze(-1), self.causal_units[None, :])
        return n[:, self.row_q]

    def mass_at(self, n: Tensor) -> Tensor:
        """True mass [H, R] of the top ``n`` units ([Hr, R]) for each query head."""
        n = self._heads(self.causal_budget(n))
        last = (n - 1).clamp(min=0, max=self.own_csum.shape[-1] - 1)  # the per-head token sums stop at the window
        got = self.own_csum.gather(-1, last[..., None]).squeeze(-1)
        return torch.where(n > 0, got, torch.zeros_like(got))

    def cells_at(self, n: Tensor) -> Tensor:
        """Causal (query, key) cells [Hr, R] the top ``n`` units cover."""
        n = self.causal_budget(n)
        if self.g.unit == "token":
            return n.float()
        got = self.cells_csum.gather(-1, (n - 1).clamp(min=0)[..., None]).squeeze(-1)
        return torch.where(n > 0, got, torch.zeros_like(got))

    def order_of(self, index: Tensor) -> Tensor:
        """Units of the rows ``rows[index]`` from best to worst: [Hr, len(index), U]."""
        if self.order is not None:
            return self.order[:, self.row_q[index]]
        if self._index is None or not torch.equal(self._index, index):  # per-head tokens: rank once
            self._index = index
            self._index_order = argsort_desc(self.probs[:, index])
        return self._index_order

    def unit_mask(self, index: Tensor, n: Tensor) -> Tensor:
        """Kept units [Hr, len(index), U] of the rows ``rows[index]`` at budget ``n`` [Hr, R]."""
        n = self.causal_budget(n)[:, index]
        order = self.order_of(index)
        rank = torch.arange(self.n_units, device=order.device)
        keep = rank[None, None, :] < n[..., None]
        return torch.zeros_like(keep).scatter_(-1, order, keep)

    def key_mask(self, index: Tensor, n: Tensor) -> Tensor:
        """Kept keys [Hr, len(index), T] of the rows ``rows[index]`` at budget ``n``."""
        units = self.unit_mask(index, n)
        if self.g.size > 1:
            units = units.repeat_interleave(self.g.size, dim=-1)
        return units[..., : self.n_keys]


def fraction_per_query_head(budget: Budget, n_q: int) -> Tensor:
    """Kept fraction per query head [Hq] of a budget (``per_head`` counts over query or KV heads)."""
    if budget.per_head is None:
        return torch.full((n_q,), budget.fraction)
    per = torch.tensor(budget.per_head, dtype=torch.float32) / max(budget.n_ctx, 1)
    return per if len(per) == n_q else per.repeat_interleave(n_q // len(per))


def view_probs(view: LayerView, rows: Tensor) -> Tensor:
    """True attention [Hq, R, T] of ``rows``: ``view.probs`` when the simulator set it, else computed."""
    if view.probs is not None:
        return view.probs
    from sparse_frontier.simulator.attention import true_attention

    return true_attention(view.queries_at(rows), view.k, rows, view.scale, view.softcap, view.sliding_window)


def _rows(view: LayerView) -> Tensor:
    """The rows an oracle selects for: ``view.rows``, or every prompt row."""
    if view.rows is not None:
        return view.rows
    return torch.arange(view.prefill_len, device=view.k.device)


def to_selection(ranking: Ranking, n: Tensor) -> Selection:
    """The Selection holding a ranking's top ``n`` units ([Hr, R]) for its rows."""
    g, rows = ranking.g, ranking.rows
    if g.unit == "block":
        n_qblocks = -(-ranking.n_keys // g.size)
        diagonal = torch.arange(n_qblocks, device=rows.device)
        blocks = torch.zeros(n.shape[0], n_qblocks, ranking.n_units, dtype=torch.bool, device=rows.device)
        blocks[:, diagonal, diagonal] = True  # query blocks without scored rows keep their diagonal
        blocks[:, ranking.q_ids] = ranking.unit_mask(ranking.first_row, n)
        return BlockMask(blocks, block_q=g.size, block_k=g.size)
    units = ranking.unit_mask(torch.arange(len(rows), device=rows.device), n)  # [Hr, R, U]
    width = int(units.sum(-1).max()) if units.numel() else 0
    order = torch.argsort(units.to(torch.int8), dim=-1, descending=True, stable=True)[..., :width]
    kept = torch.where(units.gather(-1, order), order, torch.full_like(order, -1))
    if g.unit == "page":
        return PageSet(rows=rows, pages=kept, page_size=g.size)
    return TokenSet(rows=rows, indices=kept)


@dataclass
class OracleParams:
    """Top-k oracle: ``unit`` token/page/block of ``size`` keys, per ``sharing`` head or GQA group."""

    unit: Unit = "token"
    size: int = 1
    sharing: Sharing = "head"


@dataclass
class OracleTopPParams(OracleParams):
    """Top-p oracle: also the mass ``p`` to reach (a ``topp`` budget rule's ``top_p`` overrides it)."""

    p: float = 0.9


class OracleTopK(PolicyBase):
    """Keeps the units of largest true attention at the budget's kept fraction (the ceiling of its granularity)."""

    name: ClassVar[str] = "oracle_topk"
    phase: ClassVar[str] = "prefill"
    owns_budget: ClassVar[bool] = False
    granularity: ClassVar[tuple] = Granularity()  # the default; an instance's comes from its parameters
    Params: ClassVar[type] = OracleParams

    def __init__(self, **params):
        super().__init__(**params)
        self.granularity = Granularity(self.params.unit, self.params.size, self.params.sharing).check()

    def units(self, ranking: Ranking, budget: Budget, fraction: Tensor) -> Tensor:
        """Units per ranking head and row: ``fraction`` [Hr] of each query (block)'s causal units."""
        return ranking.fraction_budget(fraction.to(ranking.rows.device))

    def select(self, view: LayerView, budget: Budget) -> Selection:
        rows = _rows(view)
        ranking = Ranking(view_probs(view, rows), rows, self.granularity, view.group, view.sliding_window)
        fraction = ranking.share_mean(fraction_per_query_head(budget, view.n_query_heads))
        return to_selection(ranking, self.units(ranking, budget, fraction))


class OracleTopP(OracleTopK):
    """Keeps the fewest units whose true attention mass reaches ``p`` (reports the budget a mass needs)."""

    name: ClassVar[str] = "oracle_topp"
    Params: ClassVar[type] = OracleTopPParams

    def __init__(self, **params):
        super().__init__(**params)
        if not 0.0 < self.params.p <= 1.0:
            raise ValueError(f"oracle_topp: p={self.params.p} is outside (0, 1]")

    def units(self, ranking: Ranking, budget: Budget, fraction: Tensor) -> Tensor:
        """Units per ranking head and row reaching the mass ``top_p`` (from the budget, else ``p``)."""
        return ranking.mass_budget(budget.top_p if budget.top_p is not None else self.params.p)


class DecodeOracleTopK(OracleTopK):
    """``oracle_topk`` scored on decode steps (generated tokens, or the labelled prompt proxy)."""

    name: ClassVar[str] = "oracle_topk_decode"
    phase: ClassVar[str] = "decode"


class DecodeOracleTopP(OracleTopP):
    """``oracle_topp`` scored on decode steps."""

    name: ClassVar[str] = "oracle_topp_decode"
    phase: ClassVar[str] = "decode"
