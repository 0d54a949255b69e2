"""Simulator benchmark, one run on one machine.

1. the machine's float32 matmul rate (square 2048 x 2048, and the logits shape [1024, d] x [d, T]);
2. the dense-attention pass: scored (query, key) cells per second of ``true_attention`` over one layer
   (all heads, 1024 sampled rows), and its rate as 2 d FLOPs per cell against the matmul rates. Cells are the
   visible ones only (keys at or before each row, inside a sliding window): 9 heads x sum over the rows of
   min(row + 1, T); masked cells a row block computes past its first row are not counted. The KV groups write
   into one reused ``ProbsBuffer``, as the sweep's scorer does; the same pass with a fresh output per call is
   printed beside it. The matmuls and the passes are timed in turn, ``--rounds`` times, each figure its best
   round, so a slow minute of a shared machine does not fall on one side of the ratio alone;
3. the full seed sweep (every registered policy x 8 sparsities, 1024 sampled queries per head) over an
   8K SmolLM2 trace: wall time and peak resident memory of the whole process tree (Dask workers included);
4. a 32K trace (synthetic q/k/v with SmolLM2's shapes, unless --long names a real one): peak memory of
   simulating one layer and of two layers, to show it is bounded by one layer.

Example:
  frontier trace capture --model smollm2-135m --task niah --length 8192 --generate 0 --out traces/smol-8k.zarr
  python benchmarks/simulate.py --trace traces/smol-8k.zarr --workers 2
  python benchmarks/simulate.py --trace traces/smol-8k.zarr --sections layers,devices   # GPU machine
  python benchmarks/simulate.py --trace traces/smol-8k.zarr --sections dense,layers --threads 1  # shared machine

On a machine other jobs also load, ``--threads 1`` keeps torch's threads from waiting on each other, and the
'layers' section's CPU seconds per layer (not its wall time) give the projection of a sweep on idle cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SPARSITIES = "0.3,0.5,0.67,0.8,0.867,0.9,0.933,0.95"


class PeakMemory:
    """Polls the resident memory of a process and all its descendants; ``peak`` is the largest sum seen."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.process, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_alternated(fns: dict, rounds: int) -> dict:
    """Best time of each function over ``rounds`` rounds that run them in turn (after one warm-up call each):
    a slow minute on a shared machine then falls on all of them, not on whichever was timed during it."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn))
    return best


def dense_pass(trace: str, queries: int, rounds: int) -> tuple[dict, dict]:
    """The dense pass over one layer and the matmul rates, timed in alternation: (pass figures, rates)."""
    from sparse_frontier.simulator.attention import ProbsBuffer, true_attention, visible_cells
    from sparse_frontier.tracer.store import TraceStore

    store = TraceStore(trace)
    index = store.n_layers // 2
    view = store.layer_view(index, with_values=False)
    prompt = view.q_positions[view.q_positions < view.prefill_len]
    rows = torch.sort(prompt[torch.randperm(len(prompt), generator=torch.Generator().manual_seed(0))[:queries]]).values
    q = view.queries_at(rows)
    group = view.group
    d, n_keys = q.shape[-1], view.prefill_len

    def run(buffer=None):
        for g in range(view.n_kv_heads):
            true_attention(q[g * group : (g + 1) * group], view.k[g : g + 1, :n_keys], rows, view.scale,
                           view.softcap, view.sliding_window, out=buffer)

    buffer = ProbsBuffer()
    square = torch.randn(2048, 2048)
    q_shape, k_shape = torch.randn(1024, d), torch.randn(d, n_keys)
    best = best_alternated({"square": lambda: square @ square, "logits_shape": lambda: q_shape @ k_shape,
                            "dense": lambda: run(buffer), "fresh": run}, rounds)
    rates = {"square_gflops": 2 * 2048**3 / best["square"] / 1e9,
             "logits_shape_gflops": 2 * 1024 * d * n_keys / best["logits_shape"] / 1e9}
    cells = view.n_query_heads * visible_cells(rows, n_keys, view.sliding_window)
    dense = {"layer": store.layers[index], "rows": len(rows), "cells": cells, "seconds": best["dense"],
             "cells_per_s": cells / best["dense"], "gflops_2d": cells * 2 * d / best["dense"] / 1e9, "head_dim": d,
             "n_keys": n_keys, "fresh_seconds": best["fresh"], "fresh_gflops_2d": cells * 2 * d / best["fresh"] / 1e9,
             "rounds": rounds}
    return dense, rates


def sweep(trace: str, workers: int | None, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-c", "from sparse_frontier.cli.main import cli; cli()", "simulate", trace,
           "--policies", "all", "--queries", "1024", "--out", str(out), "--json", *extra]
    if workers:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as mem:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"sweep failed:\n{stderr[-3000:]}")
    result = json.loads(stdout)
    return {"command": " ".join(cmd[2:]), "wall_s": wall, "peak_rss_gb": mem.peak / 1e9,
            "parts": result["parts"], "summary_rows": len(result["summary"])}


def layer_timing(trace: str, device: str = "cpu") -> dict:
    """Seconds per layer of the full seed sweep (every policy x 8 sparsities, 1024 queries) in this process."""
    from sparse_frontier.policies import registry
    from sparse_frontier.simulator.sweep import Settings, Spec, load_policies, simulate_layer
    from sparse_frontier.tracer.store import TraceStore

    store = TraceStore(trace)
    settings = Settings(policies=[Spec(n) for n in sorted(registry.available())],
                        sparsities=[float(x) for x in SPARSITIES.split(",")], device=device)
    load_policies(settings)
    seconds, cpu = [], []
    for index in range(store.n_layers):
        start, start_cpu = time.perf_counter(), time.process_time()
        simulate_layer(store, index, settings)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"device": device, "threads": torch.get_num_threads(), "layers": store.layers, "seconds": seconds,
            "mean_s": sum(seconds) / len(seconds), "cpu_s": cpu, "mean_cpu_s": sum(cpu) / len(cpu),
            "model_layers": int(store.model.get("n_layers", store.n_layers))}


def compare_devices(trace: str, queries: int = 256) -> dict:
    """The same sweep on CPU and on CUDA: the largest difference of each metric over the ok rows."""
    import pandas as pd

    from sparse_frontier.policies import registry
    from sparse_frontier.simulator.sweep import Settings, Spec, simulate_layer
    from sparse_frontier.tracer.store import TraceStore

    store = TraceStore(trace)
    frames, seconds = {}, {}
    for device in ("cpu", "cuda"):
        settings = Settings(policies=[Spec(n) for n in sorted(registry.available())], sparsities=[0.5, 0.9],
                            queries=queries, device=device)
        start = time.perf_counter()
        frames[device] = pd.concat([simulate_layer(store, i, settings)[0] for i in range(store.n_layers)],
                                   ignore_index=True)
        seconds[device] = time.perf_counter() - start
    cpu, cuda = frames["cpu"], frames["cuda"]
    same_status = bool((cpu["status"] == cuda["status"]).all())
    ok = (cpu["status"] == "ok") & (cuda["status"] == "ok")
    diffs = {c: float((cpu.loc[ok, c] - cuda.loc[ok, c]).abs().max())
             for c in ("density", "recall", "oracle_recall", "output_error", "oracle_output_error")}
    errors = sorted(set(cuda.loc[cuda["status"] != "ok", "error"].str[:160]))
    return {"rows": len(cpu), "ok_rows": int(ok.sum()), "same_status": same_status, "max_abs_diff": diffs,
            "seconds": seconds, "cuda_errors": errors}


def synthetic_trace(path: Path, n_tokens: int, n_layers: int) -> str:
    """A random trace with SmolLM2-135M's attention shapes (9 query, 3 KV heads, d 64)."""
    from sparse_frontier.tracer.store import TraceWriter

    gen = torch.Generator().manual_seed(0)
    attrs = {"model": {"name": "synthetic-smollm2-shape", "n_layers": 30, "n_q_heads": 9, "n_kv_heads": 3,
                       "head_dim": 64, "softmax_scale": 0.125, "layer_types": ["full_attention"] * 30,
                       "sliding_window": None, "attn_logit_softcapping": None, "d_model": 576, "d_mlp": 1536,
                       "vocab_size": 49152},
             "sequence": {"n_tokens": n_tokens, "prefill_len": n_tokens, "generated_len": 0}, "task": None,
             "capture": {"device": "cpu", "dtype": "bfloat16"}}
    writer = TraceWriter(str(path), attrs=attrs, n_layers=n_layers, n_q_heads=9, n_kv_heads=3, head_dim=64,
                         n_tokens=n_tokens, q_positions=range(n_tokens))
    writer.write_tokens(range(n_tokens))
    for i in range(n_layers):
        writer.write_layer(i, i, torch.randn(9, n_tokens, 64, generator=gen) * 2,
                           torch.randn(3, n_tokens, 64, generator=gen) * 2, torch.randn(3, n_tokens, 64, generator=gen))
    writer.finish()
    return str(path)


SECTIONS = ("dense", "sweep", "long", "layers", "devices")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", required=True, help="an 8K SmolLM2 trace store")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers for the sweep (0: one process)")
    parser.add_argument("--long", help="a 32K trace store (default: synthetic ones with SmolLM2's shapes, 1 and 2 "
                        "layers)")
    parser.add_argument("--sections", default="dense,sweep,long",
                        help=f"comma-separated, of {', '.join(SECTIONS)}: 'layers' = seconds per layer of the full "
                        "seed sweep in this process (no CLI, no Dask); 'devices' = the same sweep on CPU and CUDA "
                        "and the largest difference per metric")
    parser.add_argument("--threads", type=int, help="torch threads in this process (dense, layers; default: torch's)")
    parser.add_argument("--rounds", type=int, default=15,
                        help="dense: rounds that time the matmuls and the pass in turn (each figure: its best round)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        parser.error(f"unknown sections {sorted(sections - set(SECTIONS))}")
    import os

    if args.threads:
        torch.set_num_threads(args.threads)
    figures: dict = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    if "dense" in sections:
        dense, rates = dense_pass(args.trace, 1024, args.rounds)
        figures.update(matmul=rates, dense_pass=dense)
        print(f"float32 matmul: {rates['square_gflops']:.1f} GFLOP/s square, {rates['logits_shape_gflops']:.1f} "
              f"GFLOP/s in the logits shape [1024, {dense['head_dim']}] x [{dense['head_dim']}, {dense['n_keys']}]")
        print(f"dense-attention pass (layer {dense['layer']}, {dense['rows']} rows, all heads): "
              f"{dense['cells_per_s'] / 1e6:.1f} M cells/s = {dense['gflops_2d']:.2f} GFLOP/s at 2d per cell; "
              f"ratio {dense['gflops_2d'] / rates['square_gflops']:.1%} of square matmul (target 50%), "
              f"{dense['gflops_2d'] / rates['logits_shape_gflops']:.1%} of the logits-shaped matmul")
        print(f"  with a fresh zeroed output per call instead of the reused buffer: {dense['fresh_gflops_2d']:.2f} "
              f"GFLOP/s, {dense['fresh_gflops_2d'] / rates['square_gflops']:.1%} of square matmul")
    if "layers" in sections:
        layers = figures["layers"] = layer_timing(args.trace)
        print(f"full seed sweep in this process: {layers['mean_s']:.2f} s wall, {layers['mean_cpu_s']:.2f} s CPU per "
              f"layer ({layers['threads']} threads)")
        if layers["threads"] == 1 and args.workers:
            rounds = -(-layers["model_layers"] // args.workers)
            print(f"  projected {layers['model_layers']}-layer sweep on {args.workers} idle one-thread workers: "
                  f"{rounds} x {layers['mean_cpu_s']:.2f} s = {rounds * layers['mean_cpu_s']:.0f} s")
    if "devices" in sections:
        figures["devices"] = compare_devices(args.trace)
        print(f"CPU vs CUDA: {json.dumps(figures['devices'])}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "sweep" in sections:
            result = sweep(args.trace, args.workers or None, tmp / "sweep", ["--sparsity", SPARSITIES])
            figures["sweep"] = result
            print(f"full seed sweep: {result['wall_s']:.1f} s wall (target < 120 s, ratio "
                  f"{result['wall_s'] / 120:.2f}), peak RSS {result['peak_rss_gb']:.2f} GB (target < 3 GB, ratio "
                  f"{result['peak_rss_gb'] / 3:.2f}), {result['parts']} parts\n  {result['command']}")
        if "long" in sections:
            # 32K: peak memory of one layer and of two (two sparsities suffice: memory does not grow with them)
            traces = {"given": args.long} if args.long else \
                {f"{n} layer(s)": synthetic_trace(tmp / f"long-{n}.zarr", 32768, n) for n in (1, 2)}
            figures["long"] = {}
            for name, trace in traces.items():
                res = sweep(trace, None, tmp / f"out-{len(figures['long'])}", ["--sparsity", "0.5,0.9"])
                figures["long"][name] = res
                print(f"32K trace, {name}, one process: {res['wall_s']:.1f} s, peak RSS {res['peak_rss_gb']:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
