"""frontier simulate: replay policies x budget rules x sparsities over traces and score them."""

from __future__ import annotations

import json
import math

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparse_frontier.tracer.store import TraceError


def _count(value: str, option: str) -> int | None:
    if value.strip().lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither 'all' nor a whole number", param_hint=option) from None
    if n < 1:
        raise click.BadParameter(f"{n} must be at least 1", param_hint=option)
    return n


def _sparsities(value: str) -> list[float]:
    out = []
    for item in filter(None, (s.strip() for s in value.split(","))):
        try:
            s = float(item)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not a number", param_hint="--sparsity") from None
        if not 0.0 <= s < 1.0:
            raise click.BadParameter(f"sparsity {item} is outside [0, 1)", param_hint="--sparsity")
        out.append(s)
    if not out:
        raise click.BadParameter("give at least one sparsity", param_hint="--sparsity")
    return out


def _split_policies(value: str) -> list[str]:
    """Split on commas outside brackets (``a,oracle_topk[unit=block;size=64]``)."""
    items, depth, current = [], 0, ""
    for ch in value:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [s.strip() for s in [*items, current] if s.strip()]


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _table(summary) -> Table:
    table = Table(title="Mean over traces, layers and heads (oracle: top-k at the same budget and granularity)")
    for name in ("policy", "rule", "sparsity", "realised", "recall", "oracle recall", "output error",
                 "oracle error", "errors"):
        table.add_column(name, justify="left" if name in ("policy", "rule") else "right")
    for row in summary.itertuples(index=False):
        table.add_row(row.config, row.budget_rule, f"{row.sparsity:g}", _fmt(row.realised_sparsity),
                      _fmt(row.recall), _fmt(row.oracle_recall), _fmt(row.output_error),
                      _fmt(row.oracle_output_error), str(row.errors) if row.errors else "")
    return table


@click.command(name="simulate")
@click.argument("traces", nargs=-1, required=True)
@click.option("--policies", default="all", show_default=True,
              help="all, or names separated by commas; parameters in brackets: oracle_topk[unit=block;size=64].")
@click.option("--sparsity", default="0.5,0.8,0.9,0.95", show_default=True, help="Requested sparsities in [0, 1).")
@click.option("--budget-rule", "budget_rules", multiple=True, default=("uniform",), show_default=True,
              help="Budget rule (repeatable): uniform, fixed[tokens=512], sublinear[alpha=0.5], topp[p=0.9].")
@click.option("--queries", default="1024", show_default=True,
              help="Query rows scored per layer and phase: all or N (a seeded sample; 95% CIs on means).")
@click.option("--error-queries", default="32", show_default=True,
              help="Of those, rows whose output error is computed: all or N.")
@click.option("--proxy-rows", default=128, show_default=True, type=click.IntRange(2),
              help="Decode proxy when the trace has no generated queries: the last N prompt rows.")
@click.option("--output-error/--no-output-error", default=None,
              help="Compute output error (default: when the trace stores values).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--workers", type=click.IntRange(1), help="Run tasks on a local Dask cluster of N processes.")
@click.option("--scheduler", help="Run tasks on an existing Dask cluster (scheduler address).")
@click.option("--threads", type=click.IntRange(1), help="Torch threads per task (default: torch's; 1 on Dask).")
@click.option("--policy-file", "policy_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A .py file defining one policy (repeatable); add its name to --policies or use all.")
@click.option("--seed", default=0, show_default=True, help="Seed of the query samples.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1), help="B of the cost model.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Results folder (resumable).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def simulate(traces, policies, sparsity, budget_rules, queries, error_queries, proxy_rows, output_error, device,
             workers, scheduler, threads, policy_files, seed, batch, out, as_json):
    """Score sparse-attention policies against the true attention of trace stores.

    One task per (trace, layer) writes OUT/parts/<trace>__L<layer>.parquet (one row per query head, policy,
    budget rule and sparsity); a rerun skips finished parts. OUT/sweep.json records the settings.

    \b
    Examples:
      frontier simulate traces/niah-8k.zarr --out results/niah-8k
      frontier simulate traces/*.zarr --policies quest,snapkv,oracle_topk_decode --sparsity 0.8,0.9 \\
          --workers 2 --out results/decode
    """
    import torch

    from sparse_frontier.policies import registry
    from sparse_frontier.policies.validate import PolicyError
    from sparse_frontier.simulator.results import load_parts, summary
    from sparse_frontier.simulator.sweep import Settings, Spec, SweepError, run_sweep

    if workers and scheduler:
        raise click.UsageError("give --workers or --scheduler, not both")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is available here")
    try:
        for path in policy_files:
            registry.load_policy_file(path)
        names = sorted(registry.available()) if policies.strip() == "all" else _split_policies(policies)
        settings = Settings(
            policies=[Spec.parse(n) for n in names], rules=[Spec.parse(r) for r in budget_rules],
            sparsities=_sparsities(sparsity), queries=_count(queries, "--queries"),
            error_queries=_count(error_queries, "--error-queries"), proxy_rows=proxy_rows, seed=seed,
            output_error=output_error, policy_files=[str(p) for p in policy_files], batch=batch, device=device,
            threads=threads)
        console = Console(stderr=True)
        with Progress(TextColumn("[bold]simulate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=console, disable=as_json) as progress:
            bar = progress.add_task("", total=None)

            def on_task(result, done, total):
                progress.update(bar, completed=done, total=total, description=result["part"])

            record = run_sweep(list(traces), settings, out, workers=workers, scheduler=scheduler, on_task=on_task)
    except (SweepError, TraceError, PolicyError) as exc:
        raise click.ClickException(str(exc)) from None
    table = summary(load_parts(out))
    if as_json:
        click.echo(json.dumps({"out": str(out), "complete": record["complete"], "parts": len(record["parts"]),
                               "summary": json.loads(table.to_json(orient="records"))}, indent=1))
        return
    console = Console()
    console.width = max(console.width, 130)
    console.print(_table(table))
    click.echo(f"{len(record['parts'])} parts in {out}/parts; settings in {out}/sweep.json")
