"""Selection kinds: each dense mask equals a hand computation of the cells its kernel computes."""

import torch

from sparse_frontier.kernels.reference import masked_attention
from sparse_frontier.policies.selection import (
    BlockMask,
    Dense,
    KeptKeys,
    PageSet,
    TokenSet,
    VerticalSlash,
    expand_heads,
)

T = 12
ROWS = torch.arange(T)


def hand_causal():
    return [[j <= i for j in range(T)] for i in range(T)]


def test_dense_is_causal_and_counts_cells():
    sel = Dense(heads=2)
    assert sel.mask(ROWS, T)[1].tolist() == hand_causal()
    assert sel.cells(ROWS, T).tolist() == [T * (T + 1) // 2] * 2


def test_block_mask_expands_blocks_and_applies_causal():
    blocks = torch.zeros(1, 3, 3, dtype=torch.bool)
    blocks[0, 2, 0] = True  # query block 2 (rows 8..11) keeps key block 0 (keys 0..3)
    blocks[0, 1, 1] = True  # query block 1 (rows 4..7) keeps its diagonal block
    got = BlockMask(blocks, block_q=4, block_k=4).mask(ROWS, T)[0]
    want = [[(i >= 8 and j < 4) or (4 <= i < 8 and 4 <= j <= i) for j in range(T)] for i in range(T)]
    assert got.tolist() == want


def test_vertical_slash_covers_block_parallelograms():
    # block 4: for the query block starting at r0, slash o covers keys r0-o .. r0+3-o
    sel = VerticalSlash(columns=[torch.tensor([1])], offsets=[torch.tensor([0, 6])], block=4)
    got = sel.mask(ROWS, T)[0]
    want = []
    for i in range(T):
        r0 = i // 4 * 4
        row = []
        for j in range(T):
            covered = any(r0 - o <= j <= r0 + 3 - o for o in (0, 6))
            row.append(j <= i and (covered or j == 1))
        want.append(row)
    assert got.tolist() == want
    assert sel.cells(ROWS, T).item() == sum(map(sum, want))


def test_token_set_keeps_listed_keys_and_ignores_padding():
    rows = torch.tensor([5, 9])
    sel = TokenSet(rows=rows, indices=torch.tensor([[[0, 5, -1], [2, 3, 9]]]))
    got = sel.mask(rows, T)[0]
    assert got.nonzero().tolist() == [[0, 0], [0, 5], [1, 2], [1, 3], [1, 9]]


def test_page_set_keeps_whole_pages_up_to_the_query():
    rows = torch.tensor([10])
    sel = PageSet(rows=rows, pages=torch.tensor([[[0, 2]]]), page_size=4)
    assert sel.mask(rows, T)[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 8, 9, 10]


def test_kept_keys_always_keep_new_tokens():
    kept = torch.zeros(1, 8, dtype=torch.bool)
    kept[0, [0, 3]] = True
    got = KeptKeys(kept).mask(torch.tensor([10]), T)[0, 0]
    assert got.nonzero().flatten().tolist() == [0, 3, 8, 9, 10]


def test_shared_selection_expands_over_gqa_group_and_matches_sdpa_when_dense():
    torch.manual_seed(0)
    q, k, v = torch.randn(4, T, 8), torch.randn(2, T, 8), torch.randn(2, T, 8)
    mask = Dense(heads=2).mask(ROWS, T)
    assert expand_heads(mask, 4).shape == (4, T, T)
    out, _ = masked_attention(q, k, v, ROWS, 0.35, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 0), v.repeat_interleave(2, 0), is_causal=True, scale=0.35)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
