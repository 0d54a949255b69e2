"""Sweep results -> tables and a self-contained HTML report (figures inline, data inline, no network).

Reads one or more results folders written by ``frontier simulate`` (``parts/*.parquet`` and ``sweep.json``),
averages each configuration over traces, layers and heads, and groups by what the traces carry
(model, task, length). Tables are pandas; figures come from ``figures.py`` (matplotlib).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow

from .results import configs
from .sweep import COLUMNS, FORMAT

ROW_KEY = ("trace_id", "layer", "head", "policy", "params", "budget_rule", "sparsity")
GROUP = ["model", "task", "length"]
CONFIG = ["config", "policy", "phase", "budget_rule", "params"]
DEFAULT_TOLERANCE = 0.95
LENGTH_FRACTIONS = (1 / 10, 1 / 20)
SPARSITY_MATCH = 1e-6
BUDGET_SLACK = 0.05


class ReportError(ValueError):
    """Results that cannot be reported: missing, empty or foreign folder, unreadable or unknown data."""


def is_dense(policy: str) -> bool:
    """The dense reference of a phase (``dense`` for prefill, ``dense_decode`` for decode)."""
    return policy == "dense" or policy.startswith("dense_")


def is_baseline(policy: str) -> bool:
    """Dense and the oracles are references, not methods: they never win a table or sit on a cost frontier."""
    return is_dense(policy) or policy.startswith("oracle")


def _read_part(part: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(part)
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        raise ReportError(f"{part} is not a readable Parquet file: {exc}") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ReportError(f"{part} is not a sweep result: it lacks the columns {', '.join(missing)}")
    return frame


def _read_sweep(folder: Path) -> dict:
    path = folder / "sweep.json"
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ReportError(f"{path} is not a sweep record (no {FORMAT!r} format): {folder} holds something else")
    return record


def load_results(folders: Sequence[str | Path]) -> tuple[pd.DataFrame, dict[str, dict]]:
    """All result rows of the given folders (with a ``results_dir`` column) and each folder's sweep.json."""
    if not folders:
        raise ReportError("no results folder given")
    frames, sweeps = [], {}
    for folder in map(Path, folders):
        if not folder.exists():
            raise ReportError(f"results folder {folder} does not exist")
        if not folder.is_dir():
            raise ReportError(f"{folder} is not a folder: give the folder that `frontier simulate --out` wrote")
        sweeps[str(folder)] = _read_sweep(folder)
        parts = sorted((folder / "parts").glob("*.parquet"))
        if not parts:
            if sweeps[str(folder)]:
                raise ReportError(f"results folder {folder} has no parts/*.parquet yet: its sweep finished no task")
            raise ReportError(f"{folder} is not a results folder: it has neither sweep.json nor parts/*.parquet "
                              f"(write one with `frontier simulate TRACE... --out {folder}`)")
        for part in parts:
            frame = _read_part(part)
            frame["results_dir"] = str(folder)
            frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    rows["task"] = rows["task"].fillna("").astype(str)
    rows["params"] = rows["params"].fillna("{}").astype(str)
    return rows, sweeps


def drop_repeats(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Keep one row per (trace, layer, head, configuration, sparsity): the first folder's, saying so."""
    repeated = rows.duplicated(subset=list(ROW_KEY), keep="first")
    if not repeated.any():
        return rows, []
    folders = sorted(rows.loc[repeated, "results_dir"].unique())
    return rows[~repeated].reset_index(drop=True), [
        f"{int(repeated.sum())} rows of {', '.join(folders)} repeat rows of an earlier folder (same trace, layer, "
        f"head, configuration and sparsity): the earlier folder's are shown"]


def add_config(rows: pd.DataFrame) -> pd.DataFrame:
    """Add ``config``: the simulator's label (policy, with the parameters that tell its variants apart), plus
    the budget rule where several rules are in the data."""
    rows = rows.copy()
    label = configs(rows) if len(rows) else rows["policy"].astype(str)
    if rows["budget_rule"].nunique() > 1:
        label = label + "/" + rows["budget_rule"].astype(str)
    rows["config"] = label.astype(str)
    return rows


def _mean_ci(ok: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """Per key, the mean of ``metric`` over rows and the 95% half-width of that mean.

    Within a trace the rows' own half-widths (query sampling, independent per head) combine as
    sqrt(sum ci^2) / n; across several traces the traces' spread (1.96 standard errors) is added in quadrature.
    """
    valid = ok[np.isfinite(ok[metric].astype(float))]
    frame = valid[keys + ["trace_id"]].assign(v=valid[metric].astype(float),
                                              ss=valid[f"{metric}_ci"].astype(float).fillna(0.0) ** 2)
    per_trace = frame.groupby(keys + ["trace_id"], dropna=False).agg(v=("v", "mean"), ss=("ss", "sum"),
                                                                      n=("v", "size"))
    per_trace["ci2"] = per_trace["ss"] / per_trace["n"] ** 2
    out = per_trace.groupby(level=keys, dropna=False).agg(mean=("v", "mean"), ci2=("ci2", "sum"),
                                                          n=("v", "size"), sd=("v", "std"))
    sampling = np.sqrt(out["ci2"]) / out["n"]
    spread = 1.96 * out["sd"].fillna(0.0) / np.sqrt(out["n"])
    return pd.DataFrame({metric: out["mean"], f"{metric}_ci": np.hypot(sampling, spread)})


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, task, length, config, sparsity): means over traces, layers and heads of the ok rows."""
    ok = add_config(rows[rows["status"] == "ok"])
    if ok.empty:
        raise ReportError("every result row is an error row: nothing to report (see the error column)")
    keys = GROUP + CONFIG + ["sparsity"]
    means = ok.groupby(keys, sort=True, dropna=False).agg(
        oracle=("oracle", lambda o: ",".join(sorted(set(o.dropna().astype(str)) - {""}))),
        oracle_recall=("oracle_recall", "mean"), oracle_output_error=("oracle_output_error", "mean"),
        realised_sparsity=("realised_sparsity", "mean"), density=("density", "mean"),
        prefill_flops=("prefill_flops", "mean"), decode_bytes=("decode_bytes", "mean"), proxy=("proxy", "any"),
        n_traces=("trace_id", "nunique"), n_rows=("trace_id", "size"))
    metrics = [_mean_ci(ok, keys, m) for m in ("recall", "output_error")]
    return pd.concat([*metrics, means], axis=1).reindex(means.index).reset_index()


def meets_budget(agg: pd.DataFrame) -> pd.Series:
    """Whether each configuration really ran at its requested sparsity (realised >= requested - BUDGET_SLACK).

    Methods that own their budget (FlexPrefill's alpha) or whose granularity cannot reach a level realise less
    sparsity than requested; at that level they are not compared with methods that did.
    """
    return agg["realised_sparsity"] >= agg["sparsity"] - BUDGET_SLACK


def best_per_phase(agg: pd.DataFrame) -> pd.DataFrame:
    """For each (model, task, length, sparsity) and phase, the method of highest mean recall among those that
    met the budget (baselines excluded)."""
    methods = agg[~agg["policy"].map(is_baseline) & agg["recall"].notna() & meets_budget(agg)]
    methods = methods.sort_values(GROUP + ["phase", "sparsity", "recall", "config"],
                                  ascending=[True] * 5 + [False, True])
    best = methods.groupby(GROUP + ["phase", "sparsity"], sort=True).head(1)
    return best[GROUP + ["sparsity", "phase", "config", "recall", "realised_sparsity",
                         "output_error"]].reset_index(drop=True)


def dense_recall(agg: pd.DataFrame) -> pd.Series:
    """Dense recall per (model, task, length, phase): the phase's dense policy where swept, else 1 (its definition)."""
    dense = agg[agg["policy"].map(is_dense)].groupby(GROUP + ["phase"])["recall"].mean()
    groups = agg[GROUP + ["phase"]].drop_duplicates().set_index(GROUP + ["phase"]).index
    return dense.reindex(groups).fillna(1.0).rename("dense_recall")


def held_sparsity(agg: pd.DataFrame, tolerance: float = DEFAULT_TOLERANCE) -> pd.DataFrame:
    """Per (model, task, length, method): the highest swept sparsity up to which recall stays >= tolerance x dense.

    "Up to" means every swept sparsity at or below it keeps the threshold and meets the budget
    (:func:`meets_budget`); NaN when even the lowest fails.
    """
    if not 0 < tolerance <= 1:
        raise ReportError(f"tolerance {tolerance} is outside (0, 1]")
    dense = dense_recall(agg)
    methods = agg[~agg["policy"].map(is_baseline)]
    out = []
    for key, group in methods.groupby(GROUP + ["config", "phase"], sort=True):
        threshold = tolerance * float(dense.loc[(*key[:3], key[4])])
        group = group.sort_values("sparsity")
        fails = ~((group["recall"] >= threshold) & meets_budget(group))
        held = group[~fails.cumsum().astype(bool)]
        out.append({**dict(zip(GROUP + ["config", "phase"], key, strict=True)), "threshold": threshold,
                     "held_sparsity": held["sparsity"].max() if len(held) else math.nan,
                     "recall_at_held": held["recall"].iloc[-1] if len(held) else math.nan,
                     "max_swept": group["sparsity"].max()})
    return pd.DataFrame(out)


def missing_notes(rows: pd.DataFrame, agg: pd.DataFrame, sweeps: dict[str, dict]) -> list[str]:
    """What the data lacks, in words: unfinished sweeps, absent (task, length) cells, policies or sparsities,
    error rows, decode policies scored on a proxy."""
    notes = []
    for folder, record in sweeps.items():
        parts = record.get("parts", {})
        todo = sorted(name for name, part in parts.items() if not part.get("done"))
        if todo:
            notes.append(f"{folder}: the sweep is unfinished, {len(todo)} of {len(parts)} (trace, layer) parts "
                         f"missing (first: {todo[0]}); rerun the same `frontier simulate` to finish it")
    for model, part in agg.groupby("model"):
        have = set(map(tuple, part[["task", "length"]].drop_duplicates().to_numpy()))
        for task in sorted(part["task"].unique()):
            for length in sorted(part["length"].unique()):
                if (task, length) not in have:
                    notes.append(f"{model}: no results for task {task or '(none)'} at length {length}")
        all_configs = set(part["config"])
        levels = set(part.loc[~part["policy"].map(is_dense), "sparsity"])
        for key, group in part.groupby(["task", "length"]):
            where = f"{model}, task {key[0] or '(none)'}, length {key[1]}"
            absent = sorted(all_configs - set(group["config"]))
            if absent:
                notes.append(f"{where}: no results for {', '.join(absent)}")
            for config, cg in group[~group["policy"].map(is_dense)].groupby("config"):
                lacking = sorted(levels - set(cg["sparsity"]))
                if lacking:
                    notes.append(f"{where}: {config} lacks sparsity {', '.join(f'{s:g}' for s in lacking)}")
    errors = rows[rows["status"] != "ok"]
    for (policy, sparsity), group in errors.groupby(["policy", "sparsity"]):
        first = str(group["error"].dropna().iloc[0]) if group["error"].notna().any() else "no message"
        notes.append(f"{policy} at sparsity {sparsity:g}: {len(group)} error rows, left out (first: {first})")
    if agg["proxy"].any():
        proxied = sorted(agg.loc[agg["proxy"], "config"].unique())
        notes.append(f"decode policies scored on the last prompt queries as a proxy (no generated tokens): "
                     f"{', '.join(proxied)}")
    return notes


@dataclass
class Report:
    """Everything the report shows: the data, its tables, its figures and what is missing."""

    rows: pd.DataFrame
    agg: pd.DataFrame
    best: pd.DataFrame
    held: pd.DataFrame
    tolerance: float
    sweeps: dict[str, dict]
    notes: list[str]
    figures: list = field(default_factory=list)
    e2e: pd.DataFrame | None = None
    fidelity: pd.DataFrame | None = None


def side_by_side(rows: pd.DataFrame, e2e: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Simulated means beside end-to-end task scores (``frontier eval --sweep`` folders), matched and ranked by
    :mod:`.fidelity`: the joined configurations and the Spearman correlations per (model, task, length)."""
    from . import fidelity

    try:
        scores = pd.concat([fidelity.load_e2e(path) for path in e2e], ignore_index=True)
        joined = fidelity.join(rows, scores)
    except fidelity.FidelityError as exc:
        raise ReportError(str(exc)) from None
    columns = [*fidelity.KEY, "phase", "recall", "output_error", "score", "samples"]
    return joined[columns], fidelity.fidelity(joined)


def build_report(folders: Sequence[str | Path], *, tolerance: float = DEFAULT_TOLERANCE,
                 heatmap_policies: Sequence[str] = (), heatmap_sparsity: float | None = None,
                 e2e: Sequence[str | Path] = (), progress=None) -> Report:
    """Load the folders, compute the tables and draw every figure (``progress(step)`` is called per figure)."""
    from . import figures

    rows, sweeps = load_results(folders)
    rows, repeats = drop_repeats(rows)
    agg = aggregate(rows)
    report = Report(rows=rows, agg=agg, best=best_per_phase(agg), held=held_sparsity(agg, tolerance),
                    tolerance=tolerance, sweeps=sweeps, notes=repeats + missing_notes(rows, agg, sweeps))
    if e2e:
        report.e2e, report.fidelity = side_by_side(rows, e2e)
    known = set(rows["policy"])
    unknown = sorted(set(heatmap_policies) - known)
    if unknown:
        raise ReportError(f"heatmap policy {', '.join(unknown)} is not in the results (they hold "
                          f"{', '.join(sorted(known))})")
    figs, notes = figures.all_figures(rows, agg, heatmap_policies=heatmap_policies,
                                      heatmap_sparsity=heatmap_sparsity, progress=progress)
    report.figures, report.notes = figs, report.notes + notes
    return report


def summary_tables(report: Report) -> dict[str, pd.DataFrame]:
    """The summary as two display tables: best method per phase at each sparsity, and the sparsity each method holds."""
    best, held = report.best, report.held
    if best.empty:
        best_wide = pd.DataFrame(columns=GROUP + ["sparsity"])
    else:
        cells = best.assign(cell=[f"{c} ({r:.3f})" for c, r in zip(best["config"], best["recall"], strict=True)])
        best_wide = cells.pivot_table(index=GROUP + ["sparsity"], columns="phase", values="cell", aggfunc="first")
        best_wide = best_wide[sorted(best_wide.columns, key=lambda phase: (phase != "prefill", phase))]
        best_wide.columns = [f"best {phase} (recall)" for phase in best_wide.columns]
        best_wide = best_wide.fillna("none met the budget").reset_index()
    if held.empty:
        held_wide = pd.DataFrame(columns=["config", "phase"])
    else:
        cells = held.assign(cell=["none" if pd.isna(s) else f"{s:g}" for s in held["held_sparsity"]])
        held_wide = cells.pivot_table(index=["config", "phase"], columns=GROUP, values="cell", aggfunc="first")
        held_wide.columns = [f"{m} {t or '-'} {n}" for m, t, n in held_wide.columns]
        held_wide = held_wide.fillna("n/a").reset_index()
    return {"best": best_wide, "held": held_wide}


def _table_html(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p>No method in the results (only the dense and oracle baselines).</p>"
    return frame.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.4g}", border=0, classes="table")


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;
color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.table{border-collapse:collapse;font-size:.9em;margin:.5em 0} .table td,.table th{padding:.25em .6em;
border-bottom:1px solid #e4e4e4;text-align:left} .table th{background:#f4f4f4}
figure{margin:1.5em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#555;max-width:70em} .notes li{margin:.2em 0} .meta{color:#555}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
"""


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page: inline PNG figures, inline tables and data, no script."""
    from .figures import render

    esc = html.escape
    agg = report.agg
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<link rel='icon' href='data:,'>", "<title>sparse-frontier report</title>",
        f"<style>{STYLE}</style></head><body>", "<h1>sparse-frontier report</h1>",
        f"<p class='meta'>{len(report.rows)} result rows from {len(report.sweeps)} results folder(s): "
        f"{esc(', '.join(report.sweeps))}. Models: {esc(', '.join(sorted(agg['model'].unique())))}; "
        f"tasks: {esc(', '.join(sorted(t or '(none)' for t in agg['task'].unique())))}; "
        f"lengths: {esc(', '.join(str(n) for n in sorted(agg['length'].unique())))}; "
        f"{agg['config'].nunique()} configurations; sparsity levels "
        f"{esc(', '.join(f'{s:g}' for s in sorted(agg['sparsity'].unique())))}. "
        f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.</p>",
        "<p class='meta'>Recall is attention-mass recall: the true softmax mass of the keys a method computes, "
        "averaged over scored queries, heads, layers and traces. Bands are 95% confidence intervals of that "
        "mean. Output error is ||o_sparse - o_dense|| / ||o_dense||.</p>",
        "<h2>What is missing</h2>",
    ]
    if report.notes:
        parts.append("<ul class='notes'>" + "".join(f"<li>{esc(n)}</li>" for n in report.notes) + "</ul>")
    else:
        parts.append("<p>Nothing: every (task, length) has every configuration at every sparsity level.</p>")
    tables = summary_tables(report)
    parts += [
        "<h2>Summary</h2>",
        "<h3>Best method per phase at each sparsity (mean recall)</h3>",
        f"<p class='meta'>Baselines (dense, oracles) excluded; a method counts at a sparsity only where its "
        f"realised sparsity reached the requested one within {BUDGET_SLACK:g}.</p>",
        _table_html(tables["best"]),
        f"<h3>Highest sparsity each method holds with recall &ge; {report.tolerance:g} &times; dense</h3>",
        "<p class='meta'>Every swept sparsity up to the one shown keeps the threshold (and meets the budget); "
        "'none' means even the lowest swept sparsity fails.</p>",
        _table_html(tables["held"]),
    ]
    if report.e2e is not None:
        parts += ["<h2>Simulated against end to end</h2>",
                  "<p class='meta'>Spearman rank correlation, across configurations, of simulated recall (and "
                  "output error) with the task score of running the model with the same configuration.</p>",
                  _table_html(report.fidelity), "<h3>Configurations in both</h3>", _table_html(report.e2e)]
    section = None
    for spec in report.figures:
        if spec.section != section:
            section = spec.section
            parts.append(f"<h2>{esc(section)}</h2>")
        uri = _data_uri(render(spec.figure, "png"), "image/png")
        parts.append(f"<figure id='{esc(spec.name)}'><img src='{uri}' alt='{esc(spec.title)}'>"
                     f"<figcaption><b>{esc(spec.title)}.</b> {esc(spec.caption)}</figcaption></figure>")
    csv = agg.to_csv(index=False).encode()
    data_json = agg.to_json(orient="records", double_precision=6).replace("</", "<\\/")
    parts += [
        "<h2>Data</h2>",
        f"<p><a download='aggregated.csv' href='{_data_uri(csv, 'text/csv')}'>aggregated.csv</a>: the means "
        "behind every figure and table, one row per (model, task, length, configuration, sparsity). The same "
        "records are embedded as JSON in the element <code>#aggregated-data</code>.</p>",
        f"<script type='application/json' id='aggregated-data'>{data_json}</script>",
        "<details><summary>sweep.json of each folder</summary>",
        *(f"<h4>{esc(folder)}</h4><pre>{esc(json.dumps(sweep, indent=1, default=str))}</pre>"
          for folder, sweep in report.sweeps.items()),
        "</details></body></html>",
    ]
    return "\n".join(parts)


def check_out(out: str | Path, fmt: str) -> None:
    """Refuse an output the format cannot be written to (before any work): a folder for html, a file for figures."""
    out = Path(out)
    if fmt not in ("html", "png", "svg"):
        raise ReportError(f"format {fmt!r} is not html, png or svg")
    if fmt == "html" and out.is_dir():
        raise ReportError(f"--out {out} is a folder: give a file name such as {out / 'report.html'}")
    if fmt != "html" and out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file: figures go into a folder")


def write_html(report: Report, out: str | Path) -> Path:
    """Write the self-contained report page and return its path."""
    check_out(out, "html")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(report), encoding="utf-8")
    return out


def write_figures(report: Report, out: str | Path, fmt: str) -> list[Path]:
    """Write every figure as ``<name>.<fmt>`` (png or svg) into the folder ``out``; return the paths."""
    from .figures import render

    if fmt not in ("png", "svg"):
        raise ReportError(f"figure format {fmt!r} is not png or svg")
    check_out(out, fmt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in report.figures:
        path = out / f"{spec.name}.{fmt}"
        path.write_bytes(render(spec.figure, fmt))
        paths.append(path)
    return paths
