"""The inference runtime: generation over the one model's ragged KV cache (exactly its
whole-sequence causal forward), executed FLOPs from routing decisions, sampling, stop strings
and streaming, and its one-line errors."""

import ast
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from runs import small_overrides
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from modmoe.config import load_config
from modmoe.export import export_checkpoint
from modmoe.inference.export_format import MODEL_FILES
from modmoe.inference.flops import trace_flops, trace_of_sequences
from modmoe.inference.generate import Generator
from modmoe.inference.loading import InferenceError, load_exported
from modmoe.inference.sampling import SamplingConfig, filter_logits, next_tokens
from modmoe.inference.text import StopTextStream
from modmoe.model import MoDETransformer
from modmoe.model.flops import count_flops
from modmoe.model.trace import Trace
from modmoe.model_config import ModelConfig
from modmoe.train.loop import Trainer

MODEL_DIR = Path(__file__).resolve().parents[3] / "modmoe" / "model"


def small_cfg(depth=None, moe=None, **top) -> ModelConfig:
    return ModelConfig(
        **{
            "vocab_size": 97,
            "dim": 32,
            "num_layers": 4,
            "num_heads": 4,
            "num_kv_heads": 2,
            "ffn_hidden": 48,
            "max_seq_len": 64,
            "depth": {"capacity": 0.25, "predictor": True, **(depth or {})},
            "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, **(moe or {})},
            **top,
        }
    )


VARIANTS = {
    "default": small_cfg(),
    "predictor_sigmoid_shared_bias": small_cfg(
        depth={"causal_router": "predictor", "router_weight": "sigmoid"},
        moe={"score": "sigmoid", "num_shared_experts": 1, "bias_update_rate": 0.1},
    ),
    "integrated": small_cfg(depth={"variant": "integrated", "noop_experts": 2}),
    "prefix_rank": small_cfg(depth={"causal_router": "prefix_rank", "prefix_prior_tokens": 8}),
    "dense_tied_mha": small_cfg(moe={"enabled": False}, num_kv_heads=None, tie_embeddings=True),
}


def random_model(cfg: ModelConfig, seed: int = 0) -> MoDETransformer:
    torch.manual_seed(seed)
    model = MoDETransformer(cfg).eval()
    for moe in model.moe_layers():
        if moe.expert_bias is not None:
            moe.expert_bias.normal_(0, 0.1)  # a trained bias changes the experts' choice
    with torch.no_grad():  # a prefix-rank prior as a training step leaves it: a batch's logit quantiles
        out = model.train()(torch.randint(0, cfg.vocab_size, (4, cfg.max_seq_len)))
        for block, aux in zip(model.layers, out.layers, strict=True):
            if aux.depth is not None and aux.depth.quantile_sums is not None:
                block.router.observe(aux.depth.quantile_sums)
                assert float(block.router.prior_quantiles.std()) > 0  # a real spread, not the zeros it starts at
    return model.eval()


@pytest.fixture(scope="module")
def trained(small_data_dir, tmp_path_factory):
    """A few training steps, exported: (export dir, the training model)."""
    run = tmp_path_factory.mktemp("inference-run")
    cfg = load_config(
        None,
        small_overrides(
            small_data_dir,
            run,
            **{"trainer.max_steps": 12, "logging.mlflow.enabled": False, "model.moe.bias_update_rate": 0.01},
        ),
    )
    trainer = Trainer(cfg, log=lambda _: None)
    trainer.train()
    out = run.parent / f"{run.name}-export"
    export_checkpoint(run, out)
    return out, trainer.backend.core.eval()


def _import_roots(tree: ast.AST) -> set[str]:
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return roots | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}


def test_the_model_files_an_export_copies_import_only_torch_and_each_other():
    """They are shipped inside every export, where modmoe is not installed: absolute imports of
    torch and the standard library only, relative imports among themselves only."""
    allowed = {"__future__", "math", "dataclasses", "typing", "collections", "torch"}
    for name in MODEL_FILES:
        tree = ast.parse((MODEL_DIR / name).read_text())
        assert _import_roots(tree) <= allowed, name
        relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        assert {f"{m}.py" for m in relative} <= set(MODEL_FILES), name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_generation_equals_the_whole_sequence_forward(variant):
    """Causal routing over the KV cache (prefill, then one token at a time) computes exactly what
    the whole-sequence causal forward of training and evaluation computes."""
    model = random_model(VARIANTS[variant])
    tokens = torch.randint(0, 97, (3, 40))
    with torch.no_grad():
        reference = model(tokens, routing="causal").logits
        torch.testing.assert_close(model.run_tokens(tokens, model.new_cache(3)), reference, rtol=1e-5, atol=1e-5)
        cache = model.new_cache(3)
        steps = [model.run_tokens(tokens[:, :10], cache)] + [
            model.run_tokens(tokens[:, t : t + 1], cache) for t in range(10, 40)
        ]
        torch.testing.assert_close(torch.cat(steps, 1), reference, rtol=1e-5, atol=1e-5)


def test_routed_caches_hold_only_the_tokens_that_entered():
    core = random_model(VARIANTS["default"], seed=3)
    tokens = torch.randint(0, 97, (2, 30))
    cache, trace = core.new_cache(2), Trace()
    with torch.no_grad():
        core.run_tokens(tokens, cache, trace=trace)
    for lt in trace.layers:
        expected = lt.enter.sum(1) if lt.enter is not None else torch.full((2,), 30)
        assert cache.layers[lt.layer].lengths.tolist() == expected.tolist()
    routed = [lt for lt in trace.layers if lt.enter is not None]
    assert routed and all(0 < int(lt.enter.sum()) < 60 for lt in routed)  # some enter, some skip
    assert cache.positions.tolist() == [30, 30]


def test_right_padded_batch_equals_each_row_alone():
    model = random_model(VARIANTS["default"], seed=4)
    rows = [torch.randint(0, 97, (n,)) for n in (7, 19, 12)]
    tokens = torch.zeros(3, 19, dtype=torch.long)
    valid = torch.zeros(3, 19, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], valid[i, : len(r)] = r, True
    with torch.no_grad():
        batched = model.run_tokens(tokens, model.new_cache(3), valid, last_only=True)[:, 0]
        for i, r in enumerate(rows):
            alone = model(r[None], routing="causal").logits[0, -1]
            torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-5)


def greedy_by_recompute(native: MoDETransformer, prompt: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding with no cache: the whole sequence through the training model each step."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            token = int(native(torch.tensor([seq]), routing="causal").logits[0, -1].argmax())
            if token == eos:
                break
            seq.append(token)
            out.append(token)
    return out


def test_kv_cache_greedy_generation_equals_recompute_from_scratch(trained):
    out_dir, native = trained
    loaded = load_exported(out_dir)
    gen = Generator(loaded)
    prompts = [gen.encode(t) for t in ("def main(args):\n    ", "import os\nimport sys\n\nclass ", "x = ")]
    params = SamplingConfig(max_new_tokens=24)
    batched = gen.generate_ids(prompts, params)
    for prompt, got in zip(prompts, batched):
        assert got == greedy_by_recompute(native, prompt, 24, loaded.eos_id)
        assert gen.generate_ids([prompt], params)[0] == got  # batching changes nothing
    assert gen.stats.decode_tokens > 0 and gen.stats.decode_flops > 0


def counted_by_torch(fn) -> int:
    """Matmul FLOPs torch really executed (its counter misses CPU flash attention: add it)."""
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: (
            sdpa_flop_count(q, k, v)
        )
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def test_decode_flops_follow_the_routing_decisions():
    """Per decode step, the FLOPs counted from the decisions equal what torch executed, so a
    token that skips a routed block really computes nothing there but the router."""
    cfg = VARIANTS["default"]
    core = random_model(cfg, seed=5)
    cache = core.new_cache(1)
    torch.set_grad_enabled(False)
    try:
        core.run_tokens(torch.randint(0, 97, (1, 8)), cache)
        entered_steps = skipped_steps = 0
        for _ in range(24):
            trace = Trace()
            token = torch.randint(0, 97, (1, 1))
            executed = counted_by_torch(lambda: core.run_tokens(token, cache, last_only=True, trace=trace))
            assert executed == sum(trace_flops(trace, cfg.to_args()).values())
            for lt in trace.layers:
                if lt.enter is not None:
                    entered_steps += int(lt.enter.any())
                    skipped_steps += int(not lt.enter.any())
                    assert lt.tokens == int(lt.enter.sum())
    finally:
        torch.set_grad_enabled(True)
    assert entered_steps and skipped_steps


def test_prefill_flops_equal_count_flops_without_routing():
    """The runtime's unit costs are model.flops's: a whole-sequence prefill of a model without
    routed blocks counts exactly count_flops's forward FLOPs per token times the tokens."""
    for cfg in (small_cfg(depth={"enabled": False}), small_cfg(depth={"enabled": False}, moe={"enabled": False})):
        core = random_model(cfg)
        trace = Trace()
        with torch.no_grad():
            core.run_tokens(torch.randint(0, 97, (1, 40)), core.new_cache(1), trace=trace)
        assert sum(trace_flops(trace, cfg.to_args()).values()) == pytest.approx(
            count_flops(cfg, 40).forward_per_token * 40, rel=1e-12
        )


def test_whole_sequence_trace_counts_the_routed_work():
    """The top-k reference's trace, read from the model's routing details: k tokens per sequence
    in a routed block, every token elsewhere, and the decision it compares with top-k."""
    cfg = VARIANTS["default"]
    model = random_model(cfg, seed=6)
    with torch.no_grad():
        output = model(torch.randint(0, 97, (2, 40)), routing="topk")
    trace = trace_of_sequences(model, output, 40, "aux_loss")
    k = cfg.to_args().entering_tokens(40)
    for layer, aux in zip(trace.layers, output.layers):
        expected = 2 * k if aux.depth is not None else 2 * 40
        assert layer.tokens == expected
        if aux.depth is not None:
            assert torch.equal(layer.enter, aux.depth.logits > 0) and int(layer.topk.sum()) == 2 * k


def test_sampling_filters_and_seeds():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=None)[0, 2:]).all()
    # softmax ~ [0.64, 0.24, 0.09, ...]: p = 0.8 keeps the two tokens that first reach 0.8.
    kept = ~torch.isinf(filter_logits(logits, top_k=None, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False, False]]
    assert (~torch.isinf(filter_logits(logits, None, 1e-6))).sum() == 1  # the most likely always stays
    greedy = SamplingConfig(temperature=0.0)
    assert next_tokens(logits, greedy).tolist() == [0]
    assert next_tokens(logits, SamplingConfig(temperature=1.0, top_k=1), torch.Generator().manual_seed(0)).tolist() == [
        0
    ]
    flat = torch.zeros(1, 1000)
    draw = lambda seed: next_tokens(
        flat.expand(8, -1), SamplingConfig(temperature=1.0), torch.Generator().manual_seed(seed)
    ).tolist()
    assert draw(1) == draw(1) and draw(1) != draw(2)
    high = next_tokens(
        logits.expand(2000, -1), SamplingConfig(temperature=1.0, top_k=2), torch.Generator().manual_seed(0)
    )
    assert set(high.tolist()) == {0, 1}
    assert 0.65 < (high == 0).float().mean() < 0.80  # e^4 / (e^4 + e^3) = 0.73


def test_stop_strings_and_split_characters_stream_only_settled_text():
    pieces = ["Hel", "lo", " wor", "ld", "\n", "\n", "ignored"]
    vocab = {i: p.encode() for i, p in enumerate(pieces)}
    vocab[7], vocab[8] = "é".encode()[:1], "é".encode()[1:]  # one character over two tokens
    decode = lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
    s = StopTextStream(decode, stops=["\n\n", "world!"])
    deltas = [s.feed(t) for t in (0, 1, 7, 8, 2, 3, 4, 5, 6)]
    # Half a character waits for its second byte; " wor"/"world" wait (could become
    # "world!"); "\n" waits (could become "\n\n"), then the stop cuts the text before it.
    assert deltas == ["Hel", "lo", "", "é", " ", "", "world", "", ""]
    assert s.stopped and s.text == "Helloé world"
    s2 = StopTextStream(decode, stops=["world!"])
    streamed = "".join(s2.feed(t) for t in (0, 1, 2, 3)) + s2.flush()
    assert streamed == "Hello world" and not s2.stopped  # "world" held back until the end, then released


def test_generation_stream_finish_reasons_and_context_end(trained):
    out_dir, _ = trained
    gen = Generator(load_exported(out_dir))
    base = gen.complete(["def "], SamplingConfig(max_new_tokens=12))[0]
    assert base.finish_reason in ("length", "eos") and base.text
    events = list(gen.stream(["def "], SamplingConfig(max_new_tokens=12)))
    assert "".join(e.text for e in events) == base.text and events[-1].finish_reason == base.finish_reason
    # A stop string taken from the greedy text ends it right before that string.
    stop = base.text[len(base.text) // 2 :][:3]
    cut = gen.complete(["def "], SamplingConfig(max_new_tokens=12, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == base.text[: base.text.find(stop)]
    # A prompt 2 tokens short of the context gets 2 tokens, then ends with reason "context".
    limit = gen.loaded.config.max_seq_len
    ids = (gen.encode("import os\n") * limit)[: limit - 2]
    streamed = list(gen.stream_ids([ids], SamplingConfig(max_new_tokens=10, stop_at_eos=False)))
    assert len(streamed) == 2 and streamed[-1][2]


def test_rows_that_finish_early_leave_the_others_unchanged(trained):
    """A row that stops is dropped from the batch (and its cache rows with it); the rows that
    go on generate what they generate alone."""
    out_dir, _ = trained
    gen = Generator(load_exported(out_dir))
    prompts = [gen.encode(p) for p in ("def ", "import os\n", "class A:\n    ")]
    params = SamplingConfig(max_new_tokens=16, stop_at_eos=False)
    alone = [gen.generate_ids([p], params)[0] for p in prompts]
    got: list[list[int]] = [[] for _ in prompts]
    for idx, token, _ in gen.stream_ids(prompts, params):
        got[idx].append(token)
        if idx == 1 and len(got[1]) == 3:  # as a stop string would: the middle row ends
            gen.finish(1)
    assert got == [alone[0], alone[1][:3], alone[2]]


def test_bad_prompts_and_options_fail_with_one_line(trained):
    out_dir, _ = trained
    gen = Generator(load_exported(out_dir))
    too_long = [1] * (gen.loaded.config.max_seq_len + 1)
    with pytest.raises(
        InferenceError, match=r"prompt 0: 65 tokens, longer than the context \(model.max_seq_len = 64\)"
    ):
        list(gen.stream_ids([too_long], SamplingConfig()))
    with pytest.raises(InferenceError, match="prompt 0: empty"):
        list(gen.stream([""], SamplingConfig()))
    with pytest.raises(InferenceError, match="--routing 'beam': allowed causal, topk"):
        Generator(gen.loaded, routing="beam")


def _copy(out_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(out_dir, dst)
    return dst


def test_missing_mismatched_and_unsupported_files_fail_with_one_line(trained, tmp_path):
    out_dir, _ = trained
    d = _copy(out_dir, tmp_path)
    (d / "model.safetensors").rename(d / "elsewhere.safetensors")
    with pytest.raises(InferenceError, match="no model.safetensors and no model.safetensors.index.json"):
        load_exported(d)

    d = _copy(out_dir, tmp_path / "b")
    weights = load_file(d / "model.safetensors")
    weights["layers.1.mlp.experts.w1"] = weights["layers.1.mlp.experts.w1"][:, :, :8].contiguous()
    save_file(weights, d / "model.safetensors")
    (d / "modmoe_export.json").unlink()  # as if re-saved by another tool: shapes are still checked
    with pytest.raises(
        InferenceError,
        match=r"tensor 'layers.1.mlp.experts.w1' has shape \[4, 64, 8\], config.json implies \[4, 64, 64\]",
    ):
        load_exported(d)

    d = _copy(out_dir, tmp_path / "c")
    with open(d / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(
        InferenceError, match="model.safetensors: .* bytes, the export recorded .* \\(replaced or truncated\\)"
    ):
        load_exported(d)

    d = _copy(out_dir, tmp_path / "d")
    cfg = json.loads((d / "config.json").read_text())
    cfg["modmoe"]["model"]["depth"]["capacity"] = 1.5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InferenceError, match=r"config.json: config error: modmoe.model.depth.capacity = 1.5"):
        load_exported(d)
    cfg["modmoe"]["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InferenceError, match="version 99 is not supported"):
        load_exported(d)

    d = _copy(out_dir, tmp_path / "e")
    (d / "config.json").unlink()
    with pytest.raises(InferenceError, match="config.json: missing"):
        load_exported(d)
    with pytest.raises(InferenceError, match="not a directory"):
        load_exported(tmp_path / "nothing")


def test_bf16_runtime_stays_close_and_keeps_routers_fp32(trained):
    out_dir, native = trained
    loaded = load_exported(out_dir, dtype=torch.bfloat16)
    assert loaded.model.layers[1].attn.wq.weight.dtype == torch.bfloat16
    assert loaded.model.layers[1].router.proj.weight.dtype == torch.float32
    tokens = torch.randint(0, 500, (2, 48))
    with torch.no_grad():
        ref = native(tokens, routing="topk").logits
        got = loaded.model(tokens, routing="topk").logits.float()
    # bf16 keeps ~3 significant digits: compare at a scale of the logits' spread.
    assert (got - ref).abs().mean() < 0.05 * ref.std()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert math.isfinite(float(got.sum()))
