"""Vertical-Slash (MInference): key columns and diagonals estimated from the last window of prompt queries."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Budget, LayerView, PolicyBase
from .estimate import ViewCache, mass_count, ranking, register_window, window_stats
from .selection import VerticalSlash as VerticalSlashSelection
from .targeting import largest_within_each


def vs_rankings(view: LayerView, window: int, sinks: int, local: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Window estimate of every query head: (vertical sums, slash sums, column keep-order, offset keep-order).

    Column j scores the attention the window queries pay to key j; offset o scores the attention along the
    diagonal i - j = o. The first ``sinks`` columns and the ``local`` smallest offsets come first in the order.
    """
    stats = window_stats(view, window)
    vertical, slash = stats.vertical, stats.slash
    col_order = ranking(vertical, list(range(sinks)))
    off_order = ranking(slash, list(range(local)))
    return vertical, slash, col_order, off_order


class VerticalSlash(PolicyBase):
    """MInference Vertical-Slash: top key columns and diagonals of the last-window estimate, per query head.

    The counts include the always-kept first ``sinks`` columns and ``local`` diagonals, as in MInference
    (they are forced into the top-k). With ``target`` (default) the counts are searched per head so that the
    realised density of what the kernel computes (slashes as ``block``-row parallelograms) is the largest not
    above the budget; ``vertical_size`` / ``slash_size`` are then unused. With ``target=False`` the fixed counts
    are used whatever the budget (the paper calibrated them per length: Table 3, 164 to 2304 at 16k).
    """

    name: ClassVar[str] = "vertical_slash"
    phase: ClassVar[str] = "prefill"
    owns_budget: ClassVar[bool] = False
    granularity: ClassVar[tuple] = ("token", 1, "head")

    @dataclass
    class Params:
        window: int = 256  # 512 for retrieval-style tasks (NIAH, story retrieval)
        sinks: int = 4
        local: int = 64
        block: int = 64
        target: bool = True
        vertical_size: int = 512
        slash_size: int = 512
        slash_ratio: float = 1.0  # slashes per vertical while searching one count for both

        def __post_init__(self):
            if min(self.window, self.block, self.vertical_size, self.slash_size) < 1 or min(self.sinks, self.local) < 0:
                raise ValueError("vertical_slash needs window, block and sizes >= 1 and sinks, local >= 0")
            if self.slash_ratio <= 0:
                raise ValueError(f"vertical_slash slash_ratio={self.slash_ratio} must be positive")

    def __init__(self, **params):
        super().__init__(**params)
        self._cache = ViewCache()
        register_window(self.params.window)
        if not self.params.target:
            self.owns_budget = True  # fixed counts: the budget rule is not honoured

    def _rankings(self, view: LayerView):
        p = self.params
        return self._cache.get(view, "rankings", lambda: vs_rankings(view, p.window, p.sinks, p.local))

    def _slashes(self, count: int, n: int) -> int:
        """Slash count going with ``count`` verticals while searching (never below the forced local band)."""
        return min(n, max(min(self.params.local, n), round(self.params.slash_ratio * count)))

    def _smallest(self, n: int) -> int:
        """The smallest vertical count searched: room for the forced sinks and local band."""
        return min(n, max(self.params.sinks, math.ceil(self.params.local / self.params.slash_ratio), 1))

    def _densities(self, view: LayerView, heads: list[int], counts: list[int]) -> list[float]:
        """Realised density over the whole prompt of each (head, vertical count), evaluated together."""
        n = view.prefill_len
        _, _, col_order, off_order = self._rankings(view)
        sel = VerticalSlashSelection([col_order[h, :c] for h, c in zip(heads, counts, strict=True)],
                                     [off_order[h, : self._slashes(c, n)] for h, c in zip(heads, counts, strict=True)],
                                     block=self.params.block)
        return (sel.cells(torch.arange(n), n).double() / (n * (n + 1) / 2)).tolist()

    def _memos(self, view: LayerView) -> list[dict[int, float]]:
        return self._cache.get(view, "density", lambda: [{} for _ in range(view.n_query_heads)])

    def floor_density(self, view: LayerView) -> float:
        """Density of the always-kept part (sinks and local band at the smallest count), worst head."""
        if not self.params.target:
            return 0.0
        low = self._smallest(view.prefill_len)
        memos = self._memos(view)
        heads = [h for h in range(view.n_query_heads) if low not in memos[h]]
        if heads:
            for h, value in zip(heads, self._densities(view, heads, [low] * len(heads)), strict=True):
                memos[h][low] = value
        return max(m[low] for m in memos)

    def select(self, view: LayerView, budget: Budget) -> VerticalSlashSelection:
        p = self.params
        n = view.prefill_len
        vertical, slash, col_order, off_order = self._rankings(view)
        heads = view.n_query_heads
        if p.target:
            counts = largest_within_each(lambda hs, cs: self._densities(view, hs, cs), [self._smallest(n)] * heads,
                                         [n] * heads, budget.fraction, self._memos(view))
        else:
            counts = [min(p.vertical_size, n)] * heads
        columns, offsets = [], []
        for h in range(heads):
            n_cols = counts[h]
            n_offs = self._slashes(n_cols, n) if p.target else min(p.slash_size, n)
            if budget.top_p is not None:
                n_cols = _mass_capped(vertical[h], col_order[h], budget.top_p, n_cols, min(p.sinks, n))
                n_offs = _mass_capped(slash[h], off_order[h], budget.top_p, n_offs, min(p.local, n))
            columns.append(col_order[h, :n_cols].clone())
            offsets.append(off_order[h, :n_offs].clone())
        return VerticalSlashSelection(columns, offsets, block=p.block)


def _mass_capped(scores: Tensor, order: Tensor, top_p: float, cap: int, forced: int) -> int:
    """Prefix of ``order`` whose estimated mass reaches ``top_p``: at least the forced ones, at most ``cap``."""
    mass = scores[order] / scores.sum().clamp(min=1e-30)
    return int(min(cap, max(forced, int(mass_count(mass, top_p)))))
