"""frontier report on results of a real small sweep: figures, summary numbers, partial data, bad folders."""

from __future__ import annotations

import glob
import math
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from html.parser import HTMLParser

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import write_random_trace

from sparse_frontier.cli.main import cli
from sparse_frontier.simulator import figures
from sparse_frontier.simulator import sweep as sweep_api
from sparse_frontier.simulator.report import (
    ReportError,
    aggregate,
    best_per_phase,
    build_report,
    held_sparsity,
    load_results,
    side_by_side,
    write_figures,
    write_html,
)
from sparse_frontier.simulator.sweep import Settings, Spec

SPARSITY = (0.5, 0.9, 0.95)
POLICIES = ("dense", "dense_decode", "vertical_slash", "block_sparse", "sink_local", "oracle_topk", "snapkv",
            "ada_snapkv", "quest", "oracle_topk_decode")
GENERATED = 32


def run_sweep(tmp_path, name, lengths=(256, 512), policies=POLICIES, sparsity=SPARSITY):
    """Random traces of the given prompt lengths (+32 generated tokens), swept by the real simulator."""
    traces = []
    for n in lengths:
        path = tmp_path / f"{name}-{n}.zarr"
        write_random_trace(path, n_tokens=n + GENERATED, prefill_len=n, seed=n)
        traces.append(str(path))
    settings = Settings(policies=[Spec(p) for p in policies], sparsities=list(sparsity), queries=64,
                        error_queries=16)
    record = sweep_api.run_sweep(traces, settings, tmp_path / name)
    assert record["complete"]
    return tmp_path / name


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Results of one small real sweep: two random traces (256 and 512 tokens), every policy kind."""
    return run_sweep(tmp_path_factory.mktemp("sweep"), "results")


def hand_rows(folder):
    """The ok rows of a results folder, read with pyarrow alone, as plain dicts."""
    rows = []
    for part in sorted(glob.glob(f"{folder}/parts/*.parquet")):
        rows += [r for r in pq.read_table(part).to_pylist() if r["status"] == "ok"]
    return rows


def hand_means(rows, column):
    """Mean of ``column`` per (length, policy, phase, sparsity), by plain Python."""
    values = defaultdict(list)
    for r in rows:
        values[(r["length"], r["policy"], r["phase"], r["sparsity"])].append(r[column])
    return {key: sum(v) / len(v) for key, v in values.items()}


def is_method(policy):
    return not (policy.startswith("dense") or policy.startswith("oracle"))


def test_every_figure_type_is_drawn(sweep, tmp_path):
    result = CliRunner().invoke(cli, ["report", str(sweep), "--format", "png", "--out", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "png").glob("*.png"))
    names = [p.stem for p in pngs]
    for prefix in ("recall-vs-sparsity", "output-error-vs-sparsity", "cost-prefill", "cost-decode", "length-",
                   "heatmap-"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    report = build_report([sweep], heatmap_policies=["quest"], heatmap_sparsity=0.9)
    report.figures = [s for s in report.figures if s.name.startswith("heatmap-")]
    assert [s.name for s in report.figures] == ["heatmap-random-256-s0.9", "heatmap-random-512-s0.9"]
    svgs = write_figures(report, tmp_path / "svg", "svg")
    assert all(ET.parse(p).getroot().tag.endswith("svg") for p in svgs)


def test_summary_equals_hand_computation(sweep):
    tolerance, slack = 0.9, 0.05
    agg = aggregate(load_results([sweep])[0])
    best_table, held_table = best_per_phase(agg), held_sparsity(agg, tolerance)
    rows = hand_rows(sweep)
    recall, realised = hand_means(rows, "recall"), hand_means(rows, "realised_sparsity")
    assert {p for (_, p, _, _) in recall} == set(POLICIES)
    meets = {key: realised[key] >= key[3] - slack for key in recall}
    # best method per phase at each sparsity: among methods that met the budget, the highest mean recall
    best = {}
    for (length, policy, phase, s), r in recall.items():
        if not is_method(policy) or not meets[(length, policy, phase, s)]:
            continue
        key = (length, phase, s)
        if key not in best or r > best[key][1] or (r == best[key][1] and policy < best[key][0]):
            best[key] = (policy, r)
    got = {(r.length, r.phase, r.sparsity): (r.config, r.recall) for r in best_table.itertuples()}
    assert best and got.keys() == best.keys()
    for key, (policy, r) in best.items():
        assert got[key][0] == policy
        assert got[key][1] == pytest.approx(r, rel=1e-9)
    # highest sparsity each method holds: every swept level up to it keeps recall >= 0.9 x the phase's dense
    dense = {(length, phase): r for (length, policy, phase, _), r in recall.items() if policy.startswith("dense")}
    held = {(r.length, r.config): r.held_sparsity for r in held_table.itertuples()}
    methods = {(length, policy, phase) for (length, policy, phase, _) in recall if is_method(policy)}
    assert held.keys() == {(length, policy) for length, policy, _ in methods}
    for length, policy, phase in methods:
        expected = math.nan
        for s in sorted(s for (n, p, _, s) in recall if n == length and p == policy):
            key = (length, policy, phase, s)
            if recall[key] < tolerance * dense[(length, phase)] or not meets[key]:
                break
            expected = s
        got_held = held[(length, policy)]
        assert (math.isnan(expected) and math.isnan(got_held)) or got_held == expected, (length, policy)


def test_cli_prints_summary_and_writes_self_contained_html(sweep, tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", str(sweep), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Best method per phase" in result.output and str(out) in result.output
    page = out.read_text()

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.refs = []

        def handle_starttag(self, tag, attrs):
            self.refs += [(tag, v) for k, v in attrs if k in ("src", "href") and v]

    parser = Links()
    parser.feed(page)
    images = [v for tag, v in parser.refs if tag == "img"]
    assert len(images) >= 7 and page.count("<figure") == len(images)
    assert all(v.startswith("data:image/png;base64,") for v in images)
    assert all(v.startswith("data:") or v.startswith("#") for _, v in parser.refs)
    assert not re.search(r"https?://", page.replace("http://www.w3.org", ""))


def test_end_to_end_scores_side_by_side(sweep, tmp_path):
    # end-to-end records as `frontier eval --sweep` writes them: one task score per sample and configuration
    sim = {(r["policy"], r["sparsity"]): r for r in hand_rows(sweep) if r["length"] == 256}
    scores = {("quest", 0.5): [1.0, 0.0], ("snapkv", 0.5): [1.0], ("block_sparse", 0.9): [0.0],
              ("vertical_slash", 0.5): [1.0]}
    records = [{**{k: sim[key][k] for k in ("model", "task", "policy", "params", "budget_rule", "sparsity", "phase",
                                             "realised_sparsity")}, "length": 256, "score": x}
               for key, xs in scores.items() for x in xs]
    (tmp_path / "e2e").mkdir()
    pd.DataFrame(records).to_parquet(tmp_path / "e2e" / "part.parquet")
    joined, correlation = side_by_side(load_results([sweep])[0], [tmp_path])
    table = joined.set_index(["policy", "sparsity"])
    assert len(table) == 4
    assert table.loc[("quest", 0.5), "score"] == 0.5 and table.loc[("quest", 0.5), "samples"] == 2
    quest = [r["recall"] for r in hand_rows(sweep) if (r["policy"], r["sparsity"], r["length"]) == ("quest", 0.5, 256)]
    assert table.loc[("quest", 0.5), "recall"] == pytest.approx(sum(quest) / len(quest))
    assert correlation.set_index("phase").loc["all", "configs"] == 4


def test_one_policy_one_sparsity_still_renders(tmp_path):
    folder = run_sweep(tmp_path, "one", lengths=(256,), policies=("block_sparse",), sparsity=(0.5,))
    report = build_report([folder])
    names = [s.name for s in report.figures]
    assert any(n.startswith("recall-vs-sparsity") for n in names)
    assert any(n.startswith("heatmap-") for n in names)
    assert not any(n.startswith(("cost-decode", "length-")) for n in names)
    assert any("one length only" in n for n in report.notes)  # stated instead of an empty panel
    assert any("cost view (decode)" in n for n in report.notes)
    assert report.best["config"].tolist() == ["block_sparse"]
    write_html(report, tmp_path / "one.html")
    assert "<img" in (tmp_path / "one.html").read_text()


def test_several_folders_at_once_and_missing_stated(tmp_path):
    a = run_sweep(tmp_path, "a", lengths=(256,), policies=("dense", "block_sparse", "quest"))
    b = run_sweep(tmp_path, "b", lengths=(512,), policies=("dense", "block_sparse"))
    report = build_report([a, b, a])  # a given twice: its rows are counted once, and the report says so
    assert sorted(report.agg["length"].unique()) == [256, 512]
    assert len(report.rows) == len(hand_rows(a)) + len(hand_rows(b))
    assert any("length 512: no results for quest" in n for n in report.notes), report.notes
    assert any("repeat rows of an earlier folder" in n for n in report.notes), report.notes


def test_interrupted_sweep_is_stated_unfinished(tmp_path):
    trace = tmp_path / "t.zarr"
    write_random_trace(trace, n_tokens=256 + GENERATED, prefill_len=256)

    def stop(result, done, total):
        raise KeyboardInterrupt  # the user stops the sweep after its first (trace, layer) task

    settings = Settings(policies=[Spec("dense"), Spec("sink_local")], sparsities=[0.5], queries=32, error_queries=8)
    with pytest.raises(KeyboardInterrupt):
        sweep_api.run_sweep([str(trace)], settings, tmp_path / "cut", on_task=stop)
    report = build_report([tmp_path / "cut"])
    assert set(report.rows["layer"]) == {0}
    assert any("sweep is unfinished, 1 of 2" in n for n in report.notes), report.notes


def test_empty_or_foreign_folder_is_a_clear_error(tmp_path, random_trace):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="not a results folder"):
        load_results([empty])
    with pytest.raises(ReportError, match="not a results folder"):
        load_results([random_trace])  # a trace store is not a results folder
    foreign = tmp_path / "foreign"
    (foreign / "parts").mkdir(parents=True)
    (foreign / "parts" / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ReportError, match="not a readable Parquet"):
        load_results([foreign])
    (foreign / "sweep.json").write_text('{"format": "something-else"}')
    with pytest.raises(ReportError, match="not a sweep record"):
        load_results([foreign])
    runner = CliRunner()
    for folder in (empty, tmp_path / "nowhere"):
        result = runner.invoke(cli, ["report", str(folder)])
        assert result.exit_code == 1
        assert str(folder) in result.output and "Traceback" not in result.output


def test_pareto_front_by_hand():
    import numpy as np

    cost = np.array([1.0, 2.0, 2.0, 3.0, 4.0])
    recall = np.array([0.5, 0.4, 0.7, 0.7, 0.9])
    assert figures.pareto_front(cost, recall, True).tolist() == [True, False, True, False, True]
    error = 1 - recall
    assert figures.pareto_front(cost, error, False).tolist() == [True, False, True, False, True]


@pytest.mark.slow
def test_demo_captures_simulates_reports_and_reuses_its_trace(tmp_path):
    from sparse_frontier.policies import registry

    args = ["demo", "--length", "1024", "--sparsity", "0.5,0.9", "--queries", "32",
            "--traces", str(tmp_path / "traces"), "--results", str(tmp_path / "results")]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    folder = tmp_path / "results" / "demo-gemma3-270m-niah-1024"
    assert "Best method per phase" in first.output and str(folder / "report.html") in first.output
    rows = hand_rows(folder)
    builtins = {name for name, info in registry.available().items() if info.source == "built-in"}
    assert {r["policy"] for r in rows} == builtins  # every built-in policy (other tests may load extra ones)
    assert {(r["model"], r["task"]) for r in rows} == {("gemma3-270m", "niah")}
    assert all(r["recall"] == pytest.approx(1.0, abs=1e-5) for r in rows if r["policy"] in ("dense", "dense_decode"))
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert "reusing the trace" in second.output
