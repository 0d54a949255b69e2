"""frontier tasks: list the long-context tasks, show a generated sample, score a model densely on a task."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from sparse_frontier.tracer.models import DEFAULT_MODEL, ModelError

console = Console()


@click.group()
def tasks():
    """Long-context tasks generated locally at any token length, and their dense baselines.

    \b
    Example:
      frontier tasks list
      frontier tasks show niah --length 4096 --model gemma3-270m
      frontier tasks eval --model gemma3-270m --task niah --length 4096 --samples 3
    """


def _params(items: tuple[str, ...], answer_format: str | None) -> dict:
    """KEY=VALUE options as a dict (values are converted to each parameter's type by the task)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--param")
        params[key.strip()] = value.strip()
    if answer_format:
        params["answer_format"] = answer_format
    return params


def _tokenizer(model: str):
    from sparse_frontier.tracer.models import load_tokenizer

    try:
        return load_tokenizer(model)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None


def _make(task: str, tokenizer, length: int, seed: int, params: dict):
    from sparse_frontier.tracer.tasks import TaskError, make_task

    try:
        return make_task(task, tokenizer, length, seed=seed, **params)
    except TaskError as exc:
        raise click.ClickException(str(exc)) from None


def _list(as_json: bool) -> None:
    from sparse_frontier.tracer.tasks import TASKS, task_defaults

    rows = [{"name": s.name, "metric": s.metric, "params": task_defaults(s.name), "description": s.description}
            for s in TASKS.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("task", "metric", "parameters (defaults)", "description")
    for row in rows:
        table.add_row(row["name"], row["metric"], ", ".join(f"{k}={v}" for k, v in row["params"].items()),
                      Text(row["description"]))
    console.print(table)


@tasks.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_tasks(as_json: bool):
    """List the tasks, their metric and their parameters.

    \b
    Example:
      frontier tasks list
    """
    _list(as_json)


@tasks.command("ls", hidden=True)
@click.option("--json", "as_json", is_flag=True)
def ls_tasks(as_json: bool):
    """Same as `frontier tasks list`."""
    _list(as_json)


_PARAM = click.option("--param", "-p", "param", multiple=True, metavar="KEY=VALUE",
                      help="Task parameter (repeatable), e.g. -p n_keys=2; see `frontier tasks list`.")
_FORMAT = click.option("--answer-format", type=click.Choice(["tags", "direct"]),
                       help="tags: reason, then <answer>...</answer> (default); direct: short answer after a cue, "
                            "for small models.")


@tasks.command("show")
@click.argument("task")
@click.option("--length", "-n", type=click.IntRange(1), default=4096, show_default=True,
              help="Target length in tokens of the model input.")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help="Model whose tokenizer measures it.")
@click.option("--seed", type=int, default=0, show_default=True)
@_FORMAT
@_PARAM
@click.option("--prompt", "show_prompt", is_flag=True, help="Also print the exact model input text.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(task, length, model, seed, answer_format, param, show_prompt, as_json):
    """Generate one sample of TASK and show its real token length, answer positions and reference.

    \b
    Example:
      frontier tasks show niah --length 8192 --model smollm2-135m
      frontier tasks show story_multihop -n 2048 -m gemma3-270m --answer-format direct --prompt
    """
    tokenizer = _tokenizer(model)
    inst = _make(task, tokenizer, length, seed, _params(param, answer_format))
    info = {**inst.describe(), "model": model, "stop": inst.stop}
    if show_prompt:
        info["text"] = inst.text
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    n = len(inst.input_ids)
    console.print(f"[bold]{inst.name}[/] with {model}'s tokenizer, seed {seed}")
    console.print(f"tokens: {n} of {length} ({n / length:.1%})")
    console.print("params: " + ", ".join(f"{k}={v}" for k, v in inst.params.items()))
    spans = " ".join(f"[{s}, {e})" for s, e in inst.answer_spans[:24])
    more = f" ... ({len(inst.answer_spans)} in all)" if len(inst.answer_spans) > 24 else ""
    console.print(f"answer spans (token ranges): {spans}{more}", highlight=False)
    console.print(f"reference ({inst.metric}): {inst.reference}", highlight=False, markup=False)
    console.print(f"max new tokens: {inst.max_new_tokens}; stops at: {inst.stop!r}", highlight=False, markup=False)
    if show_prompt:
        console.rule("model input")
        console.print(inst.text, highlight=False, markup=False)


@tasks.command("eval")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="Built-in model name, transformers folder or .gguf file.")
@click.option("--task", "-t", "task", required=True, help="Task name (see `frontier tasks list`).")
@click.option("--length", "-n", type=click.IntRange(1), default=4096, show_default=True,
              help="Target length in tokens of the model input.")
@click.option("--samples", "-k", type=click.IntRange(1), default=3, show_default=True,
              help="Number of samples (seeds SEED, SEED+1, ...).")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed.")
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cpu or cuda.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True)
@_FORMAT
@_PARAM
@click.option("--max-new-tokens", type=click.IntRange(1), help="Cap on generated tokens (default: the task's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record per sample and the mean.")
def eval_task(model, task, length, samples, seed, device, dtype, answer_format, param, max_new_tokens, as_json):
    """Run the model densely (greedy) on samples of a task and print the task score.

    This is the baseline every sparse result is compared with.

    \b
    Example:
      frontier tasks eval --model gemma3-270m --task niah --length 4096 --samples 3 --answer-format direct
    """
    import torch

    from sparse_frontier.tracer.models import load_model
    from sparse_frontier.tracer.tasks import TaskError, get_task
    from sparse_frontier.tracer.tasks.dense import evaluate

    params = _params(param, answer_format)
    try:
        get_task(task)
    except TaskError as exc:
        raise click.ClickException(str(exc)) from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.ClickException(f"--device {device}: CUDA is not available on this machine")
    try:
        net, tokenizer = load_model(model, device=device, dtype=dtype)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    records = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        job = bar.add_task(f"{task} @ {length} tokens", total=samples)
        try:
            for record in evaluate(net, tokenizer, task, length, samples, seed, params, max_new_tokens):
                records.append(record)
                bar.advance(job)
        except TaskError as exc:
            raise click.ClickException(str(exc)) from None
    mean = sum(r["score"] for r in records) / len(records)
    if as_json:
        for record in records:
            click.echo(json.dumps(record))
        click.echo(json.dumps({"model": model, "task": task, "length": length, "samples": samples,
                               "mean_score": mean}))
        return
    table = Table("seed", "tokens", "score", "answer", "reference", "seconds")
    for r in records:
        table.add_row(str(r["seed"]), str(r["n_tokens"]), f"{r['score']:.3f}", Text(_short(r["answer"])),
                      Text(_short(r["reference"])), f"{r['seconds']:.1f}")
    console.print(table)
    console.print(f"[bold]{task}[/] dense score of {model} at {length} tokens: [bold]{mean:.3f}[/] "
                  f"(mean of {samples} samples)")


def _short(value, width: int = 60) -> str:
    text = ", ".join(value) if isinstance(value, list) else str(value)
    return text if len(text) <= width else text[:width - 3] + "..."
