"""Block-Sparse (MInference block pattern): query and key blocks mean-pooled, top key blocks per query block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Budget, LayerView, PolicyBase
from .estimate import ViewCache, mass_count
from .flexprefill import _mean_pool
from .oracle import argsort_desc
from .selection import BlockMask
from .targeting import largest_within


def block_sparse_density(n: int, block: int, top: int) -> float:
    """Exact causal density of keeping min(m + 1, top) key blocks (diagonal included) for each query block m."""
    nb = -(-n // block)
    m = torch.arange(nb, dtype=torch.float64)
    rows = torch.clamp(n - m * block, max=block)  # rows in query block m
    kept_below = torch.clamp(m + 1, max=top) - 1  # whole blocks left of the diagonal
    cells = rows * (rows + 1) / 2 + kept_below * rows * block
    return (cells.sum() / (n * (n + 1) / 2)).item()


class BlockSparse(PolicyBase):
    """MInference block-sparse: top key blocks per query block by mean-pooled q.k, per query head.

    Per query head and query block, the key blocks with the largest unscaled dot of mean-pooled q and k.

    Always kept: the first key block (sink), the diagonal block and the one just below it; each query block
    m keeps min(m + 1, top_chunks) blocks, forced ones included (MInference). With ``target`` (default)
    top_chunks is the largest whose density (closed form, the same for every head) is within the budget;
    ``target=False`` uses ``top_chunks`` as given. ``chunk_size`` is both the pooling and the mask block.
    Choice: a last partial block is pooled over the tokens it has (MInference zero-pads, diluting it).
    On a sliding-window layer, key blocks wholly outside every row's window of a query block rank last.
    """

    name: ClassVar[str] = "block_sparse"
    phase: ClassVar[str] = "prefill"
    owns_budget: ClassVar[bool] = False
    granularity: ClassVar[tuple] = ("block", 16, "head")

    @dataclass
    class Params:
        chunk_size: int = 16
        top_chunks: int = 64
        target: bool = True

        def __post_init__(self):
            if self.chunk_size < 1:
                raise ValueError(f"block_sparse chunk_size={self.chunk_size} must be >= 1")
            if self.top_chunks < 3:
                raise ValueError(f"block_sparse top_chunks={self.top_chunks} must be >= 3 (sink, diagonal, below)")

    def __init__(self, **params):
        super().__init__(**params)
        self._cache = ViewCache()
        self.granularity = ("block", self.params.chunk_size, "head")
        if not self.params.target:
            self.owns_budget = True

    def _pooled(self, view: LayerView) -> tuple[Tensor, Tensor]:
        """Mean-pooled prompt queries [Hq, nb, d] and keys expanded to the query heads [Hq, nb, d] (on the
        view's device, where the ranks and the mask are made too)."""
        def pool():
            n, b = view.prefill_len, self.params.chunk_size
            q = view.queries_at(torch.arange(n, device=view.q_positions.device)).float()
            k = _mean_pool(view.k[:, :n].float(), b).repeat_interleave(view.group, dim=0)
            return _mean_pool(q, b), k

        return self._cache.get(view, "pooled", pool)

    def _ranks(self, view: LayerView) -> Tensor:
        """Per query head and query block, each key block's position in keep order ([Hq, nb, nb], int16/32):
        forced blocks first, then by descending pooled score, future blocks last (ties in any fixed order)."""
        def compute():
            q_pool, k_pool = self._pooled(view)
            nb, device = q_pool.shape[1], q_pool.device
            m = torch.arange(nb, device=device)
            future = m[None, :] > m[:, None]
            if view.sliding_window:  # key blocks no row of the query block can see rank with the future ones
                b = self.params.chunk_size
                future |= (m[None, :] + 1) * b - 1 <= m[:, None] * b - view.sliding_window
            forced = (m[None, :] == 0) | (m[None, :] == m[:, None]) | (m[None, :] == m[:, None] - 1)
            dtype = torch.int16 if nb < 2**15 else torch.int32
            ranks = torch.empty(len(q_pool), nb, nb, dtype=dtype, device=device)
            positions = m.expand(nb, nb)
            for h in range(len(q_pool)):
                key = (q_pool[h] @ k_pool[h].T).masked_fill(future, float("-inf"))  # unscaled, as MInference
                order = argsort_desc(key.masked_fill(forced, float("inf")))
                ranks[h] = torch.empty_like(order).scatter_(-1, order, positions)
            return ranks

        return self._cache.get(view, "ranks", compute)

    def floor_density(self, view: LayerView) -> float:
        """Density of the three always-kept blocks per query block (sink, diagonal, below)."""
        return block_sparse_density(view.prefill_len, self.params.chunk_size, 3) if self.params.target else 0.0

    def select(self, view: LayerView, budget: Budget) -> BlockMask:
        p = self.params
        n = view.prefill_len
        nb = -(-n // p.chunk_size)
        ranks = self._ranks(view)
        if p.target:
            top = largest_within(lambda k: block_sparse_density(n, p.chunk_size, k), 3, max(nb, 3),
                                 budget.fraction)
        else:
            top = p.top_chunks
        m = torch.arange(nb, device=ranks.device)
        blocks = torch.empty(view.n_query_heads, nb, nb, dtype=torch.bool, device=ranks.device)
        for h in range(view.n_query_heads):
            count = torch.clamp(m + 1, max=top)
            if budget.top_p is not None:
                q_pool, k_pool = self._pooled(view)
                scores = (q_pool[h] @ k_pool[h].T) * view.scale
                probs = torch.softmax(scores.masked_fill(m[None, :] > m[:, None], float("-inf")), dim=-1)
                order = torch.argsort(ranks[h].int(), dim=-1)
                need = mass_count(torch.gather(probs, -1, order), budget.top_p)
                count = torch.minimum(count, torch.maximum(need, torch.clamp(m + 1, max=3)))
            torch.lt(ranks[h], count[:, None].to(ranks.dtype), out=blocks[h])  # the first count[m] of the order
        return BlockMask(blocks, block_q=p.chunk_size, block_k=p.chunk_size)
