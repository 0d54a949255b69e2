"""The trace store: one Zarr v3 group per captured sequence (schema version 1).

Layout (readable with ``zarr.open_group`` alone):

* root attributes: ``format`` ("sparse-frontier-trace"), ``schema_version`` (1), ``complete`` (false until
  the writer finishes), ``model``, ``sequence``, ``task`` and ``capture`` (plain JSON).
* arrays: ``tokens [T]`` int32; ``q [L, Hq, Tq, d]`` with ``q_positions [Tq]`` int32; ``k`` and ``v``
  ``[L, Hkv, T, d]``; ``layers [L]`` int32 (the model layer index of each captured layer).
* bfloat16 is stored bit-exactly as its uint16 bit pattern; such arrays carry the attribute
  ``{"dtype": "bfloat16"}`` (view the uint16 data as bfloat16 to read it). float16 and float32 are
  stored as themselves. Chunks are (1 layer, 1 head, tokens, d) of at least 512 KiB, compressed with
  Blosc/zstd (numcodecs) and checksummed with CRC32C.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from sparse_frontier.policies.base import LayerView

FORMAT = "sparse-frontier-trace"
SCHEMA_VERSION = 1
STORAGE_DTYPES = ("bfloat16", "float16", "float32")
MIN_CHUNK_BYTES = 512 * 1024


class TraceError(ValueError):
    """A trace store that cannot be read: missing, foreign, wrong version, incomplete or corrupt."""


def _codecs() -> list:
    return [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle), Crc32cCodec()]


def _chunk_tokens(head_dim: int, itemsize: int, n_tokens: int) -> int:
    tokens = max(1, math.ceil(MIN_CHUNK_BYTES / (head_dim * itemsize)))
    return min(tokens, max(n_tokens, 1))


def _to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Tensor -> numpy in the storage dtype (bfloat16 as its uint16 bits)."""
    x = x.detach().cpu()
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.uint16).numpy()
    return x.to(getattr(torch, dtype)).numpy()


def _from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy -> float32 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.float()


class TraceWriter:
    """Streams one captured sequence into a new store, layer by layer; ``finish`` marks it complete."""

    def __init__(self, url: str, *, attrs: dict[str, Any], n_layers: int, n_q_heads: int, n_kv_heads: int,
                 head_dim: int, n_tokens: int, q_positions, dtype: str = "bfloat16", with_values: bool = True,
                 storage_options: dict | None = None):
        if dtype not in STORAGE_DTYPES:
            raise TraceError(f"storage dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        self.dtype = dtype
        self.root = zarr.open_group(url, mode="w", zarr_format=3, storage_options=storage_options)
        self.root.attrs.update({**attrs, "format": FORMAT, "schema_version": SCHEMA_VERSION, "complete": False})
        q_positions = np.asarray(q_positions, dtype=np.int32)
        store_dtype = "uint16" if dtype == "bfloat16" else dtype
        itemsize = np.dtype(store_dtype).itemsize
        ct = _chunk_tokens(head_dim, itemsize, n_tokens)
        cq = _chunk_tokens(head_dim, itemsize, len(q_positions))
        shapes = {"q": (n_layers, n_q_heads, len(q_positions), head_dim), "k": (n_layers, n_kv_heads, n_tokens, head_dim)}
        if with_values:
            shapes["v"] = shapes["k"]
        for name, shape in shapes.items():
            chunks = (1, 1, cq if name == "q" else ct, head_dim)
            arr = self.root.create_array(name, shape=shape, chunks=chunks, dtype=store_dtype,
                                         compressors=_codecs(), fill_value=0)
            arr.attrs["dtype"] = dtype
        self.root.create_array("q_positions", data=q_positions, compressors=_codecs())
        self.root.create_array("layers", shape=(n_layers,), dtype="int32", fill_value=-1)
        self.root.create_array("tokens", shape=(n_tokens,), dtype="int32", chunks=(max(n_tokens, 1),),
                               compressors=_codecs(), fill_value=0)

    def write_tokens(self, tokens) -> None:
        """Store the token ids of the whole sequence."""
        self.root["tokens"][:] = np.asarray(tokens, dtype=np.int32)

    def write_layer(self, index: int, model_layer: int, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor | None = None) -> None:
        """Store captured layer ``index`` (model layer ``model_layer``): q [Hq,Tq,d], k/v [Hkv,T,d]."""
        self.root["q"][index] = _to_storage(q, self.dtype)
        self.root["k"][index] = _to_storage(k, self.dtype)
        if v is not None and "v" in self.root:
            self.root["v"][index] = _to_storage(v, self.dtype)
        self.root["layers"][index] = model_layer

    def finish(self, **attrs: Any) -> None:
        """Merge final attributes and mark the store complete."""
        self.root.attrs.update({**attrs, "complete": True})


class TraceStore:
    """Lazy reader of a complete trace store (local path or fsspec URL)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = str(url)
        try:
            self.root = zarr.open_group(self.url, mode="r", storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
            raise TraceError(f"{self.url}: no trace store there") from exc
        attrs = dict(self.root.attrs)
        if attrs.get("format") != FORMAT:
            raise TraceError(f"{self.url}: not a sparse-frontier trace (format {attrs.get('format')!r})")
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise TraceError(f"{self.url}: trace schema version {attrs.get('schema_version')!r}; "
                             f"this sparse-frontier reads version {SCHEMA_VERSION}")
        if not attrs.get("complete"):
            raise TraceError(f"{self.url}: trace is incomplete (capture was interrupted); capture it again")
        self.attrs = attrs
        self.model = attrs["model"]
        self.sequence = attrs["sequence"]
        self.task = attrs.get("task")
        self.layers = [int(x) for x in self.root["layers"][:]]
        self.q_positions = torch.from_numpy(self.root["q_positions"][:].astype(np.int64))
        self.has_values = "v" in self.root

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def _read(self, name: str, index: int, head: int | None) -> torch.Tensor:
        arr = self.root[name]
        data = arr[index] if head is None else arr[index, head]
        out = _from_storage(data, arr.attrs.get("dtype", "float32"))
        if not torch.isfinite(out).all():
            raise TraceError(f"{self.url}: NaN or inf in {name} of captured layer {index}")
        return out

    def q(self, index: int, head: int | None = None) -> torch.Tensor:
        """Queries of captured layer ``index``: [Hq, Tq, d] (or [Tq, d] for one head), float32."""
        return self._read("q", index, head)

    def k(self, index: int, head: int | None = None) -> torch.Tensor:
        """Keys of captured layer ``index``: [Hkv, T, d] (or [T, d]), float32."""
        return self._read("k", index, head)

    def v(self, index: int, head: int | None = None) -> torch.Tensor:
        """Values of captured layer ``index``: [Hkv, T, d] (or [T, d]), float32."""
        if not self.has_values:
            raise TraceError(f"{self.url}: trace was captured without values (--no-values)")
        return self._read("v", index, head)

    def layer_view(self, index: int, device: str = "cpu", with_values: bool = True) -> LayerView:
        """Everything a policy needs of captured layer ``index``."""
        model_layer = self.layers[index]
        window = None
        types = self.model.get("layer_types")
        if types and types[model_layer] == "sliding_attention":
            window = self.model.get("sliding_window")
        return LayerView(
            q=self.q(index).to(device), k=self.k(index).to(device),
            v=self.v(index).to(device) if with_values and self.has_values else None,
            q_positions=self.q_positions.to(device), prefill_len=int(self.sequence["prefill_len"]),
            scale=float(self.model["softmax_scale"]), softcap=self.model.get("attn_logit_softcapping"),
            sliding_window=window, layer=model_layer,
        )
