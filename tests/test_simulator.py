"""The simulator: exact attention, scoring of every Selection kind, oracles, metrics, sweeps, resume, CLI."""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
from pathlib import Path

import hypothesis.strategies as st
import pandas as pd
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import write_random_trace
from hypothesis import given, settings

from sparse_frontier.cli import prefer_avx2_sort, zen4_with_avx512
from sparse_frontier.cli.main import cli
from sparse_frontier.kernels.reference import masked_attention, selection_attention
from sparse_frontier.policies.base import Budget
from sparse_frontier.policies.flexprefill import FlexPrefill
from sparse_frontier.policies.oracle import Granularity, OracleTopK, OracleTopP, Ranking, sorted_cumsum, to_selection
from sparse_frontier.policies.selection import (
    BlockMask,
    Dense,
    KeptKeys,
    PageSet,
    TokenSet,
    VerticalSlash,
    as_float,
    causal,
    expand_heads,
)
from sparse_frontier.simulator.attention import ProbsBuffer, true_attention
from sparse_frontier.simulator.cost import ModelShape, decode_bytes, prefill_flops, vertical_slash_index
from sparse_frontier.simulator.results import load_parts, summary
from sparse_frontier.simulator.scoring import (
    CausalCells,
    Entry,
    Field,
    LayerScorer,
    Rows,
    group_part,
    relative_error,
    selected_mass,
    vertical_slash_masses,
)
from sparse_frontier.simulator.sweep import Settings, Spec, run_sweep, simulate_layer
from sparse_frontier.tracer.store import TraceStore, TraceWriter

TOL = 1e-5
PREFILL = ["dense", "sink_local", "vertical_slash", "flexprefill", "block_sparse", "oracle_topk", "oracle_topp",
           "oracle_topk[unit=page;size=16]", "oracle_topk[unit=block;size=16;sharing=group]"]
DECODE = ["dense_decode", "sink_local_decode", "snapkv", "ada_snapkv", "quest", "oracle_topk_decode",
          "oracle_topk_decode[unit=page;size=16;sharing=group]"]


def _patch_attrs(path, **model):
    root = zarr.open_group(str(path), mode="r+")
    attrs = dict(root.attrs)
    attrs["model"] = {**attrs["model"], **model}
    root.attrs.update(attrs)


def _sweep(path, policies, sparsities=(0.5, 0.8, 0.9), **kw) -> pd.DataFrame:
    store = TraceStore(str(path))
    s = Settings(policies=[Spec.parse(p) for p in policies], sparsities=list(sparsities), **kw)
    return pd.concat([simulate_layer(store, i, s)[0] for i in range(store.n_layers)], ignore_index=True)


# ---------------------------------------------------------------- exact attention


@pytest.mark.parametrize("scale", [0.35, 0.25])  # 0.25: a power of two, applied to q instead of the logits
@pytest.mark.parametrize("softcap,window", [(None, None), (5.0, None), (None, 24), (3.0, 40)])
def test_true_attention_equals_the_reference(softcap, window, scale):
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(4, 90, 8, generator=gen) * 2, torch.randn(2, 90, 8, generator=gen) * 2, torch.randn(2, 90, 8)
    rows = torch.tensor([0, 3, 17, 40, 41, 70, 89])
    probs = true_attention(q[:, rows], k, rows, scale, softcap, window, row_block=3)
    want, _ = masked_attention(q[:, rows], k, v, rows, scale, None, softcap, window)
    got = torch.matmul(probs, v.repeat_interleave(2, dim=0))
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(4, len(rows)))
    # the probabilities themselves, with row blocks of 3 and the default, against a float64 softmax
    logits = q[:, rows].double() @ k.double().repeat_interleave(2, dim=0).transpose(1, 2) * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    j = torch.arange(90)
    seen = j[None, :] <= rows[:, None]
    if window:
        seen &= j[None, :] > rows[:, None] - window
    want64 = torch.softmax(logits.masked_fill(~seen, float("-inf")), dim=-1)
    for tiled in (probs, true_attention(q[:, rows], k, rows, scale, softcap, window)):
        assert (tiled.double() - want64).abs().max() < 1e-6
        assert (tiled[:, ~seen] == 0).all()  # nothing in the future or outside the window


def test_true_attention_in_a_reused_buffer_is_exact():
    """A ProbsBuffer holds exactly a fresh result, whether the call before wrote other cells (other rows, windows,
    row blocks) or the same ones for other heads (reused memory)."""
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(4, 90, 8, generator=gen) * 2, torch.randn(2, 90, 8, generator=gen) * 2
    late, early = torch.tensor([0, 3, 17, 40, 41, 70, 89]), torch.tensor([5, 6, 30, 50, 60, 61, 62])
    buffer = ProbsBuffer()
    first = None
    for rows, window, block in [(late, None, 3), (early, None, 2), (late, 30, 4), (early, 12, 3), (late, None, 16)]:
        want = true_attention(q[:, rows], k, rows, 0.35, 4.0, window, row_block=block)
        got = true_attention(q[:, rows], k, rows, 0.35, 4.0, window, row_block=block, out=buffer)
        assert got is buffer.probs and torch.equal(got, want)
        memory = got.data_ptr()  # other heads over the same rows reuse it, and so do other rows (zeroed first)
        assert memory == (first := first or memory)
        other = (q.flip(0)[:, rows], k.flip(0), rows, 0.35, 4.0, window)
        again = true_attention(*other, row_block=block, out=buffer)
        assert again.data_ptr() == memory and torch.equal(again, true_attention(*other, row_block=block))


# ---------------------------------------------------------------- scoring each Selection kind


def _selections(n_q, n_kv, n_keys, rows, gen):
    """One selection of every kind, over query heads and over KV heads."""
    out = []
    for heads in {n_q, n_kv}:
        out.append(Dense(heads))
        blocks = torch.rand(heads, -(-n_keys // 8), -(-n_keys // 8), generator=gen) < 0.4
        out.append(BlockMask(blocks, block_q=8, block_k=8))
        out.append(VerticalSlash(columns=[torch.randperm(n_keys, generator=gen)[:5] for _ in range(heads)],
                                 offsets=[torch.randperm(n_keys, generator=gen)[:4] for _ in range(heads)], block=4))
        idx = torch.randint(-1, n_keys, (heads, len(rows), 7), generator=gen)
        out.append(TokenSet(rows, torch.minimum(idx, rows[None, :, None])))
        pages = torch.randint(-1, -(-n_keys // 4), (heads, len(rows), 3), generator=gen)
        out.append(PageSet(rows, torch.minimum(pages, (rows // 4)[None, :, None]), page_size=4))
        out.append(KeptKeys(torch.rand(heads, n_keys - 5, generator=gen) < 0.5))
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2, 3]), st.integers(20, 70), st.integers(0, 10_000))
def test_fast_recall_equals_the_dense_mask(n_kv, group, n_keys, seed):
    gen = torch.Generator().manual_seed(seed)
    n_q = n_kv * group
    rows = torch.sort(torch.randperm(n_keys, generator=gen)[: max(2, n_keys // 3)]).values
    q, k = torch.randn(n_q, len(rows), 8, generator=gen) * 2, torch.randn(n_kv, n_keys, 8, generator=gen) * 2
    probs = true_attention(q, k, rows, 0.4)
    ones = Field(causal(rows, n_keys).float()[None], rows)
    for sel in _selections(n_q, n_kv, n_keys, rows, gen):
        mask = expand_heads(sel.mask(rows, n_keys), n_q)
        for g in range(n_kv):
            qh = slice(g * group, (g + 1) * group)
            part = group_part(sel, g, group, n_kv)
            got = selected_mass(part, Field(probs[qh], rows), n_keys)
            assert torch.allclose(got.expand(group, -1), (probs[qh] * mask[qh]).sum(-1), atol=1e-5), sel
            count = selected_mass(part, ones, n_keys)
            assert torch.equal(count.expand(group, -1), mask[qh].sum(-1).float()), sel
        if isinstance(sel, VerticalSlash) and sel.heads == n_q:  # the batched path, with its cell counts
            err = torch.arange(0, len(rows), 2)
            got, cells, masks = vertical_slash_masses([sel, sel], probs, rows, n_keys, True, err)
            assert torch.allclose(got[1], (probs * mask).sum(-1), atol=1e-5)
            assert torch.equal(cells[0], mask.sum(-1).float())
            assert torch.equal(masks[1], mask[:, err])


def test_output_error_equals_the_reference_kernel_output(tmp_path):
    """o_sparse from the restricted, renormalised true probabilities = the reference kernel run on the mask."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(4, 64, 16, generator=gen), torch.randn(2, 64, 16, generator=gen), torch.randn(2, 64, 16)
    rows = torch.arange(10, 64, 3)
    blocks = torch.rand(4, 8, 8, generator=gen) < 0.5
    blocks[:, torch.arange(8), torch.arange(8)] = True
    sel = BlockMask(blocks, 8, 8)
    probs = true_attention(q[:, rows], k, rows, 0.25)
    mask = sel.mask(rows, 64)
    num = torch.matmul(probs * mask, v.repeat_interleave(2, 0))
    dense = torch.matmul(probs, v.repeat_interleave(2, 0))
    err = relative_error(num, (probs * mask).sum(-1), dense)
    sparse = selection_attention(sel, q[:, rows], k, v, rows, 0.25)
    want = (sparse - dense).norm(dim=-1) / dense.norm(dim=-1)
    assert torch.allclose(err, want, atol=1e-4)


def scored_layer(tmp_path, n_tokens: int, rows: torch.Tensor, error_step: int) -> tuple[object, Rows]:
    """Layer 0 of a one-layer random trace of ``n_tokens`` with ``rows`` scored (every ``error_step``-th one for
    output error)."""
    write_random_trace(tmp_path / "t.zarr", n_layers=1, n_tokens=n_tokens)
    view = TraceStore(str(tmp_path / "t.zarr")).layer_view(0)
    view.rows = rows
    return view, Rows(rows, torch.arange(0, len(rows), error_step), n_tokens, n_tokens)


def test_one_selection_for_several_budgets_is_scored_once_with_the_same_metrics(tmp_path):
    """FlexPrefill at its fixed alpha returns the same Selection object at every sparsity: the scorer scores it
    once and both entries carry the metrics each gets when scored alone."""
    view, scored = scored_layer(tmp_path, 200, torch.arange(40, 200, 3), error_step=4)
    policy = FlexPrefill(min_budget=8, window=32, local=8)

    def entry(sparsity: float) -> Entry:
        budget = Budget(sparsity=sparsity, tokens=int((1 - sparsity) * 200), n_ctx=200)
        return Entry(policy, "uniform", sparsity, budget, selection=policy.select(view, budget))

    together = [entry(0.5), entry(0.9)]
    assert together[0].selection is together[1].selection
    LayerScorer(view, scored, want_output=True).score(together)
    for e in together:
        alone = entry(e.sparsity)
        LayerScorer(view, scored, want_output=True).score([alone])
        for name in ("recall", "output_error", "oracle_recall", "oracle_output_error", "cells"):
            assert torch.equal(getattr(e, name), getattr(alone, name)), name
        assert e.oracle == alone.oracle and not e.error


# ---------------------------------------------------------------- oracles


@pytest.mark.parametrize("params", [{}, {"unit": "page", "size": 8, "sharing": "group"},
                                    {"unit": "block", "size": 8}])
def test_scored_oracle_equals_its_selection_run_by_the_reference(tmp_path, params):
    """Recall, density and output error of an oracle as scored = its Selection run through the reference."""
    view, scored = scored_layer(tmp_path, 120, torch.arange(30, 120, 2), error_step=3)
    rows = scored.positions
    budget = Budget(sparsity=0.7, tokens=36, n_ctx=120)
    oracle = OracleTopK(**params)
    entry = Entry(oracle, "uniform", 0.7, budget)
    LayerScorer(view, scored, want_output=True).score([entry])
    sel = oracle.select(view, budget)
    q = view.queries_at(rows)
    mask = expand_heads(sel.mask(rows, 120), 4)
    probs = true_attention(q, view.k, rows, view.scale)
    assert torch.allclose(entry.recall, (probs * mask).sum(-1), atol=1e-6)
    assert torch.allclose(entry.density, mask.sum((1, 2)).float() / (rows + 1).sum(), atol=1e-6)
    err_rows = rows[scored.error_index]
    sparse = selection_attention(sel, q[:, scored.error_index], view.k, view.v, err_rows, view.scale)
    dense = masked_attention(q[:, scored.error_index], view.k, view.v, err_rows, view.scale)[0]
    want = (sparse - dense).norm(dim=-1) / dense.norm(dim=-1)
    assert torch.allclose(entry.output_error, want, atol=1e-4)


@pytest.mark.parametrize("gran", [Granularity("token", 1, "head"), Granularity("token", 1, "group"),
                                  Granularity("page", 4, "head"), Granularity("page", 4, "group"),
                                  Granularity("block", 8, "head"), Granularity("block", 8, "group")])
def test_ranking_answers_equal_its_selection(gran):
    gen = torch.Generator().manual_seed(5)
    rows = torch.sort(torch.randperm(80, generator=gen)[:30]).values
    probs = true_attention(torch.randn(4, 30, 8, generator=gen) * 2, torch.randn(2, 80, 8, generator=gen) * 2,
                           rows, 0.4)
    rank = Ranking(probs, rows, gran, group=2)
    for fraction in (0.1, 0.3, 0.7):
        n = rank.fraction_budget(torch.full((rank.ranking_heads,), fraction))
        mask = expand_heads(to_selection(rank, n).mask(rows, 80), 4)
        assert torch.allclose(rank.mass_at(n), (probs * mask).sum(-1), atol=1e-6)
        assert torch.equal(rank.cells_at(n).sum(-1), to_selection(rank, n).mask(rows, 80).sum((1, 2)).float())
        keys = rank.key_mask(torch.arange(len(rows)), n) & causal(rows, 80)
        assert torch.equal(expand_heads(keys, 4), mask)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["token", "page", "block"]), st.sampled_from([1, 2, 3]), st.booleans(), st.integers(20, 60),
       st.integers(0, 10_000))
def test_oracle_beats_any_selection_at_its_budget(unit, group, shared, n_keys, seed):
    """A random selection of n units per row (or per query block) never keeps more mass than the oracle at n:
    per row for tokens and pages, summed over each query block's rows for blocks, summed over the group when
    shared."""
    gen = torch.Generator().manual_seed(seed)
    size = 1 if unit == "token" else 4
    rows = torch.sort(torch.randperm(n_keys, generator=gen)[: n_keys // 2]).values
    probs = true_attention(torch.randn(2 * group, len(rows), 8, generator=gen) * 2,
                           torch.randn(2, n_keys, 8, generator=gen) * 2, rows, 0.5)
    gran = Granularity(unit, size, "group" if shared else "head")
    rank = Ranking(probs, rows, gran, group)
    n_units = -(-n_keys // size)
    score = torch.rand(rank.ranking_heads, len(rows), n_units, generator=gen)
    if unit == "block":  # one random set per query block, shared by its rows
        score = score[:, rank.first_row[rank.row_q]]
    n = torch.randint(0, n_units + 1, (rank.ranking_heads, len(rows)), generator=gen)
    if unit == "block":
        n = n[:, rank.first_row[rank.row_q]]
    n = rank.causal_budget(n)
    causal_units = torch.arange(n_units)[None, None, :] < rank.causal_units[rank.row_q][None, :, None]
    order = torch.argsort(score.masked_fill(~causal_units, -1.0), dim=-1, descending=True)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(
        -1, order, torch.arange(n_units)[None, None, :] < n[..., None])
    keys = keep.repeat_interleave(size, dim=-1)[..., :n_keys]
    keys = keys.repeat_interleave(rank.group, dim=0)
    mine = (probs * keys).sum(-1)
    best = rank.mass_at(n)
    if shared:
        mine, best = mine.view(2, group, -1).sum(1), best.view(2, group, -1).sum(1)
    if unit == "block":
        blocks = rank.row_q
        mine = torch.zeros(mine.shape[0], len(rank.q_ids)).index_add_(1, blocks, mine)
        best = torch.zeros(best.shape[0], len(rank.q_ids)).index_add_(1, blocks, best)
    assert (mine <= best + 1e-5).all()


def test_oracle_topp_is_the_smallest_set_reaching_p():
    gen = torch.Generator().manual_seed(8)
    rows = torch.arange(20, 50)
    probs = true_attention(torch.randn(2, 30, 8, generator=gen), torch.randn(2, 50, 8, generator=gen), rows, 1.0)
    rank = Ranking(probs, rows, Granularity(), 1)
    n = rank.mass_budget(0.8)
    assert (rank.mass_at(n) >= 0.8 - 1e-6).all()
    assert (rank.mass_at(n - 1) < 0.8).all()


@pytest.mark.parametrize("window", [1, 7, 40, 500])
def test_token_ranking_over_the_window_equals_the_full_rows(window):
    """Sorting only the keys a sliding window shows gives the same cumulative masses, to the bit, as sorting the
    whole rows (whose keys outside the window have mass 0)."""
    gen = torch.Generator().manual_seed(window)
    rows = torch.sort(torch.randperm(300, generator=gen)[:90]).values
    probs = true_attention(torch.randn(3, 90, 8, generator=gen) * 2, torch.randn(3, 300, 8, generator=gen) * 2,
                           rows, 0.5, sliding_window=window)
    full, windowed = Ranking(probs, rows, Granularity()), Ranking(probs, rows, Granularity(), sliding_window=window)
    seen = max(int(rows[min(i + 31, 89)] - rows[i]) + window for i in range(0, 90, 32))  # by a block of 32 rows
    assert windowed.own_csum.shape[-1] <= min(300, seen)
    for n in [torch.randint(0, 301, (3, 90), generator=gen), torch.full((3, 90), window), torch.full((3, 90), 300)]:
        assert torch.equal(full.mass_at(n), windowed.mass_at(n))
    for p in (0.3, 0.9, 1.0):
        assert torch.equal(full.mass_budget(p), windowed.mass_budget(p))


def test_sorted_cumsum_is_the_descending_sort_summed():
    """The token oracle's sums (an int32 sort of the probabilities' negated bits) equal torch's descending sort
    summed, to the bit, ties and zeros included; past a block's causal keys a row repeats its last sum."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.sort(torch.randperm(200, generator=gen)[:70]).values
    probs = true_attention(torch.randn(2, 70, 8, generator=gen), torch.randn(2, 200, 8, generator=gen), rows, 0.5)
    probs[:, ::3, :20] = 0.25  # ties
    probs = probs * causal(rows, 200)[None]
    sums = sorted_cumsum(probs, rows, chunk=32)
    expected = torch.sort(probs, dim=-1, descending=True).values.cumsum(-1)
    assert torch.equal(sums, expected[..., : sums.shape[-1]])
    assert sums.shape[-1] == int(rows[-1]) + 1


def test_causal_cells_closed_form_equals_the_summed_ones():
    """The scorer's count of causal cells per key unit (closed form, no [R, T] array) equals the sums of the
    materialised causal mask, for whole-row, token, page and block units and a partial last unit."""
    rows = torch.sort(torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:100]).values
    for n_keys in (1000, 1037):
        closed, ones = CausalCells(rows, n_keys), Field(as_float(causal(rows, n_keys))[None], rows)
        for size in (0, 1, 16, 64, 100):
            assert torch.equal(closed.unit_sums(size), ones.unit_sums(size))
        assert torch.equal(closed.data, ones.data)


def test_numpy_sort_choice_on_zen4():
    """``frontier`` asks numpy for its AVX2 sort on AMD Zen 4 with AVX-512, and on nothing else; a value the user
    set is kept, and numpy before 2.4 (other feature names) is left alone."""
    zen4 = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: fpu avx2 avx512f avx512bw\n"
    zen3 = zen4.replace(" avx512f avx512bw", "")
    zen5 = zen4.replace(": 25", ": 26")
    intel = zen4.replace("AuthenticAMD", "GenuineIntel").replace(": 25", ": 6")
    assert zen4_with_avx512(zen4) and not any(map(zen4_with_avx512, (zen3, zen5, intel)))
    assert "numpy" in sys.modules  # this process: too late to choose, so nothing is set
    assert not prefer_avx2_sort({}, zen4, "2.4.6")
    with pytest.MonkeyPatch.context() as mp:
        mp.delitem(sys.modules, "numpy")
        chosen = {}
        assert prefer_avx2_sort(chosen, zen4, "2.4.6")
        assert chosen == {"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}
        for cpu, version, env in ((intel, "2.4.6", {}), (zen4, "2.3.5", {}),
                                  (zen4, "2.4.6", {"NPY_DISABLE_CPU_FEATURES": ""})):
            before = dict(env)
            assert not prefer_avx2_sort(env, cpu, version) and env == before


def test_oracle_policies_select_from_the_view(tmp_path):
    write_random_trace(tmp_path / "t.zarr", n_tokens=96)
    view = TraceStore(str(tmp_path / "t.zarr")).layer_view(0)
    view.rows = torch.arange(40, 96)
    budget = Budget(sparsity=0.75, tokens=24, n_ctx=96)
    sel = OracleTopK(unit="page", size=8, sharing="group").select(view, budget)
    assert isinstance(sel, PageSet) and sel.heads == 2
    token = OracleTopK().select(view, budget)
    counts = token.mask(view.rows, 96).sum(-1)
    assert torch.equal(counts, torch.round(0.25 * (view.rows + 1)).clamp(min=1).long().expand(4, -1))
    top = OracleTopP(p=0.5).select(view, budget)
    probs = true_attention(view.queries_at(view.rows), view.k, view.rows, view.scale)
    assert ((probs * top.mask(view.rows, 96)).sum(-1) >= 0.5 - 1e-6).all()


# ---------------------------------------------------------------- the science over sweeps


@pytest.fixture(scope="module")
def gqa_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "gqa.zarr"
    write_random_trace(path, n_layers=1, n_q_heads=6, n_kv_heads=2, head_dim=16, n_tokens=576)
    return _sweep(path, PREFILL + DECODE, sparsities=(0.3, 0.5, 0.8, 0.9, 0.95), queries=256, error_queries=64)


def test_dense_recall_is_one_and_error_zero(gqa_results):
    dense = gqa_results[gqa_results["policy"].isin(["dense", "dense_decode"])]
    assert (dense["status"] == "ok").all() and len(dense) > 0
    assert (dense["recall"] - 1).abs().max() < TOL
    assert dense["output_error"].max() < 1e-5
    assert (dense["density"] == 1).all()


def test_no_policy_above_its_oracle(gqa_results):
    ok = gqa_results[gqa_results["status"] == "ok"]
    assert set(ok["policy"]) >= {"vertical_slash", "block_sparse", "sink_local", "snapkv", "quest", "ada_snapkv"}
    per_head = ok[ok["oracle"].str.endswith(":head")]
    assert (per_head["recall"] <= per_head["oracle_recall"] + TOL).all()
    shared = ok[ok["oracle"].str.endswith(":group")].assign(group=lambda f: f["head"] // 3)
    means = shared.groupby(["policy", "params", "sparsity", "group"])[["recall", "oracle_recall"]].mean()
    assert len(means) and (means["recall"] <= means["oracle_recall"] + TOL).all()


def test_recall_never_falls_as_the_budget_grows(gqa_results):
    monotone = ["oracle_topk", "oracle_topk_decode", "sink_local", "sink_local_decode", "snapkv", "quest"]
    ok = gqa_results[(gqa_results["status"] == "ok") & gqa_results["policy"].isin(monotone)]
    for _, group in ok.groupby(["policy", "params", "head", "phase"]):
        by_budget = group.sort_values("sparsity", ascending=False)["recall"].to_numpy()
        assert (by_budget[1:] >= by_budget[:-1] - TOL).all(), group[["policy", "sparsity", "recall"]]


def test_realised_density_matches_the_request(gqa_results):
    ok = gqa_results[gqa_results["status"] == "ok"]
    token = ok[(ok["policy"] == "oracle_topk") & ok["params"].str.contains('"token"')]
    assert (token["density"] - (1 - token["sparsity"])).abs().max() < 0.01
    for policy, unit in [("sink_local", 64), ("quest", 16)]:  # within the kernel's unit of the request
        rows = ok[ok["policy"] == policy]
        assert len(rows) and ((rows["density"] - (1 - rows["sparsity"])).abs() < 2 * unit / 576 + 0.02).all()


def test_decode_policies_are_scored_on_a_labelled_proxy(gqa_results):
    decode = gqa_results[gqa_results["phase"] == "decode"]
    assert decode["proxy"].all() and (decode["n_queries"] == 128).all()
    assert not gqa_results[gqa_results["phase"] == "prefill"]["proxy"].any()


def test_generated_queries_are_scored_when_present(tmp_path):
    write_random_trace(tmp_path / "g.zarr", n_layers=1, n_tokens=300, prefill_len=260)
    frame = _sweep(tmp_path / "g.zarr", ["snapkv", "quest", "dense_decode"], sparsities=(0.5,))
    assert (frame["status"] == "ok").all() and not frame["proxy"].any()
    assert (frame["n_queries"] == 40).all()


def test_sliding_window_and_softcap_layers(tmp_path):
    path = tmp_path / "w.zarr"
    write_random_trace(path, n_layers=1, n_tokens=256)
    _patch_attrs(path, layer_types=["sliding_attention"], sliding_window=48, attn_logit_softcapping=4.0)
    frame = _sweep(path, ["dense", "oracle_topk", "sink_local"], sparsities=(0.5, 0.9))
    ok = frame[frame["status"] == "ok"]
    assert (ok[ok["policy"] == "dense"]["recall"] - 1).abs().max() < TOL
    assert (ok["recall"] <= ok["oracle_recall"] + TOL).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sweep_equals_the_cpu_sweep(tmp_path):
    """``--device cuda`` runs the same code on the GPU (policies build their selections there): every policy,
    a generated tail and a sliding window, the same rows and metrics as on the CPU up to float32 rounding."""
    path = tmp_path / "c.zarr"
    write_random_trace(path, n_layers=2, n_q_heads=6, n_kv_heads=2, head_dim=16, n_tokens=700, prefill_len=660)
    _patch_attrs(path, layer_types=["full_attention", "sliding_attention"], sliding_window=200)
    frames = {device: _sweep(path, PREFILL + DECODE, sparsities=(0.5, 0.9), queries=128, device=device)
              for device in ("cpu", "cuda")}
    cpu, cuda = frames["cpu"], frames["cuda"]
    assert (cpu["status"] == "ok").all() and (cuda["status"] == "ok").all()
    for column in ("density", "recall", "oracle_recall", "output_error", "oracle_output_error"):
        assert (cpu[column] - cuda[column]).abs().max() < 1e-4, column


def test_cost_model_by_hand():
    m = ModelShape(n_layers=2, d_model=8, d_mlp=16, vocab_size=10, n_heads=2, n_kv_heads=1, head_dim=4)
    L = 100
    attn_quadratic = 2 * (2 * 2 * L**2 * 4 + 3 * 2 * L**2 + 2 * 2 * L**2 * 4)
    assert prefill_flops(m, L, 1.0) - prefill_flops(m, L, 0.25) == pytest.approx(0.75 * attn_quadratic)
    linear = 2 * L * 8 + 2 * (2 * L * 8 * (8 + 2 * 4 * 1 + 8)) + 2 * (6 * L * 8 * 16 + 2 * L * 16) + 2 * L * 8 * 10
    assert prefill_flops(m, L, 0.0) == pytest.approx(linear)
    weights = 2 * (4 * 64 + 3 * 8 * 16) + 8 * 10 + 8
    assert decode_bytes(m, L, 0.5, bytes_per_element=1) == pytest.approx(weights + 2 * 2 * L * 4 * 1 * 0.5)
    vs = 2 * 2 * (2 * 4 * L * 10 + 3 * L * 10 + 2 * L * 10 + 2 * L * math.log2(L) + L / 64 * 30)
    assert vertical_slash_index(m, L, 10, 20, 10) == pytest.approx(vs)


def test_cost_columns_order_methods_by_density(gqa_results):
    ok = gqa_results[(gqa_results["status"] == "ok") & (gqa_results["policy"] == "oracle_topk")]
    ordered = ok.sort_values("density")
    assert ordered["prefill_flops"].is_monotonic_increasing


# ---------------------------------------------------------------- sweeps: parts, resume, Dask, CLI


SMALL = dict(n_layers=2, n_q_heads=4, n_kv_heads=2, head_dim=16, n_tokens=200, prefill_len=180)


def _settings(**kw):
    return Settings(policies=[Spec.parse(p) for p in ["dense", "oracle_topk", "block_sparse", "quest", "snapkv"]],
                    sparsities=[0.5, 0.9], queries=64, error_queries=16, **kw)


def test_sweep_writes_parts_and_resumes(tmp_path):
    write_random_trace(tmp_path / "a.zarr", **SMALL)
    out = tmp_path / "out"
    record = run_sweep([str(tmp_path / "a.zarr")], _settings(), out)
    parts = sorted((out / "parts").glob("*.parquet"))
    assert [p.name for p in parts] == [f"a-{record['traces'][0]['trace_id'].split('-')[-1]}__L{i}.parquet"
                                       for i in (0, 1)]
    assert record["complete"] and all(p["done"] for p in record["parts"].values())
    first = load_parts(out)
    assert len(first) == 2 * 4 * 5 * 2  # layers x heads x policies x sparsities
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[1].unlink()
    ran = []
    run_sweep([str(tmp_path / "a.zarr")], _settings(), out, on_task=lambda r, d, t: ran.append(r["part"]))
    assert ran == [parts[1].name]
    assert parts[0].stat().st_mtime_ns == stamps[parts[0].name]
    pd.testing.assert_frame_equal(load_parts(out), first)
    assert json.loads((out / "sweep.json").read_text())["complete"]


def test_resume_refuses_other_settings(tmp_path):
    write_random_trace(tmp_path / "a.zarr", **SMALL)
    run_sweep([str(tmp_path / "a.zarr")], _settings(), tmp_path / "out")
    with pytest.raises(ValueError, match="other settings"):
        run_sweep([str(tmp_path / "a.zarr")], _settings(seed=1), tmp_path / "out")


def test_two_dask_workers_equal_one_process(tmp_path):
    for name, seed in [("a.zarr", 0), ("b.zarr", 1)]:
        write_random_trace(tmp_path / name, seed=seed, **SMALL)
    traces = [str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")]
    run_sweep(traces, _settings(threads=1), tmp_path / "one")
    run_sweep(traces, _settings(threads=1), tmp_path / "dask", workers=2)
    one, dask = load_parts(tmp_path / "one"), load_parts(tmp_path / "dask")
    assert len(one) == 2 * 2 * 4 * 5 * 2
    pd.testing.assert_frame_equal(one, dask)


POLICY_FILES = {
    "raises": """
        from dataclasses import dataclass
        class Broken:
            name, phase, owns_budget, granularity = "broken", "prefill", False, ("token", 1, "head")
            @dataclass
            class Params:
                pass
            def select(self, view, budget):
                raise RuntimeError("boom")
    """,
    "greedy": """
        from dataclasses import dataclass
        import torch
        from sparse_frontier.policies.selection import BlockMask
        class Greedy:
            name, phase, owns_budget, granularity = "greedy", "prefill", False, ("block", 16, "head")
            @dataclass
            class Params:
                pass
            def select(self, view, budget):
                n = -(-view.prefill_len // 16)
                return BlockMask(torch.ones(view.n_query_heads, n, n, dtype=torch.bool).tril(), 16, 16)
    """,
    "peeks": """
        from dataclasses import dataclass
        import torch
        from sparse_frontier.policies.selection import TokenSet
        class Peeks:
            name, phase, owns_budget, granularity = "peeks", "decode", False, ("token", 1, "head")
            @dataclass
            class Params:
                pass
            def select(self, view, budget):
                rows = view.rows
                return TokenSet(rows, (rows + 1)[None, :, None].expand(view.n_query_heads, -1, 1).clone())
    """,
}


def test_bad_policies_give_error_rows_and_the_sweep_goes_on(tmp_path):
    write_random_trace(tmp_path / "a.zarr", **SMALL)
    files = []
    for name, body in POLICY_FILES.items():
        files.append(tmp_path / f"{name}.py")
        files[-1].write_text(textwrap.dedent(body))
    settings = Settings(policies=[Spec(n) for n in ["broken", "greedy", "peeks", "dense"]], sparsities=[0.9],
                        queries=32, error_queries=8, policy_files=[str(f) for f in files])
    run_sweep([str(tmp_path / "a.zarr")], settings, tmp_path / "out")
    frame = load_parts(tmp_path / "out")
    errors = frame.groupby("policy")["error"].first()
    assert "boom" in errors["broken"]
    assert "over budget" in errors["greedy"]
    assert "future" in errors["peeks"]
    assert (frame[frame["policy"] == "dense"]["status"] == "ok").all()
    assert (frame[frame["policy"] != "dense"]["status"] == "error").all()


def test_cli_prints_a_summary_and_json(tmp_path):
    write_random_trace(tmp_path / "a.zarr", **SMALL)
    runner = CliRunner()
    args = ["simulate", str(tmp_path / "a.zarr"), "--policies", "dense,quest,oracle_topk[unit=block;size=16]",
            "--sparsity", "0.5,0.9", "--queries", "32", "--out", str(tmp_path / "out")]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "oracle recall" in result.output and "quest" in result.output
    result = runner.invoke(cli, [*args, "--json"])
    data = json.loads(result.output)
    table = pd.DataFrame(data["summary"])
    assert data["complete"] and set(table["policy"]) == {"dense", "quest", "oracle_topk"}
    want = summary(load_parts(tmp_path / "out"))
    assert table["recall"].tolist() == pytest.approx(want["recall"].tolist())


@pytest.mark.parametrize("args,message", [
    (["--policies", "dense,nope"], "unknown policy 'nope'; known policies: "),
    (["--sparsity", "0.5,1.0"], "outside [0, 1)"),
    (["--queries", "lots"], "neither 'all' nor a whole number"),
    (["--workers", "2", "--scheduler", "tcp://x:1"], "not both"),
])
def test_cli_bad_input(tmp_path, args, message):
    write_random_trace(tmp_path / "a.zarr", **SMALL)
    result = CliRunner().invoke(cli, ["simulate", str(tmp_path / "a.zarr"), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_cli_refuses_output_error_without_values_and_incomplete_traces(tmp_path):
    write_random_trace(tmp_path / "nov.zarr", with_values=False, **SMALL)
    runner = CliRunner()
    nov = str(tmp_path / "nov.zarr")
    result = runner.invoke(cli, ["simulate", nov, "--output-error", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "without values" in result.output
    result = runner.invoke(cli, ["simulate", nov, "--policies", "dense", "--sparsity", "0.5",
                                 "--out", str(tmp_path / "o2")])
    assert result.exit_code == 0 and load_parts(tmp_path / "o2")["output_error"].isna().all()
    writer = TraceWriter(str(tmp_path / "half.zarr"), attrs={"model": {}, "sequence": {}}, n_layers=1, n_q_heads=2,
                         n_kv_heads=1, head_dim=4, n_tokens=8, q_positions=range(8))
    writer.close()
    result = runner.invoke(cli, ["simulate", str(tmp_path / "half.zarr"), "--out", str(tmp_path / "o3")])
    assert result.exit_code != 0 and "incomplete" in result.output
    assert not os.path.exists(tmp_path / "o3" / "parts")


# ---------------------------------------------------------------- a real model


@pytest.mark.slow
def test_real_smollm2_trace(tmp_path):
    """A short SmolLM2 trace: dense is exact, no policy beats its oracle, the oracle beats the methods."""
    trace = tmp_path / "smol.zarr"
    result = CliRunner().invoke(cli, ["trace", "capture", "--model", "smollm2-135m", "--task", "niah", "--length",
                                      "800", "--generate", "8", "--layers", "0,15,29", "--out", str(trace)])
    assert result.exit_code == 0, result.output
    frame = _sweep(Path(trace), PREFILL + DECODE, sparsities=(0.5, 0.9), queries=256)
    ok = frame[frame["status"] == "ok"]
    assert (ok[ok["policy"] == "dense"]["recall"] - 1).abs().max() < TOL
    per_head = ok[ok["oracle"].str.endswith(":head")]
    assert (per_head["recall"] <= per_head["oracle_recall"] + TOL).all()
    assert not frame[frame["phase"] == "decode"]["proxy"].any()
    assert set(ok["policy"]) >= {"vertical_slash", "block_sparse", "quest", "snapkv"}
