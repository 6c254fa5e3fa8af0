"""``resolve_job``: cross-section checks before any work, and the keys each backend honours."""

from __future__ import annotations

import pytest

from modmoe.config import load_config
from modmoe.config_base import ConfigError
from modmoe.train.backends.keys import MEGATRON_KEYS, NATIVE_KEYS, SPEED_KEYS, TRAINER_KEYS
from modmoe.train.resolve import changed_keys, resolve_job

MEGATRON = ["engine=megatron", "model.moe.score=sigmoid", "model.moe.aux_loss_coef=0", "trainer.device=cpu"]


def resolve(overrides, world_size=1):
    return resolve_job(load_config("configs/tiny.yaml", overrides), world_size=world_size, device="cpu")


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_resolution_computes_the_layout_once():
    job = resolve(["trainer.global_batch_size=32", "trainer.micro_batch_size=4"], world_size=2)
    assert (job.backend, job.dp, job.accum_steps, job.layout.dp) == ("native", 2, 4, 2)
    assert resolve(["parallel.dp_backend=deepspeed"]).backend == "deepspeed"
    meg = resolve([*MEGATRON, "parallel.tp=2", "megatron.sequence_parallel=true"], world_size=4)
    assert (meg.backend, meg.dp, meg.layout.layout.tp) == ("megatron", 2, 2)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["trainer.global_batch_size=24", "trainer.micro_batch_size=8"], 2, "trainer.global_batch_size = 24"),
        (["data.seq_len=512"], 1, "data.seq_len = 512: must be <= model.max_seq_len (256)"),
        (["model.vocab_size=1000"], 1, "model.vocab_size = 1000: must be >= data.vocab_size (4096)"),
        (["parallel.tp=3"], 2, "parallel.tp = 3"),
        ([*MEGATRON, "megatron.pp=4"], 2, "tp * megatron.pp * megatron.cp = 4 must divide the world size (2)"),
    ],
)
def test_cross_section_problems_are_one_line_config_errors(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        resolve(overrides, world)
    assert message in one_line(err)


def test_a_key_the_backend_does_not_honour_is_refused_naming_key_and_backend():
    with pytest.raises(ConfigError) as err:
        resolve([*MEGATRON, "checkpoint.async_save=true"])
    assert one_line(err).startswith("config error: checkpoint.async_save = True: not honoured by the megatron backend")
    with pytest.raises(ConfigError) as err:
        resolve(["megatron.pp=2"])
    assert "megatron.pp = 2: not honoured by the native backend" in one_line(err)


def test_a_key_left_at_its_default_is_never_refused():
    assert changed_keys(load_config(None, ["checkpoint.async_save=false"])) == {}
    resolve([*MEGATRON])  # the Megatron-only defaults, async_save = false, ... are all accepted


def test_every_config_key_is_honoured_somewhere():
    """A key no backend and not the Trainer implements would be refused everywhere: a config
    field without code behind it."""
    honoured = TRAINER_KEYS | NATIVE_KEYS | SPEED_KEYS | MEGATRON_KEYS
    from modmoe.train.resolve import _leaves

    for key in _leaves(load_config(None).model_dump(mode="json")):
        assert key in honoured, key
