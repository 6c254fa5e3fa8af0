"""Fuzz-style: generated hostile inputs through the command line, in-process.

A few hundred configs (random types and values, unknown keys, YAML anchors, aliases, tags,
deep nesting, duplicate and non-string keys, huge and non-finite numbers, torn or binary
text) go through ``modmoe train --dry-run`` (every check before any work); damaged
checkpoints through ``checkpoints_tools validate|inspect|consolidate`` and ``modmoe export``;
damaged corpora and tokenizers through ``modmoe train``. Issue 24 added: deep nesting,
numeric extremes and broken Unicode in every JSON file modmoe reads (checkpoint manifest, RNG
state and sampler position, prepared index and marker, export config, index and record,
tokenizer files), path fields that lead out of their directory, Unicode edge cases in JSONL,
gzip and zstd bombs, and symlink loops in a corpus (read-only and full output locations:
tests/integration/test_issue24_findings.py). Each must end in success or in one line, within
a time bound (and, for issue 24's classes, a bound on peak memory growth): never a traceback,
never a hang, never a payload run.

Seeded (``MODMOE_FUZZ_SEED``, default 14): a failure names its case and reproduces.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import resource
import shutil
import time
from pathlib import Path

import pytest
from hostile import Payload, plant_bytes_item, reseal
from runs import REPO, small_overrides
from typer.testing import CliRunner

from checkpoints_tools.cli import app as tools_app
from modmoe import cli
from modmoe.config import JobConfig
from modmoe.train.resolve import _leaves

SEED = int(os.environ.get("MODMOE_FUZZ_SEED", "14"))
CONFIG_CASES = 300
CHECKPOINT_CASES = 24
CASE_SECONDS = 10.0


class Raw(str):
    """YAML text emitted as it is (an anchor, an alias, a tag, a bomb)."""


def emit(value) -> str:
    """Flow-style YAML of plain data, with :class:`Raw` pieces verbatim."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{emit(k) if not isinstance(k, str) else json.dumps(k)}: {emit(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(emit(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _nested(dotted: dict[str, object]) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _scalar(text: str):
    import yaml

    return yaml.safe_load(text)


def random_value(rng: random.Random, marker: Path):
    kind = rng.randrange(16)
    if kind == 0:
        return rng.choice([0, 1, -1, 3, 7, 64, 2**31, 2**63, -(2**63) - 1, 10**30])
    if kind == 1:
        return Raw(rng.choice([".inf", "-.inf", ".nan", "1.0e+999", "-1.0e+400", "1e400", "0.0", "-0.5", "1e-300"]))
    if kind == 2:
        return "".join(rng.choice("abc/._-~ *?$\\'\"\t") for _ in range(rng.randrange(0, 12)))
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return [rng.randrange(5) for _ in range(rng.randrange(4))]
    if kind == 5:
        return {"x": rng.randrange(3), "deep": {"er": [1, {"est": None}]}}
    if kind == 6:
        depth = rng.randrange(5, 200)
        return Raw("[" * depth + "1" + "]" * depth)
    if kind == 7:
        levels = rng.randrange(3, 9)
        parts = ["&l0 [x, x, x, x, x, x, x, x, x, x]"] + [
            f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)
        ]
        return Raw("[" + ", ".join(parts) + "]")
    if kind == 8:
        return Raw("&self [*self]") if rng.random() < 0.5 else Raw("*undefined_anchor")
    if kind == 9:
        return Raw(
            rng.choice(
                [
                    f"!!python/object/apply:os.system ['touch {marker}']",
                    f"!!python/object/new:os.system ['touch {marker}']",
                    "!!binary aGVsbG8=",
                    "!!set {a, b}",
                    "!!timestamp 2001-12-14",
                    "!!timestamp 2001-02-30",
                    "!custom thing",
                    "!!str 12",
                    "!!float nan",
                ]
            )
        )
    if kind == 10:
        return Raw(rng.choice(["{1: 2}", "{on: 1}", "{null: 1}", "{[1, 2]: 3}", "{a: 1, a: 2}", "{? {x: 1} : 2}"]))
    if kind == 11:
        return Raw("9" * rng.choice([19, 20, 400, 4301, 6000]))
    if kind == 12:
        return rng.uniform(-1e6, 1e6)
    if kind == 13:
        return rng.randrange(-5, 100000)
    if kind == 14:
        return Raw(rng.choice(["~", "''", "'", '"unterminated', "[1, 2", "{a: ", "- - -", "%TAG ! x", "&a", "@x"]))
    return rng.choice(["native", "megatron", "fsdp2", "deepspeed", "ddp", "cpu", "cuda", "bf16", "files", "stdlib"])


def random_config(rng: random.Random, base: dict[str, object], leaves: list[str], marker: Path) -> bytes:
    values = dict(base)
    if rng.random() < 0.1:  # a config that should pass, so the accepting path is fuzzed too
        values["trainer.max_steps"] = rng.randrange(1, 5)
        values["optimizer.lr"] = rng.choice([1e-4, 0.01, 0.3])
        return "".join(f"{emit(k)}: {emit(v)}\n" for k, v in _nested(values).items()).encode()
    for _ in range(rng.randrange(1, 4)):
        action = rng.random()
        if action < 0.6:
            values[rng.choice(leaves)] = random_value(rng, marker)
        elif action < 0.75:
            values[rng.choice(leaves).rsplit(".", 1)[0] + "." + rng.choice(["typo", "lr_", "Model", "__class__"])] = 1
        elif action < 0.85:
            values[rng.choice(["model", "data", "trainer", "optimizer", "parallel"])] = random_value(rng, marker)
        else:
            anchor_key, alias_key = rng.sample(leaves, 2)
            values[anchor_key] = Raw(f"&shared {emit(rng.randrange(1, 9))}")
            values[alias_key] = Raw("*shared")
    sections: dict = {}
    for key, value in values.items():  # a section replaced by a scalar wins over its fields
        head, _, rest = key.partition(".")
        if not rest:
            sections[head] = value
        elif isinstance(sections.setdefault(head, {}), dict):
            sections[head].update(_nested({rest: value}))
    text = "".join(f"{emit(k)}: {emit(v)}\n" for k, v in sections.items()).encode()
    corruption = rng.random()
    if corruption < 0.05:
        text = text[: rng.randrange(len(text))]
    elif corruption < 0.08:
        cut = rng.randrange(len(text))
        text = text[:cut] + bytes(rng.randrange(256) for _ in range(8)) + text[cut:]
    elif corruption < 0.10:
        text = b"- " + text  # a list, not a mapping
    return text


def _ends_well(result, what: str, seconds: float, limit: float = CASE_SECONDS) -> None:
    """Exit 0, or one ``modmoe:``/``error:`` line; no exception but SystemExit; in time."""
    assert seconds < limit, f"{what}: took {seconds:.1f}s"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{what}: {type(result.exception).__name__}: {result.exception}") from result.exception
    assert "Traceback" not in result.output, f"{what}: {result.output[-2000:]}"
    if result.exit_code != 0:
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith(("modmoe: ", "error: "))]
        assert len(lines) == 1 or result.stdout.startswith("INVALID"), f"{what}: {result.output[-2000:]}"


def _invoke(app, args: list[str], what: str):
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, [str(a) for a in args])
    _ends_well(result, what, time.perf_counter() - t0)
    return result


def test_generated_configs_end_in_one_line_or_success(small_data_dir, tmp_path):
    rng = random.Random(SEED)
    marker = tmp_path / "PAYLOAD_RAN"
    base = {
        k: _scalar(v)
        for k, v in (
            o.split("=", 1) for o in small_overrides(small_data_dir, tmp_path / "run", **{"trainer.max_steps": 1})
        )
    }
    leaves = sorted(_leaves(JobConfig().model_dump(mode="json")))
    outcomes = {"ok": 0, "refused": 0}
    t0 = time.perf_counter()
    for case in range(CONFIG_CASES):
        path = tmp_path / f"case_{case:03d}.yaml"
        path.write_bytes(random_config(rng, base, leaves, marker))
        result = _invoke(
            cli.app, ["train", path, "--dry-run"], f"seed {SEED} case {case} ({path.read_bytes()[:300]!r})"
        )
        outcomes["ok" if result.exit_code == 0 else "refused"] += 1
    assert not marker.exists(), "a YAML tag ran code"
    assert outcomes["ok"] >= 10 and outcomes["refused"] >= 100, outcomes  # both paths were exercised
    assert time.perf_counter() - t0 < 120


@pytest.fixture(scope="module")
def good_checkpoint(small_data_dir, tmp_path_factory) -> Path:
    from modmoe.config import load_config
    from modmoe.train.loop import Trainer

    run_dir = tmp_path_factory.mktemp("fuzz-ckpt")
    overrides = {"trainer.max_steps": 1, "checkpoint.interval_steps": 1, "logging.mlflow.enabled": False}
    Trainer(load_config(None, small_overrides(small_data_dir, run_dir, **overrides)), log=lambda _: None).train()
    return run_dir / "checkpoints" / "step_00000001"


def _damage(rng: random.Random, step: Path, marker: Path) -> str:
    files = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file() and p.name != "manifest.json")
    kind = rng.randrange(9)
    target = step / rng.choice(files)
    if kind == 0:  # flipped bytes, resealed: integrity holds, content is garbage
        data = bytearray(target.read_bytes())
        for _ in range(rng.randrange(1, 20)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        reseal(step, target.relative_to(step).as_posix())
    elif kind == 1:  # truncated, resealed
        target.write_bytes(target.read_bytes()[: rng.randrange(target.stat().st_size)])
        reseal(step, target.relative_to(step).as_posix())
    elif kind == 2:  # random bytes as the index
        (step / ".metadata").write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4000))))
        reseal(step, ".metadata")
    elif kind == 3:  # an index of the right classes with wrong contents
        from torch.distributed.checkpoint.metadata import Metadata

        junk = rng.choice([{}, {"x": 1}, {1: None}, [1, 2], None, "s"])
        (step / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata=junk, storage_data=junk)))
        reseal(step, ".metadata")
    elif kind == 4:
        (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
        reseal(step, ".metadata")
    elif kind == 5:
        plant_bytes_item(step, marker)
    elif kind == 6:  # the manifest itself
        manifest = json.loads((step / "manifest.json").read_text())
        field = rng.choice(["step", "world_size", "layout", "files", "meta", "model_prefix", "format_version"])
        manifest[field] = rng.choice(
            [None, -1, 2**70, "x", [], {}, [{"path": "../../etc/passwd", "size": 1, "sha256": "0" * 64}]]
        )
        (step / "manifest.json").write_text(json.dumps(manifest))
    elif kind == 7:  # deeply nested meta
        manifest = json.loads((step / "manifest.json").read_text())
        (step / "manifest.json").write_text(
            json.dumps(manifest)[:-1] + ', "deep": ' + "[" * 100000 + "]" * 100000 + "}"
        )
    else:
        target.unlink()
    return f"damage {kind} of {target.name}"


def test_damaged_checkpoints_end_in_one_line_or_success(good_checkpoint, tmp_path):
    rng = random.Random(SEED + 1)
    marker = tmp_path / "PAYLOAD_RAN"
    cli.mount_commands("export")
    for case in range(CHECKPOINT_CASES):
        step = tmp_path / f"c{case}" / "checkpoints" / "step_00000001"
        shutil.copytree(good_checkpoint, step)
        what = f"seed {SEED + 1} case {case}: {_damage(rng, step, marker)}"
        _invoke(tools_app, ["validate", step], what)
        _invoke(tools_app, ["inspect", step], what)
        _invoke(tools_app, ["consolidate", step, "--out", tmp_path / f"c{case}" / "w.safetensors"], what)
        _invoke(cli.app, ["export", step, "--out", tmp_path / f"c{case}" / "hf"], what)
        shutil.rmtree(tmp_path / f"c{case}")
    assert not marker.exists(), "a checkpoint ran code"


def _corpus(tmp_path: Path, name: str, rng: random.Random) -> Path:
    root = tmp_path / name
    root.mkdir()
    if name == "binary":
        (root / "a.txt").write_bytes(bytes(rng.randrange(256) for _ in range(60_000)))
    elif name == "bad_utf8":
        (root / "a.txt").write_bytes(("text " * 4000).encode() + b"\xff\xfe\xc3\x28" * 3000)
    elif name == "one_long_line":
        (root / "a.txt").write_text("".join(rng.choice("abcdefgh ") for _ in range(300_000)))
    elif name == "nul_bytes":
        (root / "a.txt").write_bytes(b"\x00" * 50_000 + b"tail\n")
    elif name == "empty":
        (root / "a.txt").write_text("")
    return root


@pytest.mark.parametrize("name", ["binary", "bad_utf8", "one_long_line", "nul_bytes", "empty"])
def test_damaged_corpora_end_in_one_line_or_success(tmp_path, name):
    rng = random.Random(SEED + 2)
    root = _corpus(tmp_path, name, rng)
    overrides = small_overrides(
        str(tmp_path / "prepared"),
        tmp_path / "run",
        **{
            "data.corpus": "files",
            "data.corpus_glob": str(root / "*.txt"),
            "data.vocab_size": 300,
            "model.vocab_size": 512,
            "data.max_corpus_bytes": 400_000,
            "trainer.max_steps": 1,
            "logging.mlflow.enabled": False,
        },
    )
    args = ["train", str(REPO / "configs" / "tiny.yaml"), *sum((["--set", o] for o in overrides), [])]
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli.app, args)
    _ends_well(result, f"corpus {name}", time.perf_counter() - t0, limit=120)


@pytest.mark.parametrize("content", [b"", b"{", b'{"model": 1}', b"\x00" * 100, b"[" * 50_000 + b"]" * 50_000])
def test_damaged_tokenizers_end_in_one_line(small_data_dir, tmp_path, content):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_bytes(content)
    overrides = small_overrides(
        str(tmp_path / "prepared"),
        tmp_path / "run",
        **{"data.tokenizer": str(tokenizer), "trainer.max_steps": 1, "logging.mlflow.enabled": False},
    )
    args = ["train", str(REPO / "configs" / "tiny.yaml"), *sum((["--set", o] for o in overrides), [])]
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli.app, args)
    _ends_well(result, f"tokenizer {content[:20]!r}", time.perf_counter() - t0)
    assert result.exit_code == 2


# ---------------------------------------------------------------------------- issue 24's classes
MEMORY_BOUND = 1 << 30  # bytes the peak RSS may grow by during one case


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bounded(app, args: list, what: str, seconds: float = CASE_SECONDS):
    """One CLI call: one line or success, within ``seconds`` and :data:`MEMORY_BOUND`."""
    before = _max_rss()
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, [str(a) for a in args])
    _ends_well(result, what, time.perf_counter() - t0, limit=seconds)
    assert _max_rss() - before < MEMORY_BOUND, f"{what}: peak RSS grew by {(_max_rss() - before) >> 20} MiB"
    return result


HOSTILE_JSON = {
    "deep": "[" * 100_000 + "]" * 100_000,
    "deep object": '{"a": ' * 5_000 + "1" + "}" * 5_000,
    "float overflow": "1e999",
    "long integer": "9" * 100_000,
    "NaN": "NaN",
    "-Infinity": "-Infinity",
    "lone surrogate": '"\\ud800"',
    "low surrogate": '"\\udfff tail"',
    "truncated": '{"a": [1, 2',
    "not UTF-8": "\udcff",  # written as the byte 0xff
    "empty": "",
}


def _write_json(path: Path, value_text: str, key: list | None = None) -> None:
    """Replaces ``path`` by ``value_text`` (``key`` None) or puts the raw text at ``key`` inside
    the file's own JSON (the rest of the structure stays valid, so deeper checks are reached)."""
    if key is None:
        text = value_text
    else:
        data = json.loads(path.read_text())
        node = data
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = "@@HOSTILE@@"
        text = json.dumps(data).replace('"@@HOSTILE@@"', value_text or "null")
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


@pytest.fixture(scope="module")
def good_export(good_checkpoint, tmp_path_factory) -> Path:
    cli.mount_commands("export")
    out = tmp_path_factory.mktemp("fuzz-export") / "hf"
    assert CliRunner().invoke(cli.app, ["export", str(good_checkpoint), "--out", str(out)]).exit_code == 0
    return out


def test_hostile_json_in_every_checkpoint_file(good_checkpoint, tmp_path):
    """Deep nesting, numeric extremes and broken Unicode in the manifest (whole, in meta, in the
    sampler position) and in an RNG state (resealed): validate, inspect, consolidate, export."""
    cli.mount_commands("export")
    targets = [
        ("manifest.json", None),
        ("manifest.json", ["meta", "extra"]),
        ("manifest.json", ["meta", "sampler", "position"]),
        ("manifest.json", ["step"]),
        ("rng/rank_00000.json", None),
        ("rng/rank_00000.json", ["numpy", "pos"]),
    ]
    for case, ((rel, key), (name, text)) in enumerate((t, h) for t in targets for h in HOSTILE_JSON.items()):
        step = tmp_path / f"c{case}" / "checkpoints" / "step_00000001"
        shutil.copytree(good_checkpoint, step)
        _write_json(step / rel, text, key)
        if rel != "manifest.json":
            reseal(step, rel)
        what = f"{rel} {key} = {name}"
        report = _bounded(tools_app, ["validate", step], what)
        assert report.exit_code == 1 or (key is not None and not text), f"{what}: {report.stdout[:200]}"
        _bounded(tools_app, ["inspect", step], what)
        _bounded(tools_app, ["consolidate", step, "--out", step.parent.parent / "w.safetensors"], what)
        _bounded(cli.app, ["export", step, "--out", step.parent.parent / "hf"], what)
        shutil.rmtree(tmp_path / f"c{case}")


def test_hostile_json_and_paths_in_every_export_file(good_export, tmp_path):
    cli.mount_commands("generate")
    targets = [("config.json", None), ("config.json", ["modmoe", "model", "dim"]), ("modmoe_export.json", None)]
    cases = [(rel, key, name, text) for rel, key in targets for name, text in HOSTILE_JSON.items()]
    for path_value in ["/etc/passwd", "../../outside.safetensors", "sub/../../x", "", "a\\b", "model.safetensors/.."]:
        cases.append(("modmoe_export.json", ["files", "@name"], f"record path {path_value!r}", path_value))
        cases.append(("model.safetensors.index.json", None, f"index path {path_value!r}", path_value))
    for case, (rel, key, name, text) in enumerate(cases):
        out = tmp_path / f"e{case}"
        shutil.copytree(good_export, out)
        if rel == "model.safetensors.index.json":  # an index whose one file lies elsewhere
            (out / rel).write_text(json.dumps({"weight_map": {"tok_embeddings.weight": text}}))
        elif key == ["files", "@name"]:
            record = json.loads((out / rel).read_text())
            record["files"] = {text: {"size": 1}}
            (out / rel).write_text(json.dumps(record))
        else:
            _write_json(out / rel, text, key)
        result = _bounded(cli.app, ["generate", out, "--prompt", "x", "--max-new-tokens", "1"], f"{rel} {name}")
        assert result.exit_code == 2, f"{rel} {name}: {result.output[-500:]}"
        shutil.rmtree(out)


def test_hostile_json_and_paths_in_prepared_directories_and_tokenizers(small_data_dir, tmp_path):
    """The prepared index (whole, its numbers, its shard paths), its marker, and a tokenizer's
    two files: ``data inspect``, and ``data prepare`` (which reuses, prepares again or refuses)."""
    cli.mount_commands("data")
    cases = [("index.json", None, n, t) for n, t in HOSTILE_JSON.items()]
    cases += [("index.json", ["vocab_size"], n, t) for n, t in HOSTILE_JSON.items() if n != "empty"]
    for bad in ["/etc/passwd", "../../../etc/passwd", "sub/../../x", "", "..", ".hidden", "a\\b", "x\u0000y"]:
        cases.append(
            (
                "index.json",
                ["sources", "stdlib", "splits", "val", "shards", 0, "file"],
                f"path {bad!r}",
                json.dumps(bad),
            )
        )
    cases += [("MODMOE_PREPARED.json", None, n, t) for n, t in list(HOSTILE_JSON.items())[:4]]
    for case, (rel, key, name, text) in enumerate(cases):
        copy = tmp_path / f"p{case}"
        shutil.copytree(small_data_dir, copy)
        _write_json(copy / rel, text, key)
        what = f"{rel} {key} = {name}"
        result = _bounded(cli.app, ["data", "inspect", copy], what)
        assert rel != "index.json" or result.exit_code == 2, f"{what}: {result.output[-300:]}"
        shutil.rmtree(copy)
    good = json.loads((Path(small_data_dir) / "tokenizer.json").read_text())
    targets = [("tokenizer.json", None), ("tokenizer.json", ["model", "dropout"]), ("tokenizer_config.json", None)]
    for case, (name, text) in enumerate(HOSTILE_JSON.items()):
        for target, (rel, key) in enumerate(targets):
            tok = tmp_path / f"t{case}-{target}"
            tok.mkdir()
            (tok / "tokenizer.json").write_text(json.dumps(good))
            if rel != "tokenizer.json":
                (tok / rel).write_text("{}")
            _write_json(tok / rel, text, key)
            config = tok / "c.yaml"
            config.write_text(
                f"data: {{tokenizer: {json.dumps(str(tok))}, prepared_dir: {json.dumps(str(tok / 'p'))}}}\n"
            )
            _bounded(
                cli.app, ["data", "prepare", config, "--set", "data.max_corpus_bytes=20000"], f"{rel} {key} {name}"
            )


UNICODE_LINES = {
    "high surrogate": b'{"text": "a \\ud83d b"}',
    "low surrogate": b'{"text": "\\ude00"}',
    "surrogate in a key": b'{"\\ud800": 1, "text": "x"}',
    "escaped NUL": b'{"text": "a\\u0000b"}',
    "BOM": b'\xef\xbb\xbf{"text": "bom"}',
    "invalid UTF-8": b'{"text": "\xff\xfe"}',
    "overlong UTF-8": b'{"text": "\xc0\xaf"}',
    "noncharacters": '{"text": "\ufffe\uffff\U0010ffff"}'.encode(),
    "combining marks": ('{"text": "' + "e" + "\u0301" * 20_000 + '"}').encode(),
    "right-to-left": '{"text": "\u202eabc\u202c \u05d0\u05d1"}'.encode(),
}


def _prepare_args(tmp_path: Path, source: Path | str, **extra) -> list:
    sources = json.dumps([{"path": str(source), "name": "src"}])
    config = tmp_path / "data.yaml"
    config.write_text("data: {vocab_size: 300, tokenizer_train_bytes: 10000, val_fraction: 0.2}\n")
    args = [
        "data",
        "prepare",
        config,
        "--set",
        f"data.sources={sources}",
        "--set",
        f"data.prepared_dir={tmp_path / 'p'}",
    ]
    return args + sum((["--set", f"{k}={v}"] for k, v in extra.items()), [])


@pytest.mark.parametrize("name", list(UNICODE_LINES))
def test_unicode_edge_cases_in_jsonl_end_in_one_line_or_success(tmp_path, name):
    cli.mount_commands("data")
    corpus = tmp_path / "c.jsonl"
    texts = [json.dumps({"text": f"document {i} " * 200}).encode() for i in range(20)]
    corpus.write_bytes(b"\n".join(texts[:10] + [UNICODE_LINES[name]] + texts[10:]) + b"\n")
    _bounded(cli.app, _prepare_args(tmp_path, corpus), name, seconds=60)


def _bomb(path: Path, kind: str) -> None:
    import gzip

    import zstandard

    chunks = {
        "one endless line": (b'{"text": "', [b"a" * (16 << 20)] * 32, b'"}\n'),
        "blank lines": (b"", [b"\n" * (16 << 20)] * 8, b'{"text": "end"}\n'),
        "tiny records": (b"", [b'{"text": "x"}\n' * (1 << 19)], b""),  # 7 MB: many documents, not many bytes
        "whitespace runs": (b"", [b" \t\r\n" * (4 << 20)] * 8, b""),
    }[kind]
    head, body, tail = chunks
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb", compresslevel=1) as f:
            for part in (head, *body, tail):
                f.write(part)
    else:
        compressor = zstandard.ZstdCompressor(level=3).compressobj()
        with path.open("wb") as f:
            for part in (head, *body, tail):
                f.write(compressor.compress(part))
            f.write(compressor.flush())


BOMBS = [(k, s) for k in ("one endless line", "blank lines", "whitespace runs") for s in (".jsonl.gz", ".jsonl.zst")]


@pytest.mark.parametrize(("kind", "suffix"), [*BOMBS, ("tiny records", ".jsonl.zst")])
def test_compression_bombs_end_in_one_line_in_bounded_time_and_memory(tmp_path, kind, suffix):
    pytest.importorskip("zstandard")
    cli.mount_commands("data")
    bomb = tmp_path / f"bomb{suffix}"
    _bomb(bomb, kind)
    result = _bounded(cli.app, _prepare_args(tmp_path, bomb, **{"data.max_document_bytes": 1 << 20}), kind, 60)
    assert result.exit_code == 2, result.output[-500:]


@pytest.mark.parametrize("layout", ["two self-links", "a loop of two", "a link up", "a path that is a loop"])
def test_symlink_loops_in_a_corpus_end_in_one_line_or_success(tmp_path, layout):
    cli.mount_commands("data")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(3):
        lines = [json.dumps({"text": f"document {i}.{j} " * 100}) for j in range(10)]
        (corpus / "sub" / f"d{i}.jsonl").write_text("\n".join(lines) + "\n")
    source: Path | str = str(corpus / "**" / "*.jsonl")
    if layout == "two self-links":
        os.symlink(".", corpus / "a")
        os.symlink(".", corpus / "sub" / "b")
    elif layout == "a loop of two":
        os.symlink(corpus / "y", corpus / "x")
        os.symlink(corpus / "x", corpus / "y")
    elif layout == "a link up":
        os.symlink(tmp_path, corpus / "sub" / "up")
    else:
        source = corpus / "loop.jsonl"
        os.symlink(source, source)
    result = _bounded(cli.app, _prepare_args(tmp_path, source), layout, seconds=60)
    if layout != "a path that is a loop":
        assert result.exit_code == 0 and "src: 30 documents" in result.output.replace(",", ""), result.output[-800:]
