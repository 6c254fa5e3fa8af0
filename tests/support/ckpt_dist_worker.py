"""Run under ``torchrun --nproc-per-node 2`` (gloo) by tests/test_checkpoint_multirank.py.

Phases (all in one launch to pay torch's start-up once):
  ddp:    DDP, 2 steps, sync save            -> WORK/ddp,  reference weights WORK/ddp_ref.safetensors
  fsdp:   FSDP2, 2 steps, async save         -> WORK/fsdp, reference weights WORK/fsdp_ref.safetensors
  reshard: FSDP2 loads WORK/single (saved by 1 process) and checks it against WORK/single_ref.safetensors
Rank 0 writes WORK/result.json.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import ckpt_toy as toy
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from modmoe.checkpoint import CheckpointConfig, CheckpointManager

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def fsdp_model(seed: int):
    model, _, _ = toy.build(seed=seed)
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    return model, opt, sched


def main() -> None:
    work = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    result: dict[str, object] = {}

    # ---- DDP save ---------------------------------------------------------------------
    model, opt, sched = toy.build(seed=0)
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sampler = toy.ToySampler(seed=10 + rank)
    for _ in range(2):
        toy.train_step(ddp, opt, sched, sampler)
    mgr = CheckpointManager(work / "ddp", CheckpointConfig(), rank, world)
    mgr.save(2, toy.app_state(ddp, opt, sched), {"phase": "ddp"})
    if rank == 0:
        save_file(toy.plain_state(model), work / "ddp_ref.safetensors")

    # ---- FSDP2 async save -------------------------------------------------------------
    model, opt, sched = fsdp_model(seed=1)
    assert isinstance(model.experts, DTensor) and model.experts.to_local().shape[0] == toy.E // world
    sampler = toy.ToySampler(seed=20 + rank)
    for _ in range(2):
        toy.train_step(model, opt, sched, sampler)
    mgr = CheckpointManager(work / "fsdp", CheckpointConfig(async_save=True), rank, world)
    mgr.save(2, toy.app_state(model, opt, sched), {"phase": "fsdp"})
    # clone: the full state dict shares storage with unsharded tensors (the buffer); only
    # rank 0 receives it (cpu_offload)
    full = {k: v.clone() for k, v in get_model_state_dict(model, options=FULL).items()}
    osd = {
        k: v["exp_avg"].clone() for k, v in get_optimizer_state_dict(model, opt, options=FULL).get("state", {}).items()
    }
    toy.train_step(model, opt, sched, sampler)  # training goes on (with collectives) meanwhile
    mgr.wait()
    if rank == 0:
        save_file(full, work / "fsdp_ref.safetensors")
        save_file(osd, work / "fsdp_ref_exp_avg.safetensors")

    # ---- 1 rank saved -> 2 ranks FSDP2 load -------------------------------------------
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("modmoe.checkpoint").addHandler(handler)
    model, opt, sched = fsdp_model(seed=2)
    mgr = CheckpointManager(work / "single", CheckpointConfig(), rank, world)
    meta = mgr.load(mgr.find_latest_valid(), toy.app_state(model, opt, sched))
    got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # on every rank
    ref = load_file(work / "single_ref.safetensors")
    same = got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    flags = torch.tensor([int(same), int(any("no RNG state for rank" in m for m in records))])
    gathered = [torch.zeros_like(flags) for _ in range(world)]
    dist.all_gather(gathered, flags)
    if rank == 0:
        result["reshard_equal"] = [bool(g[0]) for g in gathered]
        result["rng_fallback_warned"] = [bool(g[1]) for g in gathered]
        result["reshard_meta"] = meta
        result["lr_after_load"] = opt.param_groups[0]["lr"]
        (work / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
