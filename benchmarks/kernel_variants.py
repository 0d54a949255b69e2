"""Check and time launch variants of the Triton kernels against their current defaults, in one run.

    python benchmarks/kernel_variants.py --out variants.json [--variant vs w8 '{"num_warps": 8}' ...]

Each variant is first checked against the torch reference (2K tokens, fresh random inputs) and then timed
beside the default at the shapes of benchmarks/kernels.py; the default is timed twice to show the noise.
Vertical-slash also times parts of its layout (ranges only, columns only, neither) to show where time goes;
decode compares launch settings; ``fixed`` splits a decode call's fixed cost (an empty kernel on the same grid,
the merge kernel alone, 1 / 2 / 4 tiles per program); ``l2`` (not run by default) reads K/V-sized tiles from
L2-resident and HBM-sized buffers, the ceiling of a tile-streaming kernel. The registers, spills and shared memory
of every compiled kernel are printed last. ``--smoke`` runs it on tiny shapes under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from functools import partial

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as kb  # noqa: E402  (benchmarks/kernels.py: shapes, masks, timers)
from sparse_frontier.kernels.decode import _merge_kernel, sparse_decode  # noqa: E402
from sparse_frontier.kernels.layout import (  # noqa: E402
    PrefillLayout,
    block_sparse_layout,
    layout_cells,
    vertical_slash_layout,
)
from sparse_frontier.kernels.prefill import sparse_prefill  # noqa: E402
from sparse_frontier.kernels.reference import masked_attention  # noqa: E402
from sparse_frontier.policies.selection import BlockMask, VerticalSlash  # noqa: E402

BLOCK = {"base": {}}
VS = {"base": {}}
DECODE = {"base": {}, "base_again": {}}


def rel_err(out, ref) -> float:
    return float((out.float() - ref).norm() / ref.norm())


SIZES = {"check": 2048, "block": ((65536, (1.0, 0.2, 0.1, 0.05)), (16384, (1.0, 0.2, 0.1, 0.05))),
         "vs": (16384, 65536),
         "decode": ((32768, 8), (131072, 8), (131072, 1), (32768, 1))}


def qkv(n: int, gen) -> tuple:
    """Random q [Hq, n, d], k, v [Hkv, n, d]."""
    return tuple(torch.randn(h, n, kb.D, device=kb.DEVICE, dtype=kb.DTYPE, generator=gen)
                 for h in (kb.HQ, kb.HKV, kb.HKV))


def check_prefill(config) -> dict:
    """Block-sparse and vertical-slash outputs against the reference, 2K tokens, 32/8 heads, d 128, bf16."""
    n = SIZES["check"]
    gen = torch.Generator(device=kb.DEVICE).manual_seed(int.from_bytes(os.urandom(4), "little"))
    q, k, v = qkv(n, gen)
    rows = torch.arange(n, device=kb.DEVICE)
    out = {}
    sel = BlockMask(torch.rand(kb.HQ, n // 128, n // 128, device=kb.DEVICE, generator=gen) < 0.3, 128, 128)
    got = sparse_prefill(q, k, v, block_sparse_layout(sel, n), kb.SCALE, config=config)[0]
    ref = masked_attention(q, k, v, rows, kb.SCALE, sel.mask(rows, n))[0]
    out["block_rel_err"] = rel_err(got, ref)
    out["block_nan"] = bool(torch.isnan(got).any())
    for block, tile in ((64, 64), (128, 128)):
        vs = VerticalSlash([torch.randint(0, n, (n // 5,), device=kb.DEVICE, generator=gen) for _ in range(kb.HQ)],
                           [torch.cat([torch.arange(64, device=kb.DEVICE),
                                       torch.randint(0, n, (50,), device=kb.DEVICE, generator=gen)])
                            for _ in range(kb.HQ)], block=block)
        got = sparse_prefill(q, k, v, vertical_slash_layout(vs, n, tile=tile), kb.SCALE, config=config)[0]
        ref = masked_attention(q, k, v, rows, kb.SCALE, vs.mask(rows, n))[0]
        out[f"vs{block}_rel_err"] = rel_err(got, ref)
        out[f"vs{block}_nan"] = bool(torch.isnan(got).any())
    out["ok"] = max(v for key, v in out.items() if key.endswith("err")) < 1e-2 and not any(
        v for key, v in out.items() if key.endswith("nan"))
    return out


def block_data():
    gen = torch.Generator(device=kb.DEVICE).manual_seed(5)
    cases = []
    for n, fractions in SIZES["block"]:
        q, k, v = qkv(n, gen)
        for f in fractions:
            layout = block_sparse_layout(BlockMask(kb.random_block_mask(n // 128, f, gen), 128, 128), n)
            cells = float(layout_cells(layout, torch.arange(n, device=kb.DEVICE)).sum())
            cases.append((f"{n // 1024}K kept {f}", q, k, v, layout, cells))
    return cases


def time_prefill(name, config, cases, base_out, results, kernel):
    row = {"kernel": kernel, "variant": name, "config": {k: str(v) for k, v in config.items()}}
    try:
        row.update(check_prefill(config))
        for label, q, k, v, layout, cells in cases:
            t = kb.bench(partial(sparse_prefill, q, k, v, layout, kb.SCALE, config=config))
            out = sparse_prefill(q, k, v, layout, kb.SCALE, config=config)[0]
            if label not in base_out:
                base_out[label] = out
            row[label] = {"ms": t * 1e3, "tflops": 4 * kb.D * cells / t / 1e12,
                          "max_diff_vs_base": float((out.float() - base_out[label].float()).abs().max())}
    except Exception:
        row["error"] = traceback.format_exc(limit=4)
    results.append(row)
    print(json.dumps(row), flush=True)


def without(layout: PrefillLayout, ranges: bool = True, cols: bool = True) -> PrefillLayout:
    """The layout with its key ranges and/or gathered columns dropped (zero counts): where time goes."""
    fields = dict(vars(layout))
    fields.pop("schedules")
    if not ranges:
        fields["full_count"] = torch.zeros_like(layout.full_count)
        fields["part_count"] = torch.zeros_like(layout.part_count)
    if not cols:
        fields["col_count"] = torch.zeros_like(layout.col_count)
        fields["col_seen"] = torch.zeros_like(layout.col_seen)
    return PrefillLayout(**fields)


def one_masked_loop(layout: PrefillLayout) -> PrefillLayout:
    """The same tiles with the full ones moved into the masked list: one loop instead of two."""
    wf, wp = layout.full_index.shape[-1], layout.part_index.shape[-1]
    dev = layout.full_count.device
    idx = torch.cat([layout.full_index, layout.part_index], -1)
    end = torch.cat([layout.full_index + layout.tile, layout.part_end], -1)
    valid = torch.cat([torch.arange(wf, device=dev) < layout.full_count[..., None],
                       torch.arange(wp, device=dev) < layout.part_count[..., None]], -1)
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    fields = dict(vars(layout))
    fields.pop("schedules")
    fields.update(full_count=torch.zeros_like(layout.full_count), part_count=valid.sum(-1).to(torch.int32),
                  part_index=torch.gather(idx, -1, order).contiguous(),
                  part_end=torch.gather(end, -1, order).contiguous())
    return PrefillLayout(**fields)


def kv_bytes(layout: PrefillLayout, head_dim: int) -> float:
    """Bytes of K and V (bf16) that the programs of a 64-row vertical-slash layout load: whole key tiles of the
    ranges plus the gathered columns."""
    keys = (layout.full_count + layout.part_count) * layout.tile + layout.col_count
    return float(keys.sum()) * head_dim * 2 * 2


@triton.jit
def _read_tiles_kernel(X, OUT, n_tiles, TILES: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    """Sums TILES tiles of ROWS x D read from X at scattered tile indices: a probe of the read bandwidth."""
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    acc = tl.zeros([ROWS, D], tl.float32)
    for i in range(TILES):
        t = (pid * 7919 + i * 104729) % n_tiles
        acc += tl.load(X + (t * ROWS + rows)[:, None].to(tl.int64) * D + cols[None, :]).to(tl.float32)
    tl.store(OUT + pid * D + cols, tl.sum(acc, 0))


def l2_section(results):
    """Read bandwidth of 64 x 128 bf16 tiles (a vertical-slash program's K or V tile) from a buffer the size of
    one KV head's K and V at 16K and 64K tokens (L2-resident) and from 4 GB (HBM): the ceiling of a kernel that
    streams tiles from L2."""
    rows, tiles = 64, 64
    programs = 24 * torch.cuda.get_device_properties(0).multi_processor_count if kb.DEVICE == "cuda" else 4
    for mbytes in (8, 32, 4096) if kb.DEVICE == "cuda" else (1, 2):
        x = torch.randn(mbytes * 2 ** 20 // 2 // kb.D, kb.D, device=kb.DEVICE, dtype=kb.DTYPE)
        out = torch.empty(programs, kb.D, device=kb.DEVICE)
        n_tiles = x.shape[0] // rows
        t = kb.bench(partial(_read_tiles_kernel[(programs,)], x, out, n_tiles, TILES=tiles, ROWS=rows, D=kb.D))
        row = {"kernel": "tile_read", "buffer_mb": mbytes, "ms": t * 1e3,
               "tb_per_s": programs * tiles * rows * kb.D * 2 / t / 1e12}
        results.append(row)
        print(json.dumps(row), flush=True)


def vs_section(results):
    gen = torch.Generator(device=kb.DEVICE).manual_seed(1)
    cases = []
    for n in SIZES["vs"]:
        q, k, v = qkv(n, gen)
        rows = torch.arange(n, device=kb.DEVICE)
        for block, tile in ((64, 64), (128, 64), (128, 128)):
            sel = kb.slash_selection(n, *kb.vs_counts(n, 0.06, block), torch.Generator(device=kb.DEVICE).manual_seed(3),
                                     block=block)
            layout = vertical_slash_layout(sel, n, tile=tile)
            cells = float(layout_cells(layout, rows).sum())
            sparsity = 1 - cells / (kb.HQ * n * (n + 1) / 2)
            cases.append((f"{n // 1024}K block {block} tile {tile} s {sparsity:.3f}", q, k, v, layout, cells))
    base_out = {}
    for name, config in VS.items():
        time_prefill(name, config, cases, base_out, results, "vertical_slash")
    time_prefill("base_again", {}, cases, base_out, results, "vertical_slash")
    # where the time goes (default launch settings): ranges only, columns only, neither, one masked loop
    for label, q, k, v, layout, _ in cases[:1] + cases[3:4]:
        row = {"kernel": "vertical_slash_parts", "case": label}
        for part, lay in (("all", layout), ("ranges_only", without(layout, cols=False)),
                          ("cols_only", without(layout, ranges=False)),
                          ("nothing", without(layout, ranges=False, cols=False)),
                          ("one_masked_loop", one_masked_loop(layout))):
            row[part + "_ms"] = kb.bench(partial(sparse_prefill, q, k, v, lay, kb.SCALE)) * 1e3
        row["kv_tb_per_s"] = kv_bytes(layout, kb.D) / (row["all_ms"] * 1e-3) / 1e12
        row["n_full_tiles"] = float(layout.full_count.float().mean())
        row["n_part_tiles"] = float(layout.part_count.float().mean())
        row["n_cols"] = float(layout.col_count.float().mean())
        ref = sparse_prefill(q, k, v, layout, kb.SCALE)[0].float()
        row["one_loop_max_diff"] = float((sparse_prefill(q, k, v, one_masked_loop(layout), kb.SCALE)[0].float()
                                          - ref).abs().max())
        results.append(row)
        print(json.dumps(row), flush=True)


def decode_section(results):
    gen = torch.Generator(device=kb.DEVICE).manual_seed(4)
    for n, batch in SIZES["decode"]:
        k = torch.randn(batch, kb.HKV, n, kb.D, device=kb.DEVICE, dtype=kb.DTYPE, generator=gen)
        v = torch.randn(batch, kb.HKV, n, kb.D, device=kb.DEVICE, dtype=kb.DTYPE, generator=gen)
        q = torch.randn(batch, kb.HQ, kb.D, device=kb.DEVICE, dtype=kb.DTYPE, generator=gen)
        for fraction in (1 / 8, 1 / 16):
            layouts = kb.decode_layouts(batch, n, 16, fraction, 4, gen)
            n_pages = layouts[0].pages.shape[-1]
            read = 2 * batch * kb.HKV * n_pages * 16 * kb.D * 2
            # reference on the first layout: attention over the gathered selected keys
            lay = layouts[0]
            idx = (lay.pages.long()[..., None] * 16 + torch.arange(16, device=kb.DEVICE)).flatten(2)
            ks = torch.gather(k, 2, idx[..., None].expand(-1, -1, -1, kb.D)).float()
            vs = torch.gather(v, 2, idx[..., None].expand(-1, -1, -1, kb.D)).float()
            qg = q.float().view(batch, kb.HKV, kb.HQ // kb.HKV, kb.D)
            ref = torch.softmax(qg @ ks.transpose(-1, -2) * kb.SCALE, -1) @ vs
            ref = ref.view(batch, kb.HQ, kb.D)
            row = {"kernel": "decode", "n": n, "batch": batch, "fraction": fraction, "read_mb": read / 1e6}
            for name, cfg in DECODE.items():
                try:
                    out = sparse_decode(q, k, v, lay, kb.SCALE, **cfg)[0]
                    t = kb.bench_graph([partial(sparse_decode, q, k, v, la, kb.SCALE, **cfg) for la in layouts])
                    again = sparse_decode(q, k, v, lay, kb.SCALE, **cfg)[0]  # after the replays: tickets reset
                    row[name] = {"us": t * 1e6, "tbs": read / t / 1e12, "rel_err": rel_err(out, ref),
                                 "rel_err_after_replays": rel_err(again, ref)}
                except Exception:
                    row[name] = {"error": traceback.format_exc(limit=3)}
            results.append(row)
            print(json.dumps(row), flush=True)
        del k, v


@triton.jit
def _empty_kernel(X):
    """Does nothing: the launch floor of a grid."""
    pass


def fixed_cost_section(results):
    """Where the fixed part of a decode call goes, 32K tokens, batch 8, 8 splits pinned (the rule's choice at
    1/16): an empty kernel on the same grid, the merge kernel alone, and 4 / 2 / 1 tiles per program."""
    n, batch, splits = SIZES["decode"][0][0], SIZES["decode"][0][1], 8
    gen = torch.Generator(device=kb.DEVICE).manual_seed(6)
    k = torch.randn(batch, kb.HKV, n, kb.D, device=kb.DEVICE, dtype=kb.DTYPE, generator=gen)
    v = torch.randn_like(k)
    q = torch.randn(batch, kb.HQ, kb.D, device=kb.DEVICE, dtype=kb.DTYPE, generator=gen)
    row = {"kernel": "decode_fixed_cost", "n": n, "batch": batch, "splits": splits}
    x = torch.zeros(1, device=kb.DEVICE)
    row["empty_us"] = kb.bench_graph([partial(_empty_kernel[(splits, kb.HKV, batch)], x)] * 4) * 1e6
    o_part = torch.randn(batch, kb.HQ, splits, kb.D, device=kb.DEVICE)
    l_part = torch.randn(batch, kb.HQ, splits, device=kb.DEVICE)
    out = torch.empty(batch, kb.HQ, kb.D, device=kb.DEVICE, dtype=kb.DTYPE)
    lse = torch.empty(batch, kb.HQ, device=kb.DEVICE)
    merge = partial(_merge_kernel[(batch * kb.HQ,)], o_part, l_part, out, lse, splits, SPLITS=splits, HEAD_DIM=kb.D,
                    num_warps=4)
    row["merge_only_us"] = kb.bench_graph([merge] * 4) * 1e6
    for fraction in (1 / 16, 1 / 32, 1 / 64):
        layouts = kb.decode_layouts(batch, n, 16, fraction, 4, gen)
        read = 2 * batch * kb.HKV * layouts[0].pages.shape[-1] * 16 * kb.D * 2
        for name, cfg in (("fused", {}), ("unfused", {"fuse_splits": 0})):
            t = kb.bench_graph([partial(sparse_decode, q, k, v, la, kb.SCALE, splits=splits, **cfg)
                                for la in layouts])
            row[f"1/{round(1 / fraction)} {name}_us"] = t * 1e6
        row[f"1/{round(1 / fraction)} read_mb"] = read / 1e6
    results.append(row)
    print(json.dumps(row), flush=True)


def resources(results):
    """Registers, spills and shared memory of every compiled specialisation of the kernels (GPU only)."""
    from sparse_frontier.kernels.decode import _decode_split_kernel
    from sparse_frontier.kernels.prefill import _sparse_prefill_kernel

    for fn in (_sparse_prefill_kernel, _decode_split_kernel):
        for cache in getattr(fn, "device_caches", {}).values():
            for kernel in cache[0].values():
                try:
                    meta = kernel.metadata
                    consts = {str(k): v for k, v in getattr(kernel.src, "constants", {}).items()
                              if isinstance(v, (int, bool))}
                    ptx = kernel.asm.get("ptx", "")
                    row = {"kernel": fn.__name__, "regs": kernel.n_regs, "spills": kernel.n_spills,
                           "shared": meta.shared, "warps": meta.num_warps, "stages": meta.num_stages,
                           "wgmma": "wgmma" in ptx, "cp_async": "cp.async" in ptx,
                           "tma": "cp.async.bulk.tensor" in ptx, "constants": consts}
                except Exception as err:
                    row = {"kernel": fn.__name__, "error": repr(err)}
                results.append(row)
                print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="variants.json")
    parser.add_argument("--sections", nargs="+", default=["block", "vs", "decode", "fixed"])
    parser.add_argument("--vs-lengths", type=int, nargs="+", default=list(SIZES["vs"]),
                        help="vertical-slash prompt lengths")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1 (script check)")
    parser.add_argument("--variant", nargs=3, action="append", default=[], metavar=("KERNEL", "NAME", "JSON"),
                        help="a variant to time beside the default: block|vs|decode, its name, its launch options "
                             "as JSON (e.g. vs w8 '{\"num_warps\": 8}'); repeatable")
    args = parser.parse_args()
    for kernel, name, options in args.variant:
        {"block": BLOCK, "vs": VS, "decode": DECODE}[kernel][name] = json.loads(options)
    if args.smoke:
        kb.DEVICE, kb.HQ, kb.HKV, kb.D = "cpu", 4, 2, 16
        kb.SCALE = kb.D ** -0.5
        SIZES.update(check=256, block=((512, (1.0, 0.1)), (256, (0.05,))), vs=(256, 512),
                     decode=((512, 2), (1024, 1)))
    else:
        SIZES["vs"] = tuple(args.vs_lengths)
    results = []
    if "block" in args.sections:
        cases = block_data()
        base = {}
        for name, config in BLOCK.items():
            time_prefill(name, config, cases, base, results, "block_sparse")
        time_prefill("base_again", {}, cases, base, results, "block_sparse")
        del cases
    if "vs" in args.sections:
        vs_section(results)
    if "decode" in args.sections:
        decode_section(results)
    if "fixed" in args.sections:
        fixed_cost_section(results)
    if "l2" in args.sections:
        l2_section(results)
    if kb.DEVICE == "cuda":
        resources(results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
