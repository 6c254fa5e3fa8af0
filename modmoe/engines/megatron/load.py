"""Fill one rank's part of a Megatron ``GPTModel`` from full native tensors, read by name.

Every Megatron layout starts from the same model as the native engine: the weights are the
native model's tensors (``modmoe.model`` names, full size), and each rank takes only what its
part of the model holds:

- its pipeline stage: the layers it builds (``layer_number`` is global), the embedding on the
  first stage, the final norm and output layer on the last;
- its expert-parallel rank: the experts in ``MoELayer.local_expert_indices``;
- its tensor-parallel rank: the slice Megatron marks on each parameter (``tensor_model_parallel``,
  ``partition_dim``), over the TP group, or the expert-TP group for routed experts; a SwiGLU
  ``linear_fc1`` (``[gate; up]``) holds the rank's slice of each half.

The native tensors come from a :data:`NativeReader`, ``read(name) -> Tensor``, called once per
native tensor this rank needs and never for the others (a rank of stage 1 never reads the
embedding), so the source can be lazy: the native model initialised from a seed
(:func:`native_init_reader`), or a checkpoint read tensor by tensor. The conversion itself is
:mod:`~modmoe.engines.megatron.convert`'s, so loading and exporting cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from modmoe.engines.megatron.convert import MegatronLayout, Rule, conversion_rules
from modmoe.model_config import ModelConfig

NativeReader = Callable[[str], Tensor]
"""``read(name)``: the full tensor of the native model's state dict entry ``name``."""

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")  # SequentialMLP
_GROUPED_EXPERT = re.compile(r"^(mlp\.experts\.linear_fc[12]\.weight)(\d+)$")  # TEGroupedMLP
_GATED_FC1 = re.compile(r"linear_fc1\.weight\d*$")


@dataclass(frozen=True)
class RankShards:
    """This rank's place in the groups that split weights: tensor parallel and expert tensor parallel."""

    tp_rank: int = 0
    tp: int = 1
    etp_rank: int = 0
    etp: int = 1

    @classmethod
    def from_parallel_state(cls) -> RankShards:
        from megatron.core import parallel_state as ps

        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp=ps.get_tensor_model_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp=ps.get_expert_tensor_parallel_world_size(),
        )


def global_names(gpt: nn.Module, tied: bool) -> dict[str, str]:
    """This rank's state dict keys -> the names they have in the whole (unsharded, one-stage,
    all-experts) Megatron model. With tied embeddings, a last stage's own output weight is the
    embedding."""
    out: dict[str, str] = {}
    for key in gpt.state_dict():
        if key.endswith("_extra_state"):
            continue
        name = key
        if (m := _LAYER.match(key)) is not None:
            layer = gpt.decoder.layers[int(m.group(1))]
            rest = m.group(2)
            experts = getattr(getattr(layer, "mlp", None), "local_expert_indices", None)
            if experts is not None and (e := _LOCAL_EXPERT.match(rest)) is not None:
                rest = f"mlp.experts.local_experts.{experts[int(e.group(1))]}.{e.group(2)}"
            elif experts is not None and (e := _GROUPED_EXPERT.match(rest)) is not None:
                rest = f"{e.group(1)}{experts[int(e.group(2))]}"
            name = f"decoder.layers.{layer.layer_number - 1}.{rest}"
        elif tied and key == "output_layer.weight":
            name = "embedding.word_embeddings.weight"
        out[key] = name
    return out


def rank_slice(full: Tensor, target: Tensor, key: str, shards: RankShards) -> Tensor:
    """The part of ``full`` (unsharded Megatron tensor) that ``target`` (this rank's tensor of
    state dict ``key``) holds, as Megatron's tensor-parallel marks on it say."""
    if not getattr(target, "tensor_model_parallel", False):
        return full
    # A SwiGLU fc1 is [gate; up]: each rank holds its slice of each half (Megatron's local linears
    # mark it with stride 2; Transformer Engine's keep stride 1 and the same layout).
    halves = 2 if _GATED_FC1.search(key) else 1
    stride = getattr(target, "partition_stride", 1)
    if stride not in (1, halves):
        raise NotImplementedError(f"load: {key} is split with stride {stride}")
    dim = target.partition_dim
    rank, size = (shards.etp_rank, shards.etp) if ".mlp.experts." in f".{key}" else (shards.tp_rank, shards.tp)
    return torch.cat([part.chunk(size, dim)[rank] for part in full.chunk(halves, dim=0)], dim=dim)


@torch.no_grad()
def load_native_weights(
    gpt: nn.Module,
    cfg: ModelConfig,
    read: NativeReader,
    layout: MegatronLayout | None = None,
    shards: RankShards | None = None,
) -> list[str]:
    """Copies this rank's part of the native model (``read``) into ``gpt`` (this rank's
    ``GPTModel``); every weight and buffer of ``gpt`` is written, or a KeyError names the first
    one that is not. Returns the native names read, in order."""
    shards = shards or RankShards.from_parallel_state()
    targets = {k: v for k, v in gpt.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    names = global_names(gpt, cfg.tie_embeddings)
    wanted: dict[str, list[str]] = {}  # global Megatron name -> this rank's keys holding (part of) it
    for key, name in names.items():
        wanted.setdefault(name, []).append(key)
    rules: list[Rule] = [r for r in conversion_rules(cfg, layout) if any(m in wanted for m in r.megatron)]
    read_names: list[str] = []
    written: set[str] = set()
    for rule in rules:
        sources = [read(name) for name in rule.native]
        read_names.extend(rule.native)
        for name, full in zip(rule.megatron, rule.to_megatron(*sources), strict=True):
            for key in wanted.get(name, []):
                target = targets[key]
                part = rank_slice(full, target, key, shards)
                if part.shape != target.shape:
                    raise ValueError(
                        f"load: {key} ({name}) is {tuple(target.shape)} on this rank, the native tensors give "
                        f"{tuple(part.shape)}"
                    )
                target.copy_(part)
                written.add(key)
    missing = sorted(set(targets) - written)
    if missing:
        raise KeyError(f"load: no native tensor fills {missing[0]!r} ({len(missing)} of this rank's tensors unfilled)")
    return read_names


def native_init_reader(cfg: ModelConfig, seed: int) -> NativeReader:
    """The native model's initial tensors for ``seed``: what the native engine starts from
    (``torch.manual_seed(seed)``, then ``MoDETransformer(cfg)``), built once on the CPU in fp32
    without touching the caller's RNG state. Each tensor is dropped once read (every native
    tensor is read at most once per rank), so the full model is held only while loading."""
    from modmoe.model import MoDETransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = dict(MoDETransformer(cfg).state_dict())
    return state.pop


__all__ = ["NativeReader", "RankShards", "global_names", "load_native_weights", "native_init_reader", "rank_slice"]
