"""Dense baselines of the built-in models on every task: the scores sparse results are compared with.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/task_baselines.py --samples 3 --easy \\
        --out benchmarks/task_baselines.jsonl
    python benchmarks/task_baselines.py --table --out benchmarks/task_baselines.jsonl

Runs gemma3-270m at 2K, 4K and 8K tokens and smollm2-135m at 2K, greedy, on CPU, with the short
direct-answer variant (``answer_format=direct``), plus a few easier settings of the same tasks
(``--easy``), or only the settings given with ``--setting``. One JSON record per sample is appended to
``--out`` as it finishes; a rerun skips the samples already there, so the run can be stopped and resumed.
``--table`` prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from sparse_frontier.tracer.models import load_model
from sparse_frontier.tracer.tasks import TASKS
from sparse_frontier.tracer.tasks.dense import evaluate

RUNS = {"gemma3-270m": (2048, 4096, 8192), "smollm2-135m": (2048,)}
EASY = [("niah", {"n_keys": 1, "haystack": "text"}), ("niah", {"n_keys": 1})]


def _key(model: str, task: str, params: dict, length: int, seed: int) -> str:
    return json.dumps([model, task, params, length, seed], sort_keys=True)


def parse_setting(text: str) -> tuple[str, dict]:
    """'niah n_keys=1 haystack=text' -> ('niah', {'n_keys': 1, 'haystack': 'text'})."""
    task, *pairs = text.split()
    params = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        params[key] = int(value) if value.isdigit() else value
    return task, params


def run(out: Path, samples: int, settings: list[tuple[str, dict]]) -> None:
    """Evaluate every (model, length, setting, seed) not yet in ``out``, appending one record per sample."""
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add(_key(r["model"], r["task"], r["settings"], r["length"], r["seed"]))
    nets: dict = {}
    for length in sorted({n for lengths in RUNS.values() for n in lengths}):  # short runs first
        for model in [m for m, lengths in RUNS.items() if length in lengths]:
            for task, extra in settings:
                for seed in range(samples):
                    if _key(model, task, extra, length, seed) in done:
                        continue
                    if model not in nets:
                        nets[model] = load_model(model)
                    net, tokenizer = nets[model]
                    params = {"answer_format": "direct", **extra}
                    (record,) = evaluate(net, tokenizer, task, length, 1, seed=seed, params=params)
                    record.update(model=model, settings=extra, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
                    with out.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    print(f"{model} {task} {extra} {length} seed={seed}: score {record['score']:.3f} "
                          f"({record['seconds']} s) answer={record['answer']!r} ref={record['reference']!r}",
                          flush=True)


def table(out: Path) -> str:
    """The Markdown table of mean scores: one row per task setting, one column per model and length."""
    scores: dict = defaultdict(list)
    for line in out.read_text().splitlines():
        r = json.loads(line)
        setting = r["task"] + "".join(f" {k}={v}" for k, v in sorted(r["settings"].items()))
        scores[setting, r["model"], r["length"]].append(r["score"])
    columns = [(m, n) for m, lengths in RUNS.items() for n in lengths]
    settings = list(dict.fromkeys(s for s, _, _ in scores))
    usual = max(len(v) for v in scores.values())
    head = "| task | " + " | ".join(f"{m} {n // 1024}K" for m, n in columns) + " |"
    lines = [f"Mean score over {usual} samples per cell (fewer where marked n=).", "", head,
             "|" + "---|" * (len(columns) + 1)]
    for s in settings:
        cells = []
        for m, n in columns:
            got = scores.get((s, m, n))
            note = f" (n={len(got)})" if got and len(got) != usual else ""
            cells.append(f"{sum(got) / len(got):.2f}{note}" if got else "-")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3, help="samples (seeds 0..K-1) per task and length")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/task_baselines.jsonl"))
    parser.add_argument("--easy", action="store_true", help="also run the easier task settings")
    parser.add_argument("--setting", action="append", metavar="'TASK K=V ...'",
                        help="run only these settings (repeatable), e.g. --setting 'niah n_keys=1 haystack=text'")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
    else:
        settings = [(name, {}) for name in TASKS] + (EASY if args.easy else [])
        run(args.out, args.samples, [parse_setting(s) for s in args.setting] if args.setting else settings)


if __name__ == "__main__":
    main()
