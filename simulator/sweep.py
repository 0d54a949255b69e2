"""Sweeps: every policy x budget rule x sparsity over every (trace, layer) of some traces.

The work splits into independent tasks, one per (trace, captured layer). A task reads its layer, asks
each policy for its selections (one view per phase, reused across budgets), scores them all against the
true attention of the scored rows (:mod:`.scoring`) and writes one Parquet part,
``OUT/parts/<trace_id>__L<layer>.parquet``, atomically (temporary file, then rename). A rerun skips
parts that exist; ``OUT/sweep.json`` records the settings, the policies, rules, sparsities, traces and the
parts done. Tasks run in this process, on a local Dask cluster (``workers``) or on an existing one
(``scheduler``); a task depends only on its inputs, so the results are the same wherever it runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from sparse_frontier.policies.base import LayerView
from sparse_frontier.policies.validate import PolicyError, check_selection
from sparse_frontier.tracer.store import TraceError, TraceStore

from .cost import ModelShape, entry_cost
from .scoring import Entry, LayerScorer, Rows, mean_ci, thread_workspace

FORMAT = "sparse-frontier-sweep"
VERSION = 1
PARTS = "parts"


class SweepError(ValueError):
    """Sweep input a user can fix: unknown policy, bad sparsity, trace without values, foreign results folder."""


@dataclass
class Spec:
    """A policy or budget rule by name with parameters; written ``name`` or ``name[key=value;key=value]``."""

    name: str
    params: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Spec:
        """Parse ``name`` or ``name[k=v;k=v]`` (values read as JSON when they parse, else as strings)."""
        text = text.strip()
        if "[" not in text:
            return cls(text)
        if not text.endswith("]"):
            raise SweepError(f"{text!r}: parameters go in brackets, e.g. oracle_topk[unit=block;size=64]")
        name, body = text[:-1].split("[", 1)
        params = {}
        for item in filter(None, (part.strip() for part in body.split(";"))):
            if "=" not in item:
                raise SweepError(f"{text!r}: parameter {item!r} is not key=value")
            key, value = (s.strip() for s in item.split("=", 1))
            try:
                params[key] = json.loads(value)
            except json.JSONDecodeError:
                params[key] = value
        return cls(name.strip(), params)

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        body = ";".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(self.params.items()))
        return f"{self.name}[{body}]"


@dataclass
class Settings:
    """Everything that decides a sweep's results (``device`` and ``threads`` only decide where it runs)."""

    policies: list[Spec]
    rules: list[Spec] = field(default_factory=lambda: [Spec("uniform")])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95])
    queries: int | None = 1024  # scored rows per layer and phase (None: all)
    error_queries: int | None = 32  # of those, rows whose output error is computed (None: all)
    proxy_rows: int = 128  # decode proxy: the last prompt rows, when the trace has no generated queries
    seed: int = 0
    output_error: bool | None = None  # None: when the trace has values
    policy_files: list[str] = field(default_factory=list)
    batch: int = 1  # B of the cost model
    device: str = "cpu"
    threads: int | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Settings:
        data = dict(data)
        data["policies"] = [Spec(**p) for p in data["policies"]]
        data["rules"] = [Spec(**r) for r in data["rules"]]
        return cls(**data)

    def identity(self) -> dict:
        """The settings that decide results (a rerun into the same folder must match them)."""
        data = self.to_json()
        data.pop("device")
        data.pop("threads")
        return data


def trace_id(url: str) -> str:
    """Stable short id of a trace: its folder name and a hash of its absolute path or URL."""
    full = url if "://" in url else str(Path(url).resolve())
    stem = Path(full.rstrip("/")).name.removesuffix(".zarr") or "trace"
    return f"{stem}-{hashlib.sha1(full.encode()).hexdigest()[:8]}"


def part_name(tid: str, layer: int) -> str:
    return f"{tid}__L{layer}.parquet"


def load_policies(settings: Settings) -> tuple[list, list]:
    """Policy and budget-rule objects of the settings (policy files loaded first); SweepError on unknown names.

    Built once per process and settings: a worker running many tasks reuses them.
    """
    key = json.dumps(settings.identity(), sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _load_policies(settings)
    return _LOADED[key]


_LOADED: dict[str, tuple[list, list]] = {}


def _load_policies(settings: Settings) -> tuple[list, list]:
    from sparse_frontier.policies import registry

    try:
        for path in settings.policy_files:
            registry.load_policy_file(path)
        policies = [registry.get_policy(spec.name, **spec.params) for spec in settings.policies]
        rules = [registry.get_budget_rule(spec.name, **spec.params) for spec in settings.rules]
    except PolicyError as exc:
        raise SweepError(str(exc)) from None
    return policies, rules


def _sample(candidates: Tensor, n: int | None, m: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded sample of ``n`` rows (all when None) and, within it, ``m`` error rows: (positions, error index)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(candidates), generator=gen)
    chosen = perm if n is None else perm[:n]
    positions = torch.sort(candidates[chosen]).values
    err = torch.sort(candidates[chosen[: len(chosen) if m is None else m]]).values
    return positions, torch.searchsorted(positions, err)


def _seed(settings: Settings, tid: str, layer: int, phase: str) -> int:
    return (settings.seed * 1_000_003 + zlib.crc32(f"{tid}:{layer}:{phase}".encode())) % (2**63)


def phase_view(view: LayerView, phase: str, settings: Settings, tid: str) -> tuple[LayerView, Rows]:
    """The view a phase's policies see and the rows they are scored on.

    Prefill: the prompt alone (queries before ``prefill_len``, its keys), scored on a sample of prompt rows.
    Decode: the generated-token queries when captured; otherwise the last ``proxy_rows`` prompt rows, a
    labelled proxy whose first row plays the start of decoding (``prefill_len``).
    """
    P, qpos = view.prefill_len, view.q_positions
    seed = _seed(settings, tid, view.layer, phase)
    prompt = qpos[qpos < P]
    if phase == "prefill":
        if not len(prompt):
            raise TraceError("trace has no prompt queries to score prefill policies on")
        rows, err = _sample(prompt, settings.queries, settings.error_queries, seed)
        pview = dataclasses.replace(view, q=view.q[:, qpos < P], q_positions=prompt, k=view.k[:, :P],
                                    v=None if view.v is None else view.v[:, :P], rows=rows)
        return pview, Rows(rows, err, P, P)
    generated = qpos[qpos >= P]
    if len(generated):
        rows, err = _sample(generated, settings.queries, settings.error_queries, seed)
        return dataclasses.replace(view, rows=rows), Rows(rows, err, view.n_keys, P)
    if len(prompt) < 2:
        raise TraceError("trace has too few prompt queries for a decode proxy")
    proxy = prompt[-min(settings.proxy_rows, len(prompt) - 1):]
    rows, err = _sample(proxy, None, settings.error_queries, seed)
    first = int(rows[0])
    pview = dataclasses.replace(view, q=view.q[:, qpos < P], q_positions=prompt, k=view.k[:, :P],
                                v=None if view.v is None else view.v[:, :P], rows=rows, prefill_len=first)
    return pview, Rows(rows, err, P, first, proxy=True)


def _query_heads(x: Tensor, n_q: int) -> Tensor:
    """Per selection head (query or KV heads) -> per query head."""
    return x.repeat_interleave(n_q // x.shape[0]) if x.shape[0] != n_q else x


def _params_json(policy) -> str:
    params = getattr(policy, "params", None)
    data = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else {}
    return json.dumps(data, sort_keys=True, default=str)


def simulate_layer(store: TraceStore, index: int, settings: Settings,
                   loaded: tuple[list, list] | None = None) -> tuple[pd.DataFrame, dict]:
    """Result rows of one captured layer (every policy x rule x sparsity x query head) and work counters."""
    policies, rules = loaded or load_policies(settings)
    tid = trace_id(store.url)
    want_output = settings.output_error is not False and store.has_values
    view = store.layer_view(index, device=settings.device, with_values=want_output)
    model = ModelShape.from_attrs(store.model)
    base = {"trace": store.url, "trace_id": tid, "model": str(store.model.get("name", "")),
            "task": str((store.task or {}).get("name", "") or ""), "length": view.prefill_len,
            "layer": view.layer}
    records, stats = [], {"scored_cells": 0}
    for phase in ("prefill", "decode"):
        chosen = [p for p in policies if getattr(p, "phase", "prefill") == phase]
        if not chosen:
            continue
        pview, rows = phase_view(view, phase, settings, tid)
        entries = []
        for policy in chosen:
            for rule, spec in zip(rules, settings.rules, strict=True):
                for sparsity in settings.sparsities:
                    entry = Entry(policy, spec.label, float(sparsity))
                    try:
                        entry.budget = rule.budget(pview, sparsity)
                        if not entry.is_oracle:
                            entry.selection = policy.select(pview, entry.budget)
                            density = check_selection(policy, pview, entry.budget, entry.selection)
                            entry.density = _query_heads(density.float(), pview.n_query_heads)
                    except PolicyError as exc:
                        entry.error = str(exc)
                    except Exception as exc:  # noqa: BLE001 - a policy's own failure becomes its error row
                        entry.error = f"{type(exc).__name__}: {exc}"
                    entries.append(entry)
        scorer = LayerScorer(pview, rows, want_output, thread_workspace())
        scorer.score(entries)
        stats["scored_cells"] += scorer.scored_cells
        for entry in entries:
            records.extend(_records(entry, base, rows, phase, model, settings, pview.n_query_heads))
    return pd.DataFrame.from_records(records, columns=COLUMNS), stats


COLUMNS = ["trace", "trace_id", "model", "task", "length", "layer", "head", "policy", "phase", "params",
           "budget_rule", "sparsity", "realised_sparsity", "density", "recall", "recall_ci", "output_error",
           "output_error_ci", "oracle", "oracle_recall", "oracle_output_error", "n_queries", "proxy",
           "prefill_flops", "decode_bytes", "status", "error"]


def _records(entry: Entry, base: dict, rows: Rows, phase: str, model: ModelShape | None, settings: Settings,
             n_heads: int) -> list[dict]:
    nan = math.nan
    common = {**base, "policy": entry.policy.name, "phase": phase, "params": _params_json(entry.policy),
              "budget_rule": entry.rule, "sparsity": entry.sparsity, "n_queries": len(rows.positions),
              "proxy": rows.proxy}
    if entry.error:
        return [{**common, "head": h, "realised_sparsity": nan, "density": nan, "recall": nan, "recall_ci": nan,
                 "output_error": nan, "output_error_ci": nan, "oracle": entry.oracle, "oracle_recall": nan,
                 "oracle_output_error": nan, "prefill_flops": nan, "decode_bytes": nan, "status": "error",
                 "error": entry.error} for h in range(n_heads)]
    recall, recall_ci = mean_ci(entry.recall)
    oracle_recall, _ = mean_ci(entry.oracle_recall)
    if entry.output_error is not None:
        err, err_ci = mean_ci(entry.output_error)
        oracle_err, _ = mean_ci(entry.oracle_output_error)
    else:
        err = err_ci = oracle_err = torch.full((n_heads,), nan, dtype=torch.float64)
    params = json.loads(common["params"])
    out = []
    for h in range(n_heads):
        density = float(entry.density[h])
        flops, mem = entry_cost(model, entry.policy.name, phase, params, entry.selection, density,
                                rows.prefill_len if rows.proxy else base["length"], rows.n_keys, settings.batch)
        out.append({**common, "head": h, "realised_sparsity": 1.0 - density, "density": density,
                    "recall": float(recall[h]), "recall_ci": float(recall_ci[h]), "output_error": float(err[h]),
                    "output_error_ci": float(err_ci[h]), "oracle": entry.oracle,
                    "oracle_recall": float(oracle_recall[h]), "oracle_output_error": float(oracle_err[h]),
                    "prefill_flops": flops, "decode_bytes": mem, "status": "ok", "error": ""})
    return out


def write_part(frame: pd.DataFrame, path: Path) -> None:
    """Write a Parquet part atomically: a temporary file in the same folder, then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def run_task(settings_json: dict, trace: str, index: int, out: str) -> dict:
    """One (trace, layer) task: simulate the layer and write its part (skipped when the part exists)."""
    settings = Settings.from_json(settings_json)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    store = TraceStore(trace)
    tid, layer = trace_id(trace), store.layers[index]
    path = Path(out) / PARTS / part_name(tid, layer)
    if path.exists():
        return {"part": path.name, "skipped": True, "rows": 0, "seconds": 0.0, "scored_cells": 0}
    start = time.perf_counter()
    frame, stats = simulate_layer(store, index, settings)
    write_part(frame, path)
    return {"part": path.name, "skipped": False, "rows": len(frame), "seconds": time.perf_counter() - start,
            **stats}


@dataclass
class Task:
    trace: str
    index: int
    layer: int
    part: str


def plan(traces: Iterable[str], settings: Settings) -> tuple[list[TraceStore], list[Task]]:
    """Open every trace (one clear error for a bad one) and list its (trace, layer) tasks."""
    stores, tasks = [], []
    for url in traces:
        store = TraceStore(url)
        if settings.output_error and not store.has_values:
            raise SweepError(f"{url}: output error asked for, but the trace was captured without values "
                             f"(--no-values); drop --output-error")
        stores.append(store)
        tid = trace_id(store.url)
        tasks += [Task(store.url, i, layer, part_name(tid, layer)) for i, layer in enumerate(store.layers)]
    return stores, tasks


def _sweep_json(settings: Settings, stores: list[TraceStore], tasks: list[Task], policies: list, out: Path) -> dict:
    done = {t.part for t in tasks if (out / PARTS / t.part).exists()}
    return {
        "format": FORMAT, "version": VERSION, "settings": settings.to_json(),
        "policies": [{"name": p.name, "phase": p.phase, "label": spec.label, "params": json.loads(_params_json(p))}
                     for p, spec in zip(policies, settings.policies, strict=True)],
        "rules": [spec.label for spec in settings.rules], "sparsities": list(settings.sparsities),
        "traces": [{"trace": s.url, "trace_id": trace_id(s.url), "model": s.model.get("name", ""),
                    "layers": s.layers} for s in stores],
        "parts": {t.part: {"trace": t.trace, "layer": t.layer, "done": t.part in done} for t in tasks},
        "complete": len(done) == len(tasks),
    }


def _check_folder(out: Path, settings: Settings) -> None:
    path = out / "sweep.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SweepError(f"{path} is not a readable sweep record: {exc}") from None
    if old.get("format") != FORMAT:
        raise SweepError(f"{out} holds something other than a sweep (no {FORMAT} record); choose another --out")
    previous = Settings.from_json(old["settings"]).identity()
    if previous != settings.identity():
        changed = sorted(k for k in previous if previous[k] != settings.identity().get(k))
        raise SweepError(f"{out} holds a sweep with other settings ({', '.join(changed)}); resume it with the "
                         f"same settings or choose another --out")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def run_sweep(traces: list[str], settings: Settings, out: str | Path, workers: int | None = None,
              scheduler: str | None = None, on_task: Callable[[dict, int, int], None] | None = None) -> dict:
    """Run (or resume) a sweep into ``out``; return its sweep.json record. ``on_task(result, done, total)``
    is called as each task finishes."""
    out = Path(out)
    for s in settings.sparsities:
        if not 0.0 <= float(s) < 1.0:
            raise SweepError(f"sparsity {s} is outside [0, 1)")
    policies, _ = load_policies(settings)
    stores, tasks = plan(list(dict.fromkeys(traces)), settings)
    _check_folder(out, settings)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    record = _sweep_json(settings, stores, tasks, policies, out)
    _write_json(out / "sweep.json", record)
    todo = [t for t in tasks if not (out / PARTS / t.part).exists()]
    payload = settings.to_json()
    if (workers is not None or scheduler is not None) and settings.threads is None:
        payload["threads"] = 1  # one thread per Dask worker process
    results = []

    def finished(result: dict) -> None:
        results.append(result)
        record["parts"][result["part"]]["done"] = True
        _write_json(out / "sweep.json", record)
        if on_task is not None:
            on_task(result, len(results), len(todo))

    if workers is None and scheduler is None:
        for task in todo:
            finished(run_task(payload, task.trace, task.index, str(out)))
    else:
        import dask
        from dask.distributed import Client, LocalCluster, as_completed

        cluster = None
        if scheduler is None:
            # Dask sets MALLOC_TRIM_THRESHOLD_ in its workers, which also freezes glibc's mmap threshold at 128 KiB:
            # every block of logits would then be a fresh mmap and page faults would take a third of the time
            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
        client = Client(cluster if cluster is not None else scheduler)
        try:
            futures = [client.submit(run_task, payload, t.trace, t.index, str(out.resolve()), pure=False)
                       for t in todo]
            for future in as_completed(futures):
                finished(future.result())
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    record["complete"] = all(p["done"] for p in record["parts"].values())
    _write_json(out / "sweep.json", record)
    return record
