"""Ada-SnapKV: SnapKV with max-based scores and the layer's capacity redistributed across KV heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Budget, LayerView, PolicyBase
from .estimate import ViewCache, register_window
from .selection import KeptKeys
from .snapkv import keep_order, pooled, window_scores


class AdaSnapKV(PolicyBase):
    """Ada-SnapKV: max-based SnapKV scores, the layer's budget redistributed across its KV heads.

    Scores: max over the window queries, then over the group's query heads, pooled as SnapKV (the public
    reference pools Ada's scores too; choice: the same ``pool`` as SnapKV). The layer keeps capacity * Hkv
    prompt tokens (capacity = budget tokens): each head first takes its own top
    max(floor_ratio * capacity, floor_min) (first ``sinks`` and last ``local`` forced in), the remainder goes to
    one top-k over every (head, token) score of the layer. When the floor exceeds the capacity each head keeps
    exactly the capacity.
    """

    name: ClassVar[str] = "ada_snapkv"
    phase: ClassVar[str] = "decode"
    owns_budget: ClassVar[bool] = True
    granularity: ClassVar[tuple] = ("token", 1, "group")

    @dataclass
    class Params:
        window: int = 256
        pool: int = 21
        sinks: int = 4
        local: int = 128
        floor_ratio: float = 0.2
        floor_min: int = 132

        def __post_init__(self):
            if self.window < 1 or self.pool < 1 or min(self.sinks, self.local, self.floor_min) < 0:
                raise ValueError("ada_snapkv needs window, pool >= 1 and sinks, local, floor_min >= 0")
            if not 0.0 <= self.floor_ratio <= 1.0:
                raise ValueError(f"ada_snapkv floor_ratio={self.floor_ratio} is outside [0, 1]")

    def __init__(self, **params):
        super().__init__(**params)
        self._cache = ViewCache()
        register_window(self.params.window)

    def _estimate(self, view: LayerView) -> tuple[Tensor, Tensor]:
        p = self.params

        def compute():
            scores = pooled(window_scores(view, p.window, "max"), p.pool)
            return scores, keep_order(scores, p.sinks, p.local)

        return self._cache.get(view, "estimate", compute)

    def select(self, view: LayerView, budget: Budget) -> KeptKeys:
        p = self.params
        n, heads = view.prefill_len, view.n_kv_heads
        scores, order = self._estimate(view)
        capacity = min(budget.tokens, n)
        floor = min(capacity, max(int(p.floor_ratio * capacity), p.floor_min))
        kept = torch.zeros(heads, n, dtype=torch.bool)
        kept.scatter_(-1, order[:, :floor], True)
        remainder = capacity * heads - floor * heads
        if remainder > 0:
            rest = scores.masked_fill(kept, float("-inf")).flatten()
            top = torch.argsort(rest, descending=True, stable=True)[:remainder]
            kept.view(-1)[top] = True
        return KeptKeys(kept)
