"""The report's matplotlib figures, drawn from the aggregated results (object API only: no pyplot state)."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .report import LENGTH_FRACTIONS, SPARSITY_MATCH, add_config, is_baseline, is_dense

METRICS = {"recall": "attention-mass recall", "output_error": "output relative error"}
COSTS = {"prefill": ("prefill_flops", "prefill FLOPs"), "decode": ("decode_bytes", "decode bytes per step")}
PHASE_MARKERS = {"prefill": "o", "decode": "s"}
MODEL_MARKERS = "o^sDvP*X<>"
PANEL = (4.2, 3.2)
DEFAULT_HEATMAP_SPARSITY = 0.9


@dataclass
class FigureSpec:
    """One figure of the report: a file-safe name, the report section it belongs to, title, caption."""

    name: str
    section: str
    title: str
    caption: str
    figure: Figure


def slug(*parts: object) -> str:
    """A file-name-safe name from parts."""
    text = "_".join(str(p) for p in parts if str(p) != "")
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def render(figure: Figure, fmt: str) -> bytes:
    """The figure as PNG or SVG bytes."""
    buf = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else None
    figure.savefig(buf, format=fmt, dpi=110, metadata=metadata)
    return buf.getvalue()


def config_colors(agg: pd.DataFrame) -> dict[str, tuple]:
    """A fixed colour per configuration, the same in every figure: prefill methods from tab10, decode methods
    from Dark2 (greys left out), the dense references black and grey."""
    from matplotlib import colormaps

    palettes = {"prefill": [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7],
                "decode": [c for i, c in enumerate(colormaps["Dark2"].colors) if i != 7]}
    colors = {}
    pairs = agg[["config", "phase"]].drop_duplicates().sort_values(["phase", "config"])
    for phase, group in pairs.groupby("phase", sort=False):
        palette = palettes.get(phase, palettes["prefill"])
        names = [c for c in group["config"] if not is_dense(c)]
        colors.update({name: palette[i % len(palette)] for i, name in enumerate(names)})
    shades = iter([(0.0, 0.0, 0.0), (0.45, 0.45, 0.45)] * len(pairs))
    colors.update({c: next(shades) for c in sorted(set(pairs["config"])) if is_dense(c)})
    return colors


def _grid(n: int, ncols_max: int = 3) -> tuple[int, int]:
    ncols = min(n, ncols_max)
    return math.ceil(n / ncols), ncols


def _new_figure(nrows: int, ncols: int, legend_width: float = 2.6,
                panel: tuple[float, float] = PANEL) -> tuple[Figure, np.ndarray]:
    width = max(panel[0] * ncols, 6.0) + legend_width  # room for the title above a single panel
    fig = Figure(figsize=(width, panel[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _where(task: str, length: int) -> str:
    return f"{task or '(no task)'}, {length} tokens"


def _plot_lines(ax, frame: pd.DataFrame, x: str, metric: str, colors: dict) -> None:
    """One line per configuration with its confidence band, and its oracle dashed in the same colour."""
    oracle = {"recall": "oracle_recall", "output_error": "oracle_output_error"}[metric]
    for config, line in frame.groupby("config", sort=True):
        line = line.sort_values(x)
        if line[metric].isna().all():
            continue
        color = colors[config]
        if is_dense(str(line["policy"].iloc[0])):  # the reference: a level, not a curve over sparsity
            ax.axhline(float(line[metric].mean()), color=color, linestyle=":", linewidth=1.2)
            continue
        marker = PHASE_MARKERS.get(str(line["phase"].iloc[0]), "^")
        xs, ys, ci = line[x].to_numpy(float), line[metric].to_numpy(float), line[f"{metric}_ci"].to_numpy(float)
        ax.plot(xs, ys, color=color, marker=marker, markersize=4, linewidth=1.6, label=config)
        if np.isfinite(ci).any() and (np.nan_to_num(ci) > 0).any():
            ax.fill_between(xs, ys - np.nan_to_num(ci), ys + np.nan_to_num(ci), color=color, alpha=0.15, linewidth=0)
        if not is_baseline(str(line["policy"].iloc[0])) and line[oracle].notna().any():
            ax.plot(xs, line[oracle].to_numpy(float), color=color, linestyle="--", linewidth=1.0, alpha=0.8)


def _legend(fig: Figure, configs: Sequence[str], colors: dict, oracle: bool = True,
            models: Sequence[str] = ()) -> None:
    handles = [Line2D([], [], color=colors[c], linewidth=1.6, linestyle=":" if is_dense(c) else "-", label=c)
               for c in sorted(configs)]
    handles += [Line2D([], [], color="grey", marker=MODEL_MARKERS[i % len(MODEL_MARKERS)], linestyle="",
                       label=m) for i, m in enumerate(models)]
    if oracle:
        handles.append(Line2D([], [], color="grey", linestyle="--", label="oracle, same granularity"))
    else:
        handles += [Line2D([], [], color="grey", marker="o", linestyle="", label="on the frontier"),
                    Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="", label="dominated")]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, max(height, 0.22 * len(handles) + 0.8))  # room for the whole legend


def sparsity_figures(agg: pd.DataFrame, metric: str, colors: dict) -> tuple[list[FigureSpec], list[str]]:
    """Metric against realised sparsity, one line per configuration, one panel per (task, length);
    one figure per model and phase (prefill and decode policies are scored on different query rows)."""
    specs, notes = [], []
    order = {phase: i for i, phase in enumerate(PHASE_MARKERS)}  # prefill first, then decode
    groups = sorted(agg.groupby(["model", "phase"]), key=lambda g: (g[0][0], order.get(g[0][1], 9), g[0][1]))
    for (model, phase), part in groups:
        if part[metric].isna().all():
            notes.append(f"{model}: no {METRICS[metric]} for {phase} policies (traces without V): "
                         f"that figure is left out")
            continue
        cells = part[["task", "length"]].drop_duplicates().sort_values(["task", "length"]).to_numpy()
        fig, axes = _new_figure(*_grid(len(cells)))
        for ax, (task, length) in zip(axes.flat, cells, strict=False):
            panel = part[(part["task"] == task) & (part["length"] == length)]
            _plot_lines(ax, panel, "realised_sparsity", metric, colors)
            ax.set_title(_where(task, length), fontsize="medium")
            ax.set_xlabel("realised sparsity")
            ax.set_ylabel(METRICS[metric])
            ax.grid(alpha=0.3)
            if metric == "recall":
                ax.set_ylim(min(0.0, float(panel["recall"].min()) - 0.02), 1.02)
            else:
                ax.set_ylim(bottom=0.0)
        for ax in axes.flat[len(cells):]:
            ax.remove()
        _legend(fig, part["config"].unique(), colors)
        fig.suptitle(f"{model}, {phase} policies: {METRICS[metric]} against sparsity", x=0.01, ha="left")
        specs.append(FigureSpec(
            slug(metric, "vs-sparsity", phase, model), "Recall and output error against sparsity",
            f"{model}, {phase} policies: {METRICS[metric]} against sparsity",
            "One line per configuration (mean over traces, layers and heads) at the sparsity its selections "
            "really had; shaded: 95% confidence band; dashed, same colour: the oracle at that method's "
            "granularity and budget (its ceiling).", fig))
    return specs, notes


def pareto_front(cost: np.ndarray, value: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Boolean mask of the points no other point dominates (no more cost and no worse value, one strictly)."""
    better = value if higher_is_better else -value
    on = np.ones(len(cost), dtype=bool)
    for i in range(len(cost)):
        dominated_by = (cost <= cost[i]) & (better >= better[i]) & ((cost < cost[i]) | (better > better[i]))
        on[i] = not dominated_by.any()
    return on


def cost_figures(agg: pd.DataFrame, colors: dict) -> tuple[list[FigureSpec], list[str]]:
    """Recall and output error against the paper's cost model, with the Pareto frontier across models and methods."""
    specs, notes = [], []
    metrics = [m for m in METRICS if agg[m].notna().any()]
    for phase, (cost, cost_label) in COSTS.items():
        dense = agg["policy"].map(is_dense)
        points = agg[(agg["phase"] == phase) & (~agg["policy"].map(is_baseline) | dense)]
        points = points[np.isfinite(points[cost].astype(float))]
        if points[~points["policy"].map(is_dense)].empty:
            notes.append(f"cost view ({phase}): no {phase} policy with a {cost_label} cost in the results")
            continue
        cells = points[["task", "length"]].drop_duplicates().sort_values(["task", "length"]).to_numpy()
        models = sorted(points["model"].unique())
        fig, axes = _new_figure(len(cells), len(metrics))
        for r, (task, length) in enumerate(cells):
            panel = points[(points["task"] == task) & (points["length"] == length)]
            for c, metric in enumerate(metrics):
                ax = axes[r, c]
                data = panel[panel[metric].notna()]
                on = pareto_front(data[cost].to_numpy(float), data[metric].to_numpy(float), metric == "recall")
                for (config, model), grp in data.groupby(["config", "model"]):
                    mask = on[data.index.get_indexer(grp.index)]
                    marker = MODEL_MARKERS[models.index(model) % len(MODEL_MARKERS)]
                    ax.scatter(grp[cost][mask], grp[metric][mask], color=colors[config], marker=marker, s=28,
                               zorder=3)
                    ax.scatter(grp[cost][~mask], grp[metric][~mask], facecolors="none", edgecolors=colors[config],
                               marker=marker, s=28, zorder=2)
                front = data[on].sort_values(cost)
                ax.step(front[cost], front[metric], where="post", color="black", linewidth=0.9, alpha=0.7)
                ax.set_title(_where(task, length), fontsize="medium")
                ax.set_xlabel(cost_label)
                ax.set_ylabel(METRICS[metric])
                ax.grid(alpha=0.3)
        _legend(fig, points["config"].unique(), colors, oracle=False, models=models if len(models) > 1 else ())
        fig.suptitle(f"{phase} cost view: quality against {cost_label}", x=0.01, ha="left")
        specs.append(FigureSpec(
            slug("cost", phase), "Cost view", f"{phase.capitalize()} quality against {cost_label}",
            "Each point is one configuration at one sparsity (mean over traces, layers, heads), costed with the "
            "paper's model (Appendix B.1, index overheads included). Filled: on the Pareto frontier (black "
            "steps): no other configuration, of any model, is both cheaper and better. Hollow: dominated. "
            "Dense is the reference point.", fig))
    return specs, notes


def _at_fraction(frame: pd.DataFrame, fraction: float) -> pd.DataFrame:
    return frame[(frame["sparsity"] - (1 - fraction)).abs() < SPARSITY_MATCH]


def length_figures(agg: pd.DataFrame, colors: dict,
                   fractions: Sequence[float] = LENGTH_FRACTIONS) -> tuple[list[FigureSpec], list[str]]:
    """Quality against sequence length at fixed budget fractions (the sublinear-budget question)."""
    specs, notes = [], []
    methods = agg[~agg["policy"].map(is_baseline)]
    if methods.empty:
        notes.append("length scaling: no method in the results (only dense and oracle baselines)")
    for (model, task), part in methods.groupby(["model", "task"], sort=True):
        lengths = sorted(part["length"].unique())
        where = f"{model}, task {task or '(none)'}"
        if len(lengths) < 2:
            notes.append(f"length scaling: {where} has one length only ({lengths[0]}): sweep more lengths")
            continue
        kept = [f for f in fractions if not _at_fraction(part, f).empty]
        for f in sorted(set(fractions) - set(kept)):
            notes.append(f"length scaling: {where} was not swept at budget 1/{round(1 / f)} "
                         f"(sparsity {1 - f:g})")
        metrics = [m for m in ("output_error", "recall") if part[m].notna().any()]
        if not kept:
            continue
        columns = [(phase, f) for phase in sorted(part["phase"].unique()) for f in kept
                   if not _at_fraction(part[part["phase"] == phase], f).empty]
        fig, axes = _new_figure(len(metrics), len(columns))
        for c, (phase, fraction) in enumerate(columns):
            data = _at_fraction(part[part["phase"] == phase], fraction)
            for r, metric in enumerate(metrics):
                ax = axes[r, c]
                _plot_lines(ax, data, "length", metric, colors)
                ax.set_xscale("log", base=2)
                ax.set_xticks(lengths, [str(n) for n in lengths])
                ax.minorticks_off()
                ax.set_title(f"{phase}, budget 1/{round(1 / fraction)} (sparsity {1 - fraction:g})",
                             fontsize="medium")
                ax.set_xlabel("sequence length (tokens)")
                ax.set_ylabel(METRICS[metric])
                ax.grid(alpha=0.3)
        _legend(fig, part["config"].unique(), colors)
        fig.suptitle(f"{where}: length scaling at fixed budget fractions", x=0.01, ha="left")
        specs.append(FigureSpec(
            slug("length", model, task), "Length scaling", f"{where}: quality against length at a fixed budget",
            "At a fixed kept fraction of the keys, does the error fall as the sequence grows (longer sequences "
            "tolerating more sparsity)? Shaded: 95% confidence band; dashed: the oracle.", fig))
    return specs, notes


def _heatmap_sparsity(levels: Sequence[float], wanted: float | None) -> float | None:
    levels = sorted(levels)
    if wanted is None:
        return min(levels, key=lambda s: (abs(s - DEFAULT_HEATMAP_SPARSITY), -s))
    close = [s for s in levels if abs(s - wanted) < SPARSITY_MATCH]
    return close[0] if close else None


def heatmap_figures(rows: pd.DataFrame, policies: Sequence[str] = (),
                    sparsity: float | None = None) -> tuple[list[FigureSpec], list[str]]:
    """Per-layer x per-head recall of the chosen policies (default: every method) at one sparsity, per group."""
    specs, notes = [], []
    ok = add_config(rows[(rows["status"] == "ok") & rows["recall"].notna()])
    chosen = ok[ok["policy"].isin(policies)] if policies else ok[~ok["policy"].map(is_baseline)]
    for (model, task, length), part in chosen.groupby(["model", "task", "length"], sort=True):
        level = _heatmap_sparsity(part["sparsity"].unique(), sparsity)
        where = f"{model}, {_where(task, length)}"
        if level is None:
            notes.append(f"heatmaps: {where} was not swept at sparsity {sparsity:g}")
            continue
        data = part[(part["sparsity"] - level).abs() < SPARSITY_MATCH]
        configs = sorted(data["config"].unique())
        n_layers, n_heads = data["layer"].nunique(), data["head"].nunique()
        panel = (max(2.8, 1.4 + 0.3 * n_heads), max(2.6, 1.2 + 0.16 * n_layers))
        fig, axes = _new_figure(*_grid(len(configs), 4), legend_width=0.8, panel=panel)
        image = None
        for ax, config in zip(axes.flat, configs, strict=False):
            grid = data[data["config"] == config].pivot_table(index="layer", columns="head", values="recall",
                                                              aggfunc="mean")
            image = ax.imshow(grid.to_numpy(float), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                              interpolation="nearest")
            ax.set_title(f"{config} (mean {np.nanmean(grid.to_numpy(float)):.3f})", fontsize="medium")
            ax.set_xlabel("query head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(grid.shape[1]), [str(h) for h in grid.columns], fontsize="x-small")
            ax.set_yticks(range(grid.shape[0]), [str(n) for n in grid.index], fontsize="x-small")
        for ax in axes.flat[len(configs):]:
            ax.remove()
        fig.colorbar(image, ax=list(axes.flat[:len(configs)]), label="attention-mass recall", shrink=0.8)
        fig.suptitle(f"{where}: recall per layer and head at sparsity {level:g}", x=0.01, ha="left")
        specs.append(FigureSpec(
            slug("heatmap", model, task, length, f"s{level:g}"), "Where methods fail: recall per layer and head",
            f"{where}: recall per layer and head at sparsity {level:g}",
            "Mean recall of each (layer, query head) over the scored queries and traces; dark cells are where "
            "a method loses attention mass.", fig))
    if chosen.empty:
        which = ", ".join(policies) if policies else "any method (only dense and oracle baselines)"
        notes.append(f"heatmaps: no results for {which}")
    return specs, notes


def all_figures(rows: pd.DataFrame, agg: pd.DataFrame, *, heatmap_policies: Sequence[str] = (),
                heatmap_sparsity: float | None = None,
                progress: Callable[[str], None] | None = None) -> tuple[list[FigureSpec], list[str]]:
    """Every figure type of the report, and notes on those that the data cannot support."""
    colors = config_colors(agg)
    builders = [
        ("recall against sparsity", lambda: sparsity_figures(agg, "recall", colors)),
        ("output error against sparsity", lambda: sparsity_figures(agg, "output_error", colors)),
        ("cost view", lambda: cost_figures(agg, colors)),
        ("length scaling", lambda: length_figures(agg, colors)),
        ("heatmaps", lambda: heatmap_figures(rows, heatmap_policies, heatmap_sparsity)),
    ]
    specs, notes = [], []
    for label, build in builders:
        s, n = build()
        specs += s
        notes += n
        if progress:
            progress(label)
    return specs, notes
