"""Checks on what a policy returns: a Selection of the right shape, never reading the future, within budget."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Budget, LayerView
from .selection import BlockMask, Dense, KeptKeys, PageSet, Selection, TokenSet, VerticalSlash, row_counts


class PolicyError(ValueError):
    """A policy that cannot be found, loaded or built, or whose selection breaks the contract."""


def scored_rows(policy, view: LayerView) -> Tensor:
    """The query positions a policy's selection must cover: every prompt row (prefill) or ``view.rows``."""
    if policy.phase == "prefill":
        return torch.arange(view.prefill_len)
    if view.rows is None:
        raise PolicyError(f"decode policy {policy.name!r} needs the decode rows (view.rows)")
    return view.rows.cpu()


def _future(selection: Selection, rows: Tensor) -> str | None:
    """A description of a listed key that lies after its query, or None."""
    if isinstance(selection, BlockMask):
        b = selection.blocks
        q_last = (torch.arange(b.shape[1], device=b.device) + 1) * selection.block_q - 1
        k_first = torch.arange(b.shape[2], device=b.device) * selection.block_k
        bad = b & (k_first[None, None, :] > q_last[None, :, None])
        if bad.any():
            h, qb, kb = bad.nonzero()[0].tolist()
            return f"head {h} keeps key block {kb} for query block {qb}, which lies wholly after it"
    elif isinstance(selection, VerticalSlash):
        last = int(rows.max())
        for h in range(selection.heads):
            if (selection.offsets[h] < 0).any():
                return f"head {h} keeps a negative diagonal offset (keys after the query)"
            if (selection.columns[h] > last).any():
                return f"head {h} keeps key column {int(selection.columns[h].max())}, after every query row"
    elif isinstance(selection, TokenSet):
        idx = selection.indices.cpu()
        bad = idx > selection.rows.cpu()[None, :, None]
        if bad.any():
            h, r, _ = bad.nonzero()[0].tolist()
            return f"head {h} keeps key {int(idx[bad][0])} for the query at position {int(selection.rows[r])}"
    elif isinstance(selection, PageSet):
        first_key = selection.pages.cpu() * selection.page_size
        bad = first_key > selection.rows.cpu()[None, :, None]
        if bad.any():
            h, r, _ = bad.nonzero()[0].tolist()
            return f"head {h} reads a page after the query at position {int(selection.rows[r])}"
    return None


def check_selection(policy, view: LayerView, budget: Budget, selection, check_budget: bool = True) -> Tensor:
    """Raise PolicyError when ``selection`` breaks the contract; return its realised density per head.

    Contract: a Selection whose heads are the query or KV heads; valid for every scored row (all prompt rows
    for prefill, ``view.rows`` for decode); listing no key after its query; and, unless the policy owns its
    budget or ``check_budget`` is off, within budget up to one unit of its granularity (whole blocks or pages):
    prefill density <= max(1 - sparsity, floor) + 2 * unit / prompt length, where a policy whose always-kept
    part (sinks, local band) can exceed small budgets reports that part's density as the optional method
    ``floor_density(view)``; decode prompt keys per step <= tokens + 2 * unit. Density is over the scored
    rows: computed cells / causal cells (decode: keys read / keys cached).
    """
    who = f"policy {policy.name!r}"
    if not isinstance(selection, Selection):
        raise PolicyError(f"{who} returned {type(selection).__name__}, not a Selection")
    if selection.heads not in (view.n_query_heads, view.n_kv_heads):
        raise PolicyError(f"{who} returned a selection for {selection.heads} heads; the layer has "
                          f"{view.n_query_heads} query and {view.n_kv_heads} KV heads")
    if isinstance(selection, KeptKeys) and selection.prefill_len != view.prefill_len:
        raise PolicyError(f"{who} kept-key set covers {selection.prefill_len} prompt keys, not {view.prefill_len}")
    rows = scored_rows(policy, view)
    n_keys = view.prefill_len if policy.phase == "prefill" else view.n_keys
    future = _future(selection, rows)
    if future:
        raise PolicyError(f"{who} attends to the future: {future}")
    try:
        density = selection.density(rows, n_keys)
    except (ValueError, IndexError, RuntimeError) as exc:
        raise PolicyError(f"{who} returned a selection that does not cover the scored rows: {exc}") from exc
    if not check_budget or getattr(policy, "owns_budget", False) or isinstance(selection, Dense):
        return density
    unit = int(getattr(policy, "granularity", ("token", 1))[1])
    if policy.phase == "prefill":
        floor = policy.floor_density(view) if callable(getattr(policy, "floor_density", None)) else 0.0
        allowed = max(budget.fraction, floor) + 2 * unit / max(view.prefill_len, 1)
        worst = float(density.max())
        if worst > allowed + 1e-9:
            raise PolicyError(f"{who} is over budget: density {worst:.4f} > {budget.fraction:.4f} "
                              f"(sparsity {budget.sparsity:.4f}, granularity {unit})")
    else:
        prompt_keys = _prompt_keys_per_row(selection, rows, view)
        worst = int(prompt_keys.max())
        if worst > budget.tokens + 2 * unit:
            raise PolicyError(f"{who} is over budget: reads {worst} prompt keys in one step, "
                              f"budget {budget.tokens} tokens (granularity {unit})")
    return density


def _prompt_keys_per_row(selection: Selection, rows: Tensor, view: LayerView) -> Tensor:
    """Prompt keys (positions < prefill_len) each (head, row) reads; new tokens are free."""
    counts = []
    for start in range(0, len(rows), 256):
        mask = selection.mask(rows[start : start + 256], view.n_keys)
        counts.append(row_counts(mask[..., : view.prefill_len]))
    return torch.cat(counts, dim=1)
