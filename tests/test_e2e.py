"""End-to-end runs: a policy applied inside every attention layer of a real (tiny or small) model."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import pytest
import torch
from conftest import write_random_trace
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from sparse_frontier.policies.base import Budget, LayerView
from sparse_frontier.policies.registry import available, get_budget_rule, get_policy
from sparse_frontier.policies.selection import BlockMask, Dense, KeptKeys, PageSet, Selection
from sparse_frontier.tracer import e2e


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama with GQA 4/2 (fresh config: the runner switches its attention)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    """A randomly initialised 2-layer Gemma 3: a sliding-window layer (window 8) then a global one, q/k norms."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, intermediate_size=128, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
                           attn_implementation="eager")
    return Gemma3ForCausalLM(cfg).eval()


TINY = {"llama": tiny_llama, "gemma3": tiny_gemma3}


@dataclass
class HandPolicy:
    """A policy whose selection is built by a given function (hand-made Selections for tests)."""

    make: Callable[[LayerView, Budget], Selection]
    phase: str = "prefill"
    name: ClassVar[str] = "hand"
    owns_budget: ClassVar[bool] = True
    params: object = None

    def __post_init__(self):
        self.views: list[LayerView] = []

    def select(self, view: LayerView, budget: Budget) -> Selection:
        self.views.append(view)
        return self.make(view, budget)


def dense_logits(model, ids: torch.Tensor, continuation: list[int]) -> torch.Tensor:
    """Logits of the eager (dense) model over prompt + continuation, at the positions predicting each new token."""
    full = torch.cat([ids, torch.tensor(continuation[:-1], dtype=ids.dtype, device=ids.device)])
    with torch.no_grad():
        logits = model(full[None]).logits[0]
    return logits[len(ids) - 1 :]


def layer_outputs(model, layer: int, run: Callable[[], object]) -> list[torch.Tensor]:
    """Attention outputs (o_proj inputs [T, Hq*d]) of model layer ``layer`` during ``run()``."""
    seen: list[torch.Tensor] = []
    hook = model.model.layers[layer].self_attn.o_proj.register_forward_hook(
        lambda mod, args, out: seen.append(args[0][0].detach().clone()))
    try:
        run()
    finally:
        hook.remove()
    return seen


def hand_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Independent loop: softmax over the kept causal keys of each (query head, row); keep [Hq, R, T]."""
    group = q.shape[0] // k.shape[0]
    out = torch.zeros(q.shape[0], len(rows), q.shape[2], dtype=torch.float64)
    for h in range(q.shape[0]):
        for i, r in enumerate(rows.tolist()):
            keys = [j for j in range(r + 1) if keep[h, i, j]]
            kk, vv = k[h // group, keys].double(), v[h // group, keys].double()
            w = torch.softmax(kk @ q[h, i].double() * scale, dim=0)
            out[h, i] = w @ vv
    return out


@pytest.mark.parametrize("kind", sorted(TINY))
def test_dense_run_reproduces_the_eager_model(kind):
    model = TINY[kind]()
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1))
    gen = e2e.generate(model, ids, None, None, 0.0, max_new_tokens=8, keep_logits=True)
    expected = dense_logits(model, ids, gen.tokens)
    assert model.config._attn_implementation == "eager"  # restored after the run
    assert len(gen.tokens) == 8
    torch.testing.assert_close(torch.stack(gen.logits), expected, atol=1e-5, rtol=1e-5)
    assert gen.tokens == expected.argmax(-1).tolist()


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_dense_selection_policy_reproduces_the_eager_model(phase):
    model = tiny_llama()
    ids = torch.randint(0, 97, (33,), generator=torch.Generator().manual_seed(2))
    policy = HandPolicy(lambda view, budget: Dense(view.n_query_heads), phase=phase)
    gen = e2e.generate(model, ids, policy, get_budget_rule("uniform"), 0.0, max_new_tokens=6, keep_logits=True)
    torch.testing.assert_close(torch.stack(gen.logits), dense_logits(model, ids, gen.tokens), atol=1e-5, rtol=1e-5)
    calls = {"prefill": 2, "decode": 2 * 5}[phase]  # per layer: once at prefill / at every decode step
    assert len(policy.views) == calls
    assert gen.run.stats.realised_sparsity == pytest.approx(0.0)


def test_row_chunks_past_a_sliding_window_attend_only_over_its_keys(monkeypatch):
    """With 16-row chunks, the sliding layer's later chunks start past the window (8) and attend over the keys
    from their first row's window on: same logits as the eager model, and a sparse selection gives the same
    outputs as one chunk over all keys."""
    model = tiny_gemma3()
    ids = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(4))
    policy = HandPolicy(block_selection)
    rule = get_budget_rule("uniform")

    def sparse_outputs():
        return layer_outputs(model, 0, lambda: e2e.generate(model, ids, policy, rule, 0.5, max_new_tokens=1))[0]

    whole = sparse_outputs()  # ROW_CHUNK (512) rows: one chunk over every key
    monkeypatch.setattr(e2e, "ROW_CHUNK", 16)
    gen = e2e.generate(model, ids, None, None, 0.0, max_new_tokens=4, keep_logits=True)
    torch.testing.assert_close(torch.stack(gen.logits), dense_logits(model, ids, gen.tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse_outputs(), whole, atol=1e-6, rtol=1e-5)


def block_selection(view: LayerView, budget: Budget) -> BlockMask:
    """Per query head a different fixed block pattern: sink block, diagonal, and every third block."""
    n_blocks = -(-view.n_keys // 8)
    qb = torch.arange(n_blocks)[:, None]
    kb = torch.arange(n_blocks)[None, :]
    blocks = torch.stack([(kb == 0) | (kb == qb) | ((kb + h) % 3 == 0) for h in range(view.n_query_heads)])
    return BlockMask(blocks, 8, 8)


def test_prefill_selection_inside_the_model_equals_a_hand_computation():
    model = tiny_llama()
    ids = torch.randint(0, 97, (45,), generator=torch.Generator().manual_seed(3))
    recorder = HandPolicy(lambda view, budget: Dense(view.n_query_heads))
    e2e.generate(model, ids, recorder, get_budget_rule("uniform"), 0.0, max_new_tokens=1, layers={1})
    view = recorder.views[0]  # the live q/k/v of layer 1 in the dense model
    policy = HandPolicy(block_selection)
    rule = get_budget_rule("uniform")
    outs = layer_outputs(model, 1, lambda: e2e.generate(model, ids, policy, rule, 0.5, max_new_tokens=1, layers={1}))
    rows = torch.arange(len(ids))
    keep = block_selection(view, None).mask(rows, len(ids))
    expected = hand_attention(view.q, view.k, view.v, rows, keep, view.scale)
    got = outs[0].reshape(len(ids), 4, -1).transpose(0, 1)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)
    dense = hand_attention(view.q, view.k, view.v, rows, torch.ones_like(keep), view.scale)
    assert (got.double() - dense).abs().max() > 1e-3  # the selection really changed the output


def evict_half(view: LayerView, budget: Budget) -> KeptKeys:
    """Per KV head keep a different, uneven subset of the prompt (head h keeps keys j with j % (h+2) == 0)."""
    j = torch.arange(view.prefill_len)
    return KeptKeys(torch.stack([(j % (h + 2) == 0) | (j >= view.prefill_len - 4) for h in range(view.n_kv_heads)]))


@pytest.mark.parametrize("kind", sorted(TINY))
def test_eviction_drops_keys_from_the_cache_and_matches_masked_decoding(kind):
    model = TINY[kind]()
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(4))
    policy = HandPolicy(evict_half, phase="decode")
    gen = e2e.generate(model, ids, policy, get_budget_rule("uniform"), 0.5, max_new_tokens=5, keep_logits=True)
    kept = evict_half(policy.views[0], None).kept
    new = torch.arange(30, 30 + len(gen.tokens) - 1)  # the last token is sampled, never fed back
    for layer in (0, 1):
        cache = gen.run.caches[layer]
        assert cache.k.shape[0] == 2
        for h in range(2):
            held = cache.kept_positions(h)
            assert held.tolist() == torch.cat([kept[h].nonzero()[:, 0], new]).tolist()
        assert cache.length == int(kept.sum(1).max()) + len(new) < len(ids) + len(new)  # really smaller
    assert len(policy.views) == 2  # evicted once per layer, then dense decoding

    # the same decode as a per-step mask over the full cache gives the same logits
    def as_pages(view: LayerView, budget: Budget) -> PageSet:
        mask = torch.cat([kept, torch.ones(2, view.n_keys - view.prefill_len, dtype=torch.bool)], dim=1)
        pages = torch.where(mask, torch.arange(view.n_keys), -1)[:, None, :]
        return PageSet(view.rows, pages, page_size=1)

    masked = e2e.generate(model, ids, HandPolicy(as_pages, phase="decode"), get_budget_rule("uniform"), 0.5,
                          max_new_tokens=5, keep_logits=True, forced=gen.tokens)
    torch.testing.assert_close(torch.stack(gen.logits), torch.stack(masked.logits), atol=1e-5, rtol=1e-5)
    assert gen.run.stats.realised_sparsity == pytest.approx(masked.run.stats.realised_sparsity)
    assert 0.1 < gen.run.stats.realised_sparsity < 0.7


def test_decoding_from_a_shared_dense_prefill_equals_a_fresh_run():
    model = tiny_llama()
    ids = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(6))
    rule = get_budget_rule("uniform")
    base = e2e.SparseRun(None, None, 0.0, capacity=6, keep_queries=True)
    logits = e2e.prefill(model, ids, base)
    for name in ("snapkv", "quest"):
        fresh = e2e.generate(model, ids, get_policy(name), rule, 0.7, max_new_tokens=6, keep_logits=True)
        forked = e2e.decode(model, base.fork(get_policy(name), rule, 0.7), logits, 6, keep_logits=True)
        assert forked.tokens == fresh.tokens
        torch.testing.assert_close(torch.stack(forked.logits), torch.stack(fresh.logits))
        assert forked.run.stats.realised_sparsity == pytest.approx(fresh.run.stats.realised_sparsity)
    assert all(cache.length == 150 for cache in base.caches.values())  # the shared prefill is untouched
    with pytest.raises(ValueError, match="prefill policy"):
        base.fork(get_policy("block_sparse"), rule, 0.7)


# Policies that are not dense at sparsity 0 by design: the top-p oracles keep mass p whatever the sparsity, and
# StreamingLLM decoding reads a fixed window of `tokens` keys while the cache grows past the prompt.
NOT_DENSE_AT_ZERO = {"oracle_topp", "oracle_topp_decode", "sink_local_decode"}


@pytest.mark.parametrize("name", sorted(set(available()) - NOT_DENSE_AT_ZERO))
def test_every_policy_at_sparsity_zero_reproduces_the_dense_model(name):
    model = tiny_llama()
    ids = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(5))
    policy, rule = get_policy(name), get_budget_rule("uniform")
    gen = e2e.generate(model, ids, policy, rule, 0.0, max_new_tokens=6, keep_logits=True)
    torch.testing.assert_close(torch.stack(gen.logits), dense_logits(model, ids, gen.tokens), atol=1e-5, rtol=1e-5)
    assert gen.run.stats.total > 0  # the policy did run
    assert gen.run.stats.realised_sparsity == pytest.approx(0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["vertical_slash", "flexprefill", "block_sparse", "snapkv", "ada_snapkv", "quest"])
def test_gpu_runs_each_seed_method_inside_the_model(name):
    """On CUDA in bf16 each seed method runs inside the model through the Triton kernels (Block-Sparse's 16-token
    blocks, which no kernel runs, through the reference): at sparsity 0 it gives the dense model's logits within
    bf16 rounding, and at 0.8 it computes fewer cells (FlexPrefill none: its minimum budget of 512 keys covers
    this 300-token prompt)."""
    model = tiny_llama().to("cuda", torch.bfloat16)
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(5)).cuda()
    policy, rule = get_policy(name), get_budget_rule("uniform")
    gen = e2e.generate(model, ids, policy, rule, 0.0, max_new_tokens=4, keep_logits=True)
    dense = dense_logits(model, ids, gen.tokens).float().cpu()
    assert (torch.stack(gen.logits) - dense).abs().max() <= 0.02 * dense.abs().max()
    assert gen.run.stats.backends == ({"torch"} if name == "block_sparse" else {"triton"})
    sparse = e2e.generate(model, ids, get_policy(name), rule, 0.8, max_new_tokens=4)
    if name == "flexprefill":
        assert sparse.run.stats.realised_sparsity == 0.0
    else:  # Vertical-Slash keeps its 64-slash local band and 4 sinks: 0.22 here
        assert sparse.run.stats.realised_sparsity > 0.15


@pytest.fixture(scope="module")
def smollm2():
    """The built-in SmolLM2 through the capture backend (the model the e2e runner and capture share)."""
    from sparse_frontier.tracer.capture import TransformersBackend

    return TransformersBackend("smollm2-135m")


SIM_LAYER, SIM_STEPS = 5, 4


@pytest.fixture(scope="module")
def smollm2_trace(smollm2, tmp_path_factory):
    """One captured layer of SmolLM2 on a ~330-token prompt plus 4 generated tokens, stored as float32."""
    from sparse_frontier.tracer.capture import capture
    from sparse_frontier.tracer.store import TraceStore

    text = " ".join(f"Item {i} is stored in box {i * 7 % 13}, next to the {['red', 'blue', 'green'][i % 3]} lamp."
                    for i in range(24)) + " Which box holds item 17? Answer:"
    ids = smollm2.tokenizer(text)["input_ids"]
    path = str(tmp_path_factory.mktemp("trace") / "t.zarr")
    capture(smollm2, ids, path, layers=[SIM_LAYER], generate=SIM_STEPS, dtype="float32")
    return ids, TraceStore(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vertical_slash", "block_sparse", "quest", "snapkv"])
def test_inside_the_model_output_equals_the_simulated_sparse_output(smollm2, smollm2_trace, name):
    """A policy applied at one layer of SmolLM2 gives, at every prompt row (prefill) or decode step (decode,
    teacher-forced on the captured tokens), the output the trace predicts: the same Selection, built from the
    captured q/k, run by the reference over the captured k/v."""
    from sparse_frontier.kernels.reference import selection_attention

    ids, store = smollm2_trace
    sparsity = 0.7
    view = store.layer_view(0)
    n, n_tokens = store.sequence["prefill_len"], store.sequence["n_tokens"]
    assert n == len(ids) and n_tokens == n + SIM_STEPS
    policy, rule = get_policy(name), get_budget_rule("uniform")
    rows = torch.arange(n) if policy.phase == "prefill" else torch.arange(n, n_tokens)
    view.rows = rows
    selection = policy.select(view, rule.budget(view, sparsity))
    keys = n if policy.phase == "prefill" else n_tokens  # the prompt's attention sees the prompt's keys
    k, v = view.k[:, :keys], view.v[:, :keys]
    predicted = selection_attention(selection, view.queries_at(rows), k, v, rows, view.scale)

    tokens = [int(t) for t in store.root["tokens"][n:]]
    forced = tokens + [tokens[-1]]  # every captured token is fed back; one more step is sampled and dropped
    config = smollm2.net.config
    depth = config.num_hidden_layers
    config.num_hidden_layers = SIM_LAYER + 1  # later layers cannot change this layer's output: skip them
    try:
        outs = layer_outputs(smollm2.net, SIM_LAYER, lambda: e2e.generate(
            smollm2.net, ids, get_policy(name), rule, sparsity, 0, layers={SIM_LAYER}, forced=forced))
    finally:
        config.num_hidden_layers = depth
    got = outs[0] if policy.phase == "prefill" else torch.cat(outs[1:])  # [R, Hq*d]
    got = got.reshape(len(rows), view.n_query_heads, -1).transpose(0, 1)
    dense = selection_attention(Dense(view.n_query_heads), view.queries_at(rows), k, v, rows, view.scale)
    assert (predicted - dense).abs().max() > 1e-3  # the policy really is sparse here
    torch.testing.assert_close(got, predicted, atol=2e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer, saved as a transformers model folder."""
    from transformers import AutoTokenizer

    from sparse_frontier.tracer.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m")))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_eval_sweep_writes_keyed_parquet_and_resumes(tiny_model_folder, tmp_path):
    from click.testing import CliRunner

    from sparse_frontier.cli.main import cli

    args = ["eval", "--sweep", "--model", str(tiny_model_folder), "--task", "qa_generated", "--length", "600",
            "--policies", "quest,block_sparse", "--sparsity", "0,0.8", "--samples", "2",
            "--param", "answer_format=direct", "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    parts = sorted((tmp_path / "e2e").glob("*.parquet"))
    assert len(parts) == 2  # one part per sample
    frame = pd.concat([pd.read_parquet(p) for p in parts])
    for column in ("model", "task", "length", "seed", "policy", "phase", "params", "budget_rule", "sparsity",
                   "score", "answer", "reference", "realised_sparsity", "backend"):
        assert column in frame.columns
    assert set(frame["backend"]) == {"torch"}  # on CPU the policies' attention runs through torch
    assert len(frame) == 2 * 2 * 2 and set(frame["seed"]) == {0, 1} and set(frame["length"]) == {600}
    assert set(frame["phase"]) == {"prefill", "decode"}
    assert frame["score"].between(0, 1).all()
    dense = frame[(frame["policy"] == "block_sparse") & (frame["sparsity"] == 0)]
    assert (dense["realised_sparsity"] == 0).all()  # dense prompt attention
    assert (frame.loc[frame["sparsity"] == 0.8, "realised_sparsity"] > 0.5).all()
    # a rerun of the same sweep reads the finished parts instead of running the model again
    mtimes = [p.stat().st_mtime_ns for p in parts]
    again = CliRunner().invoke(cli, [*args, "--json"])
    assert again.exit_code == 0, again.output
    assert [p.stat().st_mtime_ns for p in parts] == mtimes
    assert len(json.loads(again.stdout)) == 8


@pytest.mark.parametrize("args, message", [
    (["--task", "niah", "--length", "800", "--policy", "nope"], "unknown policy 'nope'"),
    (["--task", "nope", "--length", "800", "--policy", "quest"], "unknown task 'nope'"),
    (["--task", "niah", "--length", "800", "--policy", "quest", "--sparsity", "1.5"], "outside [0, 1)"),
    (["--task", "niah", "--length", "800", "--policy", "quest", "--sparsity", "0.5,0.8"], "--sweep"),
    (["--task", "niah", "--length", "100", "--policy", "quest"], "too short"),
])
def test_eval_user_errors_are_one_clear_message(tiny_model_folder, args, message):
    from click.testing import CliRunner

    from sparse_frontier.cli.main import cli

    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_folder), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def _sim_rows(configs: dict, prompt_len: int = 1900, traces: int = 2, heads: int = 2) -> pd.DataFrame:
    """Simulator-shaped rows: every (trace, head) of each (policy, sparsity) with the given recall."""
    rows = []
    for (policy, phase, sparsity), recall in configs.items():
        for t in range(traces):
            for h in range(heads):
                rows.append({"trace_id": f"t{t}", "model": "m", "task": "niah", "length": prompt_len, "head": h,
                             "policy": policy, "phase": phase, "params": "{}", "budget_rule": "uniform",
                             "sparsity": sparsity, "realised_sparsity": sparsity, "recall": recall + 0.01 * h,
                             "output_error": 1 - recall, "status": "ok"})
    rows.append({**rows[0], "recall": float("nan"), "status": "error"})  # failed rows are left out
    return pd.DataFrame(rows)


def _e2e_rows(scores: dict, length: int = 2048, samples: int = 3) -> pd.DataFrame:
    return pd.DataFrame([{"model": "m", "task": "niah", "length": length, "seed": s, "policy": policy,
                          "phase": phase, "params": "{}", "budget_rule": "uniform", "sparsity": sparsity,
                          "score": score, "realised_sparsity": sparsity}
                         for (policy, phase, sparsity), score in scores.items() for s in range(samples)])


def test_fidelity_ranks_configurations_and_names_the_disagreement():
    from sparse_frontier.simulator import fidelity as fid

    recall = {("quest", "decode", 0.5): 0.95, ("quest", "decode", 0.9): 0.7, ("snapkv", "decode", 0.5): 0.9,
              ("snapkv", "decode", 0.9): 0.5, ("block_sparse", "prefill", 0.5): 0.8,
              ("block_sparse", "prefill", 0.0): 1.0}
    agree = {key: r for key, r in recall.items()}  # scores in the same order as recall
    agree[("dense", "prefill", 0.0)] = 0.9  # the dense baseline runs end to end only
    joined = fid.join(_sim_rows(recall), _e2e_rows(agree))
    assert set(joined["length"]) == {2048}  # the 1900-token prompts belong to the 2048-token target
    table = fid.fidelity(joined).set_index("phase")
    assert table.loc["all", "rho_recall"] == pytest.approx(1.0)
    assert table.loc["all", "rho_error"] == pytest.approx(-1.0)
    assert table.loc["all", "configs"] == 5 and table.loc["all", "samples"] == 3  # sparsity 0 left out
    assert table.loc["all", "dense_score"] == pytest.approx(0.95)  # block_sparse at 0 and dense
    assert table.loc["decode", "configs"] == 4
    # snapkv at 0.9 scores best of all: the simulator ranks it last, the one configuration it gets wrong
    swapped = {**agree, ("snapkv", "decode", 0.9): 0.99}
    joined = fid.join(_sim_rows(recall), _e2e_rows(swapped))
    assert fid.fidelity(joined).set_index("phase").loc["all", "rho_recall"] < 0.5
    worst = fid.disagreements(joined, top=1)
    assert worst[["policy", "sparsity"]].values.tolist() == [["snapkv", 0.9]]
    assert worst["gap"].iloc[0] < 0  # rated worse by the simulator than by the task


def test_fidelity_needs_shared_configurations():
    from sparse_frontier.simulator import fidelity as fid

    sim = _sim_rows({("quest", "decode", 0.5): 0.9})
    with pytest.raises(fid.FidelityError, match="share no"):
        fid.join(sim, _e2e_rows({("snapkv", "decode", 0.5): 0.5}))


def test_eval_fidelity_reads_real_simulator_parts(tmp_path):
    """The command joins what `frontier simulate` wrote with end-to-end records on the same key."""
    from click.testing import CliRunner

    from sparse_frontier.cli.main import cli
    from sparse_frontier.simulator.results import load_parts
    from sparse_frontier.simulator.sweep import Settings, Spec, run_sweep

    write_random_trace(tmp_path / "r.zarr")
    settings = Settings(policies=[Spec("quest"), Spec("snapkv")], sparsities=[0.5, 0.8, 0.95], queries=64,
                        error_queries=16)
    run_sweep([str(tmp_path / "r.zarr")], settings, tmp_path / "res")
    sim = load_parts(tmp_path / "res")
    means = sim.groupby(["policy", "params", "sparsity"])["recall"].mean()
    records = [{"model": "random", "task": "", "length": 256, "seed": s, "policy": policy, "phase": "decode",
                "params": params, "budget_rule": "uniform", "sparsity": sparsity, "score": float(r),
                "realised_sparsity": sparsity} for (policy, params, sparsity), r in means.items() for s in (0, 1)]
    (tmp_path / "res" / "e2e").mkdir()
    pd.DataFrame(records).to_parquet(tmp_path / "res" / "e2e" / "hand.parquet")
    result = CliRunner().invoke(cli, ["eval", "fidelity", str(tmp_path / "res"), str(tmp_path / "res"), "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)["fidelity"]
    overall = next(r for r in table if r["phase"] == "all")
    assert overall["configs"] == 6 and overall["samples"] == 2 and overall["traces"] == 1
    assert overall["rho_recall"] == pytest.approx(1.0)
    missing = CliRunner().invoke(cli, ["eval", "fidelity", str(tmp_path), str(tmp_path)])
    assert missing.exit_code != 0 and "no simulator results" in missing.output
