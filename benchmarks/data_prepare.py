"""Data preparation and loading throughput: modmoe vs Megatron-LM's own tools/preprocess_data.py.

On one JSONL corpus (real text: the standard library's modules, cycled to the requested size)
and one tokenizer (a local 128,256-token Llama-3-style tokenizer directory, uint32/int32 ids):

1. ``modmoe data prepare`` with 1 and 2 workers, and Megatron-LM's ``tools/preprocess_data.py``
   (``--tokenizer-type HuggingFaceTokenizer --append-eod``) with the same workers: wall-clock
   MB/s and the peak RSS of the whole process tree (sampled every 0.1 s);
2. modmoe's peak RSS at a second, smaller corpus size (is it independent of the size?);
3. the loader: training-batch tokens/s the sampler delivers from the uint32 shards, against the
   tokens/s a CPU training step of configs/tiny.yaml consumes;
4. the sampler's RSS over a synthetic 10^10-token index (sparse shard files) against a 10^6 one.

Megatron-LM is not part of modmoe: pass a checkout (``--megatron-lm``, e.g. a ``core_v0.16.1``
snapshot holding tools/ and megatron/{training,legacy,rl,post_training}) and, where its imports
need them, extra import paths (``--megatron-pythonpath``, e.g. a directory with triton).

    python benchmarks/data_prepare.py --megatron-lm /work/peers/Megatron-LM \
        --megatron-pythonpath /work/peers/pydeps --mb 200 --small-mb 50

Prints a table; the last line is ``prepare_mb_s=… megatron_mb_s=… ratio=… peak_rss_mb=… loader_headroom=…``
(2 workers each; ``ratio`` = modmoe / Megatron).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "support")]

from data_helpers import llama_like_tokenizer, sample_texts  # noqa: E402

from modmoe.data.inputs import stdlib_root  # noqa: E402


def build_corpus(path: Path, megabytes: int) -> int:
    """A JSONL of the standard library's modules (one document each), cycled to the size."""
    files = sorted(p for p in stdlib_root().rglob("*.py") if "site-packages" not in p.parts)
    target, written = megabytes * 1_000_000, 0
    with path.open("w", encoding="utf-8") as out:
        while written < target:
            for f in files:
                try:
                    text = f.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break
    return written


def measure(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB of the process and its children, output tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(proc.pid), 0
    out_lines: list[str] = []
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out_lines = (proc.stdout.read() if proc.stdout else "").splitlines()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n" + "\n".join(out_lines[-30:]))
    return wall, peak / 2**20, "\n".join(out_lines[-3:])


def modmoe_prepare(work: Path, corpus: Path, tokenizer: Path, workers: int, name: str) -> tuple[float, float, Path]:
    out = work / f"modmoe-{name}"
    config = work / f"{name}.yaml"
    data = {"sources": [{"path": str(corpus), "name": "corpus"}], "tokenizer": str(tokenizer), "prepared_dir": str(out)}
    config.write_text(json.dumps({"data": data}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "modmoe", "data", "prepare", str(config), "--workers", str(workers), "--no-bar"]
    wall, rss, _ = measure(cmd, env, REPO)
    return wall, rss, out


def megatron_prepare(
    work: Path, corpus: Path, tokenizer: Path, workers: int, mlm: Path, extra: str
) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(mlm), extra) if p), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(mlm / "tools" / "preprocess_data.py"),
        "--input", str(corpus),
        "--output-prefix", str(work / f"megatron-w{workers}"),
        "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(tokenizer),
        "--workers", str(workers),
        "--append-eod",
        "--legacy-tokenizer",
    ]  # fmt: skip
    wall, rss, _ = measure(cmd, env, mlm)
    return wall, rss


def loader_and_training_rates(prepared: Path) -> tuple[float, float]:
    """(tokens/s the sampler delivers from the preparation, tokens/s a tiny.yaml CPU step uses)."""
    import torch

    from modmoe.config import load_config
    from modmoe.data.prepare import PreparedData
    from modmoe.data.sampler import BlendSampler, BlendSource
    from modmoe.model import MoDETransformer

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    seq, batch = cfg.data.seq_len, cfg.trainer.micro_batch_size
    data = PreparedData.load(prepared)
    sampler = BlendSampler([BlendSource("corpus", 1.0, data.open("train"))], seq, batch, seed=0)
    for _ in range(20):
        sampler.next_batch()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3.0:
        x, _ = sampler.next_batch()
        n += x.numel()
    loader = n / (time.perf_counter() - t0)

    # The step's cost does not depend on which ids it sees: tiny.yaml's own model and vocabulary.
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = MoDETransformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1))
    x, y = x[:, :-1], x[:, 1:]
    times = []
    for _ in range(6):
        t = time.perf_counter()
        out = model(x, y)
        (out.loss + out.aux_total).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    step = sorted(times[1:])[len(times[1:]) // 2]
    return loader, x.numel() / step


_RSS_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from pathlib import Path
    from modmoe.data.sampler import BlendSampler, BlendSource
    from modmoe.data.shards import TokenShards
    directory, tokens = Path(sys.argv[1]), int(sys.argv[2])
    per = 1 << 30  # tokens per sparse shard file
    shards = []
    for k, start in enumerate(range(0, tokens, per)):
        count = min(per, tokens - start)
        path = directory / f"s{k:03d}.bin"
        with path.open("wb") as fh:
            fh.truncate(count * 4)  # sparse: no disk, reads as zeros
        shards.append({"file": path.name, "tokens": count, "bytes": count * 4, "sha256": ""})
    def status_mb(key):  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's before exec)
        line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
        return int(line.split()[1]) / 1024
    before = status_mb("VmHWM")
    stream = TokenShards(directory, {"shards": shards}, "uint32", "synthetic")
    sampler = BlendSampler([BlendSource("s", 1.0, stream)], 256, 16, seed=0)
    for _ in range(200):
        sampler.next_batch()
    sampler.load_state_dict(sampler.state_dict())
    after = status_mb("VmHWM")
    print(json.dumps({"samples": sampler.per_epoch[0], "rss_mb": after, "added_mb": after - before,
                      "anon_mb": status_mb("RssAnon"), "file_mb": status_mb("RssFile")}))
""")


def sampler_rss(work: Path, tokens: int) -> dict:
    directory = work / f"synthetic-{tokens}"
    directory.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(directory), str(tokens)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--megatron-lm", type=Path, required=True, help="Megatron-LM checkout with tools/preprocess_data.py"
    )
    parser.add_argument("--megatron-pythonpath", default="", help="extra import path for Megatron-LM's imports")
    parser.add_argument("--mb", type=int, default=200, help="corpus size in MB (>= 200 for the recorded numbers)")
    parser.add_argument("--small-mb", type=int, default=50, help="second corpus size for the RSS comparison")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    script = args.megatron_lm / "tools" / "preprocess_data.py"
    if not script.is_file():
        raise SystemExit(
            f"--megatron-lm {args.megatron_lm}: no tools/preprocess_data.py there (fetch Megatron-LM first)"
        )
    work = args.work or Path(tempfile.mkdtemp(prefix="modmoe-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = llama_like_tokenizer(work / "tokenizer", sample_texts(80, 20_000))
    corpus, small = work / "corpus.jsonl", work / "small.jsonl"
    size = build_corpus(corpus, args.mb)
    small_size = build_corpus(small, args.small_mb)
    print(
        f"corpus: {size / 1e6:.1f} MB JSONL ({small_size / 1e6:.1f} MB for the second size); tokenizer 128,256 tokens"
    )

    rows = []
    results: dict[tuple[str, int], tuple[float, float]] = {}
    prepared = None
    for workers in (1, 2):
        wall, rss, out = modmoe_prepare(work, corpus, tokenizer, workers, f"w{workers}")
        results[("modmoe", workers)] = (size / 1e6 / wall, rss)
        prepared = out
        rows.append(("modmoe", workers, f"{size / 1e6:.0f}", wall, size / 1e6 / wall, rss))
        wall, rss = megatron_prepare(work, corpus, tokenizer, workers, args.megatron_lm, args.megatron_pythonpath)
        results[("megatron", workers)] = (size / 1e6 / wall, rss)
        rows.append(("Megatron-LM preprocess_data.py", workers, f"{size / 1e6:.0f}", wall, size / 1e6 / wall, rss))
    for workers in (1, 2):
        wall, rss, _ = modmoe_prepare(work, small, tokenizer, workers, f"small-w{workers}")
        rows.append(("modmoe", workers, f"{small_size / 1e6:.0f}", wall, small_size / 1e6 / wall, rss))

    print(
        "\n| tool | workers | corpus MB | wall s | MB/s | peak RSS MB (process tree) |\n|---|---:|---:|---:|---:|---:|"
    )
    for tool, workers, mb, wall, rate, rss in rows:
        print(f"| {tool} | {workers} | {mb} | {wall:.1f} | {rate:.2f} | {rss:.0f} |")

    assert prepared is not None
    loader, training = loader_and_training_rates(prepared)
    headroom = loader / training
    print(f"\nloader: {loader:,.0f} tokens/s from uint32 shards; CPU training step (configs/tiny.yaml): "
          f"{training:,.0f} tokens/s; headroom {headroom:,.0f}x")  # fmt: skip
    small_rss, huge_rss = sampler_rss(work, 10**6), sampler_rss(work, 10**10)
    for label, r in (("10^6", small_rss), ("10^10", huge_rss)):
        print(
            f"sampler at {label} tokens ({r['samples']:,} samples), 200 batches of 16 x 257: peak RSS "
            f"{r['rss_mb']:.0f} MB (+{r['added_mb']:.1f} MB by opening and sampling), anonymous "
            f"{r['anon_mb']:.0f} MB, file-backed {r['file_mb']:.0f} MB"
        )
    ours, theirs = results[("modmoe", 2)], results[("megatron", 2)]
    print(
        f"prepare_mb_s={ours[0]:.2f} megatron_mb_s={theirs[0]:.2f} ratio={ours[0] / theirs[0]:.2f} "
        f"peak_rss_mb={ours[1]:.0f} loader_headroom={headroom:.0f}"
    )


if __name__ == "__main__":
    main()
