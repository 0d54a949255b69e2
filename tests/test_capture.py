"""Trace capture: stored q/k/v equal an independent computation from the model's own weights; decode capture
equals prefill capture; options and bad arguments. Tiny random models for speed, SmolLM2 for the real check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sparse_frontier.cli.main import cli
from sparse_frontier.kernels.reference import masked_attention
from sparse_frontier.tracer.capture import (
    CaptureError,
    TransformersBackend,
    capture,
    check_disk,
    estimate_bytes,
    parse_layers,
    query_positions,
)
from sparse_frontier.tracer.store import TraceError, TraceStore, store_info, validate_store

WORDS = [f"w{i}" for i in range(120)]


def _save_tokenizer(folder) -> None:
    """A word-level tokenizer over WORDS (ids 3..), so the CLI can run a tiny model on a text prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def _save_model(folder, config) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in net.named_parameters():  # weights large enough for peaked attention; non-trivial norms
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.15))
    net.save_pretrained(folder)
    _save_tokenizer(folder)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    _save_model(folder, LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=96, bos_token_id=1, eos_token_id=2,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0}))
    return TransformersBackend(str(folder))


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    from transformers import Gemma3TextConfig

    folder = tmp_path_factory.mktemp("tiny-gemma")
    types = ["sliding_attention", "sliding_attention", "full_attention"]
    _save_model(folder, Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=8, layer_types=types, query_pre_attn_scalar=40,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}))
    return TransformersBackend(str(folder))


def _ids(n: int, seed: int = 0) -> list[int]:
    return [1] + torch.randint(3, 123, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half layout) at positions 0..T-1 of x [H, T, d], computed here in float64."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([angle.cos(), angle.cos()], -1), torch.cat([angle.sin(), angle.sin()], -1)
    x = x.double()
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return (x * cos + rotated * sin).float()


def _hidden_states(backend, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """The input hidden state of every layer (a plain forward; nothing is captured)."""
    with torch.inference_mode():
        return backend.net(torch.tensor([ids]), output_hidden_states=True).hidden_states


def _expected_qkv(backend, hidden: tuple[torch.Tensor, ...], layer: int):
    """q/k/v [H, T, d] of one layer from its input hidden state, projections, q/k norms and RoPE by hand."""
    cfg = backend.config
    with torch.inference_mode():
        block = backend.net.model.layers[layer]
        attn = block.self_attn
        h = block.input_layernorm(hidden[layer])[0].float()
        t, d = h.shape[0], attn.head_dim
        q = (h @ attn.q_proj.weight.T).view(t, -1, d).transpose(0, 1)
        k = (h @ attn.k_proj.weight.T).view(t, -1, d).transpose(0, 1)
        v = (h @ attn.v_proj.weight.T).view(t, -1, d).transpose(0, 1)
    if hasattr(attn, "q_norm"):  # Gemma: RMS norm with weight (1 + w) over the head dim
        def norm(x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * (1.0 + w.float())
        q, k = norm(q, attn.q_norm.weight), norm(k, attn.k_norm.weight)
    rope = cfg.rope_parameters
    theta = rope[cfg.layer_types[layer]]["rope_theta"] if "rope_theta" not in rope else rope["rope_theta"]
    return _rope(q, theta), _rope(k, theta), v


def _attention_inputs(backend, layer: int, sink: list):
    """Hook on the layer's output projection: its input is the attention output the model computed."""
    o_proj = backend.net.model.layers[layer].self_attn.o_proj
    return o_proj.register_forward_pre_hook(lambda module, args: sink.append(args[0][0].float().clone()))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool(((a - b).abs() <= rel * b.abs().max() + 1e-6).all())


def test_query_positions_and_layer_specs():
    assert query_positions("all", 5).tolist() == [0, 1, 2, 3, 4]
    assert query_positions("last:3", 5).tolist() == [2, 3, 4]
    assert query_positions("last:20", 3).tolist() == [0, 1, 2]
    assert query_positions("strided:4+last:2", 10).tolist() == [0, 4, 8, 9]
    for bad in ("last:0", "first:3", "strided:x", "last:2+"):
        with pytest.raises(CaptureError, match="query positions"):
            query_positions(bad, 10)
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("4,0-2", 6) == [0, 1, 2, 4]
    for bad in ("0-9", "a", "3-1"):
        with pytest.raises(CaptureError, match="layers"):
            parse_layers(bad, 6)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma"])
def test_prefill_capture_equals_independent_computation(name, tmp_path, request):
    backend = request.getfixturevalue(name)
    ids = _ids(40)
    outputs: list[torch.Tensor] = []
    hooks = [_attention_inputs(backend, i, outputs) for i in range(3)]
    try:
        capture(backend, ids, str(tmp_path / "t.zarr"), dtype="float32")
    finally:
        for hook in hooks:
            hook.remove()
    store = TraceStore(tmp_path / "t.zarr")
    cfg = backend.config
    model = store.model
    heads = (model["n_q_heads"], model["n_kv_heads"], model["head_dim"])
    assert model["n_layers"] == 3 and heads == (4, cfg.num_key_value_heads, 16)
    assert (model["d_model"], model["d_mlp"], model["vocab_size"]) == (64, 96, 128)
    assert model["rope"] == cfg.rope_parameters and store.tokens().tolist() == ids
    assert store.sequence == {"n_tokens": 40, "prefill_len": 40, "generated_len": 0, "generated_text": ""}
    hidden = _hidden_states(backend, ids)
    for layer in range(3):
        q, k, v = _expected_qkv(backend, hidden, layer)
        assert _close(store.q(layer), q, 1e-5) and _close(store.k(layer), k, 1e-5) and _close(store.v(layer), v, 1e-5)
        # the recorded scale, window and GQA grouping reproduce the attention output the model computed
        view = store.layer_view(layer)
        out, _ = masked_attention(view.q, view.k, view.v, torch.arange(40), view.scale, softcap=view.softcap,
                                  sliding_window=view.sliding_window)
        assert _close(out, outputs[layer].view(40, 4, 16).transpose(0, 1), 1e-5)
    if name == "tiny_gemma":
        assert model["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
        assert model["sliding_window"] == 8 and model["softmax_scale"] == pytest.approx(40 ** -0.5)
        assert store.layer_view(0).sliding_window == 8 and store.layer_view(2).sliding_window is None
        view = store.layer_view(0)  # the window matters here: without it the output differs
        full, _ = masked_attention(view.q, view.k, view.v, torch.arange(40), view.scale)
        assert not _close(full, outputs[0].view(40, 4, 16).transpose(0, 1), 1e-3)
    else:
        assert model["layer_types"] == ["full_attention"] * 3 and model["sliding_window"] is None
        assert model["softmax_scale"] == pytest.approx(16 ** -0.5)


def test_decode_capture_equals_prefill_capture(tiny_llama, tmp_path):
    ids = _ids(30, seed=1)
    decoded = capture(tiny_llama, ids, str(tmp_path / "d.zarr"), generate=6, query_spec="last:4", dtype="float32")
    dec = TraceStore(tmp_path / "d.zarr")
    tokens = dec.tokens().tolist()
    assert decoded.generated_len == 6 and len(tokens) == 36 and tokens[:30] == ids
    assert dec.q_positions.tolist() == list(range(26, 36))
    assert dec.sequence["prefill_len"] == 30 and dec.sequence["generated_len"] == 6
    assert dec.sequence["generated_text"] == tiny_llama.decode(tokens[30:])
    capture(tiny_llama, tokens, str(tmp_path / "p.zarr"), dtype="float32")
    pre = TraceStore(tmp_path / "p.zarr")
    for layer in range(3):
        assert _close(dec.q(layer), pre.q(layer)[:, 26:], 1e-5)
        assert _close(dec.k(layer), pre.k(layer), 1e-5) and _close(dec.v(layer), pre.v(layer), 1e-5)
    # greedy: each generated token is the argmax after the tokens before it
    with torch.inference_mode():
        logits = tiny_llama.net(torch.tensor([tokens])).logits[0]
    assert logits[29:35].argmax(-1).tolist() == tokens[30:]


def test_decode_stops_at_end_of_sequence(tiny_llama, tmp_path):
    first = capture(tiny_llama, _ids(20, seed=2), str(tmp_path / "a.zarr"), generate=5, dtype="float32")
    generated = TraceStore(tmp_path / "a.zarr").tokens().tolist()[20:]
    stop = generated[2]
    saved = tiny_llama.eos_ids
    tiny_llama.eos_ids = {stop}
    try:
        result = capture(tiny_llama, _ids(20, seed=2), str(tmp_path / "b.zarr"), generate=5, dtype="float32")
    finally:
        tiny_llama.eos_ids = saved
    n = generated.index(stop) + 1
    assert first.generated_len == 5 and result.generated_len == n
    store = TraceStore(tmp_path / "b.zarr")
    assert store.tokens().tolist()[20:] == generated[:n] and store.k(0).shape[1] == 20 + n
    assert store.q_positions.tolist() == list(range(20 + n)) and validate_store(tmp_path / "b.zarr") == []


def test_layer_subset_without_values_matches_full_capture(tiny_gemma, tmp_path):
    ids = _ids(24, seed=3)
    capture(tiny_gemma, ids, str(tmp_path / "all.zarr"), dtype="bfloat16")
    capture(tiny_gemma, ids, str(tmp_path / "sub.zarr"), layers=[0, 2], with_values=False,
            query_spec="strided:5+last:2", dtype="bfloat16")
    full, sub = TraceStore(tmp_path / "all.zarr"), TraceStore(tmp_path / "sub.zarr")
    assert sub.layers == [0, 2] and not sub.has_values and sub.attrs["capture"]["layers"] == [0, 2]
    assert sub.q_positions.tolist() == [0, 5, 10, 15, 20, 22, 23]
    assert torch.equal(sub.q(1), full.q(2)[:, sub.q_positions]) and torch.equal(sub.k(0, head=0), full.k(0, 0))
    assert sub.layer_view(1).layer == 2 and sub.layer_view(0).sliding_window == 8
    with pytest.raises(TraceError, match="without values"):
        sub.v(0)


def test_interrupted_capture_leaves_an_incomplete_store(tiny_llama, tmp_path):
    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture(tiny_llama, _ids(20), str(tmp_path / "t.zarr"), generate=3, on_step=interrupt)
    assert store_info(tmp_path / "t.zarr")["complete"] is False
    with pytest.raises(TraceError, match="incomplete"):
        TraceStore(tmp_path / "t.zarr")


def test_disk_guard_names_the_size_needed(tmp_path):
    size = estimate_bytes(n_layers=30, n_q_heads=9, n_kv_heads=3, head_dim=64, n_tokens=8192, n_queries=8192,
                          dtype="bfloat16", with_values=True)
    assert size == 30 * (9 + 3 + 3) * 8192 * 64 * 2  # the ~470 MB of an 8K SmolLM2 trace
    check_disk(str(tmp_path / "t.zarr"), size)
    with pytest.raises(CaptureError, match=r"needs about 1000000000\.00 GB but .* has only"):
        check_disk(str(tmp_path / "deeper" / "t.zarr"), 10 ** 18)


def _run(*args: str):
    result = CliRunner().invoke(cli, ["trace", "capture", *args])
    assert "Traceback" not in result.output
    return result


def test_cli_capture_then_info_and_validate(tiny_llama, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text(" ".join(WORDS[:50]))
    out = tmp_path / "t.zarr"
    result = _run("--model", str(tiny_llama.folder), "--prompt-file", str(prompt), "--out", str(out),
                  "--generate", "3", "--dtype", "float16", "--layers", "1-2")
    assert result.exit_code == 0, result.output
    info = json.loads(CliRunner().invoke(cli, ["trace", "info", str(out), "--json"]).output)
    assert info["sequence"]["prefill_len"] == 50 and info["sequence"]["n_tokens"] == 53
    assert info["capture"]["dtype"] == "float16" and info["arrays"]["k"]["shape"] == [2, 2, 53, 16]
    assert validate_store(out) == [] and np.array_equal(TraceStore(out).layers, [1, 2])
    result = _run("--model", str(tiny_llama.folder), "--prompt-file", str(prompt), "--out", str(out),
                  "--length", "20")
    assert result.exit_code == 1 and "already exists" in result.output
    result = _run("--model", str(tiny_llama.folder), "--prompt-file", str(prompt), "--out", str(out),
                  "--length", "20", "--overwrite")
    assert result.exit_code == 0 and TraceStore(out).sequence["n_tokens"] == 20


def test_cli_bad_arguments_give_one_clear_error(tiny_llama, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text(" ".join(WORDS) + " w1 w2")  # 122 tokens: beyond the tiny model's 96
    model = ["--model", str(tiny_llama.folder), "--prompt-file", str(prompt)]
    out = ["--out", str(tmp_path / "t.zarr")]
    cases = [
        (["--model", "no-such-model", "--prompt-file", str(prompt), *out], "unknown model 'no-such-model'"),
        ([*model, *out], "122 prompt tokens + 0 generated exceed the context"),
        ([*model, *out, "--length", "500"], "--length 500 exceeds the context"),
        ([*model, "--out", str(prompt / "t.zarr")], "is not a writable folder"),
        ([*model, *out, "--query-positions", "last:x"], "query positions 'last:x'"),
        ([*model, *out, "--length", "10", "--layers", "0-7"], "layers '0-7': the model has layers 0-2"),
    ]
    for args, message in cases:
        result = _run(*args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and message in lines[-1] and lines[-1].startswith("Error:"), result.output
    result = _run("--task", "niah", *out)
    assert result.exit_code == 2 and "--task needs --length" in result.output
    result = _run(*model, "--task", "niah", "--length", "10", *out)
    assert result.exit_code == 2 and "exactly one of" in result.output
    assert not (tmp_path / "t.zarr").exists()


# --- the real model: SmolLM2-135M (already converted in the cache; a few hundred tokens) ---

TEXT = ("Sparse attention methods keep only the keys that matter for each query. To judge them fairly we "
        "capture what a real model's attention saw, then replay every method offline against it. ") * 8


@pytest.fixture(scope="module")
def smollm2():
    return TransformersBackend("smollm2-135m")


@pytest.mark.slow
def test_smollm2_stored_queries_and_keys_equal_projections_and_rope(smollm2, tmp_path):
    ids = smollm2.tokenizer(TEXT).input_ids[:256]
    capture(smollm2, ids, str(tmp_path / "t.zarr"), layers=[0, 7, 29], dtype="bfloat16")
    store = TraceStore(tmp_path / "t.zarr")
    cfg = smollm2.config
    model = store.model
    assert (model["n_layers"], model["n_q_heads"], model["n_kv_heads"], model["head_dim"]) == \
        (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, 64)
    assert (model["d_model"], model["d_mlp"], model["vocab_size"]) == (576, 1536, 49152)
    assert model["softmax_scale"] == 0.125 and model["rope"]["rope_theta"] == 100000.0
    assert model["architecture"] == "LlamaForCausalLM" and store.layers == [0, 7, 29]
    hidden = _hidden_states(smollm2, ids)
    for index, layer in enumerate(store.layers):
        q, k, v = _expected_qkv(smollm2, hidden, layer)
        # bfloat16 keeps 8 significant bits: within one rounding step of the independent float32 result
        assert _close(store.q(index), q, 2 ** -8) and _close(store.k(index), k, 2 ** -8)
        assert _close(store.v(index), v, 2 ** -8)
        assert not _close(store.k(index), _rope(k, 10000.0), 2 ** -8)  # a wrong rope base is detected


@pytest.mark.slow
def test_smollm2_decode_queries_equal_prefill_queries(smollm2, tmp_path):
    ids = smollm2.tokenizer(TEXT).input_ids[:200]
    result = capture(smollm2, ids, str(tmp_path / "d.zarr"), generate=8, layers=[3, 20], query_spec="last:1",
                     dtype="float32")
    dec = TraceStore(tmp_path / "d.zarr")
    assert result.generated_len == 8 and dec.q_positions.tolist() == list(range(199, 208))
    assert result.generated_text == smollm2.decode(dec.tokens().tolist()[200:])
    capture(smollm2, dec.tokens().tolist(), str(tmp_path / "p.zarr"), layers=[3, 20], dtype="float32")
    pre = TraceStore(tmp_path / "p.zarr")
    for index in range(2):
        assert _close(dec.q(index), pre.q(index)[:, 199:], 1e-4)
        assert _close(dec.k(index), pre.k(index), 1e-4) and _close(dec.v(index), pre.v(index), 1e-4)
