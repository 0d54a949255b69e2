"""Meeting a requested sparsity with a count knob: search the knob on the realised density of the Selection."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def largest_within_each(density: Callable[[list[int], list[int]], Sequence[float]], lo: Sequence[int],
                        hi: Sequence[int], target: float, memos: Sequence[dict[int, float]]) -> list[int]:
    """Per head, the largest knob in [lo, hi] whose density is at most ``target`` (``lo`` when even it is over).

    Heads are searched in lockstep: each round asks ``density(heads, knobs)`` for one knob per head still
    searching, so the caller can evaluate them together. Density must be non-decreasing in the knob. Each
    round interpolates inside the bracket (halving instead when interpolation did not halve it) and probes
    the guess's neighbour, so an accurate guess closes the bracket at once. ``memos`` (knob -> density, one
    per head) carry evaluations between calls on the same layer, so later targets start from a narrow bracket.
    """
    n_heads = len(lo)
    lo, hi = list(lo), list(hi)

    def at(pairs: list[tuple[int, int]]) -> None:
        need = list(dict.fromkeys((h, k) for h, k in pairs if k not in memos[h]))
        if need:
            values = density([h for h, _ in need], [k for _, k in need])
            for (h, k), value in zip(need, values, strict=True):
                memos[h][k] = float(value)

    at([(h, lo[h]) for h in range(n_heads)] + [(h, hi[h]) for h in range(n_heads) if hi[h] > lo[h]])
    result: list[int | None] = [None] * n_heads
    active = []
    for h in range(n_heads):
        if hi[h] <= lo[h] or memos[h][lo[h]] > target:
            result[h] = lo[h]
        elif memos[h][hi[h]] <= target:
            result[h] = hi[h]
        else:
            for k, value in memos[h].items():  # narrow with what earlier searches already know
                if lo[h] < k < hi[h]:
                    if value <= target:
                        lo[h] = k
                    else:
                        hi[h] = k
            active.append(h)
    interpolate = dict.fromkeys(active, True)
    while active := [h for h in active if hi[h] - lo[h] > 1]:
        width = {h: hi[h] - lo[h] for h in active}
        guess = {}
        for h in active:
            d_lo, d_hi = memos[h][lo[h]], memos[h][hi[h]]
            if interpolate[h] and d_hi > d_lo:
                g = lo[h] + int((target - d_lo) / (d_hi - d_lo) * width[h])
            else:
                g = (lo[h] + hi[h]) // 2
            guess[h] = min(max(g, lo[h] + 1), hi[h] - 1)
        at(list(guess.items()))
        probes = {}
        for h, g in guess.items():
            if memos[h][g] <= target:
                lo[h] = g
                if g + 1 < hi[h]:
                    probes[h] = g + 1
            else:
                hi[h] = g
                if g - 1 > lo[h]:
                    probes[h] = g - 1
        at(list(probes.items()))
        for h, p in probes.items():
            if memos[h][p] <= target:
                lo[h] = max(lo[h], p)
            else:
                hi[h] = min(hi[h], p)
        for h in active:
            interpolate[h] = (hi[h] - lo[h]) * 2 <= width[h]
    return [lo[h] if result[h] is None else result[h] for h in range(n_heads)]


def largest_within(density: Callable[[int], float], lo: int, hi: int, target: float,
                   memo: dict[int, float] | None = None) -> int:
    """Largest knob in [lo, hi] whose density (non-decreasing in it) is at most ``target``; ``lo`` if none is."""
    memo = {} if memo is None else memo
    return largest_within_each(lambda _, knobs: [density(k) for k in knobs], [lo], [hi], target, [memo])[0]
