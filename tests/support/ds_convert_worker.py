"""DeepSpeed side of tests/test_checkpoint_convert.py, run under torchrun (gloo, CPU).

``save CONFIG OUT STAGE...``: per ZeRO stage (``2a``: ZeRO-2 with ``parameter_alignment``, which
pads between parameters), a DeepSpeed engine on ``MoDETransformer`` (torch
AdamW in modmoe's two param groups, LambdaLR) trains 2 steps on random tokens and calls
``save_checkpoint(OUT/zero<stage>)``; the ground truth (DeepSpeed's own full fp32 parameters and
Adam moments, gathered from the live partitions, plus buffers) goes to ``truth.safetensors``.

``load CONFIG UNIVERSAL_DIR STAGE OUT``: a fresh engine of ``STAGE`` loads the universal
checkpoint (``load_universal``), takes the buffers from its model-states file, and dumps the
same quantities, the schedule position and the learning rates; it then takes one more step to
show the engine trains on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from safetensors.torch import save_file

from modmoe.config import load_config
from modmoe.model import MoDETransformer
from modmoe.train.backends.deepspeed import _ensure_adam_state, _fp32_partitions
from modmoe.train.optim import build_optimizer, build_scheduler

MICRO = 2


def engine(cfg, spec: str, load_universal: bool = False):
    stage = int(spec[0])
    torch.manual_seed(cfg.trainer.seed)
    model = MoDETransformer(cfg.model)
    if stage == 0:
        # Without ZeRO the optimizer state is numbered by position: names make it convertible.
        named = [(n, p) for n, p in model.named_parameters()]
        groups = [
            {"params": [(n, p) for n, p in named if p.dim() >= 2], "weight_decay": cfg.optimizer.weight_decay},
            {"params": [(n, p) for n, p in named if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=(cfg.optimizer.beta1, cfg.optimizer.beta2))
    else:
        optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.trainer.max_steps)
    ds_config = {
        "train_batch_size": MICRO * dist.get_world_size(),
        "train_micro_batch_size_per_gpu": MICRO,
        "zero_optimization": {"stage": stage, "parameter_alignment": spec.endswith("a")},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
    }
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    eng, _, _, sched = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    return eng, model, sched


def train_step(eng, vocab: int, seq: int, gen: torch.Generator) -> None:
    tokens = torch.randint(0, vocab, (MICRO, seq + 1), generator=gen)  # (B, T + 1)
    out = eng(tokens[:, :-1], tokens[:, 1:])
    eng.backward(out.loss + out.aux_total)
    eng.step()


def full_state(eng, model) -> dict[str, torch.Tensor]:
    """Collective: every rank gathers; DeepSpeed's own view of the full training state."""
    _ensure_adam_state(eng.optimizer)
    base = eng.optimizer.optimizer if hasattr(eng.optimizer, "optimizer") else eng.optimizer
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        fp32 = safe_get_full_fp32_param(p)
        if fp32 is None:  # no ZeRO: the parameter is its own master weight and keys its state
            out[f"fp32/{name}"] = p.detach().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{key}/{name}"] = base.state[p][key].detach().cpu().clone()
            continue
        out[f"fp32/{name}"] = fp32.detach().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    persistent = set(model.state_dict())  # rope tables are recomputed, not saved
    for name, buf in model.named_buffers():
        if name in persistent:
            out[f"buffer/{name}"] = buf.detach().cpu().clone()
    steps = [base.state[p]["step"] for p in _fp32_partitions(eng.optimizer)]
    out["adam_steps"] = torch.stack([torch.as_tensor(s, dtype=torch.float32).reshape(()) for s in steps])
    return out


def save(cfg, out: Path, stages: list[str]) -> None:
    rank = dist.get_rank()
    for stage in stages:
        eng, model, _ = engine(cfg, stage)
        gen = torch.Generator().manual_seed(100 + rank)
        for _ in range(2):
            train_step(eng, cfg.model.vocab_size, cfg.data.seq_len, gen)
        with torch.no_grad():  # stands in for aux-loss-free bias updates: buffers must travel too
            for i, block in enumerate(model.layers):
                if block.mlp.expert_bias is not None:
                    block.mlp.expert_bias.copy_(torch.linspace(-1, 1, block.mlp.expert_bias.numel()) * (i + 1))
        ckpt = out / f"zero{stage}"
        eng.save_checkpoint(str(ckpt), tag=f"global_step{eng.global_steps}")
        truth = full_state(eng, model)
        if rank == 0:
            save_file(truth, str(ckpt / "truth.safetensors"))
        dist.barrier()


def load(cfg, universal: Path, stage: str, out: Path) -> None:
    eng, model, sched = engine(cfg, stage, load_universal=True)
    path, _ = eng.load_checkpoint(str(universal))
    assert path is not None, f"nothing loaded from {universal}"
    tag = (universal / "latest_universal").read_text().strip()
    states = torch.load(universal / tag / "mp_rank_00_model_states.pt", weights_only=True)
    model.load_state_dict(states["module"], strict=False)  # the universal loader leaves buffers alone
    truth = full_state(eng, model)
    base = eng.optimizer.optimizer if hasattr(eng.optimizer, "optimizer") else eng.optimizer
    info = {
        "global_steps": eng.global_steps,
        "last_epoch": sched.last_epoch,
        "lrs": [g["lr"] for g in base.param_groups],
    }
    gen = torch.Generator().manual_seed(200 + dist.get_rank())
    train_step(eng, cfg.model.vocab_size, cfg.data.seq_len, gen)
    info["global_steps_after_step"] = eng.global_steps
    info["adam_steps_after_step"] = full_state(eng, model)["adam_steps"].tolist()
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(truth, str(out / "loaded.safetensors"))
        (out / "info.json").write_text(json.dumps(info))
    dist.barrier()


def main() -> None:
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group("gloo")
    mode, cfg = sys.argv[1], load_config(sys.argv[2])
    if mode == "save":
        save(cfg, Path(sys.argv[3]), sys.argv[4:])
    else:
        load(cfg, Path(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
