"""FlexPrefill: per-head vertical/slash counts from a cumulative-attention threshold alpha.

The paper evaluates a reduced FlexPrefill (tau = 0): vertical-slash estimation on the last ``window`` prompt
queries, vertical score = mean attention per key, slash score = diagonal sum / window, and per head and line
type count = max(min_budget, smallest count whose sorted cumulative mass reaches alpha); the first ``sinks``
columns and ``local`` diagonals are forced into those counts (as MInference's top-k does). Choice: "reaches"
is read as cumulative mass >= alpha (the public reference counts the entries with cumulative mass <= alpha,
plus one: the same except at exact equality).

``tau > 0`` enables the original FlexPrefill's Jensen-Shannon pattern switch (Lai et al. 2025), which works
on ``block``-sized blocks: per head, the block-pooled vertical estimate is compared with a pooled-query
estimate softmax(mean(window q) . mean-pooled k); when sqrt(JS) < tau the head is "query-aware" and gets
min_budget blocks of verticals/slashes plus the pooled q.k blocks covering alpha of the total block mass;
otherwise its vertical/slash counts (tokens // block + 1 blocks, at least ceil(min_budget / block)) become
whole block columns / block diagonals. That mode returns a BlockMask; tau = 0 returns a VerticalSlash.
Choice: the switch uses the same ``window`` queries as the estimate (the original uses the last block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Budget, LayerView, PolicyBase
from .estimate import ViewCache, mass_count, register_window, window_positions
from .selection import BlockMask, Selection
from .selection import VerticalSlash as VerticalSlashSelection
from .vertical_slash import vs_rankings


def _mean_pool(x: Tensor, block: int) -> Tensor:
    """Mean over consecutive ``block`` rows of x [..., T, d] (a last partial block averages what it has)."""
    t = x.shape[-2]
    n = -(-t // block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, n * block - t))
    sums = padded.reshape(*x.shape[:-2], n, block, x.shape[-1]).sum(-2)
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = t - (n - 1) * block
    return sums / counts[:, None]


def _sum_pool(x: Tensor, block: int) -> Tensor:
    """Sum over consecutive ``block`` entries of the last dim."""
    n = -(-x.shape[-1] // block)
    return torch.nn.functional.pad(x, (0, n * block - x.shape[-1])).reshape(*x.shape[:-1], n, block).sum(-1)


def _sqrt_js(p: Tensor, q: Tensor) -> Tensor:
    """Square root of the Jensen-Shannon divergence between distributions on the last dim."""
    m = (p + q) / 2
    js = 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return js.clamp(min=0).sqrt()


class FlexPrefill(PolicyBase):
    """FlexPrefill (reduced, tau = 0 as in the paper): per-head vertical/slash counts covering alpha of the mass.

    Owns its budget: alpha and min_budget set the counts. A top-p budget replaces alpha with p. With
    ``target=True`` alpha is searched instead so that the layer's mean realised density is the largest not
    above the requested one (the per-head adaptivity is kept).
    """

    name: ClassVar[str] = "flexprefill"
    phase: ClassVar[str] = "prefill"
    owns_budget: ClassVar[bool] = True
    granularity: ClassVar[tuple] = ("token", 1, "head")

    @dataclass
    class Params:
        alpha: float = 0.65
        min_budget: int = 512
        window: int = 512
        sinks: int = 4
        local: int = 64
        block: int = 64
        tau: float = 0.0
        target: bool = False

        def __post_init__(self):
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"flexprefill alpha={self.alpha} is outside [0, 1]")
            if self.window < 1 or self.block < 1 or self.min_budget < 0 or min(self.sinks, self.local) < 0:
                raise ValueError("flexprefill needs window, block >= 1 and min_budget, sinks, local >= 0")
            if self.tau < 0:
                raise ValueError(f"flexprefill tau={self.tau} must be >= 0")

    def __init__(self, **params):
        super().__init__(**params)
        self._cache = ViewCache()
        register_window(self.params.window)
        if self.params.tau > 0:
            self.granularity = ("block", self.params.block, "head")

    def select(self, view: LayerView, budget: Budget) -> Selection:
        alpha = self.params.alpha if budget.top_p is None else budget.top_p
        if not self.params.target:
            return self._at(view, alpha)
        n = view.prefill_len
        rows = torch.arange(n)
        memo = self._cache.get(view, "density", dict)

        def density(a: float) -> float:
            if a not in memo:
                memo[a] = self._at(view, a).density(rows, n).mean().item()
            return memo[a]

        lo, hi = 0.0, 1.0
        if density(hi) <= budget.fraction:
            return self._at(view, hi)
        for _ in range(20):  # alpha to ~1e-6; counts are steps in alpha, so this finds the last step below
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if density(mid) <= budget.fraction else (lo, mid)
        return self._at(view, lo)

    def _estimate(self, view: LayerView):
        p = self.params
        return self._cache.get(view, "rankings", lambda: vs_rankings(view, p.window, p.sinks, p.local))

    def _counts(self, view: LayerView, alpha: float) -> tuple[Tensor, Tensor]:
        """Per-head token counts of verticals and slashes covering alpha of the estimated mass."""
        def sorted_means() -> tuple[Tensor, Tensor]:
            vertical, slash, _, _ = self._estimate(view)
            window = len(window_positions(view.prefill_len, self.params.window))
            return tuple(torch.sort(x / window, dim=-1, descending=True).values for x in (vertical, slash))

        vertical, slash = self._cache.get(view, "sorted", sorted_means)
        return mass_count(vertical, alpha), mass_count(slash, alpha)

    def _at(self, view: LayerView, alpha: float) -> Selection:
        """The selection at ``alpha``: one object per (view, alpha), so the simulator scores it once."""
        return self._cache.get(view, ("at", alpha), lambda: self._blockwise(view, alpha) if self.params.tau > 0
                               else self._tokenwise(view, alpha))

    def _tokenwise(self, view: LayerView, alpha: float) -> VerticalSlashSelection:
        p = self.params
        n = view.prefill_len
        _, _, col_order, off_order = self._estimate(view)
        n_cols, n_offs = self._counts(view, alpha)
        columns, offsets = [], []
        for h in range(view.n_query_heads):
            columns.append(col_order[h, : min(n, max(p.min_budget, int(n_cols[h])))].clone())
            offsets.append(off_order[h, : min(n, max(p.min_budget, int(n_offs[h])))].clone())
        return VerticalSlashSelection(columns, offsets, block=p.block)

    def _blockwise(self, view: LayerView, alpha: float) -> BlockMask:
        p = self.params
        b, n = p.block, view.prefill_len
        nb = -(-n // b)
        vertical, slash, _, _ = self._estimate(view)
        window = len(window_positions(n, p.window))
        v_blocks = _sum_pool(vertical / window, b)  # [Hq, nb]: estimated mass per key block
        s_blocks = _sum_pool(slash / window, b)  # per block diagonal (offsets o // b)
        n_cols, n_offs = self._counts(view, alpha)
        floor = math.ceil(p.min_budget / b)
        n_vb = (n_cols // b + 1).clamp(min=floor, max=nb)
        n_sb = (n_offs // b + 1).clamp(min=floor, max=nb)
        keys = self._pooled_keys(view)
        positions = window_positions(n, p.window)
        last_q = view.queries_at(positions.to(view.q_positions.device)).mean(1) * view.scale  # [Hq, d]
        group = view.group
        qblock = torch.arange(nb)
        causal = qblock[None, :] <= qblock[:, None]
        blocks = torch.zeros(view.n_query_heads, nb, nb, dtype=torch.bool)
        for h in range(view.n_query_heads):
            k_h = keys[h // group]
            a_hat = torch.softmax(k_h @ last_q[h], dim=-1)
            query_aware = bool(_sqrt_js(a_hat, v_blocks[h]) < p.tau)
            nv, ns = (min(floor, nb), min(floor, nb)) if query_aware else (int(n_vb[h]), int(n_sb[h]))
            kept_cols = torch.argsort(v_blocks[h].index_fill(0, torch.tensor([0]), float("inf")),
                                      descending=True, stable=True)[:nv]
            kept_diag = torch.argsort(s_blocks[h].index_fill(0, torch.tensor([0]), float("inf")),
                                      descending=True, stable=True)[:ns]
            blocks[h][:, kept_cols] = True
            diag = torch.zeros(nb, dtype=torch.bool)
            diag[kept_diag] = True
            blocks[h] |= diag[(qblock[:, None] - qblock[None, :]).clamp(min=0)]
            if query_aware:
                scores = (self._pooled_queries(view)[h] * view.scale) @ k_h.T
                probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).flatten()
                mass, order = torch.sort(probs, descending=True, stable=True)
                chosen = order[mass.cumsum(0) <= alpha * nb]
                blocks[h].view(-1)[chosen] = True
            blocks[h] &= causal
        return BlockMask(blocks, block_q=b, block_k=b)

    def _pooled_keys(self, view: LayerView) -> Tensor:
        """Block-mean-pooled prompt keys [Hkv, nb, d]."""
        n, b = view.prefill_len, self.params.block
        return self._cache.get(view, "pooled_k", lambda: _mean_pool(view.k[:, :n].float().cpu(), b))

    def _pooled_queries(self, view: LayerView) -> Tensor:
        """Block-mean-pooled prompt queries [Hq, nb, d] (needs every prompt query in the trace)."""
        n, b = view.prefill_len, self.params.block

        def pool() -> Tensor:
            q = view.queries_at(torch.arange(n, device=view.q_positions.device))
            return _mean_pool(q.float().cpu(), b)

        return self._cache.get(view, "pooled_q", pool)
