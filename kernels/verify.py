"""Check that a kernel computes what the simulator predicts: one policy's Selection on one captured layer.

The simulator's prediction is the torch reference over the Selection's dense mask (masked attention in
float32 from the same bf16/fp16 inputs); the kernel runs the same Selection. Compared: the outputs (largest
difference, against a bound set by the dtype), the realised sparsity each side computed (the reference from
the mask, the kernel from its own count of the cells it computed) and, on GPU, the kernel's time against
dense attention of the same shape.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_frontier.policies.base import LayerView
from sparse_frontier.policies.selection import Selection, expand_heads

from .reference import masked_attention, visible
from .run import launch, prepare, run_selection, triton_available

# |kernel - reference| <= RTOL * max|v|: the output is a convex combination of value rows, and rounding the
# probabilities to the input dtype before the PV product moves it by at most eps * max|v| (4x margin)
RTOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
ROW_CHUNK = 512


@dataclass
class LayerCheck:
    """What ``frontier verify`` reports for one layer."""

    layer: int
    policy: str
    phase: str
    rows: int
    keys: int
    backend: str
    max_diff: float
    tolerance: float
    sparsity_reference: float
    sparsity_kernel: float
    kernel_ms: float | None = None
    dense_ms: float | None = None
    prepare_ms: float | None = None

    @property
    def outputs_agree(self) -> bool:
        return self.max_diff <= self.tolerance

    @property
    def cells_agree(self) -> bool:
        return abs(self.sparsity_reference - self.sparsity_kernel) < 1e-9

    @property
    def ok(self) -> bool:
        return self.outputs_agree and self.cells_agree

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok, "speedup": (self.dense_ms / self.kernel_ms
                                                           if self.kernel_ms and self.dense_ms else None)}


def reference_output(selection: Selection, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, scale: float,
                     softcap: float | None, window: int | None) -> tuple[Tensor, int, int]:
    """The simulator's predicted output [Hq, R, d] (float32) and the selected / visible cells over all query
    heads, in chunks of rows so no [Hq, R, T] tensor of the whole layer is built."""
    outs, selected, seen = [], 0, 0
    n_keys, n_q = k.shape[1], q.shape[0]
    for start in range(0, len(rows), ROW_CHUNK):
        chunk = rows[start:start + ROW_CHUNK]
        mask = selection.mask(chunk.to(selection_device(selection)), n_keys).to(q.device)
        out, _ = masked_attention(q[:, start:start + ROW_CHUNK], k, v, chunk, scale, mask, softcap, window)
        outs.append(out)
        vis = visible(chunk, n_keys, window)
        selected += int((expand_heads(mask, n_q) & vis[None]).sum())
        seen += int(vis.sum()) * n_q
    return torch.cat(outs, dim=1), selected, seen


def selection_device(selection: Selection) -> torch.device:
    """The device a Selection's tensors live on (CPU when it holds none)."""
    for value in vars(selection).values():
        if isinstance(value, Tensor):
            return value.device
        if isinstance(value, list) and value and isinstance(value[0], Tensor):
            return value[0].device
    return torch.device("cpu")


def _time(fn, repeats: int = 10) -> float:
    """Median milliseconds of ``fn`` on the GPU (one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def dense_attention(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, scale: float,
                    window: int | None) -> Tensor:
    """Dense attention of the same shape through SDPA (causal, or the visible mask for other rows)."""
    n_keys = k.shape[1]
    if window is None and len(rows) == n_keys:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                              enable_gqa=True)
    mask = visible(rows, n_keys, window)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)


def check_layer(view: LayerView, rows: Tensor, n_keys: int, selection: Selection, policy: str, phase: str,
                device: str, dtype: torch.dtype, backend: str = "auto", timing: bool = True) -> LayerCheck:
    """Run ``selection`` through its kernel and through the reference on one layer's rows; compare."""
    q = view.queries_at(rows).to(device, dtype)
    k = view.k[:, :n_keys].to(device, dtype)
    v = view.v[:, :n_keys].to(device, dtype)
    rows = rows.to(device)
    window, softcap = view.sliding_window, view.softcap
    if backend == "auto":
        backend = "triton" if triton_available(q.device) else "torch"
    start = time.perf_counter()
    if backend == "triton":
        prepared = prepare(selection, rows, k, v, window)
        if q.is_cuda:
            torch.cuda.synchronize()
        prepare_ms = (time.perf_counter() - start) * 1e3
        run = launch(prepared, q, k, v, view.scale, softcap, window, count=True)
    else:
        prepare_ms = None
        run = run_selection(selection, q, k, v, rows, view.scale, softcap, window, backend="torch", count=True)
    want, selected, seen = reference_output(selection, q, k, v, rows, view.scale, softcap, window)
    max_diff = float((run.out.float() - want).abs().max()) if want.numel() else 0.0
    tolerance = RTOL.get(dtype, 1e-4) * float(v.float().abs().max())
    kernel_cells = int(run.cells.sum())
    check = LayerCheck(layer=view.layer, policy=policy, phase=phase, rows=len(rows), keys=n_keys, backend=run.backend,
                       max_diff=max_diff, tolerance=tolerance, sparsity_reference=1.0 - selected / max(seen, 1),
                       sparsity_kernel=1.0 - kernel_cells / max(seen, 1), prepare_ms=prepare_ms)
    if timing and q.is_cuda and backend == "triton":
        check.kernel_ms = _time(lambda: launch(prepared, q, k, v, view.scale, softcap, window))
        check.dense_ms = _time(lambda: dense_attention(q, k, v, rows, view.scale, window))
    return check
