"""Properties of every built-in policy over random shapes, GQA groups and budgets (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_frontier.policies.base import LayerView
from sparse_frontier.policies.budget import Fixed, TopP, Uniform
from sparse_frontier.policies.quest import page_bounds
from sparse_frontier.policies.registry import get_policy
from sparse_frontier.policies.selection import BlockMask, KeptKeys, PageSet, Selection, VerticalSlash
from sparse_frontier.policies.validate import check_selection

FAST = settings(max_examples=20, deadline=None)

PREFILL = {  # small windows and blocks so that tiny sequences exercise every rule
    "vertical_slash": {"window": 8, "sinks": 2, "local": 4, "block": 4},
    "block_sparse": {"chunk_size": 4},
    "sink_local": {"sinks": 2, "block": 4},
    "flexprefill": {"window": 8, "min_budget": 4, "sinks": 2, "local": 4, "block": 4},
    "flexprefill_js": {"window": 8, "min_budget": 4, "block": 4, "tau": 0.3, "target": True},
}
DECODE = {
    "snapkv": {"window": 8, "pool": 3, "sinks": 2, "local": 4},
    "ada_snapkv": {"window": 8, "pool": 3, "sinks": 2, "local": 4, "floor_min": 6},
    "quest": {"page_size": 4},
    "sink_local_decode": {"sinks": 2},
}
MONOTONE_PREFILL = ("vertical_slash", "block_sparse", "sink_local")
MONOTONE_DECODE = ("snapkv", "quest", "sink_local_decode")


@st.composite
def views(draw, decode: bool = False):
    kv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    d = draw(st.sampled_from([4, 8]))
    n = draw(st.integers(12, 72))
    seed = draw(st.integers(0, 10_000))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(kv * group, n, d, generator=gen) * 2
    k = torch.randn(kv, n, d, generator=gen) * 2
    prefill, rows = n, None
    if decode:
        steps = draw(st.integers(1, min(8, n - 8)))
        prefill, rows = n - steps, torch.arange(n - steps, n)
    return LayerView(q=q, k=k, q_positions=torch.arange(n), prefill_len=prefill, scale=d ** -0.5, rows=rows)


@st.composite
def vs_selections(draw):
    n = draw(st.integers(1, 70))
    block = draw(st.integers(1, 9))
    heads = draw(st.integers(1, 3))
    ints = st.lists(st.integers(-3, n + 3), max_size=12)
    sel = VerticalSlash([torch.tensor(draw(ints), dtype=torch.long) for _ in range(heads)],
                        [torch.tensor(draw(ints), dtype=torch.long) for _ in range(heads)], block=block)
    rows = torch.tensor(sorted(draw(st.sets(st.integers(0, n - 1), min_size=1))), dtype=torch.long)
    return sel, rows, n


@FAST
@given(vs_selections())
def test_vertical_slash_closed_form_cells_equal_the_mask(case):
    sel, rows, n = case
    assert sel.cells(rows, n).tolist() == Selection.cells(sel, rows, n).tolist()


@FAST
@given(vs_selections(), st.integers(0, 12))
def test_vertical_slash_mask_covers_each_query_blocks_parallelograms(case, past):
    """Row i (in the query block starting at r0) computes key j <= i when j is a vertical or a slash o in
    [0, n) has r0 - o <= j <= r0 + block - 1 - o; rows past the keys included."""
    sel, rows, n = case
    rows = torch.cat([rows, n + torch.arange(past)])
    mask = sel.mask(rows, n)
    for h in range(sel.heads):
        cols = set(sel.columns[h].tolist())
        offs = [o for o in sel.offsets[h].tolist() if 0 <= o < n]
        for r, i in enumerate(rows.tolist()):
            r0, b = i // sel.block * sel.block, sel.block
            want = [j <= i and (j in cols or any(r0 - o <= j <= r0 + b - 1 - o for o in offs)) for j in range(n)]
            assert mask[h, r].tolist() == want


@FAST
@given(st.integers(1, 60), st.integers(1, 7), st.integers(1, 7), st.integers(0, 10_000))
def test_block_mask_closed_form_cells_equal_the_mask(n, bq, bk, seed):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.rand(2, -(-n // bq), -(-n // bk), generator=gen) < 0.4
    sel = BlockMask(blocks, bq, bk)
    rows = torch.randperm(n, generator=gen)[: max(1, n // 2)]
    assert sel.cells(rows, n).tolist() == Selection.cells(sel, rows, n).tolist()


@FAST
@given(views(), st.floats(0.0, 0.95), st.sampled_from(sorted(PREFILL)), st.booleans())
def test_prefill_selections_are_causal_shaped_and_within_budget(view, sparsity, name, top_p):
    pol = get_policy(name.removesuffix("_js"), **PREFILL[name])
    budget = (TopP(p=0.7) if top_p else Uniform()).budget(view, sparsity)
    sel = pol.select(view, budget)
    density = check_selection(pol, view, budget, sel)  # raises on future keys, bad shape or overspending
    assert sel.heads == view.n_query_heads and density.shape == (view.n_query_heads,)
    if name in MONOTONE_PREFILL and not top_p:
        floor = pol.floor_density(view)
        # within the method's granularity: at the requested fraction unless the forced part alone exceeds it
        assert float(density.max()) <= max(budget.fraction, floor) + 1e-9
    if name == "flexprefill_js" and not top_p:  # alpha searched: the layer mean meets the budget or its floor
        smallest = get_policy("flexprefill", **{**PREFILL[name], "alpha": 0.0, "target": False})
        rows = torch.arange(view.prefill_len)
        floor = float(smallest.select(view, budget).density(rows, view.prefill_len).mean())
        assert float(density.mean()) <= max(budget.fraction, floor) + 1e-9


@FAST
@given(views(decode=True), st.floats(0.0, 0.95), st.sampled_from(sorted(DECODE)))
def test_decode_selections_are_causal_shaped_and_within_budget(view, sparsity, name):
    pol = get_policy(name, **DECODE[name])
    budget = Uniform().budget(view, sparsity)
    sel = pol.select(view, budget)
    check_selection(pol, view, budget, sel)
    shared = name in ("snapkv", "ada_snapkv", "quest")
    assert sel.heads == (view.n_kv_heads if shared else view.n_query_heads)
    assert sel.mask(view.rows, view.n_keys).shape == (sel.heads, len(view.rows), view.n_keys)
    if isinstance(sel, KeptKeys):
        kept = sel.kept.sum(-1)
        if name == "snapkv":
            assert (kept == min(budget.tokens, view.prefill_len)).all()
        else:  # Ada: the layer total is the budget, every head keeps at least its floor
            assert int(kept.sum()) == min(budget.tokens, view.prefill_len) * view.n_kv_heads
            floor = min(budget.tokens, view.prefill_len, max(int(0.2 * budget.tokens), 6))
            assert (kept >= floor).all()


@FAST
@given(views(), st.floats(0.0, 0.9), st.floats(0.01, 0.09), st.sampled_from(MONOTONE_PREFILL))
def test_prefill_density_never_falls_as_the_budget_grows(view, sparsity, step, name):
    pol = get_policy(name, **PREFILL[name])
    rows, n = torch.arange(view.prefill_len), view.prefill_len
    dense_side = pol.select(view, Uniform().budget(view, sparsity)).density(rows, n)
    sparse_side = pol.select(view, Uniform().budget(view, min(sparsity + step, 0.99))).density(rows, n)
    assert (dense_side >= sparse_side - 1e-12).all()


@FAST
@given(views(decode=True), st.integers(1, 40), st.integers(1, 40), st.sampled_from(MONOTONE_DECODE))
def test_decode_selections_are_nested_as_the_budget_grows(view, small, extra, name):
    pol = get_policy(name, **DECODE[name])
    small_sel = pol.select(view, Fixed(tokens=small).budget(view, 0.0))
    large_sel = pol.select(view, Fixed(tokens=small + extra).budget(view, 0.0))
    small_mask = small_sel.mask(view.rows, view.n_keys)
    large_mask = large_sel.mask(view.rows, view.n_keys)
    assert not (small_mask & ~large_mask).any()


@FAST
@given(views(decode=True))
def test_quest_page_score_bounds_every_key_in_the_page(view):
    lo, hi = page_bounds(view.k, 4)
    for h in range(view.n_query_heads):
        q = view.q[h, view.rows]  # [R, d]
        bound = (q[:, None, :] * lo[h // view.group][None]).maximum(q[:, None, :] * hi[h // view.group][None]).sum(-1)
        dots = q @ view.k[h // view.group].T  # [R, T]
        pad = lo.shape[1] * 4 - dots.shape[1]
        page_max = torch.nn.functional.pad(dots, (0, pad), value=float("-inf")).reshape(len(q), -1, 4).amax(-1)
        assert (bound >= page_max - 1e-4).all()


@FAST
@given(views(decode=True), st.floats(0.0, 0.9))
def test_quest_reads_at_most_its_pages_and_always_the_current_one(view, sparsity):
    budget = Uniform().budget(view, sparsity)
    sel = get_policy("quest", page_size=4).select(view, budget)
    assert isinstance(sel, PageSet)
    n_top = int(budget.tokens / 4 + 0.5)
    assert ((sel.pages >= 0).sum(-1) <= n_top + 1).all()
    assert (sel.pages[..., -1] == view.rows // 4).all()
