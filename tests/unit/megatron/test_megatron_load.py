"""Loading one rank's part of a Megatron GPTModel from native tensors (modmoe/engines/megatron/load.py).

The slices are checked here against Megatron's own marks on tensors; that every layout (PP, EP,
TP and their products) then holds the native model is shown end to end over gloo by
tests/integration/test_megatron_layouts.py (each layout trains like one rank from step 1).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from modmoe.engines.megatron import MegatronConfig  # noqa: E402
from modmoe.engines.megatron.convert import conversion_rules, megatron_to_native  # noqa: E402
from modmoe.engines.megatron.load import (  # noqa: E402
    RankShards,
    global_names,
    load_native_weights,
    native_init_reader,
    rank_read,
    rank_slice,
)
from modmoe.engines.megatron.translate import build_transformer_config, translate  # noqa: E402
from modmoe.model import MoDETransformer  # noqa: E402
from modmoe.model_config import ModelConfig  # noqa: E402
from modmoe.parallel.config import ParallelConfig  # noqa: E402

CFG = ModelConfig.model_validate(
    {
        "vocab_size": 96,
        "dim": 32,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "ffn_hidden": 48,
        "max_seq_len": 32,
        "depth": {"capacity": 0.25, "predictor": True},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "num_shared_experts": 1, "first_dense": 1},
    }
)


def _marked(shape, dim: int | None, stride: int = 1) -> torch.Tensor:
    """A rank's tensor as Megatron marks it (``dim`` None: replicated)."""
    t = torch.empty(shape)
    if dim is not None:
        t.tensor_model_parallel, t.partition_dim, t.partition_stride = True, dim, stride
    return t


def test_rank_slice_follows_megatrons_tensor_parallel_marks():
    full = torch.arange(8 * 6.0).reshape(8, 6)
    tp1 = RankShards(tp_rank=1, tp=2)
    # Column-parallel (dim 0), row-parallel (dim 1), replicated.
    assert torch.equal(
        rank_slice(full, _marked((4, 6), 0), "decoder.layers.0.self_attention.linear_qkv.weight", tp1), full[4:]
    )
    assert torch.equal(rank_slice(full, _marked((8, 3), 1), "decoder.layers.0.mlp.linear_fc2.weight", tp1), full[:, 3:])
    assert rank_slice(full, _marked((8, 6), None), "decoder.layers.0.input_layernorm.weight", tp1) is full
    # SwiGLU fc1 = [gate; up]: rank 1 holds gate[2:4] and up[6:8] (Megatron marks stride 2).
    fc1 = rank_slice(full, _marked((4, 6), 0, stride=2), "decoder.layers.0.mlp.linear_fc1.weight", tp1)
    assert torch.equal(fc1, torch.cat([full[2:4], full[6:8]]))


def test_routed_experts_split_over_expert_tensor_parallel_ranks_shared_experts_over_tp():
    full = torch.arange(8 * 6.0).reshape(8, 6)
    shards = RankShards(tp_rank=1, tp=2, etp_rank=0, etp=1)  # tp 2, whole experts (etp 1)
    expert = rank_slice(
        full, _marked((8, 6), 0, 2), "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight", shards
    )
    shared = rank_slice(full, _marked((4, 6), 0, 2), "decoder.layers.1.mlp.shared_experts.linear_fc1.weight", shards)
    assert torch.equal(expert, full) and torch.equal(shared, torch.cat([full[2:4], full[6:8]]))
    with pytest.raises(NotImplementedError, match="stride 3"):
        rank_slice(full, _marked((4, 6), 0, 3), "decoder.layers.0.mlp.linear_fc2.weight", shards)


def _gpt(cfg: ModelConfig):
    from modmoe.engines.megatron.spec import build_gpt_model

    plan = translate(cfg, ParallelConfig(), MegatronConfig(), world_size=1, seq_len=32, precision="auto", device="cpu")
    return build_gpt_model(plan, build_transformer_config(plan, use_cpu_initialization=True))


def test_one_rank_holds_the_native_initial_model_and_reads_each_tensor_once(megatron_cpu):
    gpt = _gpt(CFG)
    read: list[str] = []
    reader = native_init_reader(CFG, seed=7)

    def recording(name: str, index=None) -> torch.Tensor:
        assert index is None  # one rank holds everything
        read.append(name)
        return reader(name, index)  # the reader drops what it gives: a second read of a name fails

    assert load_native_weights(gpt, CFG, recording, shards=RankShards()) == read
    torch.manual_seed(7)
    expected = MoDETransformer(CFG).state_dict()
    got = megatron_to_native(gpt.state_dict(), CFG)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert sorted(read) == sorted(k for k in expected if k != "output.weight" or not CFG.tie_embeddings)
    assert global_names(gpt, tied=False)["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"] == (
        "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    )


def test_the_native_initialisation_leaves_the_callers_random_state_alone():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    native_init_reader(CFG, seed=11)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_tensor_of_another_shape_or_one_left_unfilled_is_named(megatron_cpu):
    gpt = _gpt(CFG)
    wider = CFG.model_copy(update={"ffn_hidden": 64})
    with pytest.raises(
        ValueError, match=r"load: decoder\.layers\.0\.mlp\.linear_fc1\.weight .* \(96, 32\) on this rank"
    ):
        load_native_weights(gpt, CFG, native_init_reader(wider, seed=0), shards=RankShards())
    no_predictor = CFG.model_copy(update={"depth": CFG.depth.model_copy(update={"predictor": False})})
    with pytest.raises(KeyError, match=r"no native tensor fills 'decoder\.layers\.1\.depth_router\.predictor"):
        load_native_weights(gpt, no_predictor, native_init_reader(no_predictor, seed=0), shards=RankShards())


# How Megatron splits each tensor over tensor-parallel ranks (dim, stride), by name; None: replicated.
_MARKS = {
    "linear_qkv.weight": (0, 1),
    "linear_qkv.bias": (0, 1),
    "linear_proj.weight": (1, 1),
    "linear_fc1.weight": (0, 2),
    "linear_fc2.weight": (1, 1),
    "word_embeddings.weight": (0, 1),
    "output_layer.weight": (0, 1),
}
FEATURES = CFG.model_copy(
    update={"attention_bias": "all", "qk_norm": "head", "moe": CFG.moe.model_copy(update={"shared_expert_gate": True})}
)


@pytest.mark.parametrize(
    "shards,experts",
    [
        (RankShards(tp_rank=1, tp=2, etp_rank=1, etp=2), (2, 3)),
        # More TP ranks than KV heads (2): ranks 2 and 3 share KV group 1; expert TP over 4 ranks.
        (RankShards(tp_rank=2, tp=4, etp_rank=3, etp=4), (0, 1, 2, 3)),
        (RankShards(tp_rank=3, tp=4), (1,)),
    ],
    ids=["tp2-etp2-ep2", "tp4-etp4", "tp4-ep4"],
)
def test_each_rank_reads_only_the_native_part_its_slices_need(shards, experts):
    """For every conversion rule, the rank's slice of each Megatron tensor made from the parts of
    the native tensors it reads equals its slice of the whole converted tensor (rank_slice)."""
    torch.manual_seed(0)
    natives = MoDETransformer(FEATURES).state_dict()
    for rule in conversion_rules(FEATURES):
        full = dict(zip(rule.megatron, rule.to_megatron(*(natives[n] for n in rule.native)), strict=True))
        wanted, targets, expected = {}, {}, {}
        for name, tensor in full.items():
            if ".local_experts." in name and int(name.split(".local_experts.")[1].split(".")[0]) not in experts:
                continue  # another expert-parallel rank's expert
            dim, stride = next((v for k, v in _MARKS.items() if name.endswith(k)), (None, 1))
            expected[name] = rank_slice(tensor, _marked(tensor.shape, dim, stride), name, shards)
            wanted[name], targets[name] = [name], _marked(expected[name].shape, dim, stride)
        part_of = rank_read(rule, wanted, targets, FEATURES, shards)
        sources = [
            natives[n] if i is None else natives[n][i] for n, i in zip(rule.native, part_of.indexes, strict=True)
        ]
        made = dict(zip(part_of.names, map(part_of.keep, rule.to_megatron(*sources)), strict=True))
        assert made.keys() == expected.keys(), rule.megatron
        for name, value in expected.items():
            assert torch.equal(made[name], value), name
        if rule.kind == "experts":  # only its experts' rows, and of each its hidden slice
            share = len(experts) / FEATURES.moe.num_experts / shards.etp
            assert sum(s.numel() for s in sources) == share * sum(natives[n].numel() for n in rule.native)
