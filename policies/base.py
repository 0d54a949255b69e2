"""The contracts between traces, policies, budget rules and the simulator."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal, Protocol, runtime_checkable

from torch import Tensor

from .selection import Selection

Phase = Literal["prefill", "decode"]


@dataclass
class LayerView:
    """What a policy sees of one captured layer.

    ``q [Hq, Tq, d]`` holds the queries at ``q_positions [Tq]`` (ascending); ``k``/``v [Hkv, T, d]`` the keys
    and values of the whole sequence, after RoPE and any q/k norm. ``rows`` are the query positions a
    decode policy must select for (decode steps, or the labelled proxy rows at the end of the prompt);
    ``prefill_len`` is where decoding starts (for the proxy, the first proxy row). ``probs [Hq, R, T]``, when
    the simulator provides it, is the true attention of the scored query rows ``rows`` (oracles read it).
    ``memo`` holds estimates policies cache on the layer (:class:`policies.estimate.ViewCache`); views derived
    with ``dataclasses.replace`` (the simulator's prefill and decode views of one layer) share it.
    """

    q: Tensor
    k: Tensor
    q_positions: Tensor
    prefill_len: int
    scale: float
    v: Tensor | None = None
    rows: Tensor | None = None
    softcap: float | None = None
    sliding_window: int | None = None
    layer: int = 0
    probs: Tensor | None = None
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_query_heads(self) -> int:
        return self.q.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.k.shape[0]

    @property
    def group(self) -> int:
        """GQA group size G = Hq / Hkv."""
        return self.n_query_heads // self.n_kv_heads

    @property
    def n_keys(self) -> int:
        return self.k.shape[1]

    def queries_at(self, positions: Tensor) -> Tensor:
        """Queries [Hq, len(positions), d] at the given positions (which must have been captured)."""
        import torch

        where = torch.searchsorted(self.q_positions, positions.to(self.q_positions.device))
        ok = (where < len(self.q_positions)) & (self.q_positions[where.clamp(max=len(self.q_positions) - 1)]
                                                == positions.to(self.q_positions.device))
        if not bool(ok.all()):
            missing = positions[~ok.to(positions.device)][:5].tolist()
            raise ValueError(f"trace lacks queries at positions {missing}: capture them (--query-positions)")
        return self.q[:, where]


@dataclass(frozen=True)
class Budget:
    """How much a policy may keep: the requested sparsity and the key budget per head it implies.

    ``tokens`` is the number of keys each head may keep at context length ``n_ctx`` (decode capacity;
    for prefill the equivalent kept fraction is ``1 - sparsity``). ``per_head`` optionally gives a
    different count per head (adaptive rules); ``top_p`` is set by the mass-threshold rule.
    """

    sparsity: float
    tokens: int
    n_ctx: int
    per_head: tuple[int, ...] | None = None
    top_p: float | None = None

    @property
    def fraction(self) -> float:
        """Kept fraction rho = 1 - sparsity."""
        return 1.0 - self.sparsity


@runtime_checkable
class Policy(Protocol):
    """A sparse-attention method: maps a layer's view and a budget to a Selection."""

    name: ClassVar[str]
    phase: ClassVar[Phase]
    owns_budget: ClassVar[bool]
    params: object

    def select(self, view: LayerView, budget: Budget) -> Selection:
        """The cells this method computes for this layer under this budget."""
        ...


@runtime_checkable
class BudgetRule(Protocol):
    """Decides how many keys each head may keep for a requested sparsity."""

    name: ClassVar[str]

    def budget(self, view: LayerView, sparsity: float) -> Budget:
        """The budget for this layer at this sparsity."""
        ...


@dataclass
class PolicyInfo:
    """Registry entry: the class, where it came from, and its one-line summary."""

    cls: type
    source: str
    summary: str = field(default="")


class PolicyBase:
    """Convenience base for policies: ``__init__(**params)`` builds ``self.params`` from the ``Params`` dataclass.

    Unknown parameter names raise one ``TypeError`` naming the policy and listing the known ones.
    """

    name: ClassVar[str]
    Params: ClassVar[type]

    def __init__(self, **params):
        known = [f.name for f in fields(self.Params)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise TypeError(f"policy {self.name!r} has no parameter {', '.join(map(repr, unknown))}; "
                            f"its parameters are: {', '.join(known) or '(none)'}")
        self.params = self.Params(**params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"
