"""Fidelity: does replaying traces rank sparse-attention configurations the way running the model does?

For each (model, task, length) the simulator's mean recall (and output error) of every configuration
(policy, parameters, budget rule, sparsity) is set beside the mean task score of running the model end to
end with that configuration (``frontier eval --sweep``). The Spearman rank correlation across
configurations says how well the replay predicts the real effect; the configurations whose ranks differ
most are where it does not.

Lengths: the simulator records a trace's prompt length in tokens; the end-to-end runs record the task's
target length (a prompt fills 90-100% of it). Simulator rows are matched to the smallest end-to-end
target length that holds their prompt.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

GROUP = ["model", "task", "length"]
CONFIG = ["policy", "params", "budget_rule", "sparsity"]
KEY = GROUP + CONFIG
E2E_FOLDER = "e2e"


class FidelityError(ValueError):
    """Inputs that cannot be compared: a folder without results, or no configuration in common."""


def load_e2e(path: str | Path) -> pd.DataFrame:
    """Every end-to-end record under ``path`` (``path/e2e/*.parquet``, or ``path/*.parquet``)."""
    path = Path(path)
    folder = path / E2E_FOLDER if (path / E2E_FOLDER).is_dir() else path
    parts = sorted(folder.glob("*.parquet"))
    if not parts:
        raise FidelityError(f"{path}: no end-to-end results (run `frontier eval --sweep --out {path}`)")
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def load_simulated(path: str | Path) -> pd.DataFrame:
    """Every simulator result row of the sweep folder ``path``."""
    from .results import load_parts

    frame = load_parts(path)
    if frame.empty:
        raise FidelityError(f"{path}: no simulator results (run `frontier simulate ... --out {path}`)")
    return frame


def target_lengths(lengths: pd.Series, targets: list[int]) -> pd.Series:
    """Each prompt length mapped to the smallest target length at or above it (kept when none is)."""
    ordered = sorted(set(int(t) for t in targets))

    def target(n: int) -> int:
        return next((t for t in ordered if t >= n), n)

    return lengths.astype(int).map(target)


def simulated_means(sim: pd.DataFrame, targets: list[int] | None = None) -> pd.DataFrame:
    """Mean recall and output error per configuration over traces, layers and heads (rows that scored), and
    the 10th percentile of recall over those (trace, layer, head) rows (``recall_p10``: the weak heads)."""
    ok = sim[sim["status"] == "ok"].copy()
    if targets:
        ok["length"] = target_lengths(ok["length"], targets)
    grouped = ok.groupby(KEY, dropna=False)
    out = grouped[["recall", "output_error", "realised_sparsity"]].mean()
    out["recall_p10"] = grouped["recall"].quantile(0.1)
    out["traces"] = grouped["trace_id"].nunique()
    out["phase"] = grouped["phase"].first()
    return out.rename(columns={"realised_sparsity": "sim_realised_sparsity"}).reset_index()


def e2e_means(e2e: pd.DataFrame) -> pd.DataFrame:
    """Mean task score per configuration over samples, with the sample count and the score's standard error."""
    grouped = e2e.groupby(KEY, dropna=False)
    out = grouped["score"].agg(score="mean", samples="size", score_sd="std")
    out["score_se"] = out["score_sd"] / np.sqrt(out["samples"])
    out["e2e_realised_sparsity"] = grouped["realised_sparsity"].mean()
    out["phase"] = grouped["phase"].first()
    return out.drop(columns="score_sd").reset_index()


def join(sim: pd.DataFrame, e2e: pd.DataFrame) -> pd.DataFrame:
    """Simulated and end-to-end means side by side: one row per configuration present in both, plus the
    end-to-end sparsity-0 runs (the dense baseline; their simulated columns may be empty)."""
    ends = e2e_means(e2e)
    sims = simulated_means(sim, ends["length"].unique().tolist())
    both = ends.merge(sims.drop(columns="phase"), on=KEY, how="left")
    both = both[both["recall"].notna() | (both["sparsity"] == 0)].reset_index(drop=True)
    if both["recall"].isna().all():
        raise FidelityError("the simulator and end-to-end results share no (model, task, length, policy, params, "
                            "budget rule, sparsity): run both on the same tasks, lengths and configurations")
    return both


def _spearman(x: pd.Series, y: pd.Series) -> tuple[float, float]:
    if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
        return math.nan, math.nan
    result = spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def fidelity(joined: pd.DataFrame, include_dense: bool = False) -> pd.DataFrame:
    """Per (model, task, length) and phase (all, prefill, decode): Spearman correlation across configurations of
    simulated mean recall with task score (``rho_recall``), of mean output error with task score (``rho_error``,
    expected negative) and of the weak heads' recall (``rho_recall_p10``) with task score.

    Sparsity-0 configurations are left out unless ``include_dense``: every policy is dense there, so they
    would add ties that say nothing about the sparse methods; their mean score is reported as ``dense_score``.
    """
    rows = []
    for group, frame in joined.groupby(GROUP):
        dense = frame[frame["sparsity"] == 0]
        sparse = (frame if include_dense else frame[frame["sparsity"] > 0]).dropna(subset=["recall"])
        for phase in ("all", "prefill", "decode"):
            part = sparse if phase == "all" else sparse[sparse["phase"] == phase]
            if part.empty:
                continue
            rho, p = _spearman(part["recall"], part["score"])
            rho_err, p_err = _spearman(part["output_error"], part["score"])
            rho_p10, _ = _spearman(part["recall_p10"], part["score"])
            rows.append({**dict(zip(GROUP, group, strict=True)), "phase": phase, "configs": len(part),
                         "samples": int(part["samples"].min()), "traces": int(part["traces"].min()),
                         "rho_recall": rho, "p_recall": p, "rho_error": rho_err, "p_error": p_err,
                         "rho_recall_p10": rho_p10,
                         "score_range": float(part["score"].max() - part["score"].min()),
                         "dense_score": float(dense["score"].mean()) if len(dense) else math.nan})
    return pd.DataFrame(rows)


def disagreements(joined: pd.DataFrame, top: int = 5, include_dense: bool = False) -> pd.DataFrame:
    """Per (model, task, length), the ``top`` configurations whose recall rank and score rank differ most.

    ``gap`` = percentile rank of recall - percentile rank of score: positive where the simulator rates a
    configuration better than the task score does, negative where it rates it worse.
    """
    frame = (joined if include_dense else joined[joined["sparsity"] > 0]).dropna(subset=["recall"])
    out = []
    for _, group in frame.groupby(GROUP):
        group = group.assign(recall_rank=group["recall"].rank(pct=True), score_rank=group["score"].rank(pct=True))
        group["gap"] = group["recall_rank"] - group["score_rank"]
        out.append(group.reindex(group["gap"].abs().sort_values(ascending=False).index).head(top))
    if not out:
        return pd.DataFrame(columns=[*KEY, "recall", "score", "gap"])
    return pd.concat(out, ignore_index=True)[[*KEY, "phase", "recall", "output_error", "score", "samples",
                                              "recall_rank", "score_rank", "gap"]]
