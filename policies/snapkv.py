"""SnapKV: evict prompt keys once after prefill, by the attention of the last window of prompt queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Budget, LayerView, PolicyBase
from .estimate import ViewCache, mass_count, ranking, register_window, window_stats
from .selection import KeptKeys


def window_scores(view: LayerView, window: int, reduce: str) -> Tensor:
    """Per KV head, the window queries' attention over the prompt keys [Hkv, P] (P = ``view.prefill_len``).

    ``reduce="mean_sum"``: mean over the group's query heads, summed over the window (SnapKV);
    ``reduce="max"``: max over the window, then over the group's heads (Ada-SnapKV).
    """
    stats = window_stats(view, window)
    per_head = stats.vertical if reduce == "mean_sum" else stats.peak
    grouped = per_head.reshape(view.n_kv_heads, view.group, -1)
    return grouped.mean(1) if reduce == "mean_sum" else grouped.amax(1)


def pooled(scores: Tensor, kernel: int) -> Tensor:
    """1-D average pooling along the keys, stride 1, zero padding kernel // 2 counted in the mean (SnapKV);
    an even kernel's extra last output is dropped so the length is kept."""
    if kernel <= 1:
        return scores
    out = torch.nn.functional.avg_pool1d(scores[:, None, :], kernel, stride=1, padding=kernel // 2)[:, 0]
    return out[:, : scores.shape[-1]]


def keep_order(scores: Tensor, sinks: int, local: int) -> Tensor:
    """Prompt keys per KV head in keep order: the first ``sinks``, then the last ``local`` from the most
    recent back, then the rest by descending pooled score. (A capacity below sinks + local keeps that prefix.)"""
    n = scores.shape[-1]
    forced = list(range(min(sinks, n))) + list(range(n - 1, max(n - local, 0) - 1, -1))
    return ranking(scores, forced)


class SnapKV(PolicyBase):
    """SnapKV: evict the prompt once to the budget per KV head, by pooled last-window attention.

    Per KV head keep ``capacity`` = budget tokens of the prompt (first ``sinks`` and last ``local`` always,
    the rest by pooled window attention); generated tokens are never evicted.

    A top-p budget keeps the smallest prefix of that order whose pooled-score mass reaches p (capped at the
    capacity, never fewer than the forced tokens).
    """

    name: ClassVar[str] = "snapkv"
    phase: ClassVar[str] = "decode"
    owns_budget: ClassVar[bool] = False
    granularity: ClassVar[tuple] = ("token", 1, "group")

    @dataclass
    class Params:
        window: int = 256
        pool: int = 21
        sinks: int = 4
        local: int = 128

        def __post_init__(self):
            if self.window < 1 or self.pool < 1 or min(self.sinks, self.local) < 0:
                raise ValueError("snapkv needs window, pool >= 1 and sinks, local >= 0")

    def __init__(self, **params):
        super().__init__(**params)
        self._cache = ViewCache()
        register_window(self.params.window)

    def _estimate(self, view: LayerView) -> tuple[Tensor, Tensor]:
        p = self.params

        def compute():
            scores = pooled(window_scores(view, p.window, "mean_sum"), p.pool)
            return scores, keep_order(scores, p.sinks, p.local)

        return self._cache.get(view, "estimate", compute)

    def select(self, view: LayerView, budget: Budget) -> KeptKeys:
        p = self.params
        n = view.prefill_len
        scores, order = self._estimate(view)
        capacity = torch.full((view.n_kv_heads,), min(budget.tokens, n))
        if budget.top_p is not None:
            mass = torch.gather(scores, -1, order) / scores.sum(-1, keepdim=True).clamp(min=1e-30)
            forced = min(n, p.sinks + p.local)
            capacity = torch.minimum(capacity, mass_count(mass, budget.top_p).clamp(min=forced))
        kept = torch.zeros(view.n_kv_heads, n, dtype=torch.bool)
        kept.scatter_(-1, order, torch.arange(n)[None, :] < capacity[:, None])
        return KeptKeys(kept)
