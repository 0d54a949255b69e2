"""Budget rules: how many keys each head may keep for a requested sparsity.

Every rule maps (layer view, requested sparsity s) to a :class:`Budget` at the layer's context length
n = ``view.prefill_len`` (the prompt for prefill; the cache when decoding starts). ``Budget.tokens`` is the
per-head key count; ``Budget.sparsity`` is the sparsity that count means at this length (equal to s for
``uniform``), so prefill policies keep the fraction ``Budget.fraction`` = tokens / n of the causal cells.

Rules and policies compose: a policy with ``owns_budget`` (Ada-SnapKV across heads, FlexPrefill's alpha,
or any method run with fixed counts) decides its own counts and reports what it realised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Budget, LayerView


def check_sparsity(sparsity: float) -> float:
    """The sparsity as a float, or a ValueError naming it when it is outside [0, 1)."""
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
    return sparsity


def _tokens_budget(sparsity: float, tokens: float, n_ctx: int, top_p: float | None = None) -> Budget:
    kept = min(n_ctx, max(1, round(tokens)))
    return Budget(sparsity=sparsity if kept == round(tokens) else 1.0 - kept / n_ctx, tokens=kept,
                  n_ctx=n_ctx, top_p=top_p)


@dataclass
class Uniform:
    """Every head keeps the fraction 1 - s of the context: tokens = round((1 - s) * n)."""

    name: ClassVar[str] = "uniform"

    def budget(self, view: LayerView, sparsity: float) -> Budget:
        s = check_sparsity(sparsity)
        return _tokens_budget(s, (1.0 - s) * view.prefill_len, view.prefill_len)


@dataclass
class Fixed:
    """The same token count at every length: ``tokens``, or (1 - s) * n_ref.

    Without ``tokens``, s sets the count at the reference length and it is then held fixed.
    """

    name: ClassVar[str] = "fixed"
    tokens: int | None = None
    n_ref: int = 8192

    def __post_init__(self) -> None:
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"fixed budget tokens={self.tokens} must be at least 1")
        if self.n_ref < 1:
            raise ValueError(f"fixed budget n_ref={self.n_ref} must be at least 1")

    def budget(self, view: LayerView, sparsity: float) -> Budget:
        s = check_sparsity(sparsity)
        tokens = self.tokens if self.tokens is not None else (1.0 - s) * self.n_ref
        n = view.prefill_len
        kept = min(n, max(1, round(tokens)))
        return Budget(sparsity=1.0 - kept / n, tokens=kept, n_ctx=n)


@dataclass
class Sublinear:
    """Budget growing as c * n^alpha (the paper's open question: longer contexts tolerate more sparsity).

    c is fixed so that at the reference length the budget is (1 - s) * n_ref:
    tokens = (1 - s) * n_ref * (n / n_ref)^alpha. alpha = 1 is ``uniform``; alpha = 0 is ``fixed``.
    """

    name: ClassVar[str] = "sublinear"
    alpha: float = 0.5
    n_ref: int = 8192

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"sublinear budget alpha={self.alpha} is outside [0, 1]")
        if self.n_ref < 1:
            raise ValueError(f"sublinear budget n_ref={self.n_ref} must be at least 1")

    def budget(self, view: LayerView, sparsity: float) -> Budget:
        s = check_sparsity(sparsity)
        n = view.prefill_len
        kept = min(n, max(1, round((1.0 - s) * self.n_ref * (n / self.n_ref) ** self.alpha)))
        return Budget(sparsity=1.0 - kept / n, tokens=kept, n_ctx=n)


@dataclass
class TopP:
    """Mass threshold: the smallest set whose estimated mass reaches p, capped at the uniform budget.

    Each head keeps the smallest set whose mass, by the policy's own estimator, reaches p, never more than
    the uniform budget at the requested sparsity (s = 0: no cap).

    Honoured by vertical_slash (vertical and slash counts from the window estimate), flexprefill (p replaces
    alpha), block_sparse (key blocks per query block from the pooled softmax) and snapkv (tokens from the
    pooled window scores). The others have no mass estimate and keep the capped count.
    """

    name: ClassVar[str] = "topp"
    p: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"top-p budget p={self.p} is outside (0, 1]")

    def budget(self, view: LayerView, sparsity: float) -> Budget:
        s = check_sparsity(sparsity)
        return _tokens_budget(s, (1.0 - s) * view.prefill_len, view.prefill_len, top_p=self.p)


BUDGET_RULES: dict[str, type] = {rule.name: rule for rule in (Uniform, Fixed, Sublinear, TopP)}
