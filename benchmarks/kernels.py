"""Benchmark the Triton kernels on a GPU against SDPA (flash) and FlexAttention; writes a Markdown table.

    python benchmarks/kernels.py --out results/kernels.json --markdown results/kernels.md

Shapes: 32 query heads, 8 KV heads, head dim 128, bfloat16. Block-sparse prefill at kept fractions of the
causal blocks, vertical-slash prefill at target sparsities, sparse decode with a fraction of the pages.
Times are medians of CUDA-event timings (decode: of CUDA-graph replays over rotating page sets).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_frontier.kernels.decode import sparse_decode
from sparse_frontier.kernels.layout import (
    DecodeLayout,
    block_sparse_layout,
    layout_cells,
    tile_cells,
    vertical_slash_layout,
)
from sparse_frontier.kernels.prefill import sparse_prefill
from sparse_frontier.policies.selection import BlockMask, VerticalSlash

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
HBM_TBS = 4.8
SCALE = D ** -0.5
DEVICE = "cuda"  # --smoke: "cpu" under the Triton interpreter, tiny shapes, wall-clock timing


def bench(fn, min_time: float = 0.3, max_reps: int = 50) -> float:
    """Median seconds of one call of ``fn`` (CUDA events; one warm-up call first). Each timed window starts
    behind one queued call, so a short kernel is timed on the GPU, not waiting for the host to launch it."""
    if DEVICE == "cpu":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end) / 1e3
    inner = max(1, int(1e-3 / max(estimate, 1e-7)))
    reps = int(min(max_reps, max(3, min_time / max(estimate * inner, 1e-7))))
    times = []
    for _ in range(reps):
        fn()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return sorted(times)[len(times) // 2]


def bench_graph(fns, reps: int = 20) -> float:
    """Median seconds per call over CUDA-graph replays of ``fns`` run one after another."""
    if DEVICE == "cpu":
        return sum(bench(fn) for fn in fns) / len(fns)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return bench(graph.replay, max_reps=reps) / len(fns)


def sdpa_prefill(q, k, v, flash: bool):
    """Dense causal SDPA: forced onto the flash path, or PyTorch's own backend choice (GQA: enable_gqa)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = k.shape[0] != q.shape[0]
    if not flash:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=SCALE, enable_gqa=gqa)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION if DEVICE == "cuda" else SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=SCALE, enable_gqa=gqa)


def dense_prefill(q, k, v, flash: bool = True):
    """SDPA causal as a callable; K/V repeated over the group beforehand if the backend refuses enable_gqa."""
    try:
        sdpa_prefill(q[:, :256], k[:, :256], v[:, :256], flash)
        return partial(sdpa_prefill, q, k, v, flash)
    except RuntimeError:
        group = q.shape[0] // k.shape[0]
        return partial(sdpa_prefill, q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), flash)


def sdpa_times(q, k, v) -> tuple[float, float]:
    """Seconds of SDPA causal on the flash path and with PyTorch's default choice (cuDNN on Hopper)."""
    flash = bench(dense_prefill(q, k, v, flash=True))
    try:
        default = bench(dense_prefill(q, k, v, flash=False))
    except RuntimeError:
        default = flash
    return flash, default


def random_block_mask(n_blocks: int, fraction: float, gen: torch.Generator, heads: int | None = None) -> torch.Tensor:
    """Per (mask head, query block): the diagonal plus random causal blocks, ``fraction`` of the causal ones.
    ``heads``: the query heads (default) or the KV heads (one mask shared by a GQA group)."""
    score = torch.rand(heads or HQ, n_blocks, n_blocks, generator=gen, device=DEVICE)
    idx = torch.arange(n_blocks, device=DEVICE)
    score[:, idx, idx] = 2.0  # the diagonal always
    score = score.masked_fill(idx[None, :] > idx[:, None], -1.0)
    keep_n = torch.clamp(torch.round(fraction * (idx + 1)), min=1)
    rank = torch.argsort(torch.argsort(score, dim=-1, descending=True), dim=-1)
    return rank < keep_n[None, :, None]


def block_sparse_section(lengths, fractions, block, config, results, log, mask_heads: str = "query"):
    """Block-sparse prefill vs SDPA causal and FlexAttention with the identical BlockMask, masks per query head
    or (``mask_heads`` "kv") per KV head, shared by its GQA group."""
    from torch.nn.attention.flex_attention import flex_attention

    from sparse_frontier.kernels.flex import flex_block_mask_from_layout, flex_prefill

    flex = torch.compile(flex_attention, dynamic=False) if DEVICE == "cuda" else flex_attention
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for n in lengths:
        q = torch.randn(HQ, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
        k = torch.randn(HKV, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
        v = torch.randn(HKV, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
        causal_cells = HQ * n * (n + 1) / 2
        t_flash, t_default = sdpa_times(q, k, v)
        t_sdpa = min(t_flash, t_default)
        log(f"[block] n={n} sdpa flash {t_flash * 1e3:.2f} ms default {t_default * 1e3:.2f} ms, best "
            f"{4 * D * causal_cells / t_sdpa / 1e12:.0f} TFLOP/s")
        for fraction in fractions:
            row = {"n": n, "fraction": fraction, "block": block, "mask_heads": mask_heads, "sdpa_ms": t_sdpa * 1e3,
                   "sdpa_flash_ms": t_flash * 1e3, "sdpa_default_ms": t_default * 1e3,
                   "sdpa_tflops": 4 * D * causal_cells / t_sdpa / 1e12}
            try:
                blocks = random_block_mask(-(-n // block), fraction, gen, HKV if mask_heads == "kv" else HQ)
                layout = block_sparse_layout(BlockMask(blocks, block, block), n)
                # cells per mask head, times the query heads each mask serves
                cells = float(layout_cells(layout, torch.arange(n, device=DEVICE)).sum()) * HQ / blocks.shape[0]
                t_ours = bench(partial(sparse_prefill, q, k, v, layout, SCALE, config=config))
                ours = sparse_prefill(q, k, v, layout, SCALE, config=config)[0]
                row.update(kept=cells / causal_cells, ideal=causal_cells / cells, ours_ms=t_ours * 1e3,
                           speedup=t_sdpa / t_ours, tflops=4 * D * cells / t_ours / 1e12)
                bm = flex_block_mask_from_layout(layout, HQ, lookup=DEVICE == "cpu")  # eager Flex needs the lookup
                t_flex = bench(partial(flex_prefill, q, k, v, bm, SCALE, attention=flex))
                diff = (flex_prefill(q, k, v, bm, SCALE, attention=flex).float() - ours.float()).abs().max().item()
                row.update(flex_ms=t_flex * 1e3, flex_speedup=t_sdpa / t_flex, vs_flex=t_flex / t_ours,
                           max_diff_vs_flex=diff)
            except Exception:  # keep measuring the other shapes; the error goes into the log
                row["error"] = traceback.format_exc(limit=3)
            results["block_sparse"].append(row)
            log(f"[block] {json.dumps(row)}")


def vs_counts(n: int, x: float, block: int = 64) -> tuple[int, int]:
    """Random slashes and verticals for a budget knob x in [0, 1] (about half the cells each)."""
    n_slash = int(x * (n - 64) / block)
    return n_slash, min(n - 4, block // 2 * n_slash)


def slash_selection(n: int, n_slash: int, n_vertical: int, gen: torch.Generator,
                    heads: int | None = None, block: int = 64) -> VerticalSlash:
    """Per head: the local band (64 slashes) and 4 sink columns, plus random slashes and columns."""
    columns, offsets = [], []
    for _ in range(heads or HQ):
        perm_s = torch.randperm(n - 64, generator=gen, device=DEVICE)[:n_slash] + 64
        perm_v = torch.randperm(n - 4, generator=gen, device=DEVICE)[:n_vertical] + 4
        offsets.append(torch.cat([torch.arange(64, device=DEVICE), perm_s]))
        columns.append(torch.cat([torch.arange(4, device=DEVICE), perm_v]))
    return VerticalSlash(columns, offsets, block=block)


def vs_counts_at(n: int, block: int, density: float, rows: Tensor) -> tuple[int, int, VerticalSlash]:
    """Slash and vertical counts whose selection (every head, seed 3: the one timed) keeps ``density`` of the
    causal cells: the slash count by bisection on the budget knob (slashes and verticals about half the cells
    each), then the vertical count at that slash count, since one slash moves the density by about 2 block / n."""
    causal = HQ * n * (n + 1) / 2

    def select(n_slash: int, n_vertical: int) -> tuple[float, VerticalSlash]:
        sel = slash_selection(n, n_slash, n_vertical, torch.Generator(device=DEVICE).manual_seed(3), block=block)
        return float(layout_cells(vertical_slash_layout(sel, n), rows).sum()) / causal, sel

    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if select(*vs_counts(n, mid, block))[0] < density else (lo, mid)
    n_slash = vs_counts(n, lo, block)[0]
    v_lo, v_hi = 0, n - 4  # density(v_lo) < density <= density(v_hi), unless even every column is too few
    while v_hi - v_lo > 1:
        mid = (v_lo + v_hi) // 2
        v_lo, v_hi = (mid, v_hi) if select(n_slash, mid)[0] < density else (v_lo, mid)
    (d_lo, sel_lo), (d_hi, sel_hi) = select(n_slash, v_lo), select(n_slash, v_hi)
    return (n_slash, v_lo, sel_lo) if density - d_lo <= d_hi - density else (n_slash, v_hi, sel_hi)


def vertical_slash_section(lengths, sparsities, blocks, config, results, log):
    """Vertical-slash prefill vs SDPA causal; counts searched to hit each target sparsity."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    for n in lengths:
        q = torch.randn(HQ, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
        k = torch.randn(HKV, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
        v = torch.randn(HKV, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
        rows = torch.arange(n, device=DEVICE)
        causal_cells = n * (n + 1) / 2
        t_sdpa = min(sdpa_times(q, k, v))
        for block, sparsity in ((b, s) for b in blocks for s in sparsities):
            row = {"n": n, "block": block, "target_sparsity": sparsity, "sdpa_ms": t_sdpa * 1e3}
            try:
                n_slash, n_vertical, sel = vs_counts_at(n, block, 1 - sparsity, rows)
                start = time.perf_counter()
                layout = vertical_slash_layout(sel, n)
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                build = time.perf_counter() - start
                cells = float(layout_cells(layout, rows).sum())
                t_ours = bench(partial(sparse_prefill, q, k, v, layout, SCALE, config=config))
                ideal = HQ * causal_cells / cells
                row.update(slashes=64 + n_slash, verticals=4 + n_vertical, sparsity=1 - cells / (HQ * causal_cells),
                           tiles_over_kept=tile_cells(layout) / cells, ours_ms=t_ours * 1e3, speedup=t_sdpa / t_ours,
                           ideal=ideal, of_ideal=t_sdpa / t_ours / ideal, layout_build_ms=build * 1e3)
            except Exception:
                row["error"] = traceback.format_exc(limit=3)
            results["vertical_slash"].append(row)
            log(f"[vs] {json.dumps(row)}")


def decode_layouts(batch: int, n: int, page: int, fraction: float, n_sets: int, gen) -> list[DecodeLayout]:
    """Random distinct pages (``fraction`` of them, always the last) per (sequence, KV head), sorted."""
    n_pages = n // page
    keep = max(1, int(n_pages * fraction))
    out = []
    for _ in range(n_sets):
        score = torch.rand(batch, HKV, n_pages, generator=gen, device=DEVICE)
        score[..., -1] = 2.0
        pages = torch.sort(torch.topk(score, keep, dim=-1).indices, dim=-1).values.to(torch.int32)
        count = torch.full((batch, HKV), keep, dtype=torch.int32, device=DEVICE)
        lo = torch.zeros_like(count)
        hi = torch.full_like(count, n)
        out.append(DecodeLayout(pages.contiguous(), count, lo, hi, page))
    return out


def decode_section(lengths, fractions, batches, pages, config, results, log):
    """Sparse decode vs dense SDPA decode, and bandwidth on the bytes the kernel reads."""
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    for n in lengths:
        for batch in batches:
            k = torch.randn(batch, HKV, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
            v = torch.randn(batch, HKV, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
            q = torch.randn(batch, HQ, D, device=DEVICE, dtype=DTYPE, generator=gen)
            dense_bytes = 2 * batch * HKV * n * D * 2

            dense = partial(F.scaled_dot_product_attention, q[:, :, None], k, v, scale=SCALE, enable_gqa=True)
            t_dense = bench_graph([dense])
            for page, fraction in ((p, f) for p in pages for f in fractions):
                row = {"n": n, "batch": batch, "page": page, "fraction": fraction, "dense_ms": t_dense * 1e3,
                       "dense_tbs": dense_bytes / t_dense / 1e12}
                try:
                    layouts = decode_layouts(batch, n, page, fraction, 4, gen)
                    read = 2 * batch * HKV * layouts[0].pages.shape[-1] * page * D * 2
                    t_ours = bench_graph([partial(sparse_decode, q, k, v, lay, SCALE, **(config or {}))
                                          for lay in layouts])
                    row.update(ours_us=t_ours * 1e6, speedup=t_dense / t_ours, read_mb=read / 1e6,
                               tbs=read / t_ours / 1e12, of_peak=read / t_ours / 1e12 / HBM_TBS)
                except Exception:
                    row["error"] = traceback.format_exc(limit=3)
                results["decode"].append(row)
                log(f"[decode] {json.dumps(row)}")


def tune_section(n, block, configs, results, log):
    """Time launch configurations of the block-sparse kernel at kept 1.0 and 0.1; returns the best."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    q = torch.randn(HQ, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
    k = torch.randn(HKV, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
    v = torch.randn(HKV, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
    layouts = {f: block_sparse_layout(BlockMask(random_block_mask(n // block, f, gen), block, block), n)
               for f in (1.0, 0.1)}
    best, best_total = None, math.inf
    for config in configs:
        row = {"n": n, "config": config}
        try:
            total = 0.0
            for f, layout in layouts.items():
                t = bench(partial(sparse_prefill, q, k, v, layout, SCALE, config=config), min_time=0.15)
                row[f"ms_{f}"] = t * 1e3
                total += t
            if total < best_total:
                best, best_total = config, total
        except Exception:
            row["error"] = traceback.format_exc(limit=2)
        results["tune"].append(row)
        log(f"[tune] {json.dumps(row)}")
    return best


def tune_vs_section(n, configs, results, log):
    """Time launch configurations of the vertical-slash kernel at sparsity about 0.9; returns the best."""
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    q = torch.randn(HQ, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
    k = torch.randn(HKV, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
    v = torch.randn(HKV, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
    layout = vertical_slash_layout(slash_selection(n, *vs_counts(n, 0.05), gen), n)
    best, best_time = None, math.inf
    for config in configs:
        row = {"n": n, "kernel": "vertical_slash", "config": config}
        try:
            t = bench(partial(sparse_prefill, q, k, v, layout, SCALE, config=config), min_time=0.15)
            row["ms"] = t * 1e3
            if t < best_time:
                best, best_time = config, t
        except Exception:
            row["error"] = traceback.format_exc(limit=2)
        results["tune"].append(row)
        log(f"[tune] {json.dumps(row)}")
    return best


def tune_decode_section(cases, configs, results, log):
    """Time launch configurations of the decode kernel on (tokens, batch) cases at 1/16 pages; the best."""
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    data = []
    for n, batch in cases:
        k = torch.randn(batch, HKV, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
        v = torch.randn(batch, HKV, n, D, device=DEVICE, dtype=DTYPE, generator=gen)
        q = torch.randn(batch, HQ, D, device=DEVICE, dtype=DTYPE, generator=gen)
        data.append((n, batch, q, k, v, decode_layouts(batch, n, 16, 1 / 16, 4, gen)))
    best, best_total = None, math.inf
    for config in configs:
        row = {"kernel": "decode", "config": config}
        try:
            total = 0.0
            for n, batch, q, k, v, layouts in data:
                t = bench_graph([partial(sparse_decode, q, k, v, lay, SCALE, **config) for lay in layouts])
                row[f"us_{n}_{batch}"] = t * 1e6
                total += t
            if total < best_total:
                best, best_total = config, total
        except Exception:
            row["error"] = traceback.format_exc(limit=2)
        results["tune"].append(row)
        log(f"[tune] {json.dumps(row)}")
    return best


def markdown(results: dict) -> str:
    """The result tables in Markdown."""
    lines = [f"GPU: {results['gpu']}; torch {results['torch']}, triton {results['triton']}; "
             f"Hq={HQ}, Hkv={HKV}, d={D}, bf16; configs: block-sparse {results.get('config')}, "
             f"vertical-slash {results.get('vs_config')}, decode {results.get('decode_config')}", ""]
    heads = {r.get("mask_heads", "query") for r in results["block_sparse"]}
    lines += [f"Block-sparse prefill (block 128; masks per {' / '.join(sorted(heads))} head; kept = fraction of "
              "causal cells; SDPA = the faster of its flash path and its default backend):", "",
              "| tokens | kept | SDPA flash ms | SDPA default ms | ours ms | Flex ms | ours vs SDPA | Flex vs SDPA "
              "| ideal | ours vs Flex | ours TFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["block_sparse"]:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['fraction']} | error | | | | | | | | |")
            continue
        lines.append(f"| {r['n']} | {r['kept']:.3f} | {r['sdpa_flash_ms']:.2f} | {r['sdpa_default_ms']:.2f} | "
                     f"{r['ours_ms']:.2f} | "
                     f"{r.get('flex_ms', float('nan')):.2f} | {r['speedup']:.2f}x | "
                     f"{r.get('flex_speedup', float('nan')):.2f}x | {r['ideal']:.2f}x | "
                     f"{r.get('vs_flex', float('nan')):.2f}x | {r['tflops']:.0f} |")
    lines += ["", "Vertical-slash prefill (64-key tiles; a 128-row block runs as one program of 8 warps; SDPA = the "
              "faster backend):", "",
              "| tokens | query block | sparsity | slashes | verticals | tile cells / kept | SDPA ms | ours ms "
              "| speedup | ideal | of ideal |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["vertical_slash"]:
        if "error" in r:
            lines.append(f"| {r['n']} | {r.get('block')} | {r['target_sparsity']} | error | | | | | | | |")
            continue
        lines.append(f"| {r['n']} | {r.get('block')} | {r['sparsity']:.3f} | {r['slashes']} | {r['verticals']} | "
                     f"{r.get('tiles_over_kept', float('nan')):.2f} | "
                     f"{r['sdpa_ms']:.2f} | {r['ours_ms']:.2f} | {r['speedup']:.2f}x | {r['ideal']:.2f}x | "
                     f"{r['of_ideal']:.0%} |")
    lines += ["", "Sparse decode (pages shared by the GQA group; CUDA-graph replays):", "",
              "| tokens | batch | page | pages kept | dense SDPA us | dense TB/s | ours us | speedup | MB read | "
              "ours TB/s | of 4.8 TB/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["decode"]:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['batch']} | {r['page']} | {r['fraction']} | error | | | | | | |")
            continue
        lines.append(f"| {r['n']} | {r['batch']} | {r['page']} | 1/{round(1 / r['fraction'])} | "
                     f"{r['dense_ms'] * 1e3:.0f} | "
                     f"{r['dense_tbs']:.2f} | {r['ours_us']:.1f} | {r['speedup']:.1f}x | {r['read_mb']:.0f} | "
                     f"{r['tbs']:.2f} | {r['of_peak']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 131072])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.2, 0.1, 0.05])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--vs-blocks", type=int, nargs="+", default=[64], help="vertical-slash query blocks")
    parser.add_argument("--vs-config", type=json.loads, help="vertical-slash launch options over the defaults, as JSON")
    parser.add_argument("--decode-lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--decode-fractions", type=float, nargs="+", default=[1 / 8, 1 / 16])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--pages", type=int, nargs="+", default=[16], help="decode page sizes (Quest's is 16)")
    parser.add_argument("--sections", nargs="+", default=["tune", "block", "vs", "decode"])
    parser.add_argument("--mask-heads", choices=["query", "kv"], default="query",
                        help="block-sparse masks per query head, or per KV head shared by its GQA group")
    parser.add_argument("--out", default="kernels.json")
    parser.add_argument("--markdown", default="kernels.md")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1 (script check)")
    args = parser.parse_args()
    if args.smoke:
        global DEVICE, HQ, HKV, D, SCALE
        DEVICE, HQ, HKV, D = "cpu", 4, 2, 16
        SCALE = D ** -0.5
    import triton

    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    results = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
               "tune": [], "block_sparse": [], "vertical_slash": [], "decode": []}

    def log(line: str) -> None:
        print(line, flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    config = decode_config = None
    vs_config = args.vs_config
    if "tune" in args.sections:
        big = DEVICE == "cuda"
        configs = [{"BLOCK_N": bn, "num_warps": 8, "num_stages": st, "TMA": tma}
                   for bn, st, tma in ((128, 3, False), (128, 3, True), (128, 2, True), (64, 3, True), (64, 4, True))]
        config = tune_section(65536 if big else 256, 128, configs, results, log)
        vs_configs = [{"num_warps": w, "num_stages": st, "TMA": tma}
                      for w, st, tma in ((4, 3, False), (4, 3, True), (4, 4, True), (8, 3, True))]
        vs_config = tune_vs_section(65536 if big else 256, vs_configs, results, log)
        decode_configs = [{"pages_per_tile": ppt, "num_warps": w, "num_stages": st, "occupancy": occ}
                          for ppt, w, st, occ in ((4, 4, 2, 4), (4, 4, 3, 8), (8, 4, 3, 4), (8, 8, 3, 8), (4, 4, 4, 8),
                                                  (2, 4, 3, 8))]
        cases = [(32768, 8), (131072, 8), (131072, 1)] if big else [(512, 2)]
        decode_config = tune_decode_section(cases, decode_configs, results, log)
        results.update(config=config, vs_config=vs_config, decode_config=decode_config)
    if "block" in args.sections:
        block_sparse_section(args.lengths, args.fractions, 128, config, results, log, args.mask_heads)
    if "vs" in args.sections:
        vertical_slash_section(args.lengths, args.sparsities, args.vs_blocks, vs_config, results, log)
    if "decode" in args.sections:
        decode_section(args.decode_lengths, args.decode_fractions, args.batches, args.pages, decode_config, results,
                       log)
    log("done")
    text = markdown(results)
    with open(args.markdown, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
