"""Reading a sweep's results: the Parquet parts as one table, and the summary the CLI prints."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .sweep import COLUMNS, PARTS

SUMMARY_KEYS = ["config", "policy", "phase", "budget_rule", "sparsity"]
SUMMARY_VALUES = ["realised_sparsity", "recall", "oracle_recall", "output_error", "oracle_output_error"]


def load_parts(out: str | Path) -> pd.DataFrame:
    """Every result row of the sweep in ``out`` (all parts, in part-name order)."""
    parts = sorted((Path(out) / PARTS).glob("*.parquet"))
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def configs(frame: pd.DataFrame) -> pd.Series:
    """A label per row: the policy name, with the parameters that tell apart its variants in this frame
    (e.g. ``oracle_topk[size=64;unit=block]`` next to plain ``oracle_topk``)."""
    labels = frame["policy"].copy()
    for name, group in frame.groupby("policy"):
        variants = group["params"].unique()
        if len(variants) < 2:
            continue
        decoded = {v: json.loads(v) for v in variants}
        differ = sorted({k for d in decoded.values() for k in d
                         if len({json.dumps(x.get(k)) for x in decoded.values()}) > 1})
        for params, d in decoded.items():
            body = ";".join(f"{k}={d.get(k)}" for k in differ)
            labels[group.index[group["params"] == params]] = f"{name}[{body}]"
    return labels


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean metrics per (configuration, budget rule, sparsity) over traces, layers and heads (ok rows), with
    the oracle at the same budget beside them and the number of error rows."""
    if frame.empty:
        return pd.DataFrame(columns=[*SUMMARY_KEYS, *SUMMARY_VALUES, "oracle", "rows", "errors"])
    frame = frame.assign(config=configs(frame))
    ok = frame[frame["status"] == "ok"]
    means = ok.groupby(SUMMARY_KEYS, sort=False)[SUMMARY_VALUES].mean()
    oracle = ok.groupby(SUMMARY_KEYS, sort=False)["oracle"].agg(lambda s: ",".join(sorted(set(s))))
    counts = frame.groupby(SUMMARY_KEYS, sort=False)["status"].agg(
        rows="size", errors=lambda s: int((s != "ok").sum()))
    table = counts.join(means).join(oracle).reset_index()
    return table[[*SUMMARY_KEYS, *SUMMARY_VALUES, "oracle", "rows", "errors"]]
