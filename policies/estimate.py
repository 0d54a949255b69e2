"""Estimation shared by several methods: last-window causal softmax statistics, rankings, mass counts.

Vertical-Slash, FlexPrefill, SnapKV and Ada-SnapKV all read the causal softmax of the last prompt queries.
Each policy registers its window size when built; the first request for a view computes the softmax of the
largest registered window once per query head and reduces it for every registered window, so all these
policies share one pass over the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparse_frontier.kernels.reference import first_visible, visible

from .base import LayerView


class ViewCache:
    """Results computed from a LayerView, kept in the view's ``memo`` while the view lives.

    The simulator calls ``select`` once per budget on the same view; estimates that do not depend on the
    budget are computed once and reused, also by the other views of the same layer that share the memo.
    Keys include the view's prefill length, so a view with another prefill length (the decode proxy) gets
    fresh entries. Safe to share between threads (a value may then be computed twice, never mixed up).
    """

    def get(self, view: LayerView, key: Any, compute: Callable[[], Any]) -> Any:
        """The cached value of ``key`` for ``view``, computing it on first use."""
        key = (self, key, view.prefill_len)
        if key not in view.memo:
            view.memo.setdefault(key, compute())
        return view.memo[key]


@dataclass
class WindowStats:
    """Attention of the last ``window`` prompt queries of every query head over the prompt keys [Hq, P].

    ``vertical``: summed over the window, per key; ``slash``: summed along each diagonal offset o = i - j;
    ``peak``: max over the window, per key.
    """

    window: int
    vertical: Tensor
    slash: Tensor
    peak: Tensor


_windows: set[int] = set()
_shared = ViewCache()


def register_window(window: int) -> None:
    """Announce a window size some policy will ask for, so one pass computes it with the others."""
    _windows.add(int(window))


def window_stats(view: LayerView, window: int) -> WindowStats:
    """Statistics of the last ``window`` prompt queries (shared by every policy on this view)."""
    register_window(window)
    stats = _shared.get(view, "window_stats", dict)
    if window not in stats:
        stats.update(_compute_stats(view, sorted(_windows)))
    return stats[window]


def window_positions(end: int, window: int) -> Tensor:
    """The last ``window`` query positions before ``end`` (all of them when fewer)."""
    return torch.arange(max(0, end - window), end)


def _compute_stats(view: LayerView, windows: list[int]) -> dict[int, WindowStats]:
    """One softmax pass per query head over the largest window, reduced for each (nested) window.

    Each head's probabilities [wm, P] lie row after row in one buffer after ``wm`` zeros, so that row r's
    diagonal offsets line up as a strided view (offset o of row r sits at r * (P + 1) + P - o, counted from the
    zeros' first element; what an offset before the first key reads is zero: the padding or a future key).
    """
    end = view.prefill_len
    positions = window_positions(end, max(windows))
    wm = len(positions)
    sizes = sorted({min(w, wm) for w in windows})
    queries = view.queries_at(positions.to(view.q_positions.device)).float()
    if not view.softcap:
        queries = queries * view.scale  # fold the scale in: one pass less over the logits
    # a sliding window hides the keys before the first query's window: they stay zero in the buffer
    lo = first_visible(positions[0], view.sliding_window)
    keys = view.k[:, lo:end].float()
    buf = torch.zeros(wm + wm * end, device=keys.device)
    probs = buf[wm:].view(wm, end)
    seen = probs[:, lo:]
    if view.sliding_window:
        hidden = ~visible(positions.to(keys.device) - lo, end - lo, view.sliding_window)
    else:  # only the window's own corner holds future keys
        hidden = torch.ones(wm, wm, dtype=torch.bool, device=keys.device).triu(1)
    logits = seen if lo == 0 else torch.empty(wm, end - lo, device=keys.device)
    stride = end + 1
    out = {w: [torch.empty(view.n_query_heads, end) for _ in range(3)] for w in sizes}
    for h in range(view.n_query_heads):
        torch.matmul(queries[h], keys[h // view.group].T, out=logits)
        if view.softcap:
            logits.mul_(view.scale / view.softcap).tanh_().mul_(view.softcap)
        (logits if view.sliding_window else logits[:, end - wm :]).masked_fill_(hidden, float("-inf"))
        torch.softmax(logits, dim=-1, out=logits)
        if lo:
            seen.copy_(logits)
        vertical = torch.zeros(end, device=keys.device)
        slash = torch.zeros(end, device=keys.device)
        peak = torch.zeros(end, device=keys.device)
        first = wm
        for w in sizes:  # add the rows between the previous (smaller) window and this one
            rows = slice(wm - w, first)
            if wm - w < first:
                vertical += probs[rows].sum(0)
                peak = torch.maximum(peak, probs[rows].amax(0))
                aligned = buf.as_strided((first - (wm - w), end), (stride, 1), 1 + (wm - w) * stride)
                slash += aligned.sum(0).flip(0)
            first = wm - w
            for i, x in enumerate((vertical, slash, peak)):
                out[w][i][h] = x.cpu()
    result = {w: WindowStats(w, *out[min(w, wm)]) for w in windows}
    return result


def ranking(scores: Tensor, forced: list[int]) -> Tensor:
    """Indices in keep order along the last dim: the ``forced`` ones first (in the given order, duplicates and
    out-of-range ones dropped), then the rest by descending score (ties: lower index first)."""
    n = scores.shape[-1]
    forced_t = torch.tensor(list(dict.fromkeys(i for i in forced if 0 <= i < n)), dtype=torch.long)
    is_forced = torch.zeros(n, dtype=torch.bool)
    is_forced[forced_t] = True
    order = torch.argsort(scores.masked_fill(is_forced, float("-inf")), dim=-1, descending=True, stable=True)
    lead = order.shape[:-1]
    rest = order[~is_forced[order]].reshape(*lead, n - len(forced_t))
    return torch.cat([forced_t.expand(*lead, len(forced_t)), rest], dim=-1)


def mass_count(mass_in_order: Tensor, threshold: float) -> Tensor:
    """Smallest prefix length whose cumulative mass reaches ``threshold`` (the whole length when none does)."""
    total = mass_in_order.cumsum(-1)
    count = (total < threshold).sum(-1) + 1
    return count.clamp(max=mass_in_order.shape[-1])
