"""frontier verify: run a policy's Selections through the kernels and check the simulator's predictions."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .trace import _parse_params

DTYPES = ("auto", "bfloat16", "float16")


def _pick_layers(text: str, captured: list[int]) -> list[int]:
    """Indices into the store's captured layers for 'all' or model layers like '0,3,10-12'."""
    if text == "all":
        return list(range(len(captured)))
    wanted: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            wanted += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise click.BadParameter(f"{text!r}: expected all or model layers like 0,3,10-12",
                                     param_hint="--layers") from None
    missing = [m for m in wanted if m not in captured]
    if missing:
        raise click.BadParameter(f"model layers {missing} are not in the trace (captured: {captured})",
                                 param_hint="--layers")
    return [captured.index(m) for m in wanted]


@click.command(name="verify")
@click.argument("trace_url", metavar="TRACE")
@click.option("--policy", "policy_name", required=True, help="Policy name (see `frontier policies ls`).")
@click.option("--sparsity", type=float, required=True, help="Requested sparsity in [0, 1).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Policy parameter (repeatable).")
@click.option("--budget", "budget_rule", default="uniform", show_default=True, help="Budget rule.")
@click.option("--layers", default="all", show_default=True, help="Model layers to check: all or e.g. 0,3,10-12.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the kernels run (auto: cuda when available).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Kernel input dtype (auto: the trace's when bfloat16/float16, else bfloat16).")
@click.option("--backend", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
              help="auto: Triton on CUDA or under TRITON_INTERPRET=1, else the torch reference (CPU fallback).")
@click.option("--proxy-rows", type=click.IntRange(min=2), default=128, show_default=True,
              help="Decode policies on a trace without generated tokens: the last prompt rows act as decode steps.")
@click.option("--no-timing", is_flag=True, help="Skip the GPU timing of kernel vs dense attention.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per layer instead of a table.")
def verify(trace_url, policy_name, sparsity, params, budget_rule, layers, device, dtype, backend, proxy_rows,
           no_timing, as_json):
    """Run a policy's Selections from a trace through the Triton kernels and compare, per layer, the kernel's
    output with the simulator's predicted sparse output (the torch reference over the same Selection), the
    realised sparsity both sides computed, and on GPU the kernel's time against dense attention.

    Exits with status 1 when an output differs beyond the dtype's tolerance or the kernel computed other
    cells than the Selection's mask.

    \b
    Examples:
      frontier verify traces/niah-4k.zarr --policy vertical_slash --sparsity 0.9 --device cuda
      frontier verify traces/niah-4k.zarr --policy quest --sparsity 0.9 --layers 0,15 --json
      frontier verify traces/niah-4k.zarr --policy block_sparse --param chunk_size=64 --sparsity 0.8
    """
    import torch

    from sparse_frontier.kernels.verify import check_layer
    from sparse_frontier.policies.registry import get_budget_rule, get_policy
    from sparse_frontier.policies.validate import PolicyError
    from sparse_frontier.simulator.sweep import Settings, phase_view
    from sparse_frontier.tracer.store import TraceError, TraceStore

    if not 0.0 <= sparsity < 1.0:
        raise click.BadParameter(f"sparsity {sparsity} is outside [0, 1)", param_hint="--sparsity")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    try:
        policy = get_policy(policy_name, **_parse_params(params))
        rule = get_budget_rule(budget_rule)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        store = TraceStore(trace_url)
    except (TraceError, FileNotFoundError) as exc:
        raise click.ClickException(f"{trace_url}: {exc}") from None
    if not store.has_values:
        raise click.ClickException(f"{trace_url}: the trace has no values (captured with --no-values)")
    captured = [int(m) for m in store.layers]
    indices = _pick_layers(layers, captured)
    stored = str(store.attrs.get("capture", {}).get("dtype", ""))
    run_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        stored if dtype == "auto" else dtype, torch.bfloat16)
    settings = Settings(policies=[], queries=None, error_queries=0, proxy_rows=proxy_rows)

    checks = []
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, disable=as_json, transient=True) as progress:
        task = progress.add_task(f"verify {policy_name}", total=len(indices))
        for index in indices:
            try:
                view = store.layer_view(index)
                pview, rows = phase_view(view, policy.phase, settings, trace_url)
                budget = rule.budget(pview, sparsity)
                selection = policy.select(pview, budget)
                checks.append(check_layer(pview, rows.positions, rows.n_keys, selection, policy_name, policy.phase,
                                          device, run_dtype, backend, timing=not no_timing))
            except (TraceError, ValueError) as exc:
                raise click.ClickException(f"layer {captured[index]}: {exc}") from None
            progress.advance(task)

    if as_json:
        for check in checks:
            click.echo(json.dumps(check.to_json()))
    else:
        _table(checks, trace_url, policy_name, sparsity, run_dtype)
    bad = [c for c in checks if not c.ok]
    if bad:
        what = ", ".join(f"layer {c.layer} ({'output' if not c.outputs_agree else 'cells'})" for c in bad)
        raise click.ClickException(f"kernel and simulator disagree: {what}")


def _table(checks, trace_url: str, policy: str, sparsity: float, dtype) -> None:
    """Print the per-layer comparison."""
    table = Table("layer", "phase", "rows", "keys", "backend", "max |diff|", "tolerance", "sparsity (sim)",
                  "sparsity (kernel)", "kernel ms", "dense ms", "speedup", "ok",
                  title=f"{trace_url}: {policy} at sparsity {sparsity} ({str(dtype).removeprefix('torch.')})")
    for c in checks:
        ms = (f"{c.kernel_ms:.3f}", f"{c.dense_ms:.3f}", f"{c.dense_ms / c.kernel_ms:.2f}x") if c.kernel_ms else \
            ("-", "-", "-")
        table.add_row(str(c.layer), c.phase, str(c.rows), str(c.keys), c.backend, f"{c.max_diff:.2e}",
                      f"{c.tolerance:.2e}", f"{c.sparsity_reference:.4f}", f"{c.sparsity_kernel:.4f}", *ms,
                      "yes" if c.ok else "NO")
    Console(width=200).print(table)
