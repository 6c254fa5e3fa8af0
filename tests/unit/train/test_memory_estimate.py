"""The per-rank memory estimate: what each layout shards, and the refusal before any work."""

from __future__ import annotations

import time

import pytest

from modmoe.config import load_config
from modmoe.config_base import ConfigError
from modmoe.model.flops import parameter_counts
from modmoe.parallel.dims import ParallelDims
from modmoe.train.memory_estimate import GIB, check_memory, estimate

TINY = "configs/tiny.yaml"


def _dims(cfg, world: int) -> ParallelDims:
    return ParallelDims.build(cfg.parallel, cfg.model, world, "cpu")


def test_sixteen_bytes_per_parameter_on_one_rank():
    cfg = load_config(TINY)
    est = estimate(cfg, _dims(cfg, 1), 4)
    assert est.state_bytes == pytest.approx(16 * parameter_counts(cfg.model)["total"])
    tc, m = cfg.trainer, cfg.model
    assert (
        est.activation_bytes == tc.micro_batch_size * cfg.data.seq_len * (m.dim * m.num_layers + 2 * m.vocab_size) * 4
    )


@pytest.mark.parametrize(
    ("overrides", "dense_bytes_per_param"),
    [
        (["parallel.dp_backend=fsdp2"], 16 / 4),
        (["parallel.dp_backend=deepspeed", "parallel.zero_stage=1"], 8 + 8 / 4),
        (["parallel.dp_backend=deepspeed", "parallel.zero_stage=2"], 4 + 12 / 4),
        (["parallel.dp_backend=deepspeed", "parallel.zero_stage=3"], 16 / 4),
        (["parallel.dp_backend=ddp"], 16),
    ],
)
def test_sharding_over_four_data_parallel_ranks(overrides, dense_bytes_per_param):
    cfg = load_config(TINY, [*overrides, "model.moe.enabled=false"])
    est = estimate(cfg, _dims(cfg, 4), 4)
    assert est.state_bytes == pytest.approx(dense_bytes_per_param * parameter_counts(cfg.model)["total"])


def test_expert_parallel_splits_the_experts_only():
    cfg = load_config(TINY, ["parallel.ep=2"])
    counts = parameter_counts(cfg.model)
    est = estimate(cfg, _dims(cfg, 2), 4)
    assert est.state_bytes == pytest.approx(16 * (counts["total"] - counts["experts"] / 2))


def test_a_terabyte_model_is_refused_at_once_and_the_knob_turns_it_off():
    cfg = load_config(TINY, ["model.dim=32768", "model.num_layers=256", "model.moe.expert_hidden=32768"])
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        check_memory(cfg, _dims(cfg, 1), "cpu", 1)
    assert time.perf_counter() - t0 < 0.5
    message = str(err.value)
    assert "needs at least" in message and "GiB per rank" in message and "trainer.memory_check" in message
    assert "\n" not in message
    cfg.trainer.memory_check = "warn"
    assert check_memory(cfg, _dims(cfg, 1), "cpu", 1).total_bytes > 1000 * GIB
    cfg.trainer.memory_check = "refuse"
    cfg.trainer.memory_available_gib = 1e9
    check_memory(cfg, _dims(cfg, 1), "cpu", 1)
