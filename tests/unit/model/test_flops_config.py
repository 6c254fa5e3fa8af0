"""FLOPs counter against a hand count, and config validation messages."""

import pytest

from modmoe.config import load_config
from modmoe.config_base import ConfigError
from modmoe.model.flops import count_flops, theoretical_speedup
from modmoe.model_config import ModelConfig


def test_flops_match_hand_count():
    # 2 blocks: block 0 full + MoE, block 1 depth-routed (capacity 0.25) + MoE.
    cfg = ModelConfig(
        vocab_size=100,
        dim=16,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
        depth={"capacity": 0.25, "every": 2, "offset": 1},
        moe={"num_experts": 4, "top_k": 2, "expert_hidden": 32},
    )
    T = 8
    k = 2  # ceil(0.25 * 8)
    # Attention projections: q (16x16), k and v (16x8 each), o (16x16) = 768 MACs per token.
    proj = 2 * (16 * 16 + 16 * 8 + 16 * 8 + 16 * 16)
    # Attention core for n causal tokens: heads * head_dim * n(n+1)/2 pairs, 2 matmuls, 2 FLOPs per MAC.
    core = lambda n: 2 * 2 * 4 * 4 * n * (n + 1) / 2  # noqa: E731
    experts = 2 * (3 * 16 * 32) * 2  # top-2 experts, 3 matrices each
    router = 2 * 16 * 4
    block0 = proj + core(T) / T + router + experts
    block1 = (k / T) * (proj + router + experts) + core(k) / T + 2 * 16  # + depth router on all tokens
    head = 2 * 16 * 100
    report = count_flops(cfg, T)
    assert report.forward_per_token == pytest.approx(block0 + block1 + head)
    assert report.training_per_token == pytest.approx(3 * (block0 + block1 + head))
    assert report.per_component["depth_router"] == 32


def test_mod_speedup_prediction_follows_capacity():
    mode = ModelConfig(num_layers=8, depth={"capacity": 0.125})
    moe_only = ModelConfig(num_layers=8, depth={"enabled": False})
    s = theoretical_speedup(moe_only, mode, 1024)
    assert 1.3 < s < 2.0
    full_capacity = ModelConfig(num_layers=8, depth={"capacity": 1.0})
    assert theoretical_speedup(moe_only, full_capacity, 1024) < 1.0  # routers cost a little


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.num_layers=0", "config error: model.num_layers = 0: Input should be greater than or equal to 1"),
        (
            "model.depth.router_weight=tanh",
            "config error: model.depth.router_weight = 'tanh': Input should be 'raw', 'sigmoid' or 'unit'",
        ),
        (
            "model.depth.capacity=1.5",
            "config error: model.depth.capacity = 1.5: Input should be less than or equal to 1",
        ),
        ("model.moe.top_k=9", "config error: model.moe.top_k = 9: must be <= num_experts (8)"),
        ("model.num_heads=3", "config error: model.num_heads = 3: must divide dim (256)"),
        (
            "trainer.micro_batch_size=5",
            "config error: trainer.global_batch_size = 16: must be a multiple of trainer.micro_batch_size (5)",
        ),
    ],
)
def test_bad_values_give_one_line_naming_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == expected
    assert "\n" not in str(err.value)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown key model.depth.capcity \(allowed keys: .*capacity"):
        load_config(None, ["model.depth.capcity=0.5"])


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 3\ntrainer:\n  max_steps: 7\n")
    cfg = load_config(path, ["model.depth.capacity=0.5", "trainer.run_dir=/tmp/x"])
    assert (cfg.model.num_layers, cfg.trainer.max_steps, cfg.model.depth.capacity, cfg.trainer.run_dir) == (
        3,
        7,
        0.5,
        "/tmp/x",
    )
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_presets_validate():
    for name in ("tiny", "bench-cpu", "gpu-1b"):
        load_config(f"configs/{name}.yaml")
