"""Sink + local window (StreamingLLM / A-shape): the first tokens and a recent window, nothing estimated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Budget, LayerView, PolicyBase
from .estimate import ViewCache
from .selection import VerticalSlash
from .targeting import largest_within


class SinkLocal(PolicyBase):
    """Prefill A-shape: sink key columns plus a local band widened to the budget.

    Run as a vertical-slash selection (``sinks`` columns, slashes 0..w-1) so that the kernel's ``block``
    coverage is counted; the band width w is the largest whose realised density stays within the budget.
    """

    name: ClassVar[str] = "sink_local"
    phase: ClassVar[str] = "prefill"
    owns_budget: ClassVar[bool] = False
    granularity: ClassVar[tuple] = ("token", 1, "head")

    @dataclass
    class Params:
        sinks: int = 4
        block: int = 64

        def __post_init__(self):
            if self.sinks < 0 or self.block < 1:
                raise ValueError(f"sink_local needs sinks >= 0 and block >= 1 (got {self.sinks}, {self.block})")

    def __init__(self, **params):
        super().__init__(**params)
        self._cache = ViewCache()

    def _selection(self, heads: int, width: int) -> VerticalSlash:
        cols = torch.arange(self.params.sinks)
        offs = torch.arange(width)
        return VerticalSlash(columns=[cols] * heads, offsets=[offs] * heads, block=self.params.block)

    def _density(self, view: LayerView, width: int) -> float:
        """Realised density over the whole prompt at band width ``width`` (memoised per view)."""
        memo = self._cache.get(view, "density", dict)
        if width not in memo:
            n = view.prefill_len
            memo[width] = self._selection(1, width).cells(torch.arange(n), n).item() / (n * (n + 1) / 2)
        return memo[width]

    def floor_density(self, view: LayerView) -> float:
        """Density of the sinks and the narrowest band (one diagonal, widened to ``block`` rows by the kernel)."""
        return self._density(view, 1)

    def select(self, view: LayerView, budget: Budget) -> VerticalSlash:
        n = view.prefill_len
        memo = self._cache.get(view, "density", dict)
        width = largest_within(lambda w: self._density(view, w), 1, n, budget.fraction, memo)
        return self._selection(view.n_query_heads, width)


class SinkLocalDecode(PolicyBase):
    """StreamingLLM decoding: the first keys and the most recent ones, at the budget.

    Each step reads the first ``sinks`` keys and the most recent ``tokens - sinks`` keys (itself included);
    a vertical-slash selection at block 1 is exactly that.
    """

    name: ClassVar[str] = "sink_local_decode"
    phase: ClassVar[str] = "decode"
    owns_budget: ClassVar[bool] = False
    granularity: ClassVar[tuple] = ("token", 1, "head")

    @dataclass
    class Params:
        sinks: int = 4

        def __post_init__(self):
            if self.sinks < 0:
                raise ValueError(f"sink_local_decode needs sinks >= 0 (got {self.sinks})")

    def select(self, view: LayerView, budget: Budget) -> VerticalSlash:
        sinks = min(self.params.sinks, max(budget.tokens - 1, 0))
        width = max(1, budget.tokens - sinks)
        cols, offs = torch.arange(sinks), torch.arange(width)
        heads = view.n_query_heads
        return VerticalSlash(columns=[cols] * heads, offsets=[offs] * heads, block=1)


