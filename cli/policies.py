"""frontier policies: list the known policies, show one, check a policy file on a small random trace."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from sparse_frontier.policies.budget import BUDGET_RULES
from sparse_frontier.policies.registry import (
    available,
    describe,
    granularity_of,
    load_policy_file,
    policy_class,
)
from sparse_frontier.policies.validate import PolicyError, check_selection
from sparse_frontier.tracer.store import TraceStore, TraceWriter


@click.group()
def policies():
    """Sparse-attention policies: list them, show one, check your own.

    \b
    Example:
      frontier policies list
      frontier policies show quest
      frontier policies check my_policy.py
    """


@policies.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per policy) instead of a table.")
def list_policies(as_json: bool):
    """List the known policies (built-ins, installed plug-ins) and the budget rules.

    \b
    Example:
      frontier policies list --json
    """
    found = available()
    if as_json:
        rows = [{**describe(info.cls), "source": info.source} for _, info in sorted(found.items())]
        rules = [{"name": name, "summary": (cls.__doc__ or "").splitlines()[0]} for name, cls in BUDGET_RULES.items()]
        click.echo(json.dumps({"policies": rows, "budget_rules": rules}, indent=2, default=str))
        return
    table = Table(title="policies")
    for col in ("name", "phase", "granularity", "own budget"):
        table.add_column(col, no_wrap=True)
    table.add_column("summary")
    for name, info in sorted(found.items()):
        cls = info.cls
        source = "" if info.source == "built-in" else f" [{info.source}]"
        table.add_row(name, cls.phase, "/".join(map(str, granularity_of(cls) or ())),
                      "yes" if cls.owns_budget else "", info.summary + source)
    console = Console()
    console.print(table)
    rules = Table(title="budget rules")
    rules.add_column("name")
    rules.add_column("summary")
    for name, cls in BUDGET_RULES.items():
        rules.add_row(name, (cls.__doc__ or "").splitlines()[0])
    console.print(rules)


@policies.command(name="show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def show(name: str, as_json: bool):
    """Show one policy: phase, granularity, budget ownership, parameters with defaults, description.

    \b
    Example:
      frontier policies show vertical_slash
    """
    try:
        info = describe(policy_class(name))
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"{info['name']}  ({info['phase']}; granularity {'/'.join(map(str, info['granularity']))}"
               f"{'; owns its budget' if info['owns_budget'] else ''})\n")
    click.echo(info["doc"] + "\n")
    click.echo("parameters:")
    for p in info["params"]:
        click.echo(f"  {p['name']} = {p['default']!r}  ({p['type']})")
    if not info["params"]:
        click.echo("  (none)")


def _random_trace(path: Path, n_prompt: int, n_generated: int, seed: int = 0) -> TraceStore:
    """A small complete random trace store (GQA 4/2, head dim 32), written through the real writer."""
    n_tokens, hq, hkv, d = n_prompt + n_generated, 4, 2, 32
    gen = torch.Generator().manual_seed(seed)
    attrs = {
        "model": {"name": "random", "source": "frontier policies check", "architecture": "random", "n_layers": 1,
                  "n_q_heads": hq, "n_kv_heads": hkv, "head_dim": d, "softmax_scale": d ** -0.5,
                  "layer_types": ["full_attention"], "sliding_window": None, "attn_logit_softcapping": None},
        "sequence": {"n_tokens": n_tokens, "prefill_len": n_prompt, "generated_len": n_generated},
        "task": None,
        "capture": {"device": "cpu", "dtype": "float32"},
    }
    writer = TraceWriter(str(path), attrs=attrs, n_layers=1, n_q_heads=hq, n_kv_heads=hkv, head_dim=d,
                         n_tokens=n_tokens, q_positions=range(n_tokens), dtype="float32")
    writer.write_tokens(range(n_tokens))
    q = torch.randn(hq, n_tokens, d, generator=gen) * 2
    k = torch.randn(hkv, n_tokens, d, generator=gen) * 2
    writer.write_layer(0, 0, q, k, torch.randn(hkv, n_tokens, d, generator=gen))
    writer.finish()
    return TraceStore(str(path))


@policies.command(name="check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--sparsity", default="0,0.5,0.9", show_default=True,
              help="Comma-separated sparsity levels to run it at.")
@click.option("--budget-rule", "rule_name", default="uniform", show_default=True,
              type=click.Choice(sorted(BUDGET_RULES)), help="Budget rule turning a sparsity into a budget.")
@click.option("--tokens", default=1024, show_default=True, type=click.IntRange(64, 16384),
              help="Prompt length of the random trace (64 generated tokens follow it).")
def check(file: Path, sparsity: str, rule_name: str, tokens: int):
    """Load a one-file policy and run it on a small random trace.

    Checks that it returns a Selection of the right shape for every scored row, never lists a key after its
    query, and stays within its budget (unless it declares owns_budget).

    \b
    Example:
      frontier policies check my_policy.py --sparsity 0.5,0.8
    """
    try:
        levels = [float(x) for x in sparsity.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{sparsity!r} is not a comma-separated list of numbers", param_hint="--sparsity") \
            from None
    bad = [s for s in levels if not 0.0 <= s < 1.0]
    if bad or not levels:
        raise click.BadParameter(f"sparsity {bad[0] if bad else sparsity!r} is outside [0, 1)", param_hint="--sparsity")
    try:
        cls = load_policy_file(file)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        policy = cls()
    except Exception as exc:
        raise click.ClickException(f"policy file {file}: {cls.__name__}() failed: {type(exc).__name__}: {exc}") \
            from None
    rule = BUDGET_RULES[rule_name]()
    table = Table(title=f"{cls.name} ({cls.phase}) on a random trace of {tokens} + 64 tokens")
    for col in ("sparsity", "budget tokens", "selection", "heads", "density (mean)", "result"):
        table.add_column(col)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        store = _random_trace(Path(tmp) / "check.zarr", tokens, 64)
        view = store.layer_view(0)
        if cls.phase == "decode":
            view.rows = torch.arange(tokens, tokens + 64)
        for s in levels:
            budget = rule.budget(view, s)
            kind, heads, density, result = "-", "-", "-", "ok"
            try:
                selection = policy.select(view, budget)
                kind, heads = type(selection).__name__, str(getattr(selection, "heads", "?"))
                density = f"{float(check_selection(policy, view, budget, selection).mean()):.4f}"
            except PolicyError as exc:
                result = str(exc)
            except Exception as exc:
                result = f"select raised {type(exc).__name__}: {exc}"
            if result != "ok":
                failures.append(f"sparsity {s}: {result}")
            table.add_row(f"{s:g}", str(budget.tokens), kind, heads, density, result)
    Console().print(table)
    if failures:
        raise click.ClickException(f"policy file {file}: " + "; ".join(failures))
    click.echo(f"{cls.name}: ok")
