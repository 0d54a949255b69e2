"""Kernels against the torch reference over each Selection's dense mask (Triton interpreter on CPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernels are compiled
    os.environ["TRITON_INTERPRET"] = "1"

from sparse_frontier.kernels import run_selection  # noqa: E402
from sparse_frontier.kernels.decode import _pick_splits, _tickets, sparse_decode  # noqa: E402
from sparse_frontier.kernels.flex import flex_block_mask, flex_prefill  # noqa: E402
from sparse_frontier.kernels.layout import (  # noqa: E402
    UnsupportedSelection,
    block_sparse_layout,
    coarsen,
    layout_cells,
    page_layout,
    tile_cells,
    vertical_slash_layout,
)
from sparse_frontier.kernels.prefill import _config, schedule, sparse_prefill  # noqa: E402
from sparse_frontier.kernels.reference import masked_attention, visible  # noqa: E402
from sparse_frontier.policies.selection import (  # noqa: E402
    BlockMask,
    Dense,
    KeptKeys,
    PageSet,
    TokenSet,
    VerticalSlash,
    expand_heads,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def inputs(n_q, n_kv, n_keys, head_dim=16, dtype=torch.float16, seed=0, device=DEVICE):
    """Random q [Hq, T, d], k, v [Hkv, T, d] (values of order one, logits of order a few)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, n_keys, head_dim, generator=gen) for h in (n_q, n_kv, n_kv))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def check(sel, q, k, v, rows, scale=0.3, softcap=None, window=None):
    """The kernel's output, lse and counted cells equal the reference over ``sel.mask``; returns the run."""
    rows = rows.to(q.device)
    run = run_selection(sel, q[:, rows], k, v, rows, scale, softcap=softcap, sliding_window=window,
                        backend="triton", count=True)
    mask = sel.mask(rows, k.shape[1])
    want, want_lse = masked_attention(q[:, rows], k, v, rows, scale, mask, softcap, window)
    err = (run.out.float() - want).abs().max().item()
    assert err <= TOL[q.dtype] * v.abs().max().item(), err
    empty = ~torch.isfinite(want_lse)
    assert torch.equal(~torch.isfinite(run.lse), empty)
    assert torch.allclose(run.lse[~empty], want_lse[~empty], atol=1e-2)
    assert (run.out[empty] == 0).all()
    cells = (expand_heads(mask, q.shape[0]) & visible(rows, k.shape[1], window)[None]).sum(-1)
    assert torch.equal(run.cells.long(), cells)
    return run


# ---------------------------------------------------------------- layouts (torch only, no kernel)

def test_block_layout_splits_full_and_partial_blocks_by_hand():
    blocks = torch.ones(1, 3, 3, dtype=torch.bool)
    blocks[0, 2, 1] = False
    layout = block_sparse_layout(BlockMask(blocks, 64, 64), n_keys=150)
    # query block 0: its diagonal (partial); block 1: key block 0 full, diagonal partial; block 2 (rows
    # 128..149): key block 0 full, key block 1 dropped by the selection, key block 2 partial (diagonal)
    assert layout.full_count[0].tolist() == [0, 1, 1]
    assert layout.part_count[0].tolist() == [1, 1, 1]
    assert layout.part_index[0, :, 0].tolist() == [0, 1, 2]
    assert layout_cells(layout, torch.arange(150)).item() == BlockMask(blocks, 64, 64).cells(
        torch.arange(150), 150).item()


def test_block_layout_drops_blocks_above_the_diagonal_and_outside_the_window():
    blocks = torch.ones(1, 4, 4, dtype=torch.bool)
    layout = block_sparse_layout(BlockMask(blocks, 64, 64), n_keys=256, sliding_window=64)
    # with a 64-key window, query block 3 (rows 192..255) sees key blocks 2 (partly) and 3 only
    assert layout.full_count[0].tolist() == [0, 0, 0, 0]
    assert layout.part_count[0].tolist() == [1, 2, 2, 2]


def test_schedule_runs_kv_head_by_kv_head_heaviest_first():
    """4 query heads over 2 KV heads, 3 query blocks, one mask per query head: items (head * 3 + block) in the
    order worked out by hand from the tile counts."""
    blocks = torch.zeros(4, 3, 3, dtype=torch.bool)
    blocks[:, 0, 0] = True  # every head: block 0 sees its diagonal (1 tile)
    blocks[:, 1, :2] = True  # block 1: 2 tiles
    blocks[:, 2, 2] = True  # block 2: 1 tile ...
    blocks[3, 2, :] = True  # ... but 3 for head 3
    layout = block_sparse_layout(BlockMask(blocks, 64, 64), n_keys=192)
    # KV head 0 (heads 0, 1): the 2-tile blocks first, then the 1-tile ones, head-major; then KV head 1
    assert schedule(layout, 4, 0, 3, group=2).tolist() == [1, 4, 0, 2, 3, 5, 11, 7, 10, 6, 8, 9]
    # two programs per query block: each item's halves stay together
    assert schedule(layout, 4, 0, 3, group=4, m_split=2).tolist()[:4] == [22, 23, 2, 3]


def test_block_layout_refuses_blocks_the_kernel_does_not_run():
    sel = BlockMask(torch.ones(2, 8, 8, dtype=torch.bool), 16, 16)
    with pytest.raises(ValueError, match="block_q is 16"):
        block_sparse_layout(sel, 128)
    coarse = coarsen(sel, 64)
    assert coarse.blocks.shape == (2, 2, 2) and coarse.block_q == 64
    assert (coarse.mask(torch.arange(128), 128) >= sel.mask(torch.arange(128), 128)).all()


def test_vertical_slash_layout_covers_exactly_the_mask_by_hand():
    sel = VerticalSlash(columns=[torch.tensor([0, 5, 70, 200])], offsets=[torch.tensor([0, 1, 100])], block=64)
    n = 190
    layout = vertical_slash_layout(sel, n)
    # query block 2 (r0=128): slash 100 covers keys 28..91, one whole tile below the diagonal; slashes 0
    # and 1 merge into keys 127..191, clipped to the 190 keys: one partial tile 127..189. Column 70 is
    # inside 28..91, column 5 is not, column 200 is past the end
    assert layout.full_index[0, 2, : layout.full_count[0, 2]].tolist() == [28]
    assert layout.part_index[0, 2, : layout.part_count[0, 2]].tolist() == [127]
    assert layout.part_end[0, 2, 0].item() == 190
    assert layout.col_index[0, 2, : layout.col_count[0, 2]].tolist() == [0, 5]
    rows = torch.arange(n)
    assert layout_cells(layout, rows).item() == sel.cells(rows, n).item()


def test_tile_cells_counts_the_masked_cells_of_whole_tiles_by_hand():
    # the 64-slash local band and 4 sinks, 64-row blocks, 256 keys: block 0 computes its diagonal tile; blocks
    # 1-3 a whole tile below the diagonal, the diagonal tile and one column tile (sink 0 for block 1, whose
    # band covers sinks 1-3; all four sinks for blocks 2 and 3): 10 tiles of 64 x 64
    sel = VerticalSlash(columns=[torch.arange(4)], offsets=[torch.arange(64)], block=64)
    layout = vertical_slash_layout(sel, 256)
    assert tile_cells(layout) == 10 * 64 * 64
    # kept: the diagonal triangle, then in each later block rows seeing 64..127 keys of the band, and the sinks
    kept = 64 * 65 // 2 + sum(range(64, 128)) + 64 + 2 * (sum(range(64, 128)) + 4 * 64)
    assert layout_cells(layout, torch.arange(256)).item() == kept == sel.cells(torch.arange(256), 256).item()
    blocks = BlockMask(torch.ones(1, 2, 2, dtype=torch.bool), block_q=64, block_k=64)
    assert tile_cells(block_sparse_layout(blocks, 128)) == 3 * 64 * 64  # two diagonal tiles and one full


# ---------------------------------------------------------------- block-sparse prefill

@pytest.mark.parametrize("n_q,n_kv,mask_heads", [(2, 2, 2), (3, 1, 1), (4, 1, 4)])
def test_block_sparse_gqa_groups_and_odd_length(n_q, n_kv, mask_heads):
    n = 197
    q, k, v = inputs(n_q, n_kv, n, seed=n_q)
    blocks = torch.rand(mask_heads, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    blocks[0, 1] = False  # an empty query block: its rows output zeros
    run = check(BlockMask(blocks.to(DEVICE), 64, 64), q, k, v, torch.arange(n))
    assert (run.out[0, 64:128] == 0).all()


def test_block_sparse_single_block_and_all_blocks_at_128():
    n = 256
    q, k, v = inputs(4, 1, n, dtype=torch.bfloat16)
    single = torch.zeros(1, 2, 2, dtype=torch.bool)
    single[0, 1, 0] = True
    check(BlockMask(single.to(DEVICE), 128, 128), q, k, v, torch.arange(n))
    run = check(Dense(heads=4), q, k, v, torch.arange(n))
    assert run.cells.sum().item() == 4 * n * (n + 1) // 2


def test_block_sparse_rows_window_and_softcap():
    n = 180
    q, k, v = inputs(3, 1, n)
    blocks = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(3)) < 0.7
    rows = torch.tensor([5, 70, 71, 130, 179])  # unaligned, non-contiguous query rows
    check(BlockMask(blocks.to(DEVICE), 64, 64), q, k, v, rows, softcap=4.0, window=50)


@pytest.mark.parametrize("block_k,window", [(128, None), (64, None), (128, 90)])
def test_block_sparse_query_blocks_split_in_two_programs(block_k, window):
    # M_SPLIT 2: 64-row programs over 128-row blocks; the upper half skips the diagonal tile's later keys
    n = 300
    q, k, v = inputs(4, 2, n, seed=16)
    rows = torch.arange(n, device=DEVICE)
    gen = torch.Generator().manual_seed(17)
    sel = BlockMask((torch.rand(2, 3, -(-n // block_k), generator=gen) < 0.6).to(DEVICE), 128, block_k)
    layout = block_sparse_layout(sel, n, sliding_window=window)
    for config in ({"M_SPLIT": 2}, {"M_SPLIT": 2, "BLOCK_N": 128}):
        out, _, cells = sparse_prefill(q, k, v, layout, 0.3, sliding_window=window, count=True, config=config)
        mask = sel.mask(rows, n)
        want = masked_attention(q, k, v, rows, 0.3, mask, None, window)[0]
        assert (out.float() - want).abs().max().item() <= TOL[q.dtype] * v.abs().max().item()
        assert torch.equal(cells.long(), (expand_heads(mask, 4) & visible(rows, n, window)[None]).sum(-1))


def test_auto_backend_runs_what_no_kernel_runs_through_the_reference():
    # 16-token blocks (block_sparse's default) and float32 inputs have no kernel: "auto" falls back to the
    # reference instead of failing; 64-token blocks in float16 run on the kernel; "triton" still refuses
    n = 200
    q, k, v = inputs(4, 2, n, seed=20)
    rows = torch.arange(n, device=DEVICE)
    gen = torch.Generator().manual_seed(21)
    for block, dtype, backend in ((16, torch.float16, "torch"), (64, torch.float32, "torch"),
                                  (64, torch.float16, "triton")):
        sel = BlockMask((torch.rand(2, -(-n // block), -(-n // block), generator=gen) < 0.5).to(DEVICE), block, block)
        qd, kd, vd = (x.to(dtype) for x in (q, k, v))
        run = run_selection(sel, qd, kd, vd, rows, 0.3, count=True)
        want = masked_attention(qd, kd, vd, rows, 0.3, sel.mask(rows, n))[0]
        assert run.backend == backend
        assert (run.out.float() - want).abs().max().item() <= TOL[torch.float16] * v.abs().max().item()
    with pytest.raises(UnsupportedSelection, match="16"):
        run_selection(BlockMask(torch.ones(2, 13, 13, dtype=torch.bool, device=DEVICE), 16, 16), q, k, v, rows, 0.3,
                      backend="triton")


@pytest.mark.parametrize("block_n", [64, 128])
def test_tma_path_over_a_key_slice_of_a_longer_cache(block_n):
    # Hopper path: K/V tiles read through TMA descriptors; tiles running past the slice read masked rows
    n = 190
    q, k, v = inputs(4, 2, 256, seed=14)
    k[:, n:], v[:, n:] = float("nan"), float("nan")  # cache rows past the keys: never read into the output
    q, k, v = q[:, :n], k[:, :n], v[:, :n]
    rows = torch.arange(n)
    gen = torch.Generator().manual_seed(15)
    block = BlockMask((torch.rand(2, 2, 2, generator=gen) < 0.7).to(DEVICE), 128, 128)
    slash = VerticalSlash(columns=[torch.tensor([0, 9, 100])] * 2, offsets=[torch.tensor([0, 3, 90])] * 2)
    for sel, layout in ((block, block_sparse_layout(block, n)), (slash, vertical_slash_layout(_to(slash), n))):
        out, _, cells = sparse_prefill(q, k, v, layout, 0.3, count=True, config={"TMA": True, "BLOCK_N": block_n})
        mask = sel.mask(rows.to(DEVICE), n)
        want = masked_attention(q, k, v, rows.to(DEVICE), 0.3, mask)[0]
        assert (out.float() - want).abs().max().item() <= TOL[q.dtype] * v.abs().max().item()
        assert torch.equal(cells.long(), expand_heads(mask, 4).sum(-1))


def _to(sel: VerticalSlash) -> VerticalSlash:
    return VerticalSlash([c.to(DEVICE) for c in sel.columns], [o.to(DEVICE) for o in sel.offsets], sel.block)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_adapter_matches_the_reference():
    n = 200
    q, k, v = inputs(4, 2, n, dtype=torch.float32, device="cpu")
    sel = BlockMask(torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(4)) < 0.5, 64, 64)
    out = flex_prefill(q, k, v, flex_block_mask(sel, n, 4), 0.3)
    rows = torch.arange(n)
    want = masked_attention(q, k, v, rows, 0.3, sel.mask(rows, n))[0]
    assert torch.allclose(out, want, atol=1e-5)


# ---------------------------------------------------------------- vertical-slash prefill

def test_vertical_slash_merges_ranges_and_gathers_uncovered_columns():
    n = 201
    q, k, v = inputs(3, 1, n, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    sel = VerticalSlash(columns=[torch.tensor([0, 1, 2, 3, 90, 91, 150]), torch.randint(0, n, (9,), generator=gen),
                                 torch.tensor([], dtype=torch.long)],
                        offsets=[torch.tensor([0, 1, 2, 70, 71, 130]), torch.randint(0, n, (7,), generator=gen),
                                 torch.tensor([], dtype=torch.long)],  # third head: nothing kept (empty rows)
                        block=64)
    run = check(sel, q, k, v, torch.arange(n))
    assert (run.out[2] == 0).all()


@pytest.mark.parametrize("block", [64, 128])
def test_vertical_slash_many_columns_seen_by_whole_blocks(block):
    # enough kept columns below each block's first row for whole unmasked column tiles, plus a masked tail
    n = 700
    q, k, v = inputs(2, 1, n, seed=8)
    gen = torch.Generator().manual_seed(8)
    sel = VerticalSlash(columns=[torch.randint(0, n, (500,), generator=gen) for _ in range(2)],
                        offsets=[torch.cat([torch.arange(64), torch.randint(0, n, (3,), generator=gen)])
                                 for _ in range(2)], block=block)
    layout = vertical_slash_layout(sel, n)
    assert layout.tile == 64
    r0 = torch.arange(layout.n_qblocks) * block
    seen = torch.arange(layout.col_index.shape[-1]) < layout.col_seen[..., None]
    assert (layout.col_index[seen] <= r0[None, :, None].expand_as(seen)[seen]).all()  # a prefix every row sees
    assert int(layout.col_seen.max()) >= 128
    check(sel, q, k, v, torch.arange(n))
    run = run_selection(sel, q, k, v, torch.arange(n), 0.3, backend="triton")
    # 128-column tiles; all columns masked; 64-row programs (for 128-row blocks: two per block)
    for config in ({"COL_SPLIT": True, "BLOCK_C": 128}, {"COL_SPLIT": False}, {**_config(64, 64, 64, True),
                                                                                "M_SPLIT": block // 64}):
        other = sparse_prefill(q, k, v, layout.to(DEVICE), 0.3, config=config)[0]
        assert (other.float() - run.out.float()).abs().max().item() <= TOL[q.dtype] * v.abs().max().item()


def test_vertical_slash_gqa_group_four_window_and_rows():
    n = 160
    q, k, v = inputs(4, 1, n, seed=6)
    sel = VerticalSlash(columns=[torch.tensor([3, 40, 100])], offsets=[torch.tensor([0, 5, 64, 65, 66, 120])],
                        block=64)
    check(sel, q, k, v, torch.arange(20, n), window=40)


# ---------------------------------------------------------------- decode

@pytest.mark.parametrize("n_q,n_kv,shared", [(1, 1, True), (3, 1, True), (4, 2, False)])
def test_sparse_decode_pages(n_q, n_kv, shared):
    n = 301
    q, k, v = inputs(n_q, n_kv, n, seed=7)
    rows = torch.tensor([200, 288, 300])
    heads = n_kv if shared else n_q
    pages = torch.randint(-1, 19, (heads, 3, 5), generator=torch.Generator().manual_seed(8))
    pages[0, 0] = -1  # nothing selected: zeros
    pages[0, 1] = torch.tensor([3, 3, 3, -1, -1])  # one page, repeated
    run = check(PageSet(rows, pages, page_size=16), q, k, v, rows)
    assert (run.out[: n_q // n_kv if shared else 1, 0] == 0).all()


def test_sparse_decode_all_pages_window_and_tokens():
    n = 130
    q, k, v = inputs(4, 1, n, dtype=torch.bfloat16, seed=9)
    rows = torch.tensor([100, 129])
    all_pages = torch.arange(5)[None, None].expand(1, 2, 5)
    check(PageSet(rows, all_pages, page_size=32), q, k, v, rows, window=70)
    tokens = torch.randint(0, n, (1, 2, 40), generator=torch.Generator().manual_seed(10))
    check(TokenSet(rows, tokens), q, k, v, rows)


def test_decode_merge_in_the_last_split_equals_the_merge_kernel():
    # the last split of each (step, mask head) merges the partials (a ticket counter, left at zero for the
    # next call), or a second kernel does when there are more splits than fuse_splits
    n, steps = 400, 3
    q, k, v = inputs(4, 2, n, seed=18)
    rows = torch.tensor([150, 300, 399], device=DEVICE)
    pages = torch.randint(0, 25, (2, steps, 20), generator=torch.Generator().manual_seed(19)).to(DEVICE)
    layout = page_layout(PageSet(rows, pages, page_size=16), rows, n)
    args = (q[:, rows].transpose(0, 1).contiguous(), k[None].expand(steps, -1, -1, -1),
            v[None].expand(steps, -1, -1, -1), layout, 0.3)
    want, want_lse, want_cells = sparse_decode(*args, splits=5, fuse_splits=0, count=True)
    for _ in range(2):
        out, lse, cells = sparse_decode(*args, splits=5, count=True)
        assert (out.float() - want.float()).abs().max().item() <= 1e-3
        assert torch.allclose(lse, want_lse, atol=1e-5) and torch.equal(cells, want_cells)
    assert not _tickets(q.device, steps * 2).any()


def test_decode_splits_fill_whole_waves():
    # 64 (step, head) pairs of 256 tiles on 132 SMs x 4 programs: 8 splits (512 programs) run in one wave of
    # 32 tiles each, where 9 splits (576 programs) would need a second wave
    assert _pick_splits(64, 256, 132, 4) == 8
    # one pair of 2 tiles: never more splits than tiles; short work: one split per tile while a wave has room
    assert _pick_splits(1, 2, 132, 4) == 2
    for programs, tiles in ((8, 128), (64, 32), (3, 1000)):
        splits = _pick_splits(programs, tiles, 132, 4)
        assert 1 <= splits <= tiles and programs * splits <= 2 * 132 * 4


def test_eviction_runs_dense_decode_over_the_compacted_cache():
    n, prefill = 200, 150
    q, k, v = inputs(3, 1, n, seed=11)
    kept = torch.rand(1, prefill, generator=torch.Generator().manual_seed(12)) < 0.3
    rows = torch.tensor([149, 160, 199])
    run = check(KeptKeys(kept), q, k, v, rows)
    assert run.cells[0, 0].item() == int(kept.sum())


def test_torch_backend_is_the_reference():
    n = 64
    q, k, v = inputs(2, 1, n, dtype=torch.float32, device="cpu")
    rows = torch.arange(n)
    sel = BlockMask(torch.ones(1, 1, 1, dtype=torch.bool), 64, 64)
    run = run_selection(sel, q, k, v, rows, 0.3, backend="torch", count=True)
    assert run.backend == "torch"
    assert torch.equal(run.out, masked_attention(q, k, v, rows, 0.3)[0])
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        run_selection(sel, q, k, v, rows, 0.3, backend="triton")


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_at_realistic_shapes():
    n = 2048
    q, k, v = inputs(32, 8, n, head_dim=128, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(13)
    check(BlockMask((torch.rand(32, 16, 16, generator=gen) < 0.3).to(DEVICE), 128, 128), q, k, v, torch.arange(n))
    sel = VerticalSlash(columns=[torch.randint(0, n, (100,), generator=gen) for _ in range(32)],
                        offsets=[torch.cat([torch.arange(64), torch.randint(0, n, (50,), generator=gen)])
                                 for _ in range(32)])
    check(sel, q, k, v, torch.arange(n))
    layout = vertical_slash_layout(_to(sel), n)
    want = run_selection(sel, q, k, v, torch.arange(n, device=DEVICE), 0.3, backend="triton").out.float()
    out = sparse_prefill(q, k, v, layout, 0.3, config={"TMA": True})[0].float()
    assert (out - want).abs().max().item() <= TOL[q.dtype] * v.abs().max().item()
    rows = torch.tensor([n - 1])
    check(PageSet(rows, torch.randint(0, n // 16, (8, 1, 16), generator=gen), 16), q, k, v, rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fallback_takes_selections_built_on_the_cpu():
    # policies build some Selections on the CPU; the reference fallback on a CUDA q must move them over
    n = 300
    q, k, v = inputs(4, 2, n, dtype=torch.bfloat16)
    rows = torch.arange(n, device=DEVICE)
    blocks = torch.rand(2, 19, 19, generator=torch.Generator().manual_seed(22)) < 0.5
    pages = PageSet(torch.tensor([n - 1]), torch.tensor([[[0, 3, 18]], [[1, 2, 18]]]), page_size=16)
    mixed = PageSet(pages.rows.to(DEVICE), pages.pages, page_size=16)  # rows on the GPU, pages on the CPU (Quest)
    for sel, at, ref in ((BlockMask(blocks, 16, 16), rows, None), (pages, rows[-1:], None), (mixed, rows[-1:], pages)):
        run = run_selection(sel, q[:, at], k, v, at, 0.3)
        want = masked_attention(q[:, at], k, v, at, 0.3, (ref or sel).mask(at.cpu(), n).to(DEVICE))[0]
        assert run.backend == ("torch" if isinstance(sel, BlockMask) else "triton")
        assert (run.out.float() - want).abs().max().item() <= TOL[torch.bfloat16] * v.abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_offsets_past_two_to_the_31():
    """Inputs whose element offsets pass 2**31 (a batch of long caches, a long prompt over many heads) give the
    same result as the same values stored compactly: offsets of whole sequences and heads do not wrap."""
    gap = 2**30 + 2**20  # elements between consecutive sequences (decode) or heads (prefill): the third is past 2**31
    buffer = torch.zeros(2 * gap + 2**20, dtype=torch.bfloat16, device=DEVICE)  # 4.3 GB

    def far(x: torch.Tensor, at: int) -> torch.Tensor:
        """x [3, ...] (contiguous) copied into the buffer, its first dimension ``gap`` apart, from offset ``at``."""
        view = buffer.as_strided(x.shape, (gap, *x.stride()[1:]), at)
        return view.copy_(x)

    n = 400
    q, k, v = inputs(3, 3, n, head_dim=64, dtype=torch.bfloat16, seed=23)
    # decode: 3 steps, each with its own cache [3 KV heads, n, 64]
    rows = torch.tensor([150, 300, 399], device=DEVICE)
    pages = torch.randint(0, 25, (3, 3, 12), generator=torch.Generator().manual_seed(24)).to(DEVICE)
    layout = page_layout(PageSet(rows, pages, page_size=16), rows, n)
    steps_q = q[:, rows].transpose(0, 1).contiguous()
    k3, v3 = k[None].repeat(3, 1, 1, 1), v[None].repeat(3, 1, 1, 1)
    want = sparse_decode(steps_q, k3, v3, layout, 0.3)[0]
    got = sparse_decode(steps_q, far(k3, 0), far(v3, k3.numel()), layout, 0.3)[0]
    assert torch.equal(got, want)
    # prefill: 3 query heads and 3 KV heads, each head gap elements after the one before
    blocks = (torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(25)) < 0.5).to(DEVICE)
    layout = block_sparse_layout(BlockMask(blocks, 64, 64), n_keys=n)
    want = sparse_prefill(q, k, v, layout, 0.3)[0]
    got = sparse_prefill(far(q, 0), far(k, q[0].numel()), far(v, 2 * q[0].numel()), layout, 0.3)[0]
    assert torch.equal(got, want)
