"""Each method's selection equals one computed by hand in the test from ALGORITHMS.md's rules.

The hand computations use plain loops over a full causal softmax; they share no code with the policies.
"""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from click.testing import CliRunner

from sparse_frontier.cli.main import cli
from sparse_frontier.policies.base import LayerView
from sparse_frontier.policies.block_sparse import block_sparse_density
from sparse_frontier.policies.budget import Fixed, Sublinear, TopP, Uniform
from sparse_frontier.policies.registry import (
    available,
    get_budget_rule,
    get_policy,
    load_policy_file,
)
from sparse_frontier.policies.selection import BlockMask, Dense, KeptKeys, PageSet, TokenSet, VerticalSlash
from sparse_frontier.policies.validate import PolicyError, check_selection
from sparse_frontier.tracer.store import TraceStore


def make_view(t=32, hq=2, hkv=1, d=4, prefill=None, rows=None, seed=0, layer=0) -> LayerView:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, t, d, generator=gen) * 1.5
    k = torch.randn(hkv, t, d, generator=gen) * 1.5
    return LayerView(q=q, k=k, q_positions=torch.arange(t), prefill_len=prefill or t, scale=d ** -0.5,
                     rows=rows, layer=layer)


def hand_probs(view: LayerView, head: int, end: int) -> list[list[float]]:
    """Causal softmax of every query row i < end of one query head over keys 0..i (plain loops)."""
    k = view.k[head // view.group]
    out = []
    for i in range(end):
        logits = [float(view.q[head, i] @ k[j]) * view.scale for j in range(i + 1)]
        top = max(logits)
        e = [math.exp(x - top) for x in logits]
        out.append([x / sum(e) for x in e] + [0.0] * (end - i - 1))
    return out


def keep_order(scores: list[float], forced: list[int]) -> list[int]:
    others = sorted((j for j in range(len(scores)) if j not in forced), key=lambda j: (-scores[j], j))
    return forced + others


def hand_vs_cells(cols, offs, block: int, n: int) -> int:
    """Cells of a vertical-slash selection over rows 0..n-1: slash o covers keys r0-o .. r0+block-1-o."""
    cells = 0
    for i in range(n):
        r0 = i // block * block
        for j in range(i + 1):
            cells += j in cols or any(r0 - o <= j <= r0 + block - 1 - o for o in offs)
    return cells


def as_set(t: torch.Tensor) -> set[int]:
    return set(t.tolist())


# ---------------------------------------------------------------- vertical-slash and flexprefill


def vs_scores_by_hand(view: LayerView, head: int, window: int):
    n = view.prefill_len
    probs = hand_probs(view, head, n)
    rows = range(n - window, n)
    vertical = [sum(probs[r][j] for r in rows) for j in range(n)]
    slash = [sum(probs[r][r - o] for r in rows if r - o >= 0) for o in range(n)]
    return vertical, slash


def test_vertical_slash_fixed_counts_keep_sinks_local_and_top_scores():
    view = make_view(t=28, hq=2, hkv=1)
    pol = get_policy("vertical_slash", window=6, sinks=2, local=3, block=4, target=False,
                     vertical_size=5, slash_size=6)
    sel = pol.select(view, Uniform().budget(view, 0.5))
    for h in range(2):
        vertical, slash = vs_scores_by_hand(view, h, 6)
        assert as_set(sel.columns[h]) == set(keep_order(vertical, [0, 1])[:5])
        assert as_set(sel.offsets[h]) == set(keep_order(slash, [0, 1, 2])[:6])
        assert sel.block == 4


def test_vertical_slash_target_is_the_largest_count_within_budget():
    n = 40
    view = make_view(t=n, hq=1)
    pol = get_policy("vertical_slash", window=8, sinks=2, local=3, block=4)
    for s in (0.3, 0.6):
        sel = pol.select(view, Uniform().budget(view, s))
        vertical, slash = vs_scores_by_hand(view, 0, 8)
        cols, offs = keep_order(vertical, [0, 1]), keep_order(slash, [0, 1, 2])
        count = len(sel.columns[0])
        assert len(sel.offsets[0]) == count  # slash_ratio 1
        assert as_set(sel.columns[0]) == set(cols[:count]) and as_set(sel.offsets[0]) == set(offs[:count])
        causal_cells = n * (n + 1) / 2
        assert hand_vs_cells(cols[:count], offs[:count], 4, n) / causal_cells <= 1 - s
        assert hand_vs_cells(cols[: count + 1], offs[: count + 1], 4, n) / causal_cells > 1 - s


def test_vertical_slash_top_p_keeps_the_prefix_reaching_the_mass():
    view = make_view(t=32, hq=1)
    pol = get_policy("vertical_slash", window=8, sinks=1, local=2, block=4, target=False,
                     vertical_size=32, slash_size=32)
    sel = pol.select(view, TopP(p=0.6).budget(view, 0.0))
    vertical, slash = vs_scores_by_hand(view, 0, 8)
    for scores, forced, got in ((vertical, [0], sel.columns[0]), (slash, [0, 1], sel.offsets[0])):
        order, total, acc = keep_order(scores, forced), sum(scores), 0.0
        count = 0
        while acc < 0.6 * total - 1e-6:
            acc += scores[order[count]]
            count += 1
        assert as_set(got) == set(order[: max(count, len(forced))])


def test_flexprefill_counts_cover_alpha_with_min_budget_floor():
    view = make_view(t=36, hq=2, hkv=1, seed=3)
    pol = get_policy("flexprefill", alpha=0.5, min_budget=3, window=8, sinks=1, local=2, block=4)
    sel = pol.select(view, Uniform().budget(view, 0.9))  # owns its budget: sparsity ignored
    for h in range(2):
        vertical, slash = vs_scores_by_hand(view, h, 8)
        for scores, forced, got in ((vertical, [0], sel.columns[h]), (slash, [0, 1], sel.offsets[h])):
            mean = sorted((x / 8 for x in scores), reverse=True)
            count, acc = 0, 0.0
            while acc < 0.5:
                acc += mean[count]
                count += 1
            count = max(3, count)
            assert as_set(got) == set(keep_order(scores, forced)[:count])


def test_flexprefill_query_aware_heads_add_pooled_blocks_covering_alpha():
    n, b, alpha = 32, 4, 0.6
    view = make_view(t=n, hq=1, seed=5)
    pol = get_policy("flexprefill", alpha=alpha, min_budget=4, window=8, block=b, tau=10.0)  # every head switches
    sel = pol.select(view, Uniform().budget(view, 0.5))
    assert isinstance(sel, BlockMask) and sel.block_q == b
    nb = n // b
    vertical, slash = vs_scores_by_hand(view, 0, 8)
    v_blocks = [sum(vertical[j] for j in range(m * b, m * b + b)) for m in range(nb)]
    s_blocks = [sum(slash[o] for o in range(m * b, m * b + b)) for m in range(nb)]
    cols = keep_order(v_blocks, [0])[:1]  # min_budget 4 tokens = 1 block
    diags = keep_order(s_blocks, [0])[:1]
    q_pool = [view.q[0, m * b : m * b + b].mean(0) * view.scale for m in range(nb)]
    k_pool = [view.k[0, m * b : m * b + b].mean(0) for m in range(nb)]
    mass = []
    for m in range(nb):
        logits = [float(q_pool[m] @ k_pool[j]) for j in range(m + 1)]
        e = [math.exp(x - max(logits)) for x in logits]
        mass += [(x / sum(e), m, j) for j, x in enumerate(e)]
    picked, acc = set(), 0.0
    for value, m, j in sorted(mass, key=lambda x: -x[0]):
        acc += value
        if acc > alpha * nb:
            break
        picked.add((m, j))
    want = [[j <= m and (j in cols or (m - j) in diags or (m, j) in picked) for j in range(nb)] for m in range(nb)]
    assert sel.blocks[0].tolist() == want


# ---------------------------------------------------------------- block-sparse


def test_block_sparse_keeps_sink_diagonal_below_and_top_pooled_blocks():
    n, b, top = 22, 4, 4  # last block has 2 tokens, pooled over those
    view = make_view(t=n, hq=2, hkv=1, seed=1)
    sel = get_policy("block_sparse", chunk_size=b, top_chunks=top, target=False).select(
        view, Uniform().budget(view, 0.5))
    nb = math.ceil(n / b)
    for h in range(2):
        q_pool = [view.q[h, m * b : min(n, m * b + b)].mean(0) for m in range(nb)]
        k_pool = [view.k[0, m * b : min(n, m * b + b)].mean(0) for m in range(nb)]
        for m in range(nb):
            forced = [0, m - 1, m] if m >= 2 else list(range(m + 1))
            others = sorted((j for j in range(m + 1) if j not in forced),
                            key=lambda j: (-float(q_pool[m] @ k_pool[j]), j))
            want = set(forced) | set(others[: max(0, min(m + 1, top) - len(forced))])
            assert set(sel.blocks[h, m].nonzero().flatten().tolist()) == want


def test_block_sparse_on_a_sliding_layer_prefers_blocks_inside_the_window():
    view = make_view(t=64, hq=1, seed=5)
    view.sliding_window = 20  # query block 7 (rows 56..63) sees keys from 37: key blocks 4..7
    sel = get_policy("block_sparse", chunk_size=8, target=False, top_chunks=5).select(view, Uniform().budget(view, 0))
    assert sel.blocks[0, 7].nonzero().flatten().tolist() == [0, 4, 5, 6, 7]  # sink forced, then in-window


def test_block_sparse_closed_form_matches_the_paper_table_at_16k():
    # ALGORITHMS.md: at 16k, k = 26, 35, 53, 71, 108, 188, 300 give s = 0.95, 0.933, 0.90, 0.867, 0.80, 0.667, 0.50
    for k, s in zip((26, 35, 53, 71, 108, 188, 300), (0.95, 0.933, 0.90, 0.867, 0.80, 0.667, 0.50), strict=True):
        assert abs((1 - block_sparse_density(16384, 16, k)) - s) < 0.0025


def test_block_sparse_target_realises_the_largest_top_within_budget():
    n = 200
    view = make_view(t=n, hq=1, seed=2)
    pol = get_policy("block_sparse", chunk_size=8)
    for s in (0.5, 0.8):
        sel = pol.select(view, Uniform().budget(view, s))
        density = float(sel.density(torch.arange(n), n)[0])
        top = int(sel.blocks[0].sum(-1).max())
        assert density == pytest.approx(block_sparse_density(n, 8, top))
        assert density <= 1 - s < block_sparse_density(n, 8, top + 1)


# ---------------------------------------------------------------- SnapKV and Ada-SnapKV


def snap_scores_by_hand(view: LayerView, window: int, pool: int, reduce: str) -> list[list[float]]:
    n = view.prefill_len
    out = []
    for kv in range(view.n_kv_heads):
        heads = [kv * view.group + g for g in range(view.group)]
        probs = {h: hand_probs(view, h, n) for h in heads}
        rows = range(n - window, n)
        if reduce == "mean_sum":
            score = [sum(sum(probs[h][r][j] for h in heads) / len(heads) for r in rows) for j in range(n)]
        else:
            score = [max(probs[h][r][j] for h in heads for r in rows) for j in range(n)]
        half = pool // 2
        out.append([sum(score[i] for i in range(j - half, j + half + 1) if 0 <= i < n) / pool for j in range(n)])
    return out


def test_snapkv_keeps_sinks_recent_and_top_pooled_window_scores_per_kv_head():
    n, cap = 40, 12
    view = make_view(t=n + 4, hq=4, hkv=2, prefill=n, rows=torch.arange(n, n + 4), seed=4)
    pol = get_policy("snapkv", window=8, pool=3, sinks=2, local=4)
    sel = pol.select(view, Fixed(tokens=cap).budget(view, 0.0))
    assert isinstance(sel, KeptKeys) and sel.kept.shape == (2, n)
    for kv, score in enumerate(snap_scores_by_hand(view, 8, 3, "mean_sum")):
        forced = [0, 1, 39, 38, 37, 36]
        assert as_set(sel.kept[kv].nonzero().flatten()) == set(keep_order(score, forced)[:cap])
    # new tokens are never evicted
    assert sel.mask(torch.tensor([n + 3]), n + 4)[:, 0, n:].all()


def test_ada_snapkv_floors_each_head_then_shares_the_rest_layer_wide():
    n, cap = 40, 8
    view = make_view(t=n, hq=4, hkv=2, seed=6)
    pol = get_policy("ada_snapkv", window=8, pool=3, sinks=1, local=2, floor_ratio=0.25, floor_min=3)
    sel = pol.select(view, Fixed(tokens=cap).budget(view, 0.0))
    scores = snap_scores_by_hand(view, 8, 3, "max")
    floor = max(int(0.25 * cap), 3)
    kept = [set(keep_order(scores[h], [0, 39, 38])[:floor]) for h in range(2)]
    rest = sorted(((scores[h][j], h, j) for h in range(2) for j in range(n) if j not in kept[h]),
                  key=lambda x: (-x[0], x[1] * n + x[2]))
    for _, h, j in rest[: cap * 2 - floor * 2]:
        kept[h].add(j)
    assert [as_set(sel.kept[h].nonzero().flatten()) for h in range(2)] == kept
    assert int(sel.kept.sum()) == cap * 2


# ---------------------------------------------------------------- Quest


def quest_pages_by_hand(view: LayerView, row: int, head_group: list[int], kv: int, page: int, n_top: int):
    cur = row // page
    scores = []
    for p in range(cur):
        keys = view.k[kv, p * page : p * page + page]
        lo, hi = keys.min(0).values, keys.max(0).values
        s = 0.0
        for h in head_group:
            q = view.q[h, row]
            s += sum(max(float(q[c] * lo[c]), float(q[c] * hi[c])) for c in range(len(q)))
        scores.append(s)
    top = sorted(range(cur), key=lambda p: (-scores[p], p))[:n_top]
    return set(top) | {cur}


@pytest.mark.parametrize("share", [True, False])
def test_quest_reads_top_pages_by_min_max_bound_plus_the_current_page(share):
    n, rows = 40, torch.tensor([33, 37, 39])
    view = make_view(t=n, hq=4, hkv=2, d=6, prefill=32, rows=rows, seed=7)
    pol = get_policy("quest", page_size=4, share_pages=share)
    sel = pol.select(view, Fixed(tokens=10).budget(view, 0.0))  # 10 tokens -> round(2.5) = 3 pages
    assert isinstance(sel, PageSet) and sel.heads == (2 if share else 4)
    for r, row in enumerate(rows.tolist()):
        for h in range(sel.heads):
            group = [2 * h, 2 * h + 1] if share else [h]
            kv = h if share else h // 2
            got = set(sel.pages[h, r].tolist()) - {-1}
            assert got == quest_pages_by_hand(view, row, group, kv, 4, 3)


def test_quest_dense_first_layers_and_early_rows():
    view = make_view(t=40, hq=2, hkv=1, prefill=32, rows=torch.tensor([5, 35]), layer=1)
    budget = Fixed(tokens=8).budget(view, 0.0)
    assert isinstance(get_policy("quest", dense_first_layers=2).select(view, budget), Dense)
    sel = get_policy("quest", page_size=4).select(view, budget)
    # row 5 sits in page 1: one earlier page only, plus itself
    assert set(sel.pages[0, 0].tolist()) - {-1} == {0, 1}


def test_quest_on_a_sliding_layer_only_ranks_pages_inside_the_window():
    rows = torch.tensor([37])
    view = make_view(t=40, hq=2, hkv=1, d=6, prefill=32, rows=rows, seed=3)
    view.sliding_window = 12  # row 37 sees keys 26..37: pages 6, 7, 8 (page 9 is current)
    sel = get_policy("quest", page_size=4).select(view, Fixed(tokens=40).budget(view, 0.0))
    assert set(sel.pages[0, 0].tolist()) - {-1} == {6, 7, 8, 9}


@pytest.mark.parametrize("window", [3, 6, 40])
def test_window_statistics_on_a_sliding_layer_by_hand(window):
    """The last 8 prompt queries' attention (vertical sums, peaks, slash sums) with each row's softmax over its
    sliding window only, computed with plain loops."""
    from sparse_frontier.policies.estimate import window_stats

    view = make_view(t=40, hq=2, hkv=1, d=4, seed=5)
    view.sliding_window = window
    stats = window_stats(view, 8)
    for h in range(2):
        vertical, slash, peak = [0.0] * 40, [0.0] * 40, [0.0] * 40
        for i in range(32, 40):
            seen = range(max(0, i - window + 1), i + 1)
            logits = {j: float(view.q[h, i] @ view.k[0, j]) * view.scale for j in seen}
            top = max(logits.values())
            total = sum(math.exp(x - top) for x in logits.values())
            for j, x in logits.items():
                p = math.exp(x - top) / total
                vertical[j] += p
                slash[i - j] += p
                peak[j] = max(peak[j], p)
        for got, want in ((stats.vertical, vertical), (stats.slash, slash), (stats.peak, peak)):
            assert torch.allclose(got[h], torch.tensor(want), atol=1e-6)


# ---------------------------------------------------------------- sink + local, dense


def test_sink_local_prefill_band_is_the_widest_within_budget():
    n = 48
    view = make_view(t=n, hq=2)
    sel = get_policy("sink_local", sinks=2, block=4).select(view, Uniform().budget(view, 0.6))
    width = len(sel.offsets[0])
    assert as_set(sel.columns[1]) == {0, 1} and as_set(sel.offsets[1]) == set(range(width))
    cells = n * (n + 1) / 2
    assert hand_vs_cells({0, 1}, range(width), 4, n) / cells <= 0.4
    assert hand_vs_cells({0, 1}, range(width + 1), 4, n) / cells > 0.4


def test_sink_local_decode_reads_sinks_and_the_recent_window():
    view = make_view(t=40, hq=2, prefill=30, rows=torch.tensor([30, 39]))
    sel = get_policy("sink_local_decode", sinks=3).select(view, Fixed(tokens=10).budget(view, 0.0))
    mask = sel.mask(torch.tensor([30, 39]), 40)
    assert mask[0, 0].nonzero().flatten().tolist() == [0, 1, 2] + list(range(24, 31))
    assert mask[1, 1].nonzero().flatten().tolist() == [0, 1, 2] + list(range(33, 40))


def test_dense_selects_every_causal_cell_in_both_phases():
    view = make_view(t=16, hq=2, rows=torch.tensor([15]))
    assert get_policy("dense").select(view, Uniform().budget(view, 0.5)).cells(torch.arange(16), 16).tolist() \
        == [136, 136]
    assert get_policy("dense_decode").phase == "decode"


# ---------------------------------------------------------------- budget rules


def test_budget_rules_by_hand():
    view = make_view(t=1000)
    assert Uniform().budget(view, 0.9).tokens == 100
    assert Fixed(tokens=64).budget(view, 0.5).tokens == 64
    fixed = Fixed(n_ref=4000).budget(view, 0.95)  # 5% of 4000 = 200 tokens, held at every length
    assert fixed.tokens == 200 and fixed.sparsity == pytest.approx(0.8)
    sub = Sublinear(alpha=0.5, n_ref=4000).budget(view, 0.9)  # 0.1 * 4000 * (1000 / 4000) ** 0.5 = 200
    assert sub.tokens == 200 and sub.fraction == pytest.approx(0.2)
    top = TopP(p=0.8).budget(view, 0.5)
    assert top.top_p == 0.8 and top.tokens == 500
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="outside"):
            Uniform().budget(view, bad)
    with pytest.raises(PolicyError, match="known budget rules"):
        get_budget_rule("nope")


# ---------------------------------------------------------------- registry, validation, CLI


def test_registry_lists_the_methods_and_rejects_unknown_names():
    names = set(available())
    assert {"dense", "sink_local", "vertical_slash", "flexprefill", "block_sparse", "snapkv", "ada_snapkv",
            "quest"} <= names
    with pytest.raises(PolicyError, match="known policies: .*quest"):
        get_policy("magic")
    with pytest.raises(PolicyError, match="no parameter 'windw'.*window"):
        get_policy("snapkv", windw=3)


def test_policies_run_on_a_real_trace_store(random_trace):
    view = TraceStore(str(random_trace)).layer_view(0)  # 256 tokens, GQA 4/2
    for name in ("vertical_slash", "block_sparse", "sink_local", "flexprefill"):
        pol = get_policy(name)
        budget = Uniform().budget(view, 0.8)
        check_selection(pol, view, budget, pol.select(view, budget))
    view.prefill_len, view.rows = 224, torch.arange(224, 256)
    for name in ("snapkv", "ada_snapkv", "quest", "sink_local_decode"):
        pol = get_policy(name)
        budget = Uniform().budget(view, 0.5)
        check_selection(pol, view, budget, pol.select(view, budget))


def test_check_selection_catches_future_keys_and_overspending():
    view = make_view(t=16, hq=2, hkv=1, prefill=12, rows=torch.tensor([12, 13]))
    budget = Fixed(tokens=4).budget(view, 0.0)
    decode = get_policy("quest")
    future = TokenSet(rows=view.rows, indices=torch.tensor([[[0, 14], [1, 2]]] * 2))
    with pytest.raises(PolicyError, match="future"):
        check_selection(decode, view, budget, future)
    over = PageSet(rows=view.rows, pages=torch.tensor([[[0, 1, 2]] * 2]), page_size=4)
    with pytest.raises(PolicyError, match="over budget"):
        check_selection(get_policy("quest", page_size=1), view, budget, over)
    blocks = torch.ones(2, 3, 3, dtype=torch.bool)
    with pytest.raises(PolicyError, match="wholly after"):
        check_selection(get_policy("block_sparse"), view, budget, BlockMask(blocks, 4, 4))
    with pytest.raises(PolicyError, match="negative diagonal"):
        check_selection(get_policy("sink_local"), view, budget,
                        VerticalSlash([torch.tensor([0])] * 2, [torch.tensor([-1])] * 2, block=4))
    with pytest.raises(PolicyError, match="not a Selection"):
        check_selection(decode, view, budget, "pages")


GOOD = '''
from dataclasses import dataclass
import torch
from sparse_frontier.policies.selection import VerticalSlash

class Recent:
    """Local band only."""
    name = "recent_test"
    phase = "prefill"
    owns_budget = False
    granularity = ("token", 1, "head")

    @dataclass
    class Params:
        pass

    def __init__(self, **params):
        self.params = self.Params(**params)

    def select(self, view, budget):
        w = max(1, int(budget.fraction * view.prefill_len / 2))
        return VerticalSlash([torch.zeros(0, dtype=torch.long)] * view.n_query_heads,
                             [torch.arange(w + OFFSET)] * view.n_query_heads, block=1)
'''


def test_policy_file_loading_and_check_command(tmp_path):
    good = tmp_path / "recent.py"
    good.write_text(textwrap.dedent(GOOD).replace("OFFSET", "0"))
    cls = load_policy_file(good)
    assert cls.name == "recent_test" and "recent_test" in available()
    runner = CliRunner()
    result = runner.invoke(cli, ["policies", "check", str(good), "--tokens", "128"])
    assert result.exit_code == 0, result.output
    greedy = tmp_path / "greedy.py"
    greedy.write_text(textwrap.dedent(GOOD).replace("OFFSET", "view.prefill_len"))
    result = runner.invoke(cli, ["policies", "check", str(greedy), "--tokens", "128", "--sparsity", "0.9"])
    assert result.exit_code == 1 and "over budget" in result.output
    broken = tmp_path / "broken.py"
    broken.write_text("import nothing_here_at_all\n")
    with pytest.raises(PolicyError, match="broken.py: importing it failed: ModuleNotFoundError"):
        load_policy_file(broken)
    result = runner.invoke(cli, ["policies", "check", str(broken)])
    assert result.exit_code == 1 and "broken.py" in result.output and "Traceback" not in result.output
    lacking = tmp_path / "lacking.py"
    lacking.write_text("class P:\n    name = 'p'\n    def select(self, view, budget):\n        pass\n")
    with pytest.raises(PolicyError, match="lacking.py: class P lacks .*phase"):
        load_policy_file(lacking)


def test_entry_point_plugins_are_listed(tmp_path, monkeypatch):
    (tmp_path / "plug_policy.py").write_text(textwrap.dedent(GOOD).replace("OFFSET", "0")
                                             .replace("recent_test", "plugged"))
    dist = tmp_path / "plug_policy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plug-policy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sparse_frontier.policies]\nplugged = plug_policy:Recent\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    info = available()["plugged"]
    assert info.source.startswith("entry point plug_policy:Recent")


def test_list_and_show_commands():
    runner = CliRunner()
    result = runner.invoke(cli, ["policies", "list", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    by_name = {p["name"]: p for p in data["policies"]}
    assert by_name["quest"]["granularity"] == ["page", 16, "group"]
    assert by_name["ada_snapkv"]["owns_budget"] is True
    assert {r["name"] for r in data["budget_rules"]} == {"uniform", "fixed", "sublinear", "topp"}
    result = runner.invoke(cli, ["policies", "show", "snapkv"])
    assert result.exit_code == 0 and "pool = 21" in result.output
    result = runner.invoke(cli, ["policies", "show", "nope"])
    assert result.exit_code == 1 and "known policies" in result.output
