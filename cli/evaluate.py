"""frontier eval: run a model end to end with a sparse-attention policy inside every attention layer and score
its answers; sweep policies x sparsities into Parquet; compare with the simulator (fidelity)."""

from __future__ import annotations

import json
import math

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .simulate import _sparsities, _split_policies
from .trace import _parse_params

SEED_METHODS = "vertical_slash,flexprefill,block_sparse,snapkv,ada_snapkv,quest"


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _summary(frame):
    keys = ["policy", "params", "budget_rule", "sparsity"]
    grouped = frame.groupby(keys, sort=False)
    out = grouped["score"].agg(score="mean", samples="size")
    out["realised_sparsity"] = grouped["realised_sparsity"].mean()
    out["seconds"] = grouped["seconds"].mean()
    return out.reset_index()


def _summary_table(summary, title: str) -> Table:
    table = Table(title=title)
    for name in ("policy", "rule", "sparsity", "realised", "score", "samples", "s/sample"):
        table.add_column(name, justify="left" if name in ("policy", "rule") else "right")
    for row in summary.itertuples(index=False):
        table.add_row(row.policy, row.budget_rule, f"{row.sparsity:g}", _fmt(row.realised_sparsity),
                      _fmt(row.score), str(row.samples), f"{row.seconds:.1f}")
    return table


@click.group(name="eval", invoke_without_command=True)
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Built-in model (gemma3-270m, smollm2-135m), a transformers model folder or a .gguf file.")
@click.option("--task", help="Task whose samples are run and scored (see `frontier tasks ls`).")
@click.option("--length", type=click.IntRange(min=1), help="Target prompt length in tokens.")
@click.option("--policy", help="One policy: name or name[key=value;...] (see `frontier policies ls`).")
@click.option("--policies", help=f"With --sweep: comma-separated policies (default: the six seed methods, "
                                 f"{SEED_METHODS}).")
@click.option("--sparsity", default="0.8", show_default=True,
              help="Requested sparsity in [0, 1); with --sweep a comma-separated list.")
@click.option("--budget-rule", default="uniform", show_default=True,
              help="Budget rule: name or name[key=value;...] (uniform, fixed, sublinear, topp).")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Task samples (seeds --seed, --seed+1, ...).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the first sample.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Task parameter (repeatable).")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Cap the task's answer budget (tokens generated at most; default: the task's).")
@click.option("--sweep", is_flag=True, help="Run every policy x sparsity and write Parquet under OUT/e2e.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Results folder (the simulator's --out, to sit beside its parts); needed by --sweep.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda runs the Selections through the Triton kernels.")
@click.option("--compute-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Dtype the model runs in (auto: float32 on cpu, bfloat16 on cuda).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-sample records as JSON.")
@click.pass_context
def evaluate(ctx, model, task, length, policy, policies, sparsity, budget_rule, samples, seed, params,
             max_new_tokens, sweep, out, device, compute_dtype, as_json):
    """Run a model end to end with a sparse-attention policy applied inside every attention layer and score its
    answers with the task's scorer.

    Prefill policies make the prompt's attention sparse and decode densely; decode policies prefill densely and
    decode sparsely (eviction policies drop the evicted keys from the cache once; Quest selects pages at every
    step).

    \b
    Examples:
      frontier eval --model smollm2-135m --task niah --length 2048 --policy snapkv --sparsity 0.8 --samples 4
      frontier eval --sweep --task niah --length 2048 --policies quest,snapkv --sparsity 0.5,0.8,0.9 \\
          --samples 8 --out results/niah
      frontier eval fidelity results/niah results/niah
    """
    if ctx.invoked_subcommand is not None:
        return
    import torch

    from sparse_frontier.tracer import e2e

    if task is None or length is None:
        raise click.UsageError("give --task and --length (or a sub-command: fidelity)")
    sparsities = _sparsities(sparsity)
    if sweep:
        if out is None:
            raise click.UsageError("--sweep writes Parquet: give --out")
        names = _split_policies(policies or policy or SEED_METHODS)
    else:
        if policies:
            raise click.UsageError("--policies goes with --sweep; for one run give --policy")
        if policy is None:
            raise click.UsageError("give --policy (or --sweep with --policies)")
        if len(sparsities) != 1:
            raise click.UsageError("one run takes one --sparsity; give --sweep to run several")
        names = [policy]
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda: no CUDA device is available")
    if compute_dtype == "auto":
        compute_dtype = "bfloat16" if device == "cuda" else "float32"
    configs = [e2e.Config(name, s, budget_rule) for name in names for s in sparsities]
    task_params = _parse_params(params)
    console = Console(stderr=True)
    try:
        for config in configs:
            config.build()  # unknown names and bad parameters fail before the model loads
        from sparse_frontier.tracer.capture import TransformersBackend

        with console.status(f"loading {model}"):
            backend = TransformersBackend(model, device, compute_dtype)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task(f"{task} {length}: runs", total=len(configs) * samples)
            frame = e2e.sweep(backend, task, length, configs, samples, seed, task_params, out,
                              on_config=lambda: progress.advance(bar), max_new_tokens=max_new_tokens)
    except ValueError as exc:  # unknown policy / rule / task, bad parameter, length too short or too long
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(frame.to_json(orient="records", indent=1))
        return
    title = f"{model} on {task} at {length} tokens: mean task score over samples"
    Console().print(_summary_table(_summary(frame), title))
    if out is not None:
        click.echo(f"records written under {out}/e2e/")


@evaluate.command()
@click.argument("sim_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("e2e_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--include-dense", is_flag=True, help="Count the sparsity-0 configurations in the correlation.")
@click.option("--top", type=click.IntRange(min=0), default=5, show_default=True,
              help="Configurations with the largest rank disagreement to list per task.")
@click.option("--json", "as_json", is_flag=True, help="Print the tables as JSON.")
def fidelity(sim_dir, e2e_dir, include_dense, top, as_json):
    """Rank correlation (Spearman) across configurations between the simulator's recall / output error and the
    end-to-end task score, per model, task and length; and where the two disagree most.

    \b
    Example:
      frontier simulate traces/niah-*.zarr --policies quest,snapkv --sparsity 0.5,0.8,0.9 --out results/niah
      frontier eval --sweep --task niah --length 2048 --policies quest,snapkv --sparsity 0.5,0.8,0.9 \\
          --samples 8 --out results/niah
      frontier eval fidelity results/niah results/niah
    """
    from sparse_frontier.simulator import fidelity as fid

    try:
        joined = fid.join(fid.load_simulated(sim_dir), fid.load_e2e(e2e_dir))
    except fid.FidelityError as exc:
        raise click.ClickException(str(exc)) from exc
    table = fid.fidelity(joined, include_dense)
    worst = fid.disagreements(joined, top, include_dense)
    if as_json:
        click.echo(json.dumps({"fidelity": json.loads(table.to_json(orient="records")),
                               "disagreements": json.loads(worst.to_json(orient="records"))}, indent=1))
        return
    console = Console()
    out = Table(title="Spearman rank correlation across configurations: simulated vs end to end")
    for name in ("model", "task", "length", "phase", "configs", "samples", "traces", "ρ recall", "p",
                 "ρ error", "ρ recall p10", "score range", "dense score"):
        out.add_column(name, justify="left" if name in ("model", "task", "phase") else "right", overflow="fold")
    for r in table.itertuples(index=False):
        out.add_row(r.model, r.task, str(r.length), r.phase, str(r.configs), str(r.samples), str(r.traces),
                    _fmt(r.rho_recall), _fmt(r.p_recall), _fmt(r.rho_error), _fmt(r.rho_recall_p10),
                    _fmt(r.score_range), _fmt(r.dense_score))
    console.print(out)
    if top and not worst.empty:
        gaps = Table(title="Largest disagreements (gap = recall rank - score rank, in percentiles)")
        for name in ("task", "length", "policy", "rule", "sparsity", "recall", "error", "score", "samples", "gap"):
            gaps.add_column(name, justify="left" if name in ("task", "policy", "rule") else "right", overflow="fold")
        for r in worst.itertuples(index=False):
            gaps.add_row(r.task, str(r.length), r.policy, r.budget_rule, f"{r.sparsity:g}", _fmt(r.recall),
                         _fmt(r.output_error), _fmt(r.score), str(r.samples), f"{r.gap:+.2f}")
        console.print(gaps)
