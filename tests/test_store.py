"""The trace store: bit-exact round trips, streaming in pieces, refusal of bad stores, URLs, validation, CLI."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import write_random_trace

from sparse_frontier.cli.main import cli
from sparse_frontier.tracer.store import (
    MIN_CHUNK_BYTES,
    TraceError,
    TraceStore,
    TraceWriter,
    find_stores,
    store_info,
    validate_store,
)

ATTRS = {"model": {"name": "m", "n_layers": 2, "n_q_heads": 2, "n_kv_heads": 1, "head_dim": 8,
                   "softmax_scale": 8 ** -0.5, "layer_types": ["full_attention", "sliding_attention"],
                   "sliding_window": 4, "attn_logit_softcapping": None},
         "sequence": {"n_tokens": 12, "prefill_len": 12, "generated_len": 0}, "task": None, "capture": {}}


def _writer(url, dtype="float32", n_tokens=12, q_positions=None, **kw):
    attrs = json.loads(json.dumps(ATTRS))
    attrs["sequence"].update(n_tokens=n_tokens, prefill_len=n_tokens)
    return TraceWriter(str(url), attrs=attrs, n_layers=2, n_q_heads=2, n_kv_heads=1, head_dim=8,
                       n_tokens=n_tokens, q_positions=range(n_tokens) if q_positions is None else q_positions,
                       dtype=dtype, **kw)


def test_bfloat16_round_trip_is_bit_exact(tmp_path):
    x = torch.randn(2, 4, 300, 8) * torch.logspace(-30, 30, 300)[None, None, :, None]
    x[0, 0, :4, 0] = torch.tensor([3.3e38, -3.3e38, 1.2e-38, -0.0])
    layers = write_random_trace(tmp_path / "t.zarr", n_q_heads=4, n_kv_heads=4, head_dim=16, n_tokens=300,
                                dtype="bfloat16")
    store = TraceStore(tmp_path / "t.zarr")
    for i, (q, k, v) in enumerate(layers):
        assert torch.equal(store.q(i), q.to(torch.bfloat16).float())
        assert torch.equal(store.k(i, head=1), k[1].to(torch.bfloat16).float())
        raw = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")["v"]
        assert raw.attrs["dtype"] == "bfloat16" and raw.dtype == np.uint16
        assert np.array_equal(raw[i], v.to(torch.bfloat16).view(torch.uint16).numpy())
    # extreme magnitudes that float16 cannot hold survive bfloat16 storage bit for bit
    writer = _writer(tmp_path / "x.zarr", dtype="bfloat16", n_tokens=300)
    writer.write_layer(0, 0, x[0, :2], x[1, :1], x[1, 1:2])
    writer.write_layer(1, 1, x[0, 2:], x[1, 2:3], x[1, 3:4])
    writer.finish()
    store = TraceStore(tmp_path / "x.zarr")
    assert torch.equal(store.q(0), x[0, :2].to(torch.bfloat16).float())
    assert torch.equal(store.k(1), x[1, 2:3].to(torch.bfloat16).float())


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_float_round_trip(tmp_path, dtype):
    layers = write_random_trace(tmp_path / "t.zarr", dtype=dtype)
    store = TraceStore(tmp_path / "t.zarr")
    for i, (q, _, v) in enumerate(layers):
        cast = getattr(torch, dtype)
        assert torch.equal(store.q(i), q.to(cast).float())
        assert torch.equal(store.v(i), v.to(cast).float())
    assert zarr.open_group(str(tmp_path / "t.zarr"), mode="r")["k"].dtype == np.dtype(dtype)


def test_incomplete_store_is_refused_but_described(tmp_path):
    writer = _writer(tmp_path / "t.zarr")
    writer.write_layer(0, 0, torch.ones(2, 12, 8), torch.ones(1, 12, 8), torch.ones(1, 12, 8))
    writer.close()  # as if the capture was killed before finish
    with pytest.raises(TraceError, match="incomplete"):
        TraceStore(tmp_path / "t.zarr")
    assert store_info(tmp_path / "t.zarr")["complete"] is False
    result = CliRunner().invoke(cli, ["trace", "info", str(tmp_path / "t.zarr")])
    assert result.exit_code == 0 and "INCOMPLETE" in result.output
    result = CliRunner().invoke(cli, ["trace", "validate", str(tmp_path / "t.zarr")])
    assert result.exit_code == 1 and "incomplete" in result.output and "Traceback" not in result.output


def test_schema_version_mismatch_names_the_version(tmp_path, random_trace):
    zarr.open_group(str(random_trace), mode="r+").attrs["schema_version"] = 7
    with pytest.raises(TraceError, match="schema version 7.*reads version 1"):
        TraceStore(random_trace)
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["hello"] = 1
    with pytest.raises(TraceError, match="not a sparse-frontier trace"):
        TraceStore(tmp_path / "other.zarr")
    with pytest.raises(TraceError, match="no trace store there"):
        TraceStore(tmp_path / "missing.zarr")


def test_memory_and_file_urls(tmp_path):
    url = f"memory://{uuid.uuid4().hex}/t.zarr"
    layers = write_random_trace(url, n_tokens=64)
    store = TraceStore(url)
    assert torch.equal(store.k(1, head=0), layers[1][1][0]) and store.q(0).shape == (4, 64, 16)
    assert validate_store(url) == []
    path = tmp_path / "sub" / "t.zarr"
    layers = write_random_trace(f"file://{path}", n_tokens=64)
    assert torch.equal(TraceStore(path).v(0), layers[0][2])  # written by URL, read by path
    assert torch.equal(TraceStore(f"file://{path}").q(1, head=3), layers[1][0][3])


def test_chunks_are_per_layer_and_head_and_at_least_1mib(tmp_path):
    writer = _writer(tmp_path / "long.zarr", dtype="bfloat16", n_tokens=100000, q_positions=range(99990, 100000))
    k = writer.arrays["k"]
    assert k.chunks[:2] == (1, 1) and k.chunks[2] * k.chunks[3] * 2 >= MIN_CHUNK_BYTES
    assert writer.arrays["q"].chunks == (1, 1, 10, 8)  # fewer rows than a chunk holds: one chunk
    writer.close()


def test_chunks_encoded_by_the_writer_equal_zarr_written_ones(tmp_path):
    """Local stores get whole chunks encoded by the writer threads, memory:// stores go through zarr: the
    same pieces (unaligned, an edge chunk) must read back the same, through the checksum, with zarr alone."""
    gen = torch.Generator().manual_seed(3)
    n = 20000  # chunks of 8192 rows at d=64 bfloat16: two whole chunks and an edge chunk
    q, k, v = (torch.randn(h, n, 64, generator=gen) for h in (2, 1, 1))
    urls = [str(tmp_path / "local.zarr"), f"memory://{uuid.uuid4().hex}/t.zarr"]
    for url in urls:
        writer = TraceWriter(url, attrs=ATTRS, n_layers=2, n_q_heads=2, n_kv_heads=1, head_dim=64, n_tokens=n,
                             q_positions=range(n), dtype="bfloat16")
        assert writer.arrays["k"].chunks[2] == 8192 and (writer._folder is not None) == (url == urls[0])
        for i in range(2):
            writer.write_layer(i, i, q[:, :9000], k[:, :9000], v[:, :9000])
            writer.write_layer(i, i, q[:, 9000:], k[:, 9000:], v[:, 9000:], start=9000, q_start=9000)
        writer.finish()
    chunk_files = sorted(p.relative_to(tmp_path / "local.zarr").as_posix()
                         for p in (tmp_path / "local.zarr" / "k").rglob("c/*/*/*/*"))
    assert chunk_files == [f"k/c/{i}/0/{j}/0" for i in range(2) for j in range(3)]
    local, memory = (zarr.open_group(url, mode="r") for url in urls)
    for name, x in zip(("q", "k", "v"), (q, k, v), strict=True):
        expect = x.to(torch.bfloat16).view(torch.uint16).numpy()
        assert np.array_equal(local[name][1], expect) and np.array_equal(memory[name][0], expect)


def test_layer_written_in_pieces_equals_one_write(tmp_path):
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 12, 8, generator=gen), torch.randn(1, 12, 8, generator=gen), torch.randn(1, 12, 8)
    writer = _writer(tmp_path / "t.zarr", workers=3, max_pending=2)
    for i in range(2):  # prompt 0..8 (queries at 0..8), then generated 9..11, as a decode capture writes them
        writer.write_layer(i, i, q[:, :9], k[:, :9], v[:, :9])
        writer.write_layer(i, i, q[:, 9:], k[:, 9:], v[:, 9:], start=9, q_start=9)
    writer.write_tokens(range(12))
    writer.finish()
    store = TraceStore(tmp_path / "t.zarr")
    assert store.layers == [0, 1] and writer.raw_bytes == 2 * (q.numel() + 2 * k.numel()) * 4
    for i in range(2):
        assert torch.equal(store.q(i), q) and torch.equal(store.k(i), k) and torch.equal(store.v(i), v)


def test_truncate_drops_the_tail(tmp_path):
    writer = _writer(tmp_path / "t.zarr", n_tokens=12, q_positions=[2, 5, 9, 10, 11])
    for i in range(2):
        writer.write_layer(i, i, torch.full((2, 5, 8), float(i)), torch.ones(1, 12, 8), torch.ones(1, 12, 8))
    writer.truncate(10)
    writer.write_tokens(range(10))
    writer.finish(sequence={"n_tokens": 10, "prefill_len": 8, "generated_len": 2})
    store = TraceStore(tmp_path / "t.zarr")
    assert store.q_positions.tolist() == [2, 5, 9] and store.q(1).shape == (2, 3, 8) and store.k(0).shape[1] == 10
    assert validate_store(tmp_path / "t.zarr") == []


def test_writer_refuses_blocks_that_do_not_fit(tmp_path):
    writer = _writer(tmp_path / "t.zarr")
    with pytest.raises(TraceError, match=r"k block \(1, 99, 8\) at layer 0, row 0 does not fit"):
        writer.write_layer(0, 0, torch.ones(2, 12, 8), torch.ones(1, 99, 8))  # too many keys
    with pytest.raises(TraceError, match="q block"):
        writer.write_layer(1, 1, torch.ones(2, 12, 16), torch.ones(1, 12, 8))  # wrong head dim
    with pytest.raises(TraceError, match="at layer 2"):
        writer.write_layer(2, 2, torch.ones(2, 12, 8), torch.ones(1, 12, 8))
    writer.close()
    with pytest.raises(TraceError, match="incomplete"):
        TraceStore(tmp_path / "t.zarr")


def test_validate_finds_corrupt_chunks_and_nan(tmp_path, random_trace):
    assert validate_store(random_trace) == []
    chunk = random_trace / "k" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = validate_store(random_trace)
    assert len(problems) == 1 and "corrupt chunk in k of captured layer 1 head 0" in problems[0]
    result = CliRunner().invoke(cli, ["trace", "validate", str(random_trace)])
    assert result.exit_code == 1 and "1 problem" in result.output

    layers = write_random_trace(tmp_path / "nan.zarr")
    q = layers[0][0].clone()
    q[2, 5, 3] = float("nan")
    zarr.open_group(str(tmp_path / "nan.zarr"), mode="r+")["q"][0] = q.numpy()
    assert validate_store(tmp_path / "nan.zarr") == [f"{tmp_path / 'nan.zarr'}: NaN or inf in q of captured "
                                                     f"layer 0 head 2"]


def test_layer_view_carries_the_sliding_window(tmp_path):
    writer = _writer(tmp_path / "t.zarr")
    for i in range(2):
        writer.write_layer(i, i, torch.ones(2, 12, 8), torch.ones(1, 12, 8), torch.ones(1, 12, 8))
    writer.finish()
    store = TraceStore(tmp_path / "t.zarr")
    assert store.layer_view(0).sliding_window is None and store.layer_view(1).sliding_window == 4
    assert store.layer_view(1).scale == pytest.approx(8 ** -0.5)


def test_find_stores_and_cli_listing(tmp_path):
    write_random_trace(tmp_path / "a.zarr")
    write_random_trace(tmp_path / "nested" / "b.zarr", n_layers=3)
    _writer(tmp_path / "c.zarr").close()  # incomplete
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array("x", shape=(3,), dtype="int8")
    found = find_stores(tmp_path)
    assert [Path(f["url"]).name for f in found] == ["a.zarr", "c.zarr", "b.zarr"]
    assert [f["complete"] for f in found] == [True, False, True]
    result = CliRunner().invoke(cli, ["trace", "ls", str(tmp_path), "--json"])
    listed = json.loads(result.output)
    assert result.exit_code == 0 and len(listed) == 3 and listed[2]["model"]["n_layers"] == 3
    result = CliRunner().invoke(cli, ["trace", "ls", str(tmp_path)])
    assert "nested/b.zarr" in result.output and "NO" in result.output


def test_cli_info_json_and_table(random_trace):
    result = CliRunner().invoke(cli, ["trace", "info", str(random_trace), "--json"])
    data = json.loads(result.output)
    assert data["complete"] is True and data["arrays"]["k"]["shape"] == [2, 2, 256, 16]
    assert data["stored_bytes"] > 0 and data["model"]["d_model"] == 64
    result = CliRunner().invoke(cli, ["trace", "info", str(random_trace)])
    assert result.exit_code == 0 and "256 tokens" in result.output
    result = CliRunner().invoke(cli, ["trace", "info", str(random_trace.parent / "nothing.zarr")])
    assert result.exit_code == 1 and "no trace store there" in result.output
    result = CliRunner().invoke(cli, ["trace", "validate", str(random_trace)])
    assert result.exit_code == 0 and "ok" in result.output
