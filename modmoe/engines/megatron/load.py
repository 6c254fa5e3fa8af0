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

The native tensors come from a :data:`NativeReader`, ``read(name, index)``, asked only for the
part this rank holds (its experts' rows, its tensor-parallel rows or columns; each tensor never by
a rank that needs none of it, e.g. a rank of stage 1 never reads the embedding) and at most once
per tensor, so the source can be lazy: the native model initialised from a seed
(:func:`native_init_reader`), or a pretrained checkpoint read through memory maps
(:func:`~modmoe.engines.megatron.pretrained.pretrained_reader`). Which part of the native tensors a rank's slice of a Megatron tensor
needs follows from the rule's :attr:`~modmoe.engines.megatron.convert.Rule.kind`
(:func:`rank_read`); the conversion itself is :mod:`~modmoe.engines.megatron.convert`'s, applied
to those parts, so loading and exporting cannot disagree. :func:`rank_slice` is the reference:
the rank's part of the whole converted tensor.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from modmoe.engines.megatron.convert import MegatronLayout, Rule, conversion_rules
from modmoe.model_config import ModelConfig

Index = tuple[slice, ...]
NativeReader = Callable[[str, Index | None], Tensor]
"""``read(name, index)``: the native model's state dict entry ``name``, or its part ``index`` (one
contiguous slice per leading dimension; None: the whole tensor)."""

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


@dataclass(frozen=True)
class Split:
    """The part of a Megatron tensor a rank holds: chunk ``rank`` of ``size`` along ``dim`` (of
    each half, for a SwiGLU ``linear_fc1``)."""

    dim: int
    rank: int
    size: int


def tensor_split(target: Tensor, key: str, shards: RankShards) -> Split | None:
    """How ``target`` (this rank's tensor of state dict ``key``) splits its Megatron tensor, as
    Megatron's tensor-parallel marks on it say (over the TP group, or the expert-TP group for
    routed experts); None: it holds all of it."""
    if not getattr(target, "tensor_model_parallel", False):
        return None
    # A SwiGLU fc1 is [gate; up]: each rank holds its slice of each half (Megatron's local linears
    # mark it with stride 2; Transformer Engine's keep stride 1 and the same layout).
    halves = 2 if _GATED_FC1.search(key) else 1
    stride = getattr(target, "partition_stride", 1)
    if stride not in (1, halves):
        raise NotImplementedError(f"load: {key} is split with stride {stride}")
    rank, size = (shards.etp_rank, shards.etp) if ".mlp.experts." in f".{key}" else (shards.tp_rank, shards.tp)
    return None if size == 1 else Split(target.partition_dim, rank, size)


def rank_slice(full: Tensor, target: Tensor, key: str, shards: RankShards) -> Tensor:
    """The part of ``full`` (unsharded Megatron tensor) that ``target`` (this rank's tensor of
    state dict ``key``) holds, as Megatron's tensor-parallel marks on it say."""
    split = tensor_split(target, key, shards)
    if split is None:
        return full
    halves = 2 if _GATED_FC1.search(key) else 1
    parts = [half.chunk(split.size, split.dim)[split.rank] for half in full.chunk(halves, dim=0)]
    return torch.cat(parts, dim=split.dim)


def _whole(t: Tensor) -> Tensor:
    return t


def _chunk(t: Tensor, shares: int, index: int) -> Tensor:
    return t.chunk(shares, dim=0)[index]


def _rows(chunk: int, width: int) -> slice:
    """Chunk ``chunk`` of ``width`` rows (or columns)."""
    return slice(chunk * width, (chunk + 1) * width)


@dataclass(frozen=True)
class RankRead:
    """What a rank reads for one conversion rule, and what it makes of it."""

    indexes: tuple[Index | None, ...]  # the part of each of the rule's native tensors (None: all)
    names: tuple[str, ...]  # the Megatron tensors the rule makes of those parts, in its output order
    keep: Callable[[Tensor], Tensor] = _whole  # the rank's part of each of them


def rank_read(
    rule: Rule, wanted: dict[str, list[str]], targets: dict[str, Tensor], cfg: ModelConfig, shards: RankShards
) -> RankRead:
    """The parts of ``rule``'s native tensors that this rank's tensors (``wanted``: global Megatron
    name -> state dict keys, ``targets``: key -> tensor) hold, by the rule's kind."""
    if rule.kind == "experts":
        return _experts_read(rule, wanted, targets, shards)
    key = wanted[rule.megatron[0]][0]
    target = targets[key]
    split = tensor_split(target, key, shards)
    if split is None:
        return RankRead((None,) * len(rule.native), rule.megatron)
    if rule.kind == "same":
        return RankRead(((slice(None),) * split.dim + (_rows(split.rank, target.shape[split.dim]),),), rule.megatron)
    if split.dim != 0:
        raise NotImplementedError(f"load: {key} ({rule.kind}) is split along dimension {split.dim}")
    if rule.kind == "gated":
        rows = (_rows(split.rank, target.shape[0] // 2),)  # of the gate and of the up projection
        return RankRead((rows, rows), rule.megatron)
    return _qkv_read(cfg, split, rule.megatron)


def _qkv_read(cfg: ModelConfig, split: Split, names: tuple[str, ...]) -> RankRead:
    """Query/key/value rows: whole KV groups per rank when the KV heads split evenly, else the
    rank's share of the one group it serves (tp a multiple of the KV heads)."""
    a = cfg.to_args()
    hd, kv, per = a.head_dim, a.num_kv_heads, a.num_heads // a.num_kv_heads
    if kv % split.size == 0:
        groups = kv // split.size
        first, keep = split.rank * groups, _whole
    else:
        sharing = split.size // kv
        groups, first = 1, split.rank // sharing
        keep = functools.partial(_chunk, shares=sharing, index=split.rank % sharing)
    query = (slice(first * per * hd, (first + groups) * per * hd),)
    key_value = (slice(first * hd, (first + groups) * hd),)
    return RankRead((query, key_value, key_value), names, keep)


def _experts_read(rule: Rule, wanted: dict[str, list[str]], targets: dict[str, Tensor], shards: RankShards) -> RankRead:
    """This rank's experts (a contiguous run under expert parallelism), and of each its slice of
    the hidden units under expert tensor parallelism."""
    E = len(rule.megatron) // 2
    fc1, fc2 = rule.megatron[:E], rule.megatron[E:]
    local = [e for e in range(E) if fc1[e] in wanted]
    first, stop = local[0], local[-1] + 1
    if local != list(range(first, stop)):
        raise NotImplementedError(f"load: this rank's experts {local} are not contiguous")
    key = wanted[fc1[first]][0]
    split = tensor_split(targets[key], key, shards)
    if split is not None and split.dim != 0:
        raise NotImplementedError(f"load: {key} is split along dimension {split.dim}")
    names = fc1[first:stop] + fc2[first:stop]
    if split is None and (first, stop) == (0, E):
        return RankRead((None, None, None), names)
    hidden = slice(None) if split is None else _rows(split.rank, targets[key].shape[0] // 2)
    up = (slice(first, stop), slice(None), hidden)  # w1, w3: (E, D, F)
    down = (slice(first, stop), hidden)  # w2: (E, F, D)
    return RankRead((up, up, down), names)


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
    one that is not. Returns the native names read, in order (each once)."""
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
        part_of = rank_read(rule, wanted, targets, cfg, shards)
        sources = [read(name, index) for name, index in zip(rule.native, part_of.indexes, strict=True)]
        read_names.extend(rule.native)
        for name, made in zip(part_of.names, rule.to_megatron(*sources), strict=True):
            part = part_of.keep(made)
            for key in wanted.get(name, []):
                target = targets[key]
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


def native_init_reader(cfg: ModelConfig, seed: int, keep: Callable[[str], bool] | None = None) -> NativeReader:
    """The native model's initial tensors for ``seed``: what the native engine starts from
    (``torch.manual_seed(seed)``, then ``MoDETransformer(cfg)``), built once on the CPU in fp32
    without touching the caller's RNG state. Each tensor is dropped once read (every native
    tensor is read at most once per rank), so the full model is held only while loading; with
    ``keep``, only the tensors it keeps are held at all (the others dropped once built)."""
    from modmoe.model import MoDETransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = {k: v for k, v in MoDETransformer(cfg).state_dict().items() if keep is None or keep(k)}

    def read(name: str, index: Index | None = None) -> Tensor:
        full = state.pop(name)
        return full if index is None else full[index]

    return read


__all__ = [
    "Index",
    "NativeReader",
    "RankRead",
    "RankShards",
    "Split",
    "global_names",
    "load_native_weights",
    "native_init_reader",
    "rank_read",
    "rank_slice",
    "tensor_split",
]
