"""Torch reference attention over a Selection's dense mask: the ground truth for kernels and the CPU path."""

from __future__ import annotations

import torch
from torch import Tensor

from sparse_frontier.policies.selection import Selection, causal, expand_heads


def attention_logits(q: Tensor, k: Tensor, scale: float, softcap: float | None = None) -> Tensor:
    """Scaled (and soft-capped) logits [Hq, R, T] of queries q [Hq, R, d] against keys k [Hkv, T, d]."""
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, dim=0) if group > 1 else k
    return scale_logits_(torch.matmul(q.float(), k.float().transpose(-1, -2)), scale, softcap)


def scale_logits_(logits: Tensor, scale: float, softcap: float | None = None) -> Tensor:
    """``logits`` (raw q.k products) scaled and soft-capped in place; a scale of 1 skips the multiplication."""
    if scale != 1:
        logits.mul_(scale)
    if softcap:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def first_visible(row: int, sliding_window: int | None = None) -> int:
    """First key a query at position ``row`` sees: 0, or the start of its sliding window."""
    return max(0, int(row) - sliding_window + 1) if sliding_window else 0


def visible(rows: Tensor, n_keys: int, sliding_window: int | None = None) -> Tensor:
    """Keys each query row may see [R, T]: causal, and within the sliding window when the layer has one."""
    mask = causal(rows, n_keys)
    if sliding_window:
        keys = torch.arange(n_keys, device=rows.device)
        mask &= keys[None, :] > rows[:, None] - sliding_window
    return mask


def masked_attention(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, scale: float, mask: Tensor | None = None,
                     softcap: float | None = None, sliding_window: int | None = None) -> tuple[Tensor, Tensor]:
    """Attention of q [Hq, R, d] at positions ``rows`` over k/v [Hkv, T, d], restricted to ``mask``.

    ``mask`` is [Hq or Hkv, R, T] (None = dense). Rows with nothing selected output zeros and an lse of -inf.
    Returns (output [Hq, R, d] float32, log-sum-exp [Hq, R] float32).
    """
    n_q = q.shape[0]
    group = n_q // k.shape[0]
    logits = attention_logits(q, k, scale, softcap)
    allowed = visible(rows, k.shape[1], sliding_window)[None]
    if mask is not None:
        allowed = allowed & expand_heads(mask, n_q)
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.clamp(min=-1e30)[..., None]).nan_to_num(0.0)
    vv = v.repeat_interleave(group, dim=0) if group > 1 else v
    return torch.matmul(probs, vv.float()), lse


def selection_attention(selection: Selection, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, scale: float,
                        softcap: float | None = None, sliding_window: int | None = None) -> Tensor:
    """Reference output [Hq, R, d] of running ``selection`` for the query rows ``rows``."""
    mask = selection.mask(rows, k.shape[1])
    return masked_attention(q, k, v, rows, scale, mask, softcap, sliding_window)[0]
