"""The trace store: one Zarr v3 group per captured sequence (schema version 1).

Layout (readable with ``zarr.open_group`` alone):

* root attributes: ``format`` ("sparse-frontier-trace"), ``schema_version`` (1), ``complete`` (false until
  the writer finishes), ``model``, ``sequence``, ``task`` and ``capture`` (plain JSON).
* arrays: ``tokens [T]`` int32; ``q [L, Hq, Tq, d]`` with ``q_positions [Tq]`` int32; ``k`` and ``v``
  ``[L, Hkv, T, d]``; ``layers [L]`` int32 (the model layer index of each captured layer).
* bfloat16 is stored bit-exactly as its uint16 bit pattern; such arrays carry the attribute
  ``{"dtype": "bfloat16"}`` (view the uint16 data as bfloat16 to read it). float16 and float32 are
  stored as themselves. Chunks are (1 layer, 1 head, tokens, d) of at least 1 MiB (a few thousand tokens),
  compressed with Blosc (lz4 over bit-shuffled bytes, numcodecs) and checksummed with CRC32C.

The writer streams: ``write_layer`` copies a layer into one of ``max_pending`` reusable host buffers (default
``workers + 1`` layers, pinned when the layer is on a GPU; a host layer already in the storage dtype and layout
is used as it is), converting it to the storage dtype and layout on the layer's device, and hands it to a
small pool of writer threads, which compress and store it while the model goes on. A copy from a GPU is
asynchronous and the writer thread waits for it (a CUDA event): the forward never waits for a transfer, only
for a free buffer, and a capture's memory stays bounded by a few layers. In a local store the threads encode
whole chunks themselves with the array's codecs (Blosc, then the CRC32C zarr appends) and write the chunk
files zarr would write: zarr's own write path runs every chunk through one event-loop thread
and reached only a third of the disk's speed. Partial chunks, and stores behind other fsspec file systems,
go through zarr.
"""

from __future__ import annotations

import functools
import math
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from numcodecs import CRC32C, Blosc
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec
from zarr.storage import LocalStore

from sparse_frontier.policies.base import LayerView

FORMAT = "sparse-frontier-trace"
SCHEMA_VERSION = 1
STORAGE_DTYPES = ("bfloat16", "float16", "float32")
MIN_CHUNK_BYTES = 1024 * 1024
TENSORS = ("q", "k", "v")


class TraceError(ValueError):
    """A trace store that cannot be read: missing, foreign, wrong version, incomplete or corrupt."""


def _codecs() -> list:
    return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle), Crc32cCodec()]


# the same encoding with numcodecs, for the chunks the writer threads encode themselves
_BLOSC = Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE)
_CRC32C = CRC32C(location="end")


def _chunk_tokens(head_dim: int, itemsize: int, n_tokens: int) -> int:
    tokens = max(1, math.ceil(MIN_CHUNK_BYTES / (head_dim * itemsize)))
    return min(tokens, max(n_tokens, 1))


def _from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy -> float32 tensor."""
    if dtype == "bfloat16":  # a bfloat16 is the top half of a float32: a shift, faster than torch's conversion
        out = np.empty(a.shape, np.uint32)
        np.left_shift(a.view(np.uint16), 16, out=out, dtype=np.uint32)
        return torch.from_numpy(out.view(np.float32))
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def storage_itemsize(dtype: str) -> int:
    """Bytes per stored element of a storage dtype."""
    return {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]


def _writer_options(url: str, storage_options: dict | None) -> dict | None:
    """fsspec's local file system needs ``auto_mkdir`` to write a new store through a file:// URL."""
    if storage_options is None and url.startswith("file://"):
        return {"auto_mkdir": True}
    return storage_options


def _open_group(url: str, storage_options: dict | None = None) -> zarr.Group:
    """Open a store's root group read-only, or raise TraceError naming the URL."""
    try:
        return zarr.open_group(url, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.BaseZarrError) as exc:
        raise TraceError(f"{url}: no trace store there") from exc


def _check_header(url: str, attrs: dict) -> None:
    if attrs.get("format") != FORMAT:
        raise TraceError(f"{url}: not a sparse-frontier trace (format {attrs.get('format')!r})")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise TraceError(f"{url}: trace schema version {attrs.get('schema_version')!r}; "
                         f"this sparse-frontier reads version {SCHEMA_VERSION}")


class TraceWriter:
    """Streams one captured sequence into a new store, layer by layer; ``finish`` marks it complete.

    ``write_layer`` returns once the layer's copy into a host buffer is queued; a writer thread stores it. At
    most ``max_pending`` layers (default ``workers + 1``) are in flight. Call ``finish`` to wait for every write
    and mark the store complete, or ``close`` to stop without doing so.
    """

    def __init__(self, url: str, *, attrs: dict[str, Any], n_layers: int, n_q_heads: int, n_kv_heads: int,
                 head_dim: int, n_tokens: int, q_positions, dtype: str = "bfloat16", with_values: bool = True,
                 storage_options: dict | None = None, workers: int = 4, max_pending: int | None = None,
                 on_written: Callable[[int], None] | None = None):
        if dtype not in STORAGE_DTYPES:
            raise TraceError(f"storage dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        self.url = str(url)
        self.dtype = dtype
        self.root = zarr.open_group(self.url, mode="w", zarr_format=3,
                                    storage_options=_writer_options(self.url, storage_options))
        self.root.attrs.update({**attrs, "format": FORMAT, "schema_version": SCHEMA_VERSION, "complete": False})
        q_positions = np.asarray(q_positions, dtype=np.int32)
        store_dtype = "uint16" if dtype == "bfloat16" else dtype
        itemsize = storage_itemsize(dtype)
        ct = _chunk_tokens(head_dim, itemsize, n_tokens)
        cq = _chunk_tokens(head_dim, itemsize, len(q_positions))
        shapes = {"q": (n_layers, n_q_heads, len(q_positions), head_dim),
                  "k": (n_layers, n_kv_heads, n_tokens, head_dim)}
        if with_values:
            shapes["v"] = shapes["k"]
        self.arrays: dict[str, zarr.Array] = {}
        for name, shape in shapes.items():
            chunks = (1, 1, cq if name == "q" else ct, head_dim)
            # write_empty_chunks: skip zarr's scan of every chunk for fill values (a capture has none)
            arr = self.root.create_array(name, shape=shape, chunks=chunks, dtype=store_dtype,
                                         compressors=_codecs(), fill_value=0, config={"write_empty_chunks": True})
            arr.attrs["dtype"] = dtype
            self.arrays[name] = arr
        self.root.create_array("q_positions", data=q_positions, compressors=_codecs())
        self.root.create_array("layers", shape=(n_layers,), dtype="int32", fill_value=-1)
        self.root.create_array("tokens", shape=(n_tokens,), dtype="int32", chunks=(max(n_tokens, 1),),
                               compressors=_codecs(), fill_value=0)
        self.raw_bytes = 0
        self._model_layers = np.full(n_layers, -1, dtype=np.int32)
        self._on_written = on_written
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trace-writer")
        # free host buffers, one set per layer in flight: {array name: flat buffer}, allocated on first use
        self._free: queue.SimpleQueue[dict[str, torch.Tensor]] = queue.SimpleQueue()
        for _ in range(max_pending or workers + 1):
            self._free.put({})
        self._pending: dict[int, Future] = {}
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        store = self.root.store
        self._folder = Path(store.root) / self.root.path if isinstance(store, LocalStore) else None

    def write_tokens(self, tokens) -> None:
        """Store the token ids of the whole sequence."""
        self.root["tokens"][:] = np.asarray(tokens, dtype=np.int32)

    def write_layer(self, index: int, model_layer: int, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor | None = None, *, start: int = 0, q_start: int = 0) -> None:
        """Queue captured layer ``index`` (model layer ``model_layer``): q [Hq,Tq,d], k/v [Hkv,T,d].

        ``start`` / ``q_start`` place the block along the sequence / the stored query rows, so a layer can
        arrive in pieces (the prompt during prefill, the generated tokens after decoding).
        """
        self._raise_error()
        self._check_block(index, "q", q, q_start)
        self._check_block(index, "k", k, start)
        if v is not None:
            self._check_block(index, "v", v, start)
        slot = self._free.get()
        try:
            blocks = {name: (self._stage(slot, name, x), offset)
                      for name, x, offset in (("q", q, q_start), ("k", k, start), ("v", v, start))
                      if x is not None and name in self.arrays}
            copied = None
            if q.is_cuda:  # the copies run on the current stream; the writer thread waits for them
                copied = torch.cuda.Event(blocking=True)
                copied.record(torch.cuda.current_stream(q.device))
            future = self._pool.submit(self._store, index, blocks, self._pending.get(index), copied)
        except BaseException:
            self._free.put(slot)
            raise
        future.add_done_callback(functools.partial(self._done, slot))
        self._pending[index] = future
        self._model_layers[index] = model_layer

    def _stage(self, slot: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> np.ndarray:
        """Block ``x`` as numpy in the storage dtype (bfloat16 as uint16): a host block already in that form as
        it is, any other copied into the slot's host buffer for array ``name``, converted to the storage dtype
        and made contiguous on x's device (asynchronously from a GPU)."""
        dtype = getattr(torch, self.dtype)
        host = x.detach()
        if host.is_cuda or host.dtype != dtype or not host.is_contiguous():
            if name not in slot:
                with torch.inference_mode(False):  # a buffer that outlives a capture's inference mode
                    slot[name] = torch.empty(math.prod(self.arrays[name].shape[1:]), dtype=dtype,
                                             pin_memory=x.is_cuda)
            host = slot[name][:x.numel()].view(x.shape).copy_(host, non_blocking=True)
        return (host.view(torch.uint16) if self.dtype == "bfloat16" else host).numpy()

    def _check_block(self, index: int, name: str, x: torch.Tensor, offset: int) -> None:
        """zarr does not check the shape of assigned data: refuse a block that does not fit its place."""
        if name not in self.arrays:
            return
        n_layers, heads, rows, head_dim = self.arrays[name].shape
        if not 0 <= index < n_layers or x.ndim != 3 or x.shape[0] != heads or x.shape[2] != head_dim \
                or offset < 0 or offset + x.shape[1] > rows:
            raise TraceError(f"{self.url}: {name} block {tuple(x.shape)} at layer {index}, row {offset} does not "
                             f"fit {name} {tuple(self.arrays[name].shape)}")

    def _store(self, index: int, blocks: dict[str, tuple[np.ndarray, int]], previous: Future | None,
               copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        if previous is not None:  # pieces of one layer share chunks: store them in order
            previous.result()
        for name, (data, offset) in blocks.items():
            if data.shape[1]:
                self._put(name, index, data, offset)
        nbytes = sum(data.nbytes for data, _ in blocks.values())
        with self._lock:
            self.raw_bytes += nbytes
        if self._on_written is not None:
            self._on_written(nbytes)

    def _put(self, name: str, index: int, data: np.ndarray, offset: int) -> None:
        """Store rows [offset, offset + n) of one layer: whole chunks encoded here, partial ones by zarr."""
        arr = self.arrays[name]
        rows, ct = arr.shape[2], arr.chunks[2]
        end = offset + data.shape[1]
        first = -(-offset // ct)  # the chunks wholly inside [offset, end); the edge chunk ends at `rows`
        last = -(-rows // ct) if end == rows else end // ct
        if self._folder is None or first >= last:
            arr[index, :, offset:end] = data
            return
        if offset < first * ct:
            arr[index, :, offset:first * ct] = data[:, :first * ct - offset]
        for j in range(first, last):
            lo, hi = j * ct, min((j + 1) * ct, rows)
            for head in range(data.shape[0]):
                chunk = data[head, lo - offset:hi - offset]
                if hi - lo < ct:  # zarr stores edge chunks at full size, padded with the fill value
                    chunk = np.pad(chunk, ((0, ct - (hi - lo)), (0, 0)))
                path = self._folder / name / arr.metadata.encode_chunk_key((index, head, j, 0))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_CRC32C.encode(_BLOSC.encode(np.ascontiguousarray(chunk))))
        if last * ct < end:
            arr[index, :, last * ct:end] = data[:, last * ct - offset:]

    def _done(self, slot: dict[str, torch.Tensor], future: Future) -> None:
        self._free.put(slot)
        if not future.cancelled() and future.exception() is not None and self._error is None:
            self._error = future.exception()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise TraceError(f"{self.url}: writing the trace failed: {self._error}") from self._error

    def flush(self) -> None:
        """Wait until every queued layer is stored."""
        for future in list(self._pending.values()):
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - re-raised below as one TraceError
                pass
        self._raise_error()

    def truncate(self, n_tokens: int) -> None:
        """Shorten the sequence to its first ``n_tokens`` (decoding stopped early); drops later queries."""
        self.flush()
        for name in ("k", "v"):
            if name in self.arrays:
                arr = self.arrays[name]
                arr.resize((*arr.shape[:2], n_tokens, arr.shape[3]))
        self.root["tokens"].resize((n_tokens,))
        positions = self.root["q_positions"][:]
        keep = int((positions < n_tokens).sum())
        self.root["q_positions"].resize((keep,))
        q = self.arrays["q"]
        q.resize((*q.shape[:2], keep, q.shape[3]))

    def finish(self, **attrs: Any) -> None:
        """Wait for every write, merge final attributes and mark the store complete."""
        try:
            self.flush()
            self.root["layers"][:] = self._model_layers
            self.root.attrs.update({**attrs, "complete": True})
        finally:
            self.close()

    def close(self) -> None:
        """Stop the writer threads (queued layers are dropped); the store stays incomplete unless finished."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._free = queue.SimpleQueue()  # release the host buffers

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TraceStore:
    """Lazy reader of a complete trace store (local path or fsspec URL)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = str(url)
        self.root = _open_group(self.url, storage_options)
        attrs = dict(self.root.attrs)
        _check_header(self.url, attrs)
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
        where = f"{name} of captured layer {index}" + ("" if head is None else f" head {head}")
        try:
            data = arr[index] if head is None else arr[index, head]
        except ValueError as exc:  # the CRC32C codec raises ValueError on a checksum mismatch
            raise TraceError(f"{self.url}: corrupt chunk in {where}: {exc}") from exc
        out = _from_storage(data, arr.attrs.get("dtype", "float32"))
        if out.numel() and not torch.isfinite(torch.stack(torch.aminmax(out))).all():  # NaN propagates to both
            raise TraceError(f"{self.url}: NaN or inf in {where}")
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

    def tokens(self) -> torch.Tensor:
        """Token ids of the whole sequence [T]."""
        return torch.from_numpy(self.root["tokens"][:].astype(np.int64))

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


def store_info(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Attributes, array shapes and sizes of a store, complete or not (for ``trace info`` and ``trace ls``)."""
    url = str(url)
    root = _open_group(url, storage_options)
    attrs = dict(root.attrs)
    _check_header(url, attrs)
    arrays = {}
    for name in ("tokens", "q_positions", "layers", *TENSORS):
        if name not in root:
            continue
        arr = root[name]
        dtype = arr.attrs.get("dtype", str(arr.dtype))
        arrays[name] = {"shape": list(arr.shape), "chunks": list(arr.chunks), "dtype": dtype,
                        "raw_bytes": int(arr.nbytes), "stored_bytes": int(arr.nbytes_stored())}
    raw = sum(a["raw_bytes"] for a in arrays.values())
    stored = sum(a["stored_bytes"] for a in arrays.values())
    return {"url": url, **attrs, "arrays": arrays, "raw_bytes": raw, "stored_bytes": stored,
            "compression_ratio": raw / stored if stored else None}


def validate_store(url: str, storage_options: dict | None = None,
                   on_slice: Callable[[], None] | None = None) -> list[str]:
    """Re-read every chunk (checksums), check shapes against the attributes and values for NaN; the problems."""
    store = TraceStore(url, storage_options)
    problems = []
    model, seq, root = store.model, store.sequence, store.root
    n_tokens = int(seq["n_tokens"])
    if n_tokens != int(seq["prefill_len"]) + int(seq.get("generated_len", 0)):
        problems.append(f"sequence: n_tokens {n_tokens} != prefill_len + generated_len")
    expect = {"q": (store.n_layers, model["n_q_heads"], len(store.q_positions), model["head_dim"]),
              "k": (store.n_layers, model["n_kv_heads"], n_tokens, model["head_dim"])}
    if store.has_values:
        expect["v"] = expect["k"]
    for name, shape in expect.items():
        if tuple(root[name].shape) != tuple(shape):
            problems.append(f"{name}: shape {tuple(root[name].shape)}, the attributes imply {tuple(shape)}")
    if root["tokens"].shape != (n_tokens,):
        problems.append(f"tokens: shape {root['tokens'].shape}, expected ({n_tokens},)")
    if any(layer < 0 or layer >= model["n_layers"] for layer in store.layers) or \
            len(set(store.layers)) != len(store.layers):
        problems.append(f"layers: {store.layers} are not distinct model layers below {model['n_layers']}")
    pos = store.q_positions
    if len(pos) and (bool((pos[1:] <= pos[:-1]).any()) or int(pos[0]) < 0 or int(pos[-1]) >= n_tokens):
        problems.append(f"q_positions: not strictly ascending within [0, {n_tokens})")
    if problems:
        return problems
    for name in expect:
        for index in range(store.n_layers):
            for head in range(root[name].shape[1]):
                try:
                    store._read(name, index, head)
                except TraceError as exc:
                    problems.append(str(exc))
                if on_slice is not None:
                    on_slice()
    return problems


def find_stores(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """``store_info`` of every trace store under a local directory (complete or not), sorted by path."""
    found = []
    for here, dirs, files in os.walk(directory):
        dirs.sort()
        if "zarr.json" not in files:
            continue
        try:
            found.append(store_info(here))
        except TraceError:
            continue  # another Zarr group, or a group inside a store
        dirs.clear()  # never descend into a store
    return sorted(found, key=lambda info: Path(info["url"]).as_posix())
