"""Megatron-engine imports of tiny transformers checkpoints, for tests/integration/test_megatron_hf.py.

:func:`backend_for` builds the ``megatron`` backend of a ``model.from_hf`` job that imports its
checkpoint (a fresh start); :func:`megatron_logits` runs its forward pass through Megatron's
schedule (so pipeline stages pass activations as in training) and returns the whole-vocabulary
logits on the last stage (gathered over tensor-parallel ranks), None elsewhere.

Run under ``torchrun --nproc-per-node 2`` (gloo) with ``WORK``, it imports the checkpoints the test
saved under ``WORK/<family>`` under each layout of ``WORK/layouts.json`` and writes
``WORK/<run>-<rank>.json``: the logits' relative error against the one-rank logits in
``WORK/reference-<family>.pt``, the bytes this rank read and the native tensors it took from the checkpoint
(and from the initialisation), the loss of one training step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch


def job_config(directory: Path, run_dir: Path, model: dict[str, Any] | None = None, **sections: dict[str, Any]):
    """An ``engine: megatron`` job importing ``directory``: 2 sequences of 32 tokens per step."""
    from modmoe.config import JobConfig
    from modmoe.config_base import validate_config

    data = {
        "engine": "megatron",
        "model": {"from_hf": str(directory), **(model or {})},
        "data": {"seq_len": 32, "vocab_size": 300},
        "optimizer": {"lr": 0.01, "warmup_steps": 0},
        "trainer": {"run_dir": str(run_dir), "device": "cpu", "global_batch_size": 2, "micro_batch_size": 2},
        "logging": {"mlflow": {"enabled": False}},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return validate_config(JobConfig, data)


def backend_for(cfg, world_size: int = 1):
    """The megatron backend of ``cfg`` on this process's rank, its weights imported."""
    from modmoe.parallel.config import ParallelConfig
    from modmoe.parallel.distributed import init_distributed
    from modmoe.train.backends.megatron import MegatronBackend
    from modmoe.train.resolve import resolve_job

    job = resolve_job(cfg, world_size=world_size, device="cpu")
    return MegatronBackend(job, init_distributed(ParallelConfig(), "cpu"), load_pretrained=True)


@torch.no_grad()
def megatron_logits(backend, ids: torch.Tensor) -> torch.Tensor | None:
    """ids (B, T), B = the micro-batch size -> logits (B, T, V) on the last pipeline stage."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    kept: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        output = model(tokens, backend.position_ids, backend.attention_mask)  # [b, s, V / tp]

        def keep(logits: torch.Tensor):
            kept.append(gather_from_tensor_model_parallel_region(logits).float())
            return logits.sum() * 0, torch.ones((), dtype=torch.int), {}

        return output, keep

    backend.model.eval()
    backend.forward_backward_func(
        forward_step_func=forward_step,
        data_iterator=iter([ids]),
        model=[backend.model],
        num_microbatches=1,
        seq_length=ids.shape[1],
        micro_batch_size=ids.shape[0],
        forward_only=True,
    )
    backend.model.train()
    return kept[0] if kept else None


def train_step(backend, ids: torch.Tensor) -> tuple[float, float | None]:
    """One optimizer step on ``ids`` (its next tokens): (loss, gradient norm)."""
    stats = backend.forward_backward([(ids[:, :-1], ids[:, 1:])], 0)
    return stats.loss, backend.optimizer_step()


def _run(work: Path, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    family = spec["family"]
    cfg = job_config(work / family, work / f"run-{name}", spec.get("model"), **spec.get("sections", {}))
    backend = backend_for(cfg, world_size=dist.get_world_size())
    try:
        reference = torch.load(work / f"reference-{family}.pt")
        logits = megatron_logits(backend, reference["ids"][:, :-1])
        result: dict[str, Any] = {"bytes_read": backend.pretrained_load.bytes_read}
        result["initialised"] = backend.pretrained_load.initialised
        if logits is not None:
            expected = reference["logits"]
            result["rel_err"] = float((logits - expected).abs().max() / expected.abs().max())
        result["loss"], result["grad_norm"] = train_step(backend, reference["ids"])
        return result
    finally:
        backend.close()


def main() -> None:
    import torch.distributed as dist

    work = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for name, spec in json.loads((work / "layouts.json").read_text()).items():
        result = _run(work, name, spec)
        (work / f"{name}-{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
