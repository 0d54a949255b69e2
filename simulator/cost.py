"""The paper's cost model (Sparse Frontier, Appendix B.1) with each method's index overhead.

Prefill cost is FLOPs of the whole model for one prompt of L tokens; decode cost is memory read per
generated token (weights plus the KV cache it reads), counted in elements by the paper and reported here
in bytes (``bytes_per_element``, 2 for bf16). ``rho`` is the kept fraction (realised density).

Index overheads: the paper gives Vertical-Slash's (prefill FLOPs) and Quest's (decode memory, page min/max).
For the others we make and state these choices:

* FlexPrefill: Vertical-Slash's formula with its own window and counts (the same estimation).
* Block-Sparse: mean-pooling q and k (2 L d per head), block scores for the causal half of the
  (L/c) x (L/c) pooled matrix (2 d each) and sorting each query block's scores ((L/c) log2(L/c) each).
* SnapKV / Ada-SnapKV: a prefill overhead: the window's scores against all keys (2 d L w), their softmax
  (3 L w) and pooling (kernel k per score: k L). Decoding reads only the kept cache (rho), no index.
* Oracles, dense, sink + local: none (oracles are ideal references, not implementable methods).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sparse_frontier.policies.selection import Selection, VerticalSlash


@dataclass(frozen=True)
class ModelShape:
    """The model sizes the cost model needs (N layers, d_model, d_mlp, |V|, h = Hq, n_kv = Hkv, d)."""

    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def from_attrs(cls, model: Mapping) -> ModelShape | None:
        """From a trace's model attributes; None when any size is missing."""
        keys = {"n_layers": "n_layers", "d_model": "d_model", "d_mlp": "d_mlp", "vocab_size": "vocab_size",
                "n_heads": "n_q_heads", "n_kv_heads": "n_kv_heads", "head_dim": "head_dim"}
        try:
            return cls(**{field: int(model[key]) for field, key in keys.items()})
        except (KeyError, TypeError, ValueError):
            return None


def prefill_flops(m: ModelShape, length: int, rho: float = 1.0, index: float = 0.0, batch: int = 1) -> float:
    """FLOPs of prefilling ``length`` tokens with kept attention fraction ``rho`` plus ``index`` overhead."""
    L, N, dm, d = float(length), m.n_layers, m.d_model, m.head_dim
    h, n_kv = m.n_heads, m.n_kv_heads
    f_attn = N * (2 * L * dm * (dm + 2 * d * n_kv + dm)
                  + rho * (2 * h * L**2 * d + 3 * h * L**2 + 2 * h * L**2 * d))
    f_mlp = N * (6 * L * dm * m.d_mlp + 2 * L * m.d_mlp)
    return batch * (2 * L * dm + f_attn + f_mlp + 2 * L * dm * m.vocab_size) + index


def decode_bytes(m: ModelShape, length: int, rho: float = 1.0, index: float = 0.0, batch: int = 1,
                 bytes_per_element: int = 2) -> float:
    """Bytes read per decode step with ``length`` keys in cache, kept fraction ``rho``, plus ``index`` bytes."""
    N, dm = m.n_layers, m.d_model
    weights = N * (4 * dm**2 + 3 * dm * m.d_mlp) + dm * m.vocab_size + dm
    cache = batch * N * 2 * length * m.head_dim * m.n_kv_heads * rho
    return bytes_per_element * (weights + cache) + index


def _vs_counts(selection: Selection | None) -> tuple[float, float]:
    """Mean vertical and slash counts per head of a VerticalSlash selection."""
    if not isinstance(selection, VerticalSlash) or not selection.columns:
        return 0.0, 0.0
    heads = len(selection.columns)
    return (sum(len(c) for c in selection.columns) / heads, sum(len(o) for o in selection.offsets) / heads)


def vertical_slash_index(m: ModelShape, length: int, window: int, k_v: float, k_s: float, batch: int = 1) -> float:
    """Vertical-Slash estimation FLOPs: B N h [2 d L q + 3 L q + 2 L q + 2 L log2 L + (L/64)(k_v + k_s)]."""
    L, q = float(length), float(min(window, length))
    per_head = 2 * m.head_dim * L * q + 3 * L * q + 2 * L * q + 2 * L * math.log2(max(L, 2)) + L / 64 * (k_v + k_s)
    return batch * m.n_layers * m.n_heads * per_head


def block_sparse_index(m: ModelShape, length: int, chunk: int, batch: int = 1) -> float:
    """Block-Sparse estimation FLOPs (our choice, see the module docstring)."""
    L, n = float(length), max(float(length) / chunk, 1.0)
    per_head = 2 * L * m.head_dim + n * n * m.head_dim + n * n * math.log2(max(n, 2))
    return batch * m.n_layers * m.n_heads * per_head


def snapkv_index(m: ModelShape, length: int, window: int, kernel: int, batch: int = 1) -> float:
    """SnapKV scoring FLOPs at the end of prefill (our choice, see the module docstring)."""
    L, w = float(length), float(min(window, length))
    return batch * m.n_layers * m.n_heads * (2 * m.head_dim * L * w + 3 * L * w + kernel * L)


def quest_index_bytes(m: ModelShape, length: int, page: int, batch: int = 1, bytes_per_element: int = 2) -> float:
    """Quest's page min/max read per decode step: B N n_kv 2 d L / p elements."""
    return bytes_per_element * batch * m.n_layers * m.n_kv_heads * 2 * m.head_dim * length / page


Overhead = Callable[[ModelShape, int, Mapping, Selection | None, int], float]

PREFILL_INDEX: dict[str, Overhead] = {
    "vertical_slash": lambda m, L, p, sel, B: vertical_slash_index(m, L, p.get("window", 256), *_vs_counts(sel), B),
    "flexprefill": lambda m, L, p, sel, B: vertical_slash_index(m, L, p.get("window", 512), *_vs_counts(sel), B),
    "block_sparse": lambda m, L, p, sel, B: block_sparse_index(m, L, p.get("chunk_size", 16), B),
    "snapkv": lambda m, L, p, sel, B: snapkv_index(m, L, p.get("window", 256), p.get("pool", 21), B),
    "ada_snapkv": lambda m, L, p, sel, B: snapkv_index(m, L, p.get("window", 256), p.get("pool", 21), B),
}
DECODE_INDEX_BYTES: dict[str, Callable[[ModelShape, int, Mapping, int, int], float]] = {
    "quest": lambda m, L, p, B, e: quest_index_bytes(m, L, p.get("page_size", 16), B, e),
}


def entry_cost(m: ModelShape | None, policy: str, phase: str, params: Mapping, selection: Selection | None,
               density: float, prompt_len: int, cache_len: int, batch: int = 1,
               bytes_per_element: int = 2) -> tuple[float, float]:
    """(prefill FLOPs, decode bytes per step) of running ``policy`` at realised ``density``; NaN without sizes.

    A prefill method sparsifies the prompt's attention and decodes densely over ``cache_len`` keys;
    a decode method prefills densely (plus its index) and reads ``density`` of the cache per step.
    """
    if m is None:
        return math.nan, math.nan
    index = PREFILL_INDEX.get(policy, lambda *_: 0.0)(m, prompt_len, params, selection, batch)
    if phase == "prefill":
        return prefill_flops(m, prompt_len, density, index, batch), decode_bytes(m, cache_len, 1.0, 0.0, batch,
                                                                                  bytes_per_element)
    step = DECODE_INDEX_BYTES.get(policy, lambda *_: 0.0)(m, cache_len, params, batch, bytes_per_element)
    return (prefill_flops(m, prompt_len, 1.0, index, batch),
            decode_bytes(m, cache_len, density, step, batch, bytes_per_element))
