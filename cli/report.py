"""frontier report (sweep results -> HTML report or figures) and frontier demo (capture, simulate, report)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparse_frontier.simulator.report import (
    DEFAULT_TOLERANCE,
    Report,
    ReportError,
    build_report,
    check_out,
    summary_tables,
    write_figures,
    write_html,
)
from sparse_frontier.tracer.models import DEFAULT_MODEL


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console, transient=True)


def print_summary(report: Report, console: Console) -> None:
    """Print the report's two summary tables as plain terminal tables."""
    console.width = max(console.width, 130)
    titles = {"best": "Best method per phase at each sparsity (mean recall)",
              "held": f"Highest sparsity each method holds with recall >= {report.tolerance:g} x dense"}
    for key, frame in summary_tables(report).items():
        console.print(f"[bold]{titles[key]}[/bold]", highlight=False)
        table = Table()
        for column in frame.columns:
            table.add_column(str(column))
        for values in frame.itertuples(index=False):
            table.add_row(*("" if pd.isna(v) else f"{v:g}" if isinstance(v, float) else str(v) for v in values))
        console.print(table)


def make_report(results: list[Path], out: Path, fmt: str, *, tolerance: float = DEFAULT_TOLERANCE,
                heatmap_policies: tuple[str, ...] = (), heatmap_sparsity: float | None = None,
                e2e: tuple[Path, ...] = (), console: Console | None = None) -> tuple[Report, list[Path]]:
    """Build the report of ``results`` with a progress bar and write it to ``out`` (HTML file or figure folder)."""
    console = console or Console()
    check_out(out, fmt)
    with _progress(console) as bar:
        task = bar.add_task("reading results and drawing figures", total=5)
        report = build_report(results, tolerance=tolerance, heatmap_policies=heatmap_policies,
                              heatmap_sparsity=heatmap_sparsity, e2e=e2e,
                              progress=lambda step: bar.update(task, advance=1, description=f"drew {step}"))
        bar.update(task, description=f"writing {len(report.figures)} figures as {fmt}")
        if fmt == "html":
            paths = [write_html(report, out)]
        else:
            paths = write_figures(report, out, fmt)
        bar.update(task, description=f"wrote {out}")
    return report, paths


@click.command(name="report")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="HTML file (default report.html), or with --format png|svg a folder (default figures/).")
@click.option("--format", "fmt", type=click.Choice(["html", "png", "svg"]), default="html", show_default=True,
              help="html: one self-contained page; png/svg: the figures alone, one file each.")
@click.option("--tolerance", type=click.FloatRange(0, 1, min_open=True), default=DEFAULT_TOLERANCE,
              show_default=True, help="A method 'holds' a sparsity while its recall stays >= tolerance x dense.")
@click.option("--heatmap-policy", "heatmap_policies", multiple=True,
              help="Policy whose per-layer x per-head recall is drawn (repeatable; default: every method).")
@click.option("--heatmap-sparsity", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Sparsity of the heatmaps (a swept level; default: the one nearest 0.9).")
@click.option("--e2e", multiple=True, type=click.Path(path_type=Path),
              help="End-to-end results folder (`frontier eval --sweep --out`, repeatable): task scores and their "
                   "rank correlation with the simulated recall.")
def report(results, out, fmt, tolerance, heatmap_policies, heatmap_sparsity, e2e):
    """Turn sweep results (folders written by `frontier simulate`) into a report.

    Reads every RESULTS folder, groups by model, task and length, and draws recall and output error
    against sparsity, the cost view with its Pareto frontier, length scaling at budgets 1/10 and 1/20, and
    per-layer x per-head recall heatmaps; prints the summary table.

    \b
    Examples:
      frontier report results/ --out report.html
      frontier report results-4k/ results-8k/ --format png --out figures/
    """
    out = out or Path("report.html" if fmt == "html" else "figures")
    console = Console()
    try:
        rep, paths = make_report(list(results), out, fmt, tolerance=tolerance, heatmap_policies=heatmap_policies,
                                 heatmap_sparsity=heatmap_sparsity, e2e=e2e, console=console)
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None
    print_summary(rep, console)
    for note in rep.notes:
        console.print(f"[yellow]missing:[/yellow] {note}", highlight=False)
    if fmt == "html":
        console.print(f"report: {paths[0]}", highlight=False)
    else:
        console.print(f"{len(paths)} figures in {out}", highlight=False)


DEMO_SPARSITY = "0.5,0.67,0.8,0.9,0.95"
DEMO_GENERATE = 64  # decode steps captured: enough decode queries for the decode policies


def _grid(ctx, param, value: str) -> list[float]:
    try:
        grid = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    if not grid or not all(0 <= x < 1 for x in grid):
        raise click.BadParameter(f"{value!r}: give sparsities in [0, 1)")
    return grid


def _demo_capture(model: str, task: str, length: int, path: Path, console: Console) -> bool:
    """Capture the demo trace into ``path`` unless a complete one is there; True when it captured anew."""
    from sparse_frontier.tracer.capture import TransformersBackend, check_output
    from sparse_frontier.tracer.capture import capture as run_capture
    from sparse_frontier.tracer.store import TraceError, TraceStore
    from sparse_frontier.tracer.tasks import make_task

    if path.exists():
        try:
            TraceStore(str(path))
            console.print(f"[1/3] reusing the trace {path}", highlight=False)
            return False
        except TraceError as exc:
            console.print(f"[1/3] {path} cannot be reused ({exc}): capturing it again", highlight=False)
    check_output(str(path), overwrite=True)
    with console.status(f"[1/3] loading {model} on cpu"):
        backend = TransformersBackend(model, "cpu", "float32")
        instance = make_task(task, backend.tokenizer, length, seed=0, answer_format="direct")
    generate = min(int(instance.max_new_tokens), DEMO_GENERATE)
    with _progress(console) as bar:
        steps = bar.add_task(f"[1/3] capturing {task} at {length} tokens with {model} (forward passes)",
                             total=1 + generate)
        result = run_capture(backend, list(instance.input_ids), str(path), generate=generate, task=instance,
                             device="cpu", on_step=lambda: bar.advance(steps))
    console.print(f"[1/3] captured {path}: {result.prefill_len} prompt + {result.generated_len} generated tokens "
                  f"in {result.seconds:.0f} s (dense task score {result.task['score']:.2f})", highlight=False)
    return True


def _demo_simulate(trace: Path, out: Path, sparsity: list[float], queries: int, console: Console) -> None:
    """Sweep every built-in policy over the sparsity grid on the demo trace (resuming finished layers)."""
    from sparse_frontier.policies import registry
    from sparse_frontier.simulator.sweep import Settings, Spec, run_sweep

    names = sorted(registry.available())
    settings = Settings(policies=[Spec(n) for n in names], sparsities=sparsity, queries=queries,
                        error_queries=min(queries, 128))
    record = out / "sweep.json"
    if record.exists() and Settings.from_json(json.loads(record.read_text())["settings"]).identity() != \
            settings.identity():
        shutil.rmtree(out)  # the demo's own results of other settings: sweep afresh
    with _progress(console) as bar:
        task = bar.add_task(f"[2/3] simulating {len(names)} policies x {len(settings.sparsities)} sparsities",
                            total=None)
        run_sweep([str(trace)], settings, out,
                  on_task=lambda result, done, total: bar.update(task, completed=done, total=total))
    console.print(f"[2/3] simulated {', '.join(names)} at sparsity {', '.join(f'{x:g}' for x in sparsity)} "
                  f"into {out}", highlight=False)


@click.command(name="demo")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model to capture (built-in or a path).")
@click.option("--task", default="niah", show_default=True, help="Task that builds the prompt.")
@click.option("--length", default=4096, show_default=True, type=click.IntRange(min=256), help="Prompt tokens.")
@click.option("--sparsity", default=DEMO_SPARSITY, show_default=True, callback=_grid,
              help="Sparsity grid of the sweep.")
@click.option("--queries", default=256, show_default=True, type=click.IntRange(min=16),
              help="Query rows scored per layer and phase (a seeded sample).")
@click.option("--traces", "traces_dir", default="traces", show_default=True, type=click.Path(path_type=Path),
              help="Folder of the trace (reused when already captured).")
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(path_type=Path),
              help="Folder for the sweep results and the report.")
def demo(model, task, length, sparsity, queries, traces_dir, results_dir):
    """Capture a trace with the default model on CPU, simulate every built-in policy, write the report.

    Reuses the trace (and finished sweep parts) when run again; prints the summary table and the
    report's path. A few minutes on 2 CPU cores.

    \b
    Example:
      frontier demo
      frontier demo --task vt --length 2048
    """
    from sparse_frontier.simulator.sweep import SweepError
    from sparse_frontier.tracer.capture import CaptureError
    from sparse_frontier.tracer.models import ModelError
    from sparse_frontier.tracer.store import TraceError
    from sparse_frontier.tracer.tasks import TaskError

    console = Console()
    name = f"demo-{Path(model).name}-{task}-{length}"
    trace, results = traces_dir / f"{name}.zarr", results_dir / name
    try:
        if _demo_capture(model, task, length, trace, console) and results.exists():
            shutil.rmtree(results)  # results of an older capture of this trace
        _demo_simulate(trace, results, sparsity, queries, console)
        rep, paths = make_report([results], results / "report.html", "html", console=console)
    except (CaptureError, ModelError, TraceError, TaskError, SweepError, ReportError) as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"[3/3] wrote the report with {len(rep.figures)} figures", highlight=False)
    print_summary(rep, console)
    for note in rep.notes:
        console.print(f"[yellow]missing:[/yellow] {note}", highlight=False)
    console.print(f"report: {paths[0]}", highlight=False)
