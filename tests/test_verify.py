"""frontier verify: policies' Selections from a real trace store through the kernels (Triton interpreter on CPU)."""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernels are compiled
    os.environ["TRITON_INTERPRET"] = "1"

from click.testing import CliRunner  # noqa: E402
from conftest import write_random_trace  # noqa: E402

from sparse_frontier.cli.main import cli  # noqa: E402
from sparse_frontier.kernels.verify import check_layer  # noqa: E402
from sparse_frontier.policies.selection import BlockMask  # noqa: E402
from sparse_frontier.tracer.store import TraceStore  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    """A bf16 store: 2 layers, GQA 6/2 (group 3), 330 tokens of which 320 prompt and 10 generated."""
    path = tmp_path_factory.mktemp("verify") / "t.zarr"
    write_random_trace(path, n_layers=2, n_q_heads=6, n_kv_heads=2, head_dim=16, n_tokens=330, prefill_len=320,
                       dtype="bfloat16")
    return str(path)


def run(*args):
    return CliRunner().invoke(cli, ["verify", *args, "--device", DEVICE])


@pytest.mark.parametrize("policy,phase,rows", [
    (["--policy", "vertical_slash"], "prefill", 320),
    (["--policy", "block_sparse", "--param", "chunk_size=64"], "prefill", 320),
    (["--policy", "quest"], "decode", 10),
])
def test_kernel_agrees_with_the_simulator_on_every_layer(trace, policy, phase, rows):
    result = run(trace, *policy, "--sparsity", "0.6", "--json", "--no-timing")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [line["layer"] for line in lines] == [0, 1]
    for line in lines:
        assert line["ok"] and line["backend"] == "triton" and line["phase"] == phase and line["rows"] == rows
        assert line["max_diff"] <= line["tolerance"]
        assert line["sparsity_kernel"] == pytest.approx(line["sparsity_reference"], abs=1e-12)
        assert 0.0 < line["sparsity_reference"] < 1.0  # a real selection, neither dense nor empty


def test_table_output_and_layer_choice(trace):
    result = run(trace, "--policy", "snapkv", "--sparsity", "0.5", "--layers", "1", "--no-timing")
    assert result.exit_code == 0, result.output
    assert "sparsity (kernel)" in result.output and "yes" in result.output


def test_torch_backend_is_the_cpu_fallback(trace):
    result = run(trace, "--policy", "quest", "--sparsity", "0.5", "--backend", "torch", "--json", "--no-timing")
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.splitlines()[0])
    assert line["backend"] == "torch" and line["max_diff"] <= line["tolerance"]


def test_block_size_the_kernel_does_not_run_is_a_clear_error(trace):
    result = run(trace, "--policy", "block_sparse", "--sparsity", "0.6", "--no-timing")  # default chunk_size 16
    assert result.exit_code != 0
    assert "block_q is 16" in result.output and "64 or 128" in result.output


@pytest.mark.parametrize("args,message", [
    (["--policy", "quest", "--sparsity", "1.5"], "outside [0, 1)"),
    (["--policy", "no_such_policy", "--sparsity", "0.5"], "unknown policy"),
    (["--policy", "quest", "--sparsity", "0.5", "--layers", "7"], "not in the trace"),
])
def test_user_errors_name_the_input(trace, args, message):
    result = run(trace, *args)
    assert result.exit_code != 0 and message in result.output


def test_missing_trace_is_a_clear_error(tmp_path):
    result = run(str(tmp_path / "missing.zarr"), "--policy", "quest", "--sparsity", "0.5")
    assert result.exit_code != 0 and "missing.zarr" in result.output and "Traceback" not in result.output


def test_check_layer_counts_cells_of_a_hand_made_selection(trace):
    # one kept 64x64 block (key block 0 for query block 1) on prompt rows 0..189: kernel and reference agree
    # on exactly its 64 * 64 cells per query head, out of the 190 * 191 / 2 causal cells
    view = TraceStore(trace).layer_view(0)
    blocks = torch.zeros(2, 3, 3, dtype=torch.bool)
    blocks[:, 1, 0] = True
    rows = torch.arange(190)
    check = check_layer(view, rows, 190, BlockMask(blocks, 64, 64), "hand", "prefill", DEVICE, torch.bfloat16,
                        timing=False)
    assert check.ok
    assert check.sparsity_kernel == pytest.approx(1 - 64 * 64 / (190 * 191 / 2))
