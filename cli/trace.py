"""frontier trace: capture attention traces from real model runs; inspect, validate and list trace stores."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparse_frontier.tracer.store import STORAGE_DTYPES, TraceError, find_stores, store_info, validate_store


@click.group()
def trace():
    """Capture attention traces from real model runs and inspect trace stores.

    \b
    Example:
      frontier trace capture --model smollm2-135m --prompt-file notes.txt --out traces/notes.zarr
      frontier trace info traces/notes.zarr
    """


def _parse_params(items: tuple[str, ...]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--param")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _prompt_ids(backend, task: str | None, length: int | None, prompt_file: str | None, seed: int,
                params: dict):
    """The prompt's token ids and the task instance (None for a prompt file)."""
    if prompt_file is not None:
        ids = backend.tokenizer(Path(prompt_file).read_text()).input_ids
        if length is not None:
            if len(ids) < length:
                raise click.ClickException(f"{prompt_file} has {len(ids)} tokens, fewer than --length {length}")
            ids = ids[:length]
        return list(ids), None
    try:
        from sparse_frontier.tracer.tasks import make_task
    except ImportError as exc:
        raise click.ClickException(f"tasks are not available in this installation ({exc})") from exc
    try:
        instance = make_task(task, backend.tokenizer, length, seed=seed, **params)
    except (KeyError, ValueError, TypeError) as exc:
        raise click.ClickException(f"task {task!r}: {exc}") from exc
    return list(instance.input_ids), instance


@trace.command()
@click.option("--model", default="gemma3-270m", show_default=True,
              help="Built-in model (gemma3-270m, smollm2-135m), a transformers model folder or a .gguf file.")
@click.option("--task", help="Task that builds the prompt (see `frontier tasks ls`); needs --length.")
@click.option("--length", type=click.IntRange(min=1), help="Prompt length in tokens (task; or cut a prompt file).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Task parameter (repeatable).")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), help="Plain-text prompt.")
@click.option("--out", required=True, help="Store to create: a path or an fsspec URL (file://, memory://).")
@click.option("--generate", type=click.IntRange(min=0), default=None,
              help="Greedy-generate N tokens after the prompt and capture them (default: a task's answer "
                   "length, 0 for a prompt file).")
@click.option("--layers", default="all", show_default=True, help="Model layers to keep: all or e.g. 0,3,10-12.")
@click.option("--no-values", is_flag=True, help="Leave out v (smaller store; no output-error figures).")
@click.option("--query-positions", "query_spec", default="all", show_default=True,
              help="Prompt queries to keep: all | last:N | strided:S+last:N.")
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default="bfloat16", show_default=True,
              help="Storage dtype of q/k/v.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--compute-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Dtype the model runs in (auto: float32 on cpu, bfloat16 on cuda).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the task instance and of torch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
def capture(model, task, length, params, prompt_file, out, generate, layers, no_values, query_spec, dtype,
            device, compute_dtype, seed, overwrite):
    """Run a model over a prompt (and optionally greedy decoding) and store what every attention layer saw.

    \b
    Examples:
      frontier trace capture --model smollm2-135m --prompt-file notes.txt --out traces/notes.zarr
      frontier trace capture --task niah --length 4096 --out traces/niah-4k.zarr --query-positions last:64
    """
    import torch

    from sparse_frontier.tracer.capture import (
        CaptureError,
        TransformersBackend,
        check_output,
        parse_layers,
        query_positions,
    )
    from sparse_frontier.tracer.capture import capture as run_capture
    from sparse_frontier.tracer.models import ModelError

    if (task is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of --task (with --length) and --prompt-file")
    if task is not None and length is None:
        raise click.UsageError("--task needs --length")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda: no CUDA device is available")
    try:
        query_positions(query_spec, 1)
        check_output(out, overwrite)
        torch.manual_seed(seed)
        if compute_dtype == "auto":
            compute_dtype = "bfloat16" if device == "cuda" else "float32"
        with Console(stderr=True).status(f"loading {model}"):
            backend = TransformersBackend(model, device, compute_dtype)
        if length is not None and length > backend.max_context:
            raise CaptureError(f"--length {length} exceeds the context of {model} ({backend.max_context} tokens)")
        ids, instance = _prompt_ids(backend, task, length, prompt_file, seed, _parse_params(params))
        if generate is None:
            generate = int(instance.max_new_tokens) if instance is not None else 0
        layer_list = parse_layers(layers, backend.describe()["n_layers"])
        columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}"),
                   TimeElapsedColumn()]
        with Progress(*columns, console=Console(stderr=True)) as progress:
            steps = progress.add_task("forward passes", total=1 + generate)
            written = progress.add_task("MB written", total=None)
            result = run_capture(
                backend, ids, out, layers=layer_list, query_spec=query_spec, generate=generate, dtype=dtype,
                with_values=not no_values, task=instance, device=device,
                on_step=lambda: progress.advance(steps),
                on_written=lambda n: progress.advance(written, n / 1e6))
            progress.update(steps, completed=1 + result.generated_len, total=1 + result.generated_len)
    except (CaptureError, ModelError, TraceError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{out}: {result.n_tokens} tokens ({result.prefill_len} prompt + {result.generated_len} generated), "
               f"{len(layer_list)} layers, {result.raw_bytes / 1e6:.1f} MB of q/k/v in {result.seconds:.1f} s")
    if result.task is not None:
        click.echo(f"task {result.task['name']}: answer {result.task['model_answer']!r}, "
                   f"reference {result.task['reference']!r}, score {result.task['score']:.3f}")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _task_name(info: dict) -> str:
    return (info.get("task") or {}).get("name") or "-"


@trace.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print every attribute as JSON.")
def info(path, as_json):
    """Describe a trace store: model, sequence, task, capture settings, arrays and sizes.

    \b
    Example:
      frontier trace info traces/notes.zarr --json
    """
    try:
        data = store_info(path)
    except TraceError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    model, seq, cap = data.get("model", {}), data.get("sequence", {}), data.get("capture", {})
    state = "complete" if data.get("complete") else "INCOMPLETE (the capture was interrupted; readers refuse it)"
    click.echo(f"{path}: {state}")
    click.echo(f"model     {model.get('name')} ({model.get('architecture')}), {model.get('n_layers')} layers, "
               f"Hq {model.get('n_q_heads')} / Hkv {model.get('n_kv_heads')}, d {model.get('head_dim')}, "
               f"scale {model.get('softmax_scale')}, sliding window {model.get('sliding_window')}")
    click.echo(f"sequence  {seq.get('n_tokens')} tokens: {seq.get('prefill_len')} prompt + "
               f"{seq.get('generated_len')} generated")
    if seq.get("generated_text"):
        click.echo(f"generated {seq['generated_text'][:200]!r}")
    task = data.get("task")
    if task:
        click.echo(f"task      {task.get('name')} {task.get('params')} seed {task.get('seed')}: answer "
                   f"{task.get('model_answer')!r}, reference {task.get('reference')!r}, score {task.get('score')}")
    click.echo(f"capture   {cap.get('device')} {cap.get('compute_dtype')} -> {cap.get('dtype')}, layers "
               f"{len(cap.get('layers') or [])}, queries {cap.get('query_positions')}, at {cap.get('time')}")
    table = Table("array", "shape", "dtype", "chunks", "raw", "stored")
    for name, arr in data["arrays"].items():
        table.add_row(name, str(arr["shape"]), arr["dtype"], str(arr["chunks"]), _size(arr["raw_bytes"]),
                      _size(arr["stored_bytes"]))
    Console().print(table)
    ratio = data["compression_ratio"]
    click.echo(f"total     {_size(data['raw_bytes'])} raw, {_size(data['stored_bytes'])} stored"
               + (f" (ratio {ratio:.2f})" if ratio else ""))


@trace.command()
@click.argument("path")
def validate(path):
    """Re-read every chunk of a store (checksums), check shapes against its attributes and look for NaN.

    \b
    Example:
      frontier trace validate traces/notes.zarr
    """
    try:
        data = store_info(path)
        slices = sum(data["arrays"][n]["shape"][0] * data["arrays"][n]["shape"][1]
                     for n in ("q", "k", "v") if n in data["arrays"])
        with Progress(TextColumn("validating"), BarColumn(), TextColumn("{task.completed}/{task.total} slices"),
                      console=Console(stderr=True), transient=True) as progress:
            bar = progress.add_task("", total=slices)
            problems = validate_store(path, on_slice=lambda: progress.advance(bar))
    except TraceError as exc:
        raise click.ClickException(str(exc)) from exc
    if problems:
        raise click.ClickException(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    click.echo(f"{path}: ok ({slices} layer-head slices re-read, checksums and shapes match, no NaN)")


@trace.command(name="ls")
@click.argument("directory", default="traces", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per store.")
def ls(directory, as_json):
    """List the trace stores under a folder with model, task, length and whether each is complete.

    \b
    Example:
      frontier trace ls traces
    """
    stores = find_stores(directory)
    if as_json:
        keys = ("url", "complete", "model", "sequence", "task", "capture", "stored_bytes")
        click.echo(json.dumps([{k: s.get(k) for k in keys} for s in stores], indent=2))
        return
    if not stores:
        click.echo(f"no trace stores under {directory}")
        return
    table = Table("store", "model", "task", "tokens", "prompt", "generated", "layers", "size", "complete")
    for s in stores:
        seq = s.get("sequence", {})
        table.add_row(str(Path(s["url"]).relative_to(directory)), (s.get("model") or {}).get("name", "-"),
                      _task_name(s), str(seq.get("n_tokens")), str(seq.get("prefill_len")),
                      str(seq.get("generated_len")), str(s["arrays"].get("layers", {}).get("shape", ["?"])[0]),
                      _size(s["stored_bytes"]), "yes" if s.get("complete") else "NO")
    Console(width=160).print(table)
