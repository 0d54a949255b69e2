"""Trace capture: run a model over a prompt (and optionally greedy decoding) and stream what every
attention layer saw into a trace store.

A capture backend runs the model and reports, per layer, blocks of post-RoPE queries (at the kept query
positions) and the keys/values of the new sequence positions. :class:`TransformersBackend` does this
through transformers' attention-function registry: it registers a function that records q/k/v exactly as
the model's attention receives them (after q/k norms and RoPE) and then calls the model's own attention.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import inspect
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .models import BUILTIN_MODELS, resolve_model
from .store import STORAGE_DTYPES, TraceWriter, storage_itemsize

QUERY_POSITIONS_HELP = "all | last:N | strided:S+last:N (prompt positions; generated steps are always kept)"

# on_block(model_layer, q [Hq, n_q, d], k [Hkv, n, d], v [Hkv, n, d], start, q_start)
OnBlock = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int, int], None]


class CaptureError(ValueError):
    """A capture that cannot run as asked (bad option, too long, no room on disk)."""


def query_positions(spec: str, n: int) -> np.ndarray:
    """The prompt positions (of ``n``) whose queries are kept, from a spec: all, last:N, strided:S+last:N."""
    spec = spec.strip()
    if spec == "all":
        return np.arange(n)
    keep = np.zeros(n, dtype=bool)
    for part in spec.split("+"):
        match = re.fullmatch(r"(last|strided):(\d+)", part.strip())
        if not match or int(match.group(2)) < 1:
            raise CaptureError(f"query positions {spec!r}: expected {QUERY_POSITIONS_HELP}")
        kind, value = match.group(1), int(match.group(2))
        if kind == "last":
            keep[max(0, n - value):] = True
        else:
            keep[::value] = True
    return np.flatnonzero(keep)


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """Model layers to capture from 'all' or a list such as '0,3,10-12'."""
    if spec is None or spec.strip() == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise CaptureError(f"layers {spec!r}: expected 'all' or a list such as 0,3,10-12")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) else lo
        if hi < lo or hi >= n_layers:
            raise CaptureError(f"layers {spec!r}: the model has layers 0-{n_layers - 1}")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def estimate_bytes(*, n_layers: int, n_q_heads: int, n_kv_heads: int, head_dim: int, n_tokens: int,
                   n_queries: int, dtype: str, with_values: bool) -> int:
    """Uncompressed size of a store's q/k/v (compression saves ~15-25% on real traces: an upper bound)."""
    per_layer = (n_q_heads * n_queries + n_kv_heads * n_tokens * (2 if with_values else 1)) * head_dim
    return n_layers * per_layer * storage_itemsize(dtype)


def _local_path(url: str) -> Path | None:
    """The local path of a store URL, or None for other fsspec file systems."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url:
        return None
    return Path(url).expanduser()


def check_output(url: str, overwrite: bool = False) -> None:
    """Refuse an output path that exists (unless ``overwrite``) or whose folder cannot be written."""
    path = _local_path(url)
    if path is None:
        return
    if path.exists() and not overwrite:
        raise CaptureError(f"{url} already exists (give --overwrite to replace it)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CaptureError(f"cannot write {url}: {parent} is not a writable folder")


def check_disk(url: str, needed: int) -> None:
    """Refuse a capture whose store (about ``needed`` bytes) would not fit the free disk."""
    path = _local_path(url)
    if path is None:
        return
    existing = path
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise CaptureError(f"the trace needs about {needed / 1e9:.2f} GB but {existing} has only "
                           f"{free / 1e9:.2f} GB free: capture fewer layers (--layers), fewer query "
                           f"positions (--query-positions), --no-values or a shorter prompt")


class CaptureBackend(Protocol):
    """Runs a model over a prompt and reports what each attention layer saw."""

    name: str
    max_context: int

    def describe(self) -> dict[str, Any]:
        """The model attributes of a trace store (DESIGN.md)."""
        ...

    def run(self, input_ids: list[int], *, layers: list[int], q_index: np.ndarray, generate: int,
            on_block: OnBlock, on_step: Callable[[], None] | None = None,
            stop: list[str] | None = None) -> tuple[list[int], dict[str, Any]]:
        """Prefill ``input_ids`` then greedy-decode up to ``generate`` tokens (ending early at end-of-sequence
        or once the reply contains a ``stop`` string), reporting each captured layer's blocks to ``on_block``;
        returns the generated ids and what the attention actually used (``softmax_scale``,
        ``attn_logit_softcapping``, ``layer_types``, ``sliding_window``)."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""
        ...


class _Recorder:
    """Receives every attention call of one run; forwards captured layers' blocks, buffers decode steps."""

    def __init__(self, layers: list[int], q_index: torch.Tensor, generate: int, on_block: OnBlock):
        self.layers = set(layers)
        self.q_index = q_index
        self.generate = generate
        self.on_block = on_block
        self.step = -1  # -1: prefill; then the decode step
        self.scales: dict[int, float] = {}
        self.softcaps: dict[int, float | None] = {}
        self.windows: dict[int, int | None] = {}
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 kwargs: dict[str, Any]) -> None:
        if query.shape[0] != 1:
            raise CaptureError("capture runs one sequence at a time (batch size 1)")
        scale = kwargs.get("scaling")
        self.scales[layer] = float(query.shape[-1] ** -0.5 if scale is None else scale)
        self.softcaps[layer] = kwargs.get("softcap")
        self.windows[layer] = kwargs.get("sliding_window")
        if layer not in self.layers:
            return
        n = query.shape[2]
        q, k, v = query[0], key[0, :, -n:], value[0, :, -n:]  # the cache may hold earlier keys before these
        if self.step < 0:
            self.on_block(layer, q if len(self.q_index) == n else q[:, self.q_index], k, v, 0, 0)
            return
        if layer not in self.buffers:
            self.buffers[layer] = tuple(torch.empty(x.shape[0], self.generate, x.shape[2], dtype=x.dtype,
                                                    device=x.device) for x in (q, k, v))
        for buf, x in zip(self.buffers[layer], (q, k, v), strict=True):
            buf[:, self.step] = x[:, -1]

    def observed(self, n_layers: int) -> dict[str, Any]:
        """What the attention calls used: scale, soft-cap, per-layer type and the sliding window."""
        scales = set(self.scales.values())
        if len(scales) != 1:
            raise CaptureError(f"layers use different softmax scales {sorted(scales)}: not supported")
        caps = {c for c in self.softcaps.values()}
        windows = {w for w in self.windows.values() if w is not None}
        if len(caps) > 1 or len(windows) > 1:
            raise CaptureError("layers use different soft-caps or sliding windows: not supported")
        return {"softmax_scale": scales.pop(), "attn_logit_softcapping": caps.pop(),
                "layer_types": ["sliding_attention" if self.windows.get(i) else "full_attention"
                                for i in range(n_layers)],
                "sliding_window": windows.pop() if windows else None}


_RECORDER_ATTR = "_sparse_frontier_recorder"


def _reserve(cache: Any, room: int) -> None:
    """Give every full-attention layer of a transformers DynamicCache room for ``room`` more tokens after what it
    holds, so each decode step writes its key and value in place: the DynamicLayer's own update concatenates,
    copying every layer's whole cache at every step (about a third of a CPU decode step at 8K tokens)."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            n, m = self.keys.shape[-2], key_states.shape[-2]
            if n + m > self.buffers[0].shape[-2]:  # out of room: concatenate as DynamicLayer does
                return super().update(key_states, value_states, *args, **kwargs)
            for buf, x in zip(self.buffers, (key_states, value_states), strict=True):
                buf[..., n : n + m, :] = x
            self.keys, self.values = (buf[..., : n + m, :] for buf in self.buffers)
            return self.keys, self.values

    for layer in getattr(cache, "layers", []):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            n = layer.keys.shape[-2]
            layer.buffers = tuple(torch.cat([x, x.new_empty(*x.shape[:-2], room, x.shape[-1])], dim=-2)
                                  for x in (layer.keys, layer.values))
            layer.keys, layer.values = (buf[..., :n, :] for buf in layer.buffers)
            layer.__class__ = PreallocatedLayer


def _capture_attention(inner: Callable) -> Callable:
    """An attention function that hands q/k/v to the module's recorder, then runs ``inner`` (SDPA), or the
    windowed prefill below for a sliding-window layer on CPU."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        recorder = getattr(module, _RECORDER_ATTR, None)
        if recorder is not None:
            recorder(module.layer_idx, query, key, value, kwargs)
        window = kwargs.get("sliding_window")
        if inner is not None and window and query.device.type == "cpu" and query.shape[2] == key.shape[2] > window:
            return _windowed_prefill(query, key, value, kwargs.get("scaling"), window), None
        if inner is not None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        # eager attention lives in each model's module (Gemma 2's applies the soft-cap there)
        return sys.modules[type(module).__module__].eager_attention_forward(
            module, query, key, value, attention_mask, **kwargs)

    return attention


def _windowed_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
                      window: int) -> torch.Tensor:
    """A sliding-window layer's prefill attention [1, T, Hq, d] over keys ``key`` [1, Hkv, T, d] from position 0:
    SDPA over each chunk of rows and only the keys their window holds (transformers' SDPA path masks a whole
    T x T product: at 8K, 8K keys a row where a 512-row chunk with a 512-key window needs at most 1023)."""
    from sparse_frontier.policies.selection import Dense

    from .e2e import attend

    n = query.shape[2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    rows = torch.arange(n, device=query.device)
    out = attend(Dense(query.shape[1]), query[0], key[0], value[0], rows, scale, None, window)[0]
    return out.to(query.dtype).transpose(0, 1)[None].contiguous()


def _register(base: str) -> str:
    """Register the capturing variant of attention implementation ``base`` ('sdpa' or 'eager'); its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"sparse_frontier_capture_{base}"
    inner = ALL_ATTENTION_FUNCTIONS["sdpa"] if base == "sdpa" else None
    AttentionInterface.register(name, _capture_attention(inner))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


class TransformersBackend:
    """Capture through transformers: any decoder-only model whose attention uses the attention interface."""

    name = "transformers"

    def __init__(self, model: str, device: str = "cpu", compute_dtype: str = "float32"):
        from transformers import AutoConfig

        from .models import load_model

        folder = resolve_model(model)
        config = AutoConfig.from_pretrained(str(folder))
        config = getattr(config, "text_config", None) or config
        base = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
        self.model_name = model
        self.folder = folder
        self.device = device
        self.compute_dtype = compute_dtype
        self.net, self.tokenizer = load_model(model, device, compute_dtype, attn_implementation=base)
        self.net.set_attn_implementation(_register(base))
        self.config = getattr(self.net.config, "text_config", None) or self.net.config
        self.attention = {m.layer_idx: m for m in self.net.modules()
                          if hasattr(m, "layer_idx") and hasattr(m, "scaling")}
        self.max_context = int(self.config.max_position_embeddings)
        # transformers renamed past_key_values to cache (5.2x); use the name this version's forward takes
        self._cache_kw = "cache" if "cache" in inspect.signature(self.net.forward).parameters else "past_key_values"
        eos = self.net.generation_config.eos_token_id if self.net.generation_config else None
        eos = self.config.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])

    def describe(self) -> dict[str, Any]:
        """Model attributes from the config (scale, types and window are confirmed by the run)."""
        cfg = self.config
        n_layers = int(cfg.num_hidden_layers)
        if self.model_name in BUILTIN_MODELS:
            builtin = BUILTIN_MODELS[self.model_name]
            source = f"{builtin.package} ({builtin.gguf_name})"
        else:
            source = str(Path(self.model_name).expanduser().resolve())
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)
        sliding = any(t == "sliding_attention" for t in types)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return {
            "name": self.model_name, "source": source,
            "architecture": (cfg.architectures or [type(self.net).__name__])[0],
            "n_layers": n_layers, "n_q_heads": int(cfg.num_attention_heads),
            "n_kv_heads": int(cfg.num_key_value_heads), "head_dim": int(head_dim),
            "softmax_scale": float(self.attention[0].scaling),
            "rope": _jsonable(getattr(cfg, "rope_parameters", None)),
            "layer_types": types, "sliding_window": getattr(cfg, "sliding_window", None) if sliding else None,
            "attn_logit_softcapping": getattr(cfg, "attn_logit_softcapping", None),
            "d_model": int(cfg.hidden_size), "d_mlp": int(cfg.intermediate_size),
            "vocab_size": int(cfg.vocab_size), "max_context": self.max_context,
        }

    def run(self, input_ids: list[int], *, layers: list[int], q_index: np.ndarray, generate: int,
            on_block: OnBlock, on_step: Callable[[], None] | None = None,
            stop: list[str] | None = None) -> tuple[list[int], dict[str, Any]]:
        """Prefill, then greedy decoding; every generated token is fed back so its q/k/v are recorded."""
        recorder = _Recorder(layers, torch.as_tensor(q_index, device=self.device), generate, on_block)
        for module in self.attention.values():
            setattr(module, _RECORDER_ATTR, recorder)
        generated: list[int] = []
        try:
            with torch.inference_mode():
                ids = torch.tensor([input_ids], device=self.device)
                out = self.net(input_ids=ids, use_cache=generate > 0, logits_to_keep=1)
                if on_step:
                    on_step()
                cache = out[self._cache_kw] if generate > 0 else None
                _reserve(cache, generate)
                for step in range(generate):
                    token = int(out.logits[0, -1].argmax())
                    generated.append(token)
                    recorder.step = step
                    out = self.net(input_ids=torch.tensor([[token]], device=self.device), use_cache=True,
                                   logits_to_keep=1, **{self._cache_kw: cache})
                    if on_step:
                        on_step()
                    if token in self.eos_ids or (stop and any(s in self.decode(generated).lstrip() for s in stop)):
                        break
        finally:
            for module in self.attention.values():
                setattr(module, _RECORDER_ATTR, None)
        start, q_start = len(input_ids), len(q_index)
        for layer in sorted(recorder.buffers):
            q, k, v = (buf[:, :len(generated)] for buf in recorder.buffers[layer])
            on_block(layer, q, k, v, start, q_start)
        return generated, recorder.observed(int(self.config.num_hidden_layers))

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class CaptureResult:
    """What a capture wrote."""

    url: str
    n_tokens: int
    prefill_len: int
    generated_len: int
    generated_text: str
    seconds: float
    raw_bytes: int
    task: dict[str, Any] | None


def _versions() -> dict[str, str]:
    out = {}
    for package in ("sparse-frontier", "torch", "transformers", "zarr", "numcodecs"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "unknown"
    return out


def capture(backend: CaptureBackend, input_ids: list[int], out: str, *, layers: list[int] | None = None,
            query_spec: str = "all", generate: int = 0, dtype: str = "bfloat16", with_values: bool = True,
            task: Any = None, device: str = "cpu", on_step: Callable[[], None] | None = None,
            on_written: Callable[[int], None] | None = None, storage_options: dict | None = None,
            writer_threads: int = 4) -> CaptureResult:
    """Capture one sequence (prompt ``input_ids``, then up to ``generate`` greedy tokens) into store ``out``.

    ``task`` is the TaskInstance that produced the prompt (scored on the generated text), or None.
    """
    if dtype not in STORAGE_DTYPES:
        raise CaptureError(f"storage dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    if generate < 0:
        raise CaptureError(f"--generate {generate}: must be 0 or more")
    model = backend.describe()
    prefill_len = len(input_ids)
    if prefill_len == 0:
        raise CaptureError("the prompt is empty")
    if prefill_len + generate > backend.max_context:
        raise CaptureError(f"{prefill_len} prompt tokens + {generate} generated exceed the context of "
                           f"{model['name']} ({backend.max_context} tokens)")
    layers = list(range(model["n_layers"])) if layers is None else sorted(layers)
    q_index = query_positions(query_spec, prefill_len)
    positions = np.concatenate([q_index, np.arange(prefill_len, prefill_len + generate)])
    n_tokens = prefill_len + generate
    shape = {"n_layers": len(layers), "n_q_heads": model["n_q_heads"], "n_kv_heads": model["n_kv_heads"],
             "head_dim": model["head_dim"], "n_tokens": n_tokens}
    check_disk(out, estimate_bytes(**shape, n_queries=len(positions), dtype=dtype, with_values=with_values))
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    capture_attrs = {"backend": backend.name, "device": device, "dtype": dtype,
                     "compute_dtype": getattr(backend, "compute_dtype", None), "layers": layers,
                     "query_positions": query_spec, "with_values": with_values, "versions": _versions(),
                     "time": started}
    task_attrs = None
    if task is not None:
        described = task.describe() if hasattr(task, "describe") else {}
        task_attrs = _jsonable({**described, "name": task.name, "params": task.params, "seed": task.seed,
                                "reference": task.reference, "model_answer": None, "score": None})
    attrs = {"model": model, "task": task_attrs, "capture": capture_attrs,
             "sequence": {"n_tokens": n_tokens, "prefill_len": prefill_len, "generated_len": generate,
                          "generated_text": None}}
    index_of = {layer: i for i, layer in enumerate(layers)}
    t0 = time.perf_counter()
    writer = TraceWriter(out, attrs=attrs, **shape, q_positions=positions, dtype=dtype, with_values=with_values,
                         storage_options=storage_options, workers=writer_threads, on_written=on_written)
    with writer:
        def on_block(layer, q, k, v, start, q_start):
            writer.write_layer(index_of[layer], layer, q, k, v if with_values else None,
                               start=start, q_start=q_start)

        generated, observed = backend.run(input_ids, layers=layers, q_index=q_index, generate=generate,
                                          on_block=on_block, on_step=on_step,
                                          stop=list(getattr(task, "stop", None) or []))
        n_tokens = prefill_len + len(generated)
        if len(generated) < generate:
            writer.truncate(n_tokens)
        writer.write_tokens(list(input_ids) + generated)
        text = backend.decode(generated) if generated else ""
        writer.flush()
        if task_attrs is not None:
            task_attrs.update(model_answer=_jsonable(task.extract(text)), score=float(task.score(text)))
        seconds = time.perf_counter() - t0
        writer.finish(model={**model, **observed}, task=task_attrs,
                      sequence={"n_tokens": n_tokens, "prefill_len": prefill_len, "generated_len": len(generated),
                                "generated_text": text},
                      capture={**capture_attrs, "seconds": round(seconds, 3)})
    return CaptureResult(url=out, n_tokens=n_tokens, prefill_len=prefill_len, generated_len=len(generated),
                         generated_text=text, seconds=time.perf_counter() - t0, raw_bytes=writer.raw_bytes,
                         task=task_attrs)
