"""Shared fixtures: small hand-made trace stores written through the real writer."""

from __future__ import annotations

import os

import torch

# Without CUDA the Triton kernels run under Triton's interpreter; Triton reads this when a kernel is defined,
# so it must be set before any test module imports sparse_frontier.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sparse_frontier.tracer.store import TraceWriter  # noqa: E402


def write_random_trace(path, *, n_layers=2, n_q_heads=4, n_kv_heads=2, head_dim=16, n_tokens=256,
                       prefill_len=None, seed=0, with_values=True, dtype="float32"):
    """Write a complete random trace store to ``path`` and return the tensors written."""
    gen = torch.Generator().manual_seed(seed)
    prefill_len = n_tokens if prefill_len is None else prefill_len
    attrs = {
        "model": {"name": "random", "source": "test", "architecture": "random", "n_layers": n_layers,
                  "n_q_heads": n_q_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim,
                  "softmax_scale": head_dim ** -0.5, "layer_types": ["full_attention"] * n_layers,
                  "sliding_window": None, "attn_logit_softcapping": None, "d_model": n_q_heads * head_dim,
                  "d_mlp": 4 * n_q_heads * head_dim, "vocab_size": 1000},
        "sequence": {"n_tokens": n_tokens, "prefill_len": prefill_len, "generated_len": n_tokens - prefill_len},
        "task": None,
        "capture": {"device": "cpu", "dtype": dtype},
    }
    writer = TraceWriter(str(path), attrs=attrs, n_layers=n_layers, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads,
                         head_dim=head_dim, n_tokens=n_tokens, q_positions=range(n_tokens), dtype=dtype,
                         with_values=with_values)
    writer.write_tokens(range(n_tokens))
    layers = []
    for i in range(n_layers):
        q = torch.randn(n_q_heads, n_tokens, head_dim, generator=gen) * 2
        k = torch.randn(n_kv_heads, n_tokens, head_dim, generator=gen) * 2
        v = torch.randn(n_kv_heads, n_tokens, head_dim, generator=gen)
        writer.write_layer(i, i, q, k, v if with_values else None)
        layers.append((q, k, v))
    writer.finish()
    return layers


@pytest.fixture
def random_trace(tmp_path):
    """Path of a small complete random trace (2 layers, GQA 4/2, 256 tokens, float32)."""
    path = tmp_path / "random.zarr"
    write_random_trace(path)
    return path
