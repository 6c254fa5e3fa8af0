"""Run under ``torchrun --nproc-per-node 2`` (gloo) by tests/integration/test_hf_layouts.py.

For each layout (EP=2 over DDP, FSDP2, TP=2; DeepSpeed ZeRO-3 with EP=2 when installed), in one launch: the native backend imports the
pretrained checkpoint WORK/hf (MoD-ified at capacity 1.0) into the parallelized model, every rank
computes the logits of WORK/reference.pt's tokens, then takes one optimizer step with
``optimizer.routers_only_steps: 1``. Each rank writes WORK/<layout>-<rank>.json: the logits'
relative error against the single-process import, the bytes its import read, and whether its
trunk shards kept every bit while its routers moved.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from modmoe.config import JobConfig
from modmoe.config_base import validate_config
from modmoe.parallel.config import ParallelConfig
from modmoe.parallel.distributed import init_distributed
from modmoe.train.backends.native import NativeBackend
from modmoe.train.optim import is_router
from modmoe.train.resolve import resolve_job

LAYOUTS = {
    "ep2": {"ep": 2},
    "fsdp2": {"dp_backend": "fsdp2"},
    "tp2": {"tp": 2},
    # DeepSpeed takes the weights from the model it is given: the import fills it before
    # deepspeed.initialize partitions it (routers_only_steps is the native backend's only).
    "deepspeed_zero3_ep2": {"dp_backend": "deepspeed", "zero_stage": 3, "ep": 2},
}


def local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def run(work: Path, name: str, env) -> dict:
    parallel = LAYOUTS[name]
    dp = 1 if "tp" in parallel else 2
    deepspeed = parallel.get("dp_backend") == "deepspeed"
    cfg = validate_config(
        JobConfig,
        {
            "model": {"from_hf": str(work / "hf"), "depth": {"enabled": True, "capacity": 1.0}},
            "data": {"seq_len": 32, "vocab_size": 300},
            "optimizer": {"lr": 0.01, "warmup_steps": 0, "routers_only_steps": 0 if deepspeed else 1},
            "parallel": parallel,
            "trainer": {"run_dir": str(work / f"run-{name}"), "global_batch_size": 2 * dp, "micro_batch_size": 2},
        },
    )
    job = resolve_job(cfg, world_size=2, device="cpu")
    if deepspeed:
        from modmoe.train.backends.deepspeed import DeepSpeedBackend

        backend = DeepSpeedBackend(job, env, load_pretrained=True)
        reference = torch.load(work / "reference.pt")
        backend.module.eval()
        with torch.no_grad():
            logits = backend.module(reference["ids"]).logits
        expected = reference["logits"]
        err = float((logits - expected).abs().max() / expected.abs().max())
        return {"rel_err": err, "bytes_read": backend.pretrained_report.bytes_read}
    backend = NativeBackend(job, env, load_pretrained=True)
    # As imported (FSDP2 holds its parameters sharded now; a forward leaves the root's gathered).
    before = {k: local(p) for k, p in backend.core.named_parameters()}
    reference = torch.load(work / "reference.pt")
    ids, expected = reference["ids"], reference["logits"]
    backend.core.eval()
    with torch.no_grad():
        logits = backend.core(ids).logits
    err = float((logits - expected).abs().max() / expected.abs().max())
    backend.forward_backward([(ids[:, :-1], ids[:, 1:])], 0)
    backend.optimizer_step()
    if isinstance(backend.core, FSDPModule):
        backend.core.reshard()
    after = {k: local(p) for k, p in backend.core.named_parameters()}
    trunk = [k for k in before if not is_router(k) and before[k].numel()]
    routers = [k for k in before if is_router(k) and before[k].numel()]
    return {
        "rel_err": err,
        "bytes_read": backend.pretrained_report.bytes_read,
        "trunk_frozen": all(torch.equal(before[k], after[k]) for k in trunk),
        "routers_moved": bool(routers) and all(not torch.equal(before[k], after[k]) for k in routers),
    }


def main() -> None:
    work = Path(sys.argv[1])
    torch.set_num_threads(1)
    env = init_distributed(ParallelConfig(), "cpu")
    for name in LAYOUTS if importlib.util.find_spec("deepspeed") else [n for n in LAYOUTS if "deepspeed" not in n]:
        result = run(work, name, env)
        (work / f"{name}-{env.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
