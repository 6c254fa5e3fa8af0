"""Layout validation: every impossible layout fails before any work, with one line naming the field."""

import importlib.util

import pytest

from modmoe.config import load_config
from modmoe.config_base import ConfigError
from modmoe.parallel.dims import ParallelDims


def dims(world: int, **parallel):
    cfg = load_config("configs/tiny.yaml", [f"parallel.{k}={v}" for k, v in parallel.items()])
    return ParallelDims.build(cfg.parallel, cfg.model, world)


def test_degrees_are_derived_and_checked():
    d = dims(8, ep=4)
    assert (d.dp, d.ep, d.tp, d.edp) == (8, 4, 1, 2)
    d = dims(4, tp=2, dp_backend="fsdp2")
    assert (d.dp, d.tp) == (2, 2)
    assert "ep" not in d.describe() and "tp 2" in d.describe()


@pytest.mark.parametrize(
    "world, parallel, field, fragment",
    [
        (4, {"tp": 3}, "parallel.tp = 3", "divide the world size"),
        (4, {"dp": 3}, "parallel.dp = 3", "must equal the world size"),
        (4, {"ep": 3}, "parallel.ep = 3", "divide the data-parallel degree"),
        (6, {"ep": 3}, "parallel.ep = 3", "divide model.moe.num_experts"),  # tiny has 8 experts
        (8, {"tp": 8, "dp_backend": "fsdp2"}, "parallel.tp = 8", "divide model.num_heads"),
        (4, {"tp": 2}, "parallel.dp_backend = 'ddp'", "needs 'fsdp2'"),
        (4, {"tp": 2, "ep": 2, "dp_backend": "fsdp2"}, "parallel.ep = 2", "not supported"),
    ],
)
def test_impossible_layouts_fail_with_one_line(world, parallel, field, fragment):
    with pytest.raises(ConfigError) as err:
        dims(world, **parallel)
    msg = str(err.value)
    assert "\\n" not in msg and field in msg and fragment in msg, msg


def test_zero_stage_and_backend_are_validated_by_the_config():
    with pytest.raises(ConfigError, match="parallel.zero_stage"):
        load_config("configs/tiny.yaml", ["parallel.zero_stage=4"])
    with pytest.raises(ConfigError, match="parallel.dp_backend"):
        load_config("configs/tiny.yaml", ["parallel.dp_backend=zero"])


def test_ep_without_experts_is_rejected():
    cfg = load_config("configs/tiny.yaml", ["parallel.ep=2", "model.moe.enabled=false"])
    with pytest.raises(ConfigError, match="no MoE layers"):
        ParallelDims.build(cfg.parallel, cfg.model, 2)


def test_missing_deepspeed_is_named(monkeypatch):
    """CI installs DeepSpeed, so its absence is simulated at the one place that looks for it."""
    import modmoe.parallel.dims as dims_module

    real = dims_module.find_spec
    monkeypatch.setattr(dims_module, "find_spec", lambda name: None if name == "deepspeed" else real(name))
    with pytest.raises(ConfigError, match="DeepSpeed is not installed"):
        dims(2, dp_backend="deepspeed")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_config_is_generated_and_extra_keys_merge():
    from modmoe.train.backends.deepspeed_config import deepspeed_config

    cfg = load_config(
        "configs/tiny.yaml",
        [
            "parallel.dp_backend=deepspeed",
            "parallel.zero_stage=2",
            "trainer.global_batch_size=16",
            "trainer.micro_batch_size=4",
        ],
    )
    d = ParallelDims.build(cfg.parallel, cfg.model, 2)
    ds = deepspeed_config(cfg, 16 // (4 * d.dp), d.zero_stage, bf16=False)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == cfg.optimizer.grad_clip
    extra = cfg.model_copy(
        update={
            "parallel": cfg.parallel.model_copy(
                update={"deepspeed_extra": {"zero_optimization": {"overlap_comm": True}}}
            )
        }
    )
    assert deepspeed_config(extra, 2, 2, bf16=False)["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    owned = cfg.model_copy(
        update={"parallel": cfg.parallel.model_copy(update={"deepspeed_extra": {"zero_optimization": {"stage": 3}}})}
    )
    with pytest.raises(ConfigError, match="parallel.deepspeed_extra.zero_optimization.stage"):
        deepspeed_config(owned, 2, 2, bf16=False)
