"""Quest: full cache, per decode step the pages whose key bounds promise the largest q.k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Budget, LayerView, PolicyBase
from .estimate import ViewCache
from .selection import Dense, PageSet, Selection

ROW_CHUNK = 256


def page_bounds(k: Tensor, page_size: int) -> tuple[Tensor, Tensor]:
    """Per-channel min and max of the keys of every page: two [Hkv, n_pages, d] (a last partial page uses
    the keys it has)."""
    heads, t, d = k.shape
    n_pages = -(-t // page_size)
    pad = n_pages * page_size - t
    lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf")).reshape(heads, n_pages, page_size, d)
    hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf")).reshape(heads, n_pages, page_size, d)
    return lo.amin(2), hi.amax(2)


class Quest(PolicyBase):
    """Quest: per decode step, the pages of largest key-bound score plus the current page.

    Page score = sum over channels of max(q_c * min_c, q_c * max_c), an upper bound of q.k on the page.

    Each decode step (row) reads the top round(tokens / page_size) earlier pages plus its current page
    (the page holding the row, whose bounds the step updates: it is always read, so its bounds never matter).
    With ``share_pages`` (default) scores are summed over the query heads of a GQA group and one page set is
    kept per KV head; otherwise per query head. Layers below ``dense_first_layers`` (model layer index) are
    dense (the Quest paper keeps 2; the Sparse Frontier paper 0). On a sliding-window layer only pages that
    hold a key inside the window compete (the others can never be attended to).
    """

    name: ClassVar[str] = "quest"
    phase: ClassVar[str] = "decode"
    owns_budget: ClassVar[bool] = False
    granularity: ClassVar[tuple] = ("page", 16, "group")

    @dataclass
    class Params:
        page_size: int = 16
        share_pages: bool = True
        dense_first_layers: int = 0

        def __post_init__(self):
            if self.page_size < 1 or self.dense_first_layers < 0:
                raise ValueError("quest needs page_size >= 1 and dense_first_layers >= 0")

    def __init__(self, **params):
        super().__init__(**params)
        self._cache = ViewCache()
        self.granularity = ("page", self.params.page_size, "group" if self.params.share_pages else "head")

    def _orders(self, view: LayerView) -> Tensor:
        """Per head and row, pages in keep order: earlier pages by descending score (ties: lower page first),
        then the rest (int32 [H, R, n_pages]; H = KV heads when sharing pages, else query heads)."""
        def compute():
            lo, hi = page_bounds(view.k.float(), self.params.page_size)
            rows = view.rows.to(view.q_positions.device)
            q = view.queries_at(rows).float()  # [Hq, R, d]
            q = q.reshape(view.n_kv_heads, view.group, *q.shape[1:])
            page = torch.arange(lo.shape[1], device=rows.device)[None, :]
            earlier = page < (rows // self.params.page_size)[:, None]
            if view.sliding_window:  # a sliding layer never reads pages wholly outside its window
                last_key = (page + 1) * self.params.page_size - 1
                earlier &= last_key > (rows - view.sliding_window)[:, None]
            out = []
            for start in range(0, q.shape[2], ROW_CHUNK):
                qc = q[:, :, start : start + ROW_CHUNK]
                s = qc.clamp(min=0) @ hi.transpose(-1, -2)[:, None] + qc.clamp(max=0) @ lo.transpose(-1, -2)[:, None]
                s = s.sum(1) if self.params.share_pages else s.flatten(0, 1)
                s = s.masked_fill(~earlier[start : start + ROW_CHUNK], float("-inf"))
                out.append(torch.argsort(s, dim=-1, descending=True, stable=True).to(torch.int32).cpu())
            return torch.cat(out, dim=1)

        return self._cache.get(view, ("orders", view.rows.data_ptr(), len(view.rows)), compute)

    def select(self, view: LayerView, budget: Budget) -> Selection:
        p = self.params
        if view.rows is None:
            raise ValueError("quest is a decode policy: the view must give the decode rows (view.rows)")
        heads = view.n_kv_heads if p.share_pages else view.n_query_heads
        if view.layer < p.dense_first_layers:
            return Dense(heads=heads)
        current = view.rows.cpu() // p.page_size
        order = self._orders(view)
        n_top = min(int(budget.tokens / p.page_size + 0.5), order.shape[-1])  # tokens rounded to whole pages
        top = order[..., :n_top].long()
        first = torch.zeros_like(current)  # first page a row can read: 0, or the window's first page
        if view.sliding_window:
            first = ((view.rows.cpu() - view.sliding_window + 1).clamp(min=0)) // p.page_size
        valid = torch.arange(n_top)[None, :] < (current - first)[:, None]  # only that many earlier pages to rank
        pages = torch.cat([torch.where(valid, top, -1), current.expand(heads, -1)[..., None]], dim=-1)
        return PageSet(rows=view.rows, pages=pages, page_size=p.page_size)
