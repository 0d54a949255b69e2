"""Replay vs end to end: the wall time to evaluate the six seed methods x 6 sparsities on one task sample.

Replay = one trace capture (the dense model on the prompt, greedy decoding of the task's answer budget) plus
one simulator sweep over that trace (every captured layer, every policy x sparsity; on CPU by default in as many
worker processes as torch has threads, as ``frontier simulate --workers N`` runs it). End to end = running the
model with each policy x sparsity applied inside every attention layer (decode policies share one dense
prefill per sample). Both run in this process on the same loaded model; loading it is timed apart. Replay is
timed twice, before and after the end-to-end runs (a fresh trace and results folder each time), and the
speed-up uses the mean of the two, so a machine whose speed drifts during the long end-to-end part does not
favour either side.

    python benchmarks/replay_vs_e2e.py --model smollm2-135m --task niah --param n_keys=1 --param haystack=text \
        --length 2048 --out /tmp/rve

Prints a table and writes ``OUT/replay_vs_e2e.json`` (timings, settings, both result tables' locations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

SEED_METHODS = ["vertical_slash", "flexprefill", "block_sparse", "snapkv", "ada_snapkv", "quest"]
SPARSITIES = [0.5, 0.67, 0.8, 0.9, 0.933, 0.95]


def main() -> None:
    """Run both ways and report the speed-up."""
    import sparse_frontier.cli  # noqa: F401 - first: it chooses numpy's sort code before numpy loads
    from sparse_frontier.simulator.results import load_parts
    from sparse_frontier.simulator.sweep import Settings, Spec, run_sweep
    from sparse_frontier.tracer import e2e
    from sparse_frontier.tracer.capture import TransformersBackend, capture
    from sparse_frontier.tracer.tasks import make_task

    import torch  # isort: skip

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="niah")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="task parameter (repeatable), e.g. n_keys=1")
    parser.add_argument("--policies", default=",".join(SEED_METHODS))
    parser.add_argument("--sparsity", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=None,
                        help="simulator worker processes (a local Dask cluster; 1: in this process); default: on "
                             "CPU as many as torch's threads, which the model's forward passes use; on CUDA 1")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    if args.workers is None:
        args.workers = 1 if args.device == "cuda" else torch.get_num_threads()
    policies = args.policies.split(",")
    sparsities = [float(s) for s in args.sparsity.split(",")]
    if (args.out / "results").exists():  # a sweep would resume from what is there: the timings would be void
        parser.error(f"{args.out} holds results of an earlier run; give a fresh --out")
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    task_params = {"answer_format": "direct"}
    for item in args.param:
        key, _, value = item.partition("=")
        task_params[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value

    load_before = os.getloadavg()
    t = time.perf_counter()
    backend = TransformersBackend(args.model, args.device, dtype)
    load_s = time.perf_counter() - t
    instance = make_task(args.task, backend.tokenizer, args.length, args.seed, **task_params)
    trace = str(args.out / f"{args.task}-{args.length}-seed{args.seed}.zarr")

    settings = Settings(policies=[Spec(p) for p in policies], sparsities=sparsities, device=args.device)

    def replay(trace: str, results: Path) -> tuple[float, float, object]:
        """Capture and simulate: (capture seconds, simulate seconds, the capture's record)."""
        t = time.perf_counter()
        captured = capture(backend, instance.input_ids, trace, generate=instance.max_new_tokens, task=instance,
                           device=args.device)
        capture_s = time.perf_counter() - t
        print(f"  capture: {capture_s:.1f} s", flush=True)
        t = time.perf_counter()
        run_sweep([trace], settings, results, workers=args.workers if args.workers > 1 else None)
        simulate_s = time.perf_counter() - t
        print(f"  simulate: {simulate_s:.1f} s", flush=True)
        return capture_s, simulate_s, captured

    capture_s, simulate_s, captured = replay(trace, args.out / "results")
    simulated = load_parts(args.out / "results")

    configs = [e2e.Config(p, s) for p in policies for s in sparsities]
    done = [0]

    def progress() -> None:
        done[0] += 1
        print(f"  end to end: {done[0]}/{len(configs)} configurations, {time.perf_counter() - t:.0f} s", flush=True)

    t = time.perf_counter()
    ends = e2e.sweep(backend, args.task, args.length, configs, 1, args.seed, task_params, args.out / "results",
                     on_config=progress)
    e2e_s = time.perf_counter() - t
    print("  replay again:", flush=True)
    again = replay(trace.replace(".zarr", "-again.zarr"), args.out / "results-again")

    first_s, again_s = capture_s + simulate_s, again[0] + again[1]
    replay_s = (first_s + again_s) / 2
    report = {
        "model": args.model, "task": args.task, "task_params": task_params, "length": args.length,
        "prompt_tokens": len(instance.input_ids),
        "answer_tokens": captured.generated_len, "seed": args.seed, "policies": policies, "sparsities": sparsities,
        "configurations": len(configs), "device": args.device, "torch_threads": torch.get_num_threads(),
        "simulate_workers": args.workers,
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "model_load_s": round(load_s, 1),
        "capture_s": round(capture_s, 1), "simulate_s": round(simulate_s, 1), "replay_first_s": round(first_s, 1),
        "capture_again_s": round(again[0], 1), "simulate_again_s": round(again[1], 1),
        "replay_again_s": round(again_s, 1), "replay_s": round(replay_s, 1),
        "e2e_s": round(e2e_s, 1), "speedup": round(e2e_s / replay_s, 2),
        "simulated_rows": len(simulated), "e2e_rows": len(ends), "results": str(args.out / "results"),
        "e2e_mean_generated_tokens": round(float(ends["n_generated"].mean()), 1),
    }
    (args.out / "replay_vs_e2e.json").write_text(json.dumps(report, indent=1))
    print(f"{args.model} {args.task} @ {args.length} ({len(instance.input_ids)} prompt tokens), "
          f"{len(policies)} policies x {len(sparsities)} sparsities = {len(configs)} configurations")
    print(f"  replay before: capture {capture_s:.1f} s + simulate {simulate_s:.1f} s = {first_s:.1f} s")
    print(f"  replay after:  capture {again[0]:.1f} s + simulate {again[1]:.1f} s = {again_s:.1f} s")
    print(f"  replay (mean): {replay_s:.1f} s")
    print(f"  end to end: {e2e_s:.1f} s")
    print(f"  speed-up: {e2e_s / replay_s:.1f}x (model load {load_s:.1f} s, not counted; {torch.get_num_threads()} "
          f"torch threads, {args.workers} simulator worker(s))")


if __name__ == "__main__":
    main()
