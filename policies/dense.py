"""Dense attention: every causal cell (the s = 0 baseline), for prefill and for decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Budget, LayerView, PolicyBase
from .selection import Dense as DenseSelection


class Dense(PolicyBase):
    """Full causal attention over the prompt (ignores the budget)."""

    name: ClassVar[str] = "dense"
    phase: ClassVar[str] = "prefill"
    owns_budget: ClassVar[bool] = True
    granularity: ClassVar[tuple] = ("token", 1, "head")

    @dataclass
    class Params:
        pass

    def select(self, view: LayerView, budget: Budget) -> DenseSelection:
        return DenseSelection(heads=view.n_query_heads)


class DenseDecode(Dense):
    """Full attention over the whole cache at every decode step (ignores the budget)."""

    name: ClassVar[str] = "dense_decode"
    phase: ClassVar[str] = "decode"
