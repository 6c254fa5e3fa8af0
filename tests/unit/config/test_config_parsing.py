"""Hostile configs fail fast in one line: YAML bombs, deep nesting, odd keys, huge or
non-finite numbers, bad checkpoint directory names."""

from __future__ import annotations

import time

import pytest

from modmoe.config import load_config
from modmoe.config_base import ConfigError
from modmoe.config_yaml import MAX_BYTES

LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
)
FILES = {
    "billion_laughs": (LAUGHS, "once aliases are expanded"),
    "recursive_alias": ("model: &a {x: *a}\n", "contains it"),
    "deep_flow": ("model: " + "[" * 20000 + "]" * 20000 + "\n", "nested deeper"),
    "deep_block": ("model:\n" + "".join(" " * i + "a:\n" for i in range(1, 100)), "nested deeper"),
    "huge": ("a: 1\n" + "#" * MAX_BYTES, "more than a config may have"),
    "duplicate_key": ("optimizer:\n  lr: 0.1\n  lr: 0.2\n", "duplicate key 'lr'"),
    "int_key": ("model:\n  1: 2\n", "key 1 is of type int"),
    "yes_key": ("model:\n  on: 2\n", "key True is of type bool"),
    "python_tag": ("model: !!python/object/apply:os.system [echo]\n", "not valid YAML"),
    "unknown_tag": ("model: !secret x\n", "not valid YAML"),
    "big_int_literal": ("trainer:\n  seed: " + "9" * 5000 + "\n", "cannot be read"),
    "bad_date": ("trainer:\n  run_dir: 2001-02-30\n", "cannot be read"),
    "not_a_mapping": ("- a\n- b\n", "must hold a mapping"),
    "inf_lr": ("optimizer:\n  lr: .inf\n", "optimizer.lr = inf: Input should be a finite number"),
    "nan_coef": ("model:\n  moe:\n    aux_loss_coef: .nan\n", "finite number"),
    "int64": ("trainer:\n  seed: 99999999999999999999\n", "must fit in 64 bits"),
    "ckpt_dirname_escape": ("checkpoint:\n  dirname: ../../etc\n", "checkpoint.dirname"),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_hostile_config_files_fail_fast_in_one_line(tmp_path, name):
    text, expected = FILES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.perf_counter() - t0 < 2.0
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_binary_and_non_utf8_files(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"\xff\xfe\x00model: 1")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lr=.inf", "finite number"),
        ("optimizer.lr=-.inf", "finite number"),
        ("model.dim=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]", "nested deeper"),
        ("a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.u.v.w.x.y.z.a.b.c.d.e.f.g=1", "dotted"),
        ("model..dim=1", "dotted"),
        ("model.dim={a: 1, a: 2}", "duplicate key"),
    ],
)
def test_hostile_overrides(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_legitimate_yaml_still_loads(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &opt {lr: 0.01, warmup_steps: 3}\n")  # an anchor is fine, an unknown key is not
    with pytest.raises(ConfigError, match="unknown key base"):
        load_config(path)
    path.write_text("optimizer: &opt {lr: 0.01}\ntrainer: {max_steps: 7}\n")
    cfg = load_config(path, ["optimizer.lr=0.02"])
    assert cfg.optimizer.lr == 0.02 and cfg.trainer.max_steps == 7
    path.write_text("optimizer:\n  <<: {lr: 0.01, warmup_steps: 3}\n  lr: 0.05\n")  # a merge, then an override
    cfg = load_config(path)
    assert cfg.optimizer.lr == 0.05 and cfg.optimizer.warmup_steps == 3
    for preset in ("configs/tiny.yaml", "configs/bench-cpu.yaml", "configs/gpu-1b.yaml"):
        load_config(preset)
