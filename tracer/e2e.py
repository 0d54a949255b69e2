"""End-to-end runs: a model generating with a sparse-attention policy applied inside its attention layers.

The runner registers one attention function in transformers' attention-function registry (the mechanism
trace capture uses) and owns the KV cache itself: the model runs with ``use_cache=False`` and the function
appends each call's keys and values. For every layer it builds a :class:`LayerView` from the live q/k/v
(after RoPE and any q/k norm: exactly what the attention function receives), asks the policy for a
Selection and computes attention over exactly that Selection's cells (:func:`attend`: the Triton kernels
of ``kernels.run_selection`` on GPU; torch's SDPA over the Selection's mask on CPU). The Selection is the
same object the simulator scores.

Semantics, as the Sparse Frontier paper ran the methods:

* a prefill policy makes the prompt's attention sparse; decoding is dense over the whole cache;
* a decode policy prefills densely; at the first decode step it is shown the prompt and the step, and
  - if it returns :class:`KeptKeys` (eviction), the evicted prompt keys are dropped from the cache once;
    new tokens are appended, never evicted, and decoding is dense over what is left;
  - otherwise (Quest's :class:`PageSet`, a :class:`TokenSet`, ...) it selects again at every step from the
    full cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_frontier.kernels import run_selection
from sparse_frontier.kernels.reference import first_visible, visible
from sparse_frontier.policies.base import Budget, BudgetRule, LayerView, Policy
from sparse_frontier.policies.selection import Dense, KeptKeys, Selection, TokenSet, expand_heads

ATTENTION_NAME = "sparse_frontier_e2e"
ROW_CHUNK = 512  # prefill rows per CPU attention call (bounds the [H, rows, keys] mask)


def _grow(x: Tensor, cap: int) -> Tensor:
    """``x [H, n, ...]`` copied into a buffer with ``cap`` slots along dim 1."""
    out = x.new_zeros(x.shape[0], cap, *x.shape[2:])
    out[:, : x.shape[1]] = x
    return out


@dataclass
class LayerCache:
    """The keys and values one layer attends to: ``k``/``v [H, capacity, d]`` of which ``length`` are filled.

    ``positions [H, capacity]`` are the absolute positions of the cached keys (after eviction they differ per
    head); ``valid [H, capacity]`` marks real entries (heads that kept fewer keys than others are padded).
    ``q [Hq, capacity, d]`` holds the queries seen so far while a decode policy may still need them.
    """

    k: Tensor
    v: Tensor
    positions: Tensor
    valid: Tensor
    length: int
    q: Tensor | None = None
    evicted: bool = False

    @classmethod
    def from_prompt(cls, q: Tensor | None, k: Tensor, v: Tensor, extra: int) -> LayerCache:
        """A cache holding the prompt's keys/values (and queries, when given) with room for ``extra`` more."""
        heads, n, _ = k.shape
        cap = n + extra
        positions = torch.arange(cap, device=k.device).expand(heads, -1).clone()
        valid = torch.zeros(heads, cap, dtype=torch.bool, device=k.device)
        valid[:, :n] = True
        return cls(_grow(k, cap), _grow(v, cap), positions, valid, n, None if q is None else _grow(q, cap))

    def clone(self) -> LayerCache:
        """An independent copy (forking a run after a shared prefill)."""
        return replace(self, k=self.k.clone(), v=self.v.clone(), positions=self.positions.clone(),
                       valid=self.valid.clone(), q=None if self.q is None else self.q.clone())

    def append(self, q: Tensor, k: Tensor, v: Tensor, position: int) -> None:
        """Append one decoded token's key/value (and query) at absolute position ``position``."""
        if self.length == self.k.shape[1]:
            raise RuntimeError("KV cache is full: the run decoded more tokens than it was sized for")
        if self.k.shape[0] != k.shape[0]:  # cache expanded to query heads by a per-query-head eviction
            k, v = expand_heads(k, self.k.shape[0]), expand_heads(v, self.k.shape[0])
        i = self.length
        self.k[:, i], self.v[:, i] = k[:, 0], v[:, 0]
        self.positions[:, i] = position
        self.valid[:, i] = True
        if self.q is not None:
            self.q[:, i] = q[:, 0]
        self.length += 1

    def evict(self, kept: Tensor) -> None:
        """Drop the prompt keys not in ``kept [H, prefill_len]`` (H = KV heads or query heads); keep the rest."""
        heads, n_prompt = kept.shape
        k, v = self.k[:, : self.length], self.v[:, : self.length]
        if heads != k.shape[0]:
            k, v = expand_heads(k, heads), expand_heads(v, heads)
        keep = torch.ones(heads, self.length, dtype=torch.bool, device=k.device)
        keep[:, :n_prompt] = kept.to(k.device).bool()
        counts = keep.sum(dim=1)
        width = int(counts.max())
        cap = width + (self.k.shape[1] - self.length)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept first, in order
        self.k = _grow(torch.gather(k, 1, order[..., None].expand(-1, -1, k.shape[2])), cap)
        self.v = _grow(torch.gather(v, 1, order[..., None].expand(-1, -1, v.shape[2])), cap)
        self.positions = _grow(order, cap)
        self.valid = torch.zeros(heads, cap, dtype=torch.bool, device=k.device)
        self.valid[:, :width] = torch.arange(width, device=k.device)[None, :] < counts[:, None]
        self.length = width
        self.q = None
        self.evicted = True

    def kept_positions(self, head: int) -> Tensor:
        """Absolute positions of the keys head ``head`` holds, in cache order."""
        return self.positions[head, : self.length][self.valid[head, : self.length]]


def attend(selection: Selection, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, scale: float,
           softcap: float | None = None, window: int | None = None) -> tuple[Tensor, int, str]:
    """Attention [Hq, R, d] of q at ``rows`` over the cells of ``selection``, the number of cells computed, and the
    backend that ran ("triton" or "torch").

    On GPU one call to ``kernels.run_selection`` (the Triton kernel the Selection names; the torch reference for a
    Selection no kernel runs as it stands, such as 16-token blocks). On CPU the Selection's
    mask (causal and sliding window applied) is computed with torch's fused SDPA, ``ROW_CHUNK`` rows at a time over
    the keys those rows can see (from the first row's window on);
    layers with a logit soft-cap, which SDPA lacks, go through the torch reference of ``kernels/reference``.
    """
    if q.is_cuda:
        run = run_selection(selection, q, k, v, rows, scale, softcap, window, count=True)
        return run.out, int(run.cells.sum()), run.backend
    n_q = q.shape[0]
    dense = isinstance(selection, Dense)
    if dense and not window and not softcap and (len(rows) == 1 or bool((rows == torch.arange(len(rows))).all())):
        # every causal cell: a prompt from position 0, or one decode step over all its keys
        n = int(rows[-1]) + 1
        out = F.scaled_dot_product_attention(q[None], k[None, :, :n], v[None, :, :n], is_causal=len(rows) > 1,
                                             scale=scale, enable_gqa=True)[0]  # 4-D: SDPA's fused CPU kernel
        return out, n_q * _visible_cells(rows, n, None), "torch"
    outs, cells = [], 0
    for start in range(0, len(rows), ROW_CHUNK):
        part = rows[start : start + ROW_CHUNK]
        n = int(part[-1]) + 1  # keys past the chunk's last row are causally invisible
        qs = q[:, start : start + len(part)]
        if softcap:
            run = run_selection(selection, qs, k[:, :n], v[:, :n], part, scale, softcap, window, backend="torch",
                                count=True)
            outs.append(run.out)
            cells += int(run.cells.sum())
            continue
        lo = first_visible(part[0], window)  # keys before the first row's window: invisible
        allowed = visible(part - lo, n - lo, window)[None].expand(n_q, -1, -1)  # keys lo..n-1 (visibility: j - row)
        if not dense:
            allowed = allowed & expand_heads(selection.mask(part, n)[..., lo:], n_q)
        out = F.scaled_dot_product_attention(qs[None], k[None, :, lo:n], v[None, :, lo:n], attn_mask=allowed[None],
                                             scale=scale, enable_gqa=True)[0]
        outs.append(out.nan_to_num(0.0))  # a row with no cell selected outputs zeros, as the reference does
        cells += int(allowed.sum())
    return torch.cat(outs, dim=1), cells, "torch"


def _visible_cells(rows: Tensor, n_keys: int, window: int | None) -> int:
    """Causal (and in-window) cells of ``rows`` over ``n_keys`` keys, for one head."""
    total = 0
    for start in range(0, len(rows), ROW_CHUNK):
        total += int(visible(rows[start : start + ROW_CHUNK], n_keys, window).sum())
    return total


@dataclass
class RunStats:
    """Cells computed vs. visible cells (per query head) where the policy applied: the realised sparsity; and
    the backends that computed them."""

    computed: int = 0
    total: int = 0
    backends: set[str] = field(default_factory=set)

    @property
    def realised_sparsity(self) -> float:
        return 1.0 - self.computed / self.total if self.total else 0.0


@dataclass
class SparseRun:
    """One sequence run: the policy, its budget rule and sparsity, the per-layer caches and statistics.

    ``layers`` restricts the policy to those model layers (None = every layer); the others run densely.
    ``capacity`` is how many tokens the cache may grow by after the prompt.
    """

    policy: Policy | None
    rule: BudgetRule | None
    sparsity: float
    capacity: int
    layers: set[int] | None = None
    keep_queries: bool = False
    caches: dict[int, LayerCache] = field(default_factory=dict)
    budgets: dict[int, Budget] = field(default_factory=dict)
    stats: RunStats = field(default_factory=RunStats)
    prompt_len: int = 0

    @property
    def phase(self) -> str | None:
        return None if self.policy is None else self.policy.phase

    def applies(self, layer: int, phase: str) -> bool:
        """Whether the policy runs in this layer during this phase."""
        return self.phase == phase and (self.layers is None or layer in self.layers)

    def fork(self, policy: Policy | None, rule: BudgetRule | None, sparsity: float,
             layers: set[int] | None = None) -> SparseRun:
        """A run that continues from this run's (dense) prefill with another decode policy."""
        if self.phase == "prefill" or any(c.length != self.prompt_len for c in self.caches.values()):
            raise ValueError("only a run stopped right after a dense prefill can be forked")
        if policy is not None and policy.phase != "decode":
            raise ValueError(f"policy {policy.name!r} is a prefill policy: it cannot continue a dense prefill")
        caches = {layer: cache.clone() for layer, cache in self.caches.items()}
        if policy is not None and any(c.q is None for c in caches.values()):
            raise ValueError("the shared prefill kept no queries: run it with keep_queries=True")
        return SparseRun(policy, rule, sparsity, self.capacity, layers, caches=caches, prompt_len=self.prompt_len)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, scale: float,
               softcap: float | None, window: int | None) -> Tensor:
        """Attention output [Hq, Tq, d] of one layer call: q [Hq, Tq, d] and this call's k/v [Hkv, Tq, d]."""
        cache = self.caches.get(layer)
        if cache is None:
            if int(positions[0]) != 0:
                raise ValueError("the first call of a run must be the whole prompt, from position 0")
            return self._prefill(layer, q, k, v, scale, softcap, window)
        if q.shape[1] != 1:
            raise ValueError("decode steps feed one token at a time")
        return self._decode(layer, cache, q, k, v, int(positions[-1]), scale, softcap, window)

    def _prefill(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float | None,
                 window: int | None) -> Tensor:
        n = q.shape[1]
        self.prompt_len = n
        rows = torch.arange(n, device=q.device)
        keep_q = self.keep_queries or self.applies(layer, "decode")
        self.caches[layer] = LayerCache.from_prompt(q if keep_q else None, k, v, self.capacity)
        if not self.applies(layer, "prefill"):
            return attend(Dense(q.shape[0]), q, k, v, rows, scale, softcap, window)[0]
        view = LayerView(q=q, k=k, v=v, q_positions=rows, prefill_len=n, scale=scale, rows=rows,
                         softcap=softcap, sliding_window=window, layer=layer)
        selection = self.policy.select(view, self._budget(layer, view))
        out, cells, backend = attend(selection, q, k, v, rows, scale, softcap, window)
        self._count(cells, _visible_cells(rows, n, window), q.shape[0], backend)
        return out

    def _decode(self, layer: int, cache: LayerCache, q: Tensor, k: Tensor, v: Tensor, position: int,
                scale: float, softcap: float | None, window: int | None) -> Tensor:
        cache.append(q, k, v, position)
        rows = torch.tensor([position], device=q.device)
        n = cache.length
        if cache.evicted:
            return self._compacted(cache, q, position, scale, softcap, window)
        if not self.applies(layer, "decode"):
            return attend(Dense(q.shape[0]), q, cache.k[:, :n], cache.v[:, :n], rows, scale, softcap, window)[0]
        view = LayerView(q=cache.q[:, :n], k=cache.k[:, :n], v=cache.v[:, :n],
                         q_positions=torch.arange(n, device=q.device), prefill_len=self.prompt_len, scale=scale,
                         rows=rows, softcap=softcap, sliding_window=window, layer=layer)
        selection = self.policy.select(view, self._budget(layer, view))
        if isinstance(selection, KeptKeys):
            cache.evict(selection.kept[:, : self.prompt_len])
            return self._compacted(cache, q, position, scale, softcap, window)
        out, cells, backend = attend(selection, q, cache.k[:, :n], cache.v[:, :n], rows, scale, softcap, window)
        self._count(cells, _visible_cells(rows, n, window), q.shape[0], backend)
        return out

    def _compacted(self, cache: LayerCache, q: Tensor, position: int, scale: float, softcap: float | None,
                   window: int | None) -> Tensor:
        """Dense decode over an evicted cache: every held key, within the sliding window when there is one.

        The held keys are given to the kernel as a TokenSet over the compacted cache, with the query at its
        last index: every held key is at or before the query, so causality holds by construction.
        """
        n = cache.length
        held = cache.valid[:, :n]
        if window:
            held = held & (cache.positions[:, :n] > position - window)
        index = torch.where(held, torch.arange(n, device=q.device), -1)[:, None, :]
        last = torch.tensor([n - 1], device=q.device)
        out, cells, backend = attend(TokenSet(last, index), q, cache.k[:, :n], cache.v[:, :n], last, scale, softcap)
        self._count(cells, _visible_cells(torch.tensor([position]), position + 1, window), q.shape[0], backend)
        return out

    def _budget(self, layer: int, view: LayerView) -> Budget:
        """The layer's budget, decided once (at prefill for prefill policies, at the first decode step else)."""
        if layer not in self.budgets:
            self.budgets[layer] = self.rule.budget(view, self.sparsity)
        return self.budgets[layer]

    def _count(self, cells: int, visible_per_head: int, n_q_heads: int, backend: str) -> None:
        self.stats.computed += cells
        self.stats.total += visible_per_head * n_q_heads
        self.stats.backends.add(backend)


def sparse_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling: float,
                     dropout: float = 0.0, sparse_run: SparseRun | None = None, **kwargs):
    """The registered attention function: batch 1, the run's own cache, the run's policy."""
    if sparse_run is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} needs a SparseRun: run the model through "
                           "sparse_frontier.tracer.e2e")
    if query.shape[0] != 1:
        raise ValueError("end-to-end runs are batch size 1")
    positions = kwargs.get("position_ids")
    if positions is None:
        raise ValueError("end-to-end runs pass position_ids explicitly")
    softcap = kwargs.get("softcap", getattr(module, "attn_logit_softcapping", None))
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    out = sparse_run.attend(module.layer_idx, query[0], key[0], value[0], positions.reshape(-1), scaling, softcap,
                            window)
    return out.to(query.dtype).transpose(0, 1)[None].contiguous(), None


@contextmanager
def installed(model):
    """Within the block the model's attention runs through :func:`sparse_attention`; restored after."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, sparse_attention)
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


@dataclass
class Generation:
    """What one run produced: the new tokens, per-step logits (when kept) and the run's state."""

    tokens: list[int]
    run: SparseRun
    logits: list[Tensor] = field(default_factory=list)


def _forward(model, run: SparseRun, tokens: Tensor, start: int) -> Tensor:
    """Logits of the last of ``tokens`` (fed at positions ``start``...) through the run's attention."""
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
    return model(input_ids=tokens, position_ids=positions, use_cache=False, logits_to_keep=1,
                 sparse_run=run).logits[0, -1]


@torch.inference_mode()
def prefill(model, input_ids, run: SparseRun) -> Tensor:
    """Run the prompt through the model under ``run``; the logits predicting the first new token."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, device=device).reshape(1, -1)
    with installed(model):
        return _forward(model, run, ids, 0)


@torch.inference_mode()
def decode(model, run: SparseRun, logits: Tensor, max_new_tokens: int,
           stop: Callable[[list[int]], bool] | None = None, keep_logits: bool = False,
           forced: list[int] | None = None) -> Generation:
    """Greedy decoding after :func:`prefill` until ``stop(tokens)`` holds or ``max_new_tokens`` are made.

    ``forced`` teacher-forces the given continuation instead of the model's choices (for comparisons).
    """
    device = next(model.parameters()).device
    steps = len(forced) if forced is not None else max_new_tokens
    out = Generation([], run)
    with installed(model):
        for step in range(steps):
            if keep_logits:
                out.logits.append(logits.float().cpu())
            token = forced[step] if forced is not None else int(logits.argmax())
            out.tokens.append(token)
            if step == steps - 1 or (forced is None and stop is not None and stop(out.tokens)):
                break
            logits = _forward(model, run, torch.tensor([[token]], device=device), run.prompt_len + step)
    return out


def generate(model, input_ids, policy: Policy | None, rule: BudgetRule | None, sparsity: float,
             max_new_tokens: int, stop: Callable[[list[int]], bool] | None = None, layers: set[int] | None = None,
             keep_logits: bool = False, forced: list[int] | None = None) -> Generation:
    """Greedy generation from ``input_ids`` with ``policy`` applied (None = dense): prefill, then decode."""
    steps = len(forced) if forced is not None else max_new_tokens
    run = SparseRun(policy, rule, sparsity, capacity=max(steps, 1), layers=layers)
    logits = prefill(model, input_ids, run)
    return decode(model, run, logits, max_new_tokens, stop, keep_logits, forced)


# --- task evaluation ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One end-to-end configuration: a policy and a budget rule, each ``name`` or ``name[key=value;...]`` (the
    simulator's spelling), and a sparsity."""

    policy: str
    sparsity: float
    budget_rule: str = "uniform"

    def build(self) -> tuple[Policy, BudgetRule]:
        """Fresh policy and budget rule instances (policies may cache per-view estimates)."""
        from sparse_frontier.policies.budget import check_sparsity
        from sparse_frontier.policies.registry import get_budget_rule, get_policy
        from sparse_frontier.simulator.sweep import Spec

        check_sparsity(self.sparsity)
        policy, rule = Spec.parse(self.policy), Spec.parse(self.budget_rule)
        return get_policy(policy.name, **policy.params), get_budget_rule(rule.name, **rule.params)

    @property
    def rule_label(self) -> str:
        """The budget rule as the simulator's results name it."""
        from sparse_frontier.simulator.sweep import Spec

        return Spec.parse(self.budget_rule).label


def params_json(policy: Policy) -> str:
    """The policy's effective parameters (defaults included) as sorted JSON: the results' ``params`` column."""
    params = policy.params
    values = asdict(params) if is_dataclass(params) else dict(vars(params) if params is not None else {})
    return json.dumps(values, sort_keys=True, default=str)


def _jsonable(x) -> str:
    return x if isinstance(x, str) else json.dumps(x)


def stopper(instance, decode_text: Callable[[list[int]], str], eos_ids: set[int]) -> Callable[[list[int]], bool]:
    """Stop at an end-of-sequence token or once the reply contains one of the task's stop strings."""
    def stop(tokens: list[int]) -> bool:
        if tokens[-1] in eos_ids:
            return True
        return bool(instance.stop) and any(s in decode_text(tokens) for s in instance.stop)

    return stop


def run_sample(backend, instance, configs: list[Config], on_config: Callable[[], None] | None = None,
               layers: set[int] | None = None, max_new_tokens: int | None = None) -> list[dict]:
    """Every configuration on one task sample; one record each (score, answer, realised sparsity, ...).

    ``backend`` is a :class:`~sparse_frontier.tracer.capture.TransformersBackend` (model, tokenizer, EOS ids).
    Decode policies prefill densely, so their configurations continue from one shared dense prefill.
    ``max_new_tokens`` caps the task's answer budget.
    """
    net = backend.net
    stop = stopper(instance, backend.decode, backend.eos_ids)
    budget = min(instance.max_new_tokens, max_new_tokens or instance.max_new_tokens)
    shared: tuple[SparseRun, Tensor] | None = None
    records = []
    for config in configs:
        policy, rule = config.build()
        start = time.perf_counter()
        if policy.phase == "decode":
            if shared is None:
                base = SparseRun(None, None, 0.0, capacity=budget, keep_queries=True)
                shared = (base, prefill(net, instance.input_ids, base))
            gen = decode(net, shared[0].fork(policy, rule, config.sparsity, layers), shared[1], budget, stop)
        else:
            gen = generate(net, instance.input_ids, policy, rule, config.sparsity, budget, stop, layers)
        text = backend.decode(gen.tokens)
        records.append({
            "model": backend.model_name, "task": instance.name, "length": instance.length, "seed": instance.seed,
            "policy": policy.name,
            "phase": policy.phase, "params": params_json(policy), "budget_rule": config.rule_label,
            "sparsity": float(config.sparsity), "score": float(instance.score(text)),
            "answer": _jsonable(instance.extract(text)), "reference": _jsonable(instance.reference),
            "realised_sparsity": gen.run.stats.realised_sparsity, "backend": "+".join(sorted(gen.run.stats.backends)),
            "n_prompt": len(instance.input_ids),
            "n_generated": len(gen.tokens), "output": text, "seconds": time.perf_counter() - start,
        })
        if on_config:
            on_config()
    return records


def part_path(out: str | Path, model: str, task: str, length: int, seed: int, configs: list[Config],
              task_params: dict | None = None, max_new_tokens: int | None = None) -> Path:
    """Where the records of one sample of a sweep go: ``OUT/e2e/<model>__<task>__<length>__seed<k>__<hash>.parquet``.

    The hash names the configuration list, task parameters and answer cap, so a rerun of the same sweep skips finished
    samples and a different sweep writes beside it.
    """
    key = json.dumps([[asdict(c) for c in configs], task_params or {}, max_new_tokens], sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name)
    return Path(out) / "e2e" / f"{name}__{task}__{length}__seed{seed}__{digest}.parquet"


def sweep(backend, task: str, length: int, configs: list[Config], samples: int, seed: int = 0,
          task_params: dict | None = None, out: str | Path | None = None,
          on_config: Callable[[], None] | None = None, max_new_tokens: int | None = None) -> pd.DataFrame:
    """Every configuration on ``samples`` task samples (seeds ``seed``, ``seed + 1``, ...); one row per pair.

    With ``out``, each sample's rows are written to :func:`part_path` as it finishes and an existing part
    is read instead of recomputed.
    """
    from .tasks import make_task

    frames = []
    for s in range(seed, seed + samples):
        path = None if out is None else part_path(out, backend.model_name, task, length, s, configs, task_params,
                                                  max_new_tokens)
        if path is not None and path.exists():
            frames.append(pd.read_parquet(path))
            if on_config:
                for _ in configs:
                    on_config()
            continue
        instance = make_task(task, backend.tokenizer, length, s, **(task_params or {}))
        budget = min(instance.max_new_tokens, max_new_tokens or instance.max_new_tokens)
        if len(instance.input_ids) + budget > backend.max_context:
            raise ValueError(f"{len(instance.input_ids)} prompt tokens + {budget} new exceed the "
                             f"context of {backend.model_name} ({backend.max_context} tokens)")
        frame = pd.DataFrame(run_sample(backend, instance, configs, on_config, max_new_tokens=max_new_tokens))
        frame["task_params"] = json.dumps(task_params or {}, sort_keys=True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            frame.to_parquet(tmp, index=False)
            tmp.replace(path)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
