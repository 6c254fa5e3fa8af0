"""The ``export``, ``generate`` and ``eval`` commands as a user runs them, and their one-line errors."""

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from modmoe.cli import app, mount_commands

mount_commands()  # the test drives typer directly, so it mounts what `modmoe` would
from runs import read_metrics, run_modmoe, small_overrides

from modmoe.config import load_config
from modmoe.inference.generate import Generator
from modmoe.inference.loading import load_exported
from modmoe.inference.sampling import SamplingConfig
from modmoe.train.loop import Trainer


@pytest.fixture(scope="module")
def run_dir(small_data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli-run")
    cfg = load_config(
        None, small_overrides(small_data_dir, run, **{"trainer.max_steps": 12, "logging.mlflow.enabled": False})
    )
    Trainer(cfg, log=lambda _: None).train()
    return run


@pytest.fixture(scope="module")
def export_dir(run_dir):
    out = run_dir.parent / f"{run_dir.name}-export"
    result = invoke("export", run_dir, "--out", out, "--max-shard-size", "400kB")
    assert result.exit_code == 0, result.output
    assert re.search(
        r"exported step 12 of .* to .*: \d+ tensors, [\d.]+ MiB float32 in \d+ shards \+ index", result.stdout
    )
    return out


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_generate_streams_the_runtime_text(export_dir):
    proc = run_modmoe(["generate", str(export_dir), "--prompt", "def main(", "--max-new-tokens", "20"])
    gen = Generator(load_exported(export_dir))
    expected = gen.complete(["def main("], SamplingConfig(max_new_tokens=20))[0]
    assert proc.stdout == expected.text + "\n"
    assert "decode:" in proc.stderr and "MFLOP/token executed" in proc.stderr
    assert re.search(r"decode entry per routed layer: layer 1 [\d.]+%, layer 3 [\d.]+%", proc.stderr)


def test_generate_batch_sampling_and_stop(export_dir):
    result = invoke(
        "generate",
        export_dir,
        "--prompt",
        "import ",
        "--prompt",
        "class A:\n",
        "--max-new-tokens",
        "10",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--no-stats",
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert {line[:3] for line in lines if line.startswith("[")} == {"[0]", "[1]"}
    again = invoke(
        "generate",
        export_dir,
        "--prompt",
        "import ",
        "--prompt",
        "class A:\n",
        "--max-new-tokens",
        "10",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--no-stats",
    )
    assert again.stdout == result.stdout  # same seed, same text
    topk = invoke(
        "generate", export_dir, "--prompt", "def ", "--max-new-tokens", "6", "--routing", "topk", "--no-stats"
    )
    assert topk.exit_code == 0, topk.output
    # What the runtime makes with top-k routing (the text itself may be spaces at 12 steps).
    expected = Generator(load_exported(export_dir), routing="topk").complete(["def "], SamplingConfig(max_new_tokens=6))
    assert topk.stdout == expected[0].text + "\n"
    assert expected[0].text


def test_eval_reproduces_the_trainers_evaluation(run_dir, export_dir):
    result = invoke("eval", export_dir)
    assert result.exit_code == 0, result.output
    last = read_metrics(run_dir)[-1]
    values = dict(kv.split("=") for kv in result.stdout.strip().splitlines()[-1].split())
    assert float(values["loss_topk"]) == pytest.approx(last["eval/loss_topk"], rel=1e-5)
    assert float(values["loss_causal"]) == pytest.approx(last["eval/loss_causal"], rel=1e-5)
    assert float(values["causal_agreement"]) == pytest.approx(last["eval/causal_agreement"], rel=1e-6)
    assert re.search(
        r"layer 1: causal agreement [\d.]+, causal entry [\d.]+, precision [\d.]+, recall [\d.]+", result.stdout
    )


def one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("modmoe: "), err
    assert re.search(pattern, err), err


def test_bad_input_gives_one_clear_line(run_dir, export_dir, small_data_dir, tmp_path):
    one_line_error(invoke("generate", tmp_path / "nope", "--prompt", "x"), "nope: not a directory")
    one_line_error(
        invoke("generate", export_dir, "--prompt", "x " * 80),
        r"prompt 0: \d+ tokens, longer than the context \(model.max_seq_len = 64\)",
    )
    one_line_error(
        invoke("generate", export_dir, "--prompt", "x", "--routing", "sideways"),
        "--routing 'sideways': allowed causal, topk",
    )
    one_line_error(invoke("generate", export_dir, "--prompt", "x", "--top-p", "1.5"), r"config error: top_p = 1.5")
    one_line_error(
        invoke("export", run_dir, "--out", tmp_path / "o", "--max-shard-size", "lots"), "--max-shard-size 'lots'"
    )

    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (broken / shard).unlink()
    one_line_error(
        invoke("generate", broken, "--prompt", "x"), rf"{shard}: missing \(listed in model.safetensors.index.json\)"
    )

    unsupported = tmp_path / "unsupported"
    shutil.copytree(export_dir, unsupported)
    cfg = json.loads((unsupported / "config.json").read_text())
    cfg["modmoe"]["model"]["depth"]["causal_router"] = "oracle"
    (unsupported / "config.json").write_text(json.dumps(cfg))
    one_line_error(
        invoke("eval", unsupported), r"config.json: config error: modmoe.model.depth.causal_router = 'oracle'"
    )

    other_tok = tmp_path / "other-data"
    shutil.copytree(small_data_dir, other_tok)
    with open(other_tok / "tokenizer.json", "a") as f:
        f.write("\n")
    one_line_error(invoke("eval", export_dir, "--data-dir", other_tok), "its tokenizer.json differs from")
    one_line_error(invoke("eval", export_dir, "--data-dir", tmp_path), "no prepared data there")
