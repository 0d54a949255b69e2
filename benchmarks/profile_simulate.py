"""Where the simulator's time goes: the six seed methods x 6 sparsities over a trace, timed on each device asked
for (after a warm-up run), then once more under cProfile on the first device.

    python3 benchmarks/profile_simulate.py --synthetic 8000 --layers 4 --devices cuda cpu
    python3 benchmarks/profile_simulate.py --trace results/rve-8000/niah-8000-seed0.zarr --devices cpu

``--synthetic N`` writes a random trace with SmolLM2-135M's attention shapes (``simulate.synthetic_trace``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import sparse_frontier.cli  # noqa: F401  # isort: skip - first: it chooses numpy's sort code before numpy loads
from simulate import synthetic_trace

from sparse_frontier.simulator.sweep import Settings, Spec, run_sweep

SEED_METHODS = ["vertical_slash", "flexprefill", "block_sparse", "snapkv", "ada_snapkv", "quest"]
SPARSITIES = [0.5, 0.67, 0.8, 0.9, 0.933, 0.95]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace")
    source.add_argument("--synthetic", type=int, metavar="TOKENS")
    parser.add_argument("--layers", type=int, default=4, help="layers of the synthetic trace")
    parser.add_argument("--devices", nargs="+", default=["cpu"])
    parser.add_argument("--top", type=int, default=30, help="functions printed, by cumulative and by own time")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="profile-simulate-"))
    trace = args.trace or synthetic_trace(work / "synthetic.zarr", args.synthetic, args.layers)

    def settings(device: str) -> Settings:
        return Settings(policies=[Spec(p) for p in SEED_METHODS], sparsities=SPARSITIES, device=device)

    for device in args.devices:
        run_sweep([trace], settings(device), work / f"warm-{device}")  # compiled kernels, caches
        start = time.perf_counter()
        run_sweep([trace], settings(device), work / f"timed-{device}")
        print(f"{device}: {time.perf_counter() - start:.2f} s", flush=True)
    profile = cProfile.Profile()
    profile.enable()
    run_sweep([trace], settings(args.devices[0]), work / "profiled")
    profile.disable()
    stats = pstats.Stats(profile)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
