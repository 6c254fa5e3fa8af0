"""The data pipeline as a user drives it: ``modmoe data prepare`` (workers, SIGKILL and re-run),
training on a 128k-token tokenizer's uint32 shards blended from two formats, training on a
Megatron pair in place, training that refuses to prepare, a Slurm preparation job, and
tokenizer training on hostile input in bounded time and memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from data_helpers import llama_like_tokenizer, sample_texts, write_jsonl, write_text_files
from runs import REPO, read_metrics, run_modmoe, small_overrides

from modmoe.data import DataConfig, prepare_data
from modmoe.data.blend import counts_at

ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def modmoe(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "modmoe", *args],
        cwd=REPO,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"modmoe {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def write_config(path: Path, data: dict) -> Path:
    path.write_text(json.dumps({"data": data}))  # JSON is YAML
    return path


def shard_hashes(directory: Path) -> dict:
    index = json.loads((directory / "index.json").read_text())
    return {
        name: {s: [x["sha256"] for x in e["shards"]] for s, e in src["splits"].items()}
        for name, src in index["sources"].items()
    }


def test_prepare_killed_midway_finishes_correctly_on_rerun(tmp_path):
    data = {
        "max_corpus_bytes": 2_500_000,
        "vocab_size": 512,
        "unit_bytes": 80_000,
        "prepared_dir": str(tmp_path / "prep"),
    }
    config = write_config(tmp_path / "job.yaml", data)
    reference = prepare_data(DataConfig(**{**data, "prepared_dir": str(tmp_path / "ref")}), log=lambda _: None)

    units = tmp_path / ".prep.partial" / "sources" / "stdlib" / "units"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modmoe", "data", "prepare", str(config), "--workers", "2"],
        cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(units.glob("*.json"))) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes, mid-preparation
    proc.wait()
    records = sorted(units.glob("*.json"))
    assert 4 <= len(records) < 32, "the kill did not land mid-preparation"
    assert not (tmp_path / "prep").exists()  # nothing visible was half-written
    # A finished unit damaged after the kill is found by its checksum and redone.
    kept = json.loads(records[0].read_text())
    victim = units / kept["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(victim.read_bytes())
    raw[5] ^= 0xFF
    victim.write_bytes(bytes(raw))

    out = modmoe("data", "prepare", str(config), "--workers", "1").stdout
    assert "resuming the interrupted preparation" in out
    kept_units = int(out.split(" kept from the interrupted run")[0].rsplit("(", 1)[1].split()[0])
    assert len(records) - 1 <= kept_units < len(records)  # all but the damaged one (and a torn one)
    assert shard_hashes(tmp_path / "prep") == shard_hashes(reference.dir)
    assert not (tmp_path / ".prep.partial").exists()
    assert "reusing" in modmoe("data", "prepare", str(config)).stdout


def test_128k_tokenizer_blend_of_two_formats_prepares_then_trains(tmp_path):
    texts = sample_texts(40, max_chars=20_000)
    tok = llama_like_tokenizer(tmp_path / "tok", texts)
    code = write_text_files(tmp_path / "code", texts[:20])
    web = write_jsonl(tmp_path / "web" / "part-0.jsonl.gz", texts[20:])
    data = {
        "sources": [{"path": code, "name": "code", "weight": 0.3}, {"path": str(web), "name": "web", "weight": 0.7}],
        "tokenizer": str(tok),
        "val_fraction": 0.2,
        "prepare": "never",  # training must not prepare: `modmoe data prepare` does
    }
    config = write_config(tmp_path / "job.yaml", data)
    run_dir = tmp_path / "run"
    overrides = small_overrides(str(tmp_path / "prep"), run_dir, **{
        "model.vocab_size": 128_256, "model.dim": 32, "data.seq_len": 32, "model.max_seq_len": 32,
        "trainer.max_steps": 3, "trainer.global_batch_size": 4, "trainer.micro_batch_size": 4,
        "logging.mlflow.enabled": False, "logging.plots_every_eval": False,
    })  # fmt: skip
    sets = [
        a for kv in overrides for a in ("--set", kv) if not kv.startswith(("data.max_corpus", "data.vocab", "data.val"))
    ]
    refused = modmoe("train", str(config), *sets, check=False)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "no finished preparation" in refused.stderr
    assert "modmoe data prepare" in refused.stderr

    modmoe("data", "prepare", str(config), *sets, "--workers", "2")
    index = json.loads((tmp_path / "prep" / "index.json").read_text())
    assert index["dtype"] == "uint32" and index["eos_token"] == "<|end_of_text|>" and index["eot_id"] == 128_001
    run_modmoe(["train", str(config), *sets])
    last = read_metrics(run_dir)[-1]
    assert last["step"] == 3 and np.isfinite(last["loss"])
    assert [last["data/tokens_code"], last["data/tokens_web"]] == [c * 32 for c in counts_at([0.3, 0.7], 12)]


def test_megatron_pair_trains_in_place_through_the_cli(tmp_path):
    pytest.importorskip("megatron.core")
    from data_helpers import write_megatron_pair

    from modmoe.data.tokenizer import train_tokenizer

    texts = sample_texts(30)
    tok = train_tokenizer(texts, 512)
    tok.save(str(tmp_path / "tokenizer.json"))
    docs = [np.array([*tok.encode(t).ids, tok.token_to_id("<|endoftext|>")]) for t in texts]
    prefix = write_megatron_pair(tmp_path / "corpus_text_document", docs, np.uint16)
    config = write_config(
        tmp_path / "job.yaml",
        {"sources": [{"path": prefix + ".bin", "name": "mega"}], "tokenizer": str(tmp_path / "tokenizer.json")},
    )
    run_dir = tmp_path / "run"
    sets = [
        a
        for kv in small_overrides(
            str(tmp_path / "unused"), run_dir, **{"trainer.max_steps": 4, "logging.mlflow.enabled": False}
        )
        for a in ("--set", kv)
    ]
    run_modmoe(["train", str(config), *sets])
    metrics = read_metrics(run_dir)
    assert metrics[-1]["data/tokens_mega"] == 4 * 8 * 64
    assert not (tmp_path / "unused").exists()  # trained in place: nothing prepared or copied


@pytest.mark.timeout(120)
def test_tokenizer_training_on_hostile_input_is_bounded(tmp_path):
    """A 200 MB line without whitespace, a million tiny documents, valid UTF-8 noise: each trains
    within the time and memory the sample budget sets; random bytes are refused in one line."""
    line = tmp_path / "line" / "one.txt"
    line.parent.mkdir()
    with line.open("wb") as fh:
        for _ in range(200):
            fh.write(b"a" * (1 << 20))
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(f'{{"text": "d{i}"}}\n' for i in range(1_000_000)))
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise" / "n.txt"
    noise.parent.mkdir()
    noise.write_text("".join(chr(c) for c in rng.integers(0x21, 0x2FFF, 3_000_000) if not 0xD800 <= c < 0xE000))
    binary = tmp_path / "binary"
    binary.mkdir()
    for i in range(20):
        (binary / f"b{i}.bin").write_bytes(rng.bytes(1 << 20))
    script = textwrap.dedent(f"""
        import json, sys, time
        from modmoe.data import DataConfig, DataError
        from modmoe.data.prepare import train_corpus_tokenizer
        out = {{}}
        for name, path in {json.dumps({"line": str(line.parent), "tiny": str(tiny), "noise": str(noise.parent), "binary": str(binary)})}.items():
            t0 = time.perf_counter()
            cfg = DataConfig(sources=[{{"path": path}}], vocab_size=2048, tokenizer_train_bytes=2_000_000)
            try:
                train_corpus_tokenizer(cfg, log=lambda _: None)
                result = "trained"
            except DataError as err:
                result = str(err)
            with open("/proc/self/status") as status:  # VmHWM: peak RSS of this process only
                peak = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:")) / 1024
            out[name] = [result, time.perf_counter() - t0, peak]
        print(json.dumps(out))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **ENV}, capture_output=True, text=True, timeout=110
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("line", "tiny", "noise"):
        result, seconds, peak_mb = results[name]
        assert result == "trained" and seconds < 30 and peak_mb < 1024, (name, results[name])
    refusal, seconds, _ = results["binary"]
    assert "corpus is empty" in refusal and "\n" not in refusal and seconds < 10


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_slurm_preparation_job(tmp_path, slurm_cluster):
    data = {
        "max_corpus_bytes": 300_000,
        "vocab_size": 512,
        "unit_bytes": 60_000,
        "val_fraction": 0.2,
        "prepared_dir": str(tmp_path / "prep"),
    }
    config = write_config(tmp_path / "job.yaml", data)
    out = slurm_cluster.run(
        "sbatch", "--parsable", "--cpus-per-task=2", f"--chdir={tmp_path}",
        f"--output={tmp_path}/prepare.log",
        f"--export=ALL,MODMOE_HOME={REPO},MODMOE_PYTHON={sys.executable},PYTHONPATH={REPO},OMP_NUM_THREADS=1",
        str(REPO / "launch" / "prepare.sbatch"), str(config),
    ).stdout.strip()  # fmt: skip
    job = out.split(";")[0]
    state = slurm_cluster.wait_job(job, timeout=240)
    log = (tmp_path / "prepare.log").read_text()
    assert state == "COMPLETED", log
    assert "with 2 worker(s)" in log and "data: ready in" in log
    assert shard_hashes(tmp_path / "prep") == shard_hashes(
        prepare_data(DataConfig(**{**data, "prepared_dir": str(tmp_path / "ref")}), log=lambda _: None).dir
    )
