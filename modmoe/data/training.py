"""What the trainer calls: :func:`open_training_data` once per rank, then
:meth:`TrainingData.train_sampler` and :meth:`TrainingData.validation_batches`.

Only rank 0 of a single-node job may prepare (``data.prepare: auto``), before the others open
the result; a multi-node job, or ``data.prepare: never``, opens a finished preparation made by
``modmoe data prepare`` and refuses in one line when there is none. Megatron sources are opened
in place on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from modmoe.config_base import ConfigError
from modmoe.data.config import DataConfig, SourceConfig
from modmoe.data.errors import DataError
from modmoe.data.megatron_format import MegatronStream
from modmoe.data.prepare import (
    PreparedData,
    fingerprint,
    fingerprint_fields,
    first_difference,
    prepare_data,
    prepared_sources,
)
from modmoe.data.sampler import Batch, BlendSampler, BlendSource, blend_validation_batches
from modmoe.data.tokenizer import document_separator, load_tokenizer, vocab_bound

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainingData:
    """The opened sources of a run (each a train and a val stream) and its tokenizer."""

    cfg: DataConfig
    tokenizer_path: Path
    vocab_size: int
    """One more than the tokenizer's largest id."""
    eos_id: int
    train: list[BlendSource]
    val: list[BlendSource]
    model_vocab_size: int

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.train]

    def load_tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)

    def train_sampler(self, global_micro_batch: int, seed: int, rank: int = 0, world: int = 1) -> BlendSampler:
        """This data-parallel rank's endless training batches (``data.seq_len``, prefetched by
        ``data.num_workers`` threads): ``next_batch()``, ``state_dict()``,
        ``load_state_dict()``, ``seek(samples)``, ``metrics()``, ``close()``."""
        return BlendSampler(
            self.train,
            self.cfg.seq_len,
            global_micro_batch,
            seed=seed,
            rank=rank,
            world=world,
            num_workers=self.cfg.num_workers,
            vocab_size=self.model_vocab_size,
        )

    def validation_batches(self, batch_size: int, num_batches: int, rank: int = 0, world: int = 1) -> list[Batch]:
        """The same ``num_batches`` global batches of the blended validation splits every time."""
        return blend_validation_batches(
            self.val, self.cfg.seq_len, batch_size, num_batches, rank, world, vocab_size=self.model_vocab_size
        )


def multi_node() -> bool:
    """True under a launcher that spans several nodes (torchrun sets both variables)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def open_prepared(cfg: DataConfig) -> PreparedData:
    """The finished preparation of ``cfg`` (fingerprint checked), or a one-line refusal that
    says how to make it."""
    target = Path(cfg.prepared_dir).expanduser().resolve()
    hint = "run `modmoe data prepare CONFIG` first (launch/prepare.sbatch on a cluster)"
    if not (target / "index.json").is_file():
        raise DataError(f"data.prepared_dir {target}: no finished preparation; {hint}")
    prepared = PreparedData.load(target)
    fields = fingerprint_fields(cfg)
    if prepared.fingerprint != fingerprint(fields):
        diff = first_difference(prepared.index.get("fingerprint_fields", {}), fields)
        raise DataError(f"data.prepared_dir {target}: prepared for other settings (differs in {diff}); {hint}")
    return prepared


def _megatron_source(cfg: DataConfig, src: SourceConfig) -> tuple[MegatronStream, MegatronStream]:
    assert src.path is not None
    whole = MegatronStream(src.path)
    if src.val_path is None:
        return whole.tail_split(cfg.val_fraction)
    return whole, MegatronStream(src.val_path)


def open_training_data(
    cfg: DataConfig,
    *,
    model_vocab_size: int,
    is_main: bool,
    barrier: Callable[[], None] = lambda: None,
    log: Log = print,
) -> TrainingData:
    """Every rank calls this once. Rank 0 prepares when allowed (``data.prepare: auto`` on one
    node), everyone waits at ``barrier``, then every rank opens the same files; a failure on
    rank 0 still reaches the barrier, so no rank hangs."""
    prepared: PreparedData | None = None
    if prepared_sources(cfg):
        error: BaseException | None = None
        if is_main and cfg.prepare == "auto":
            if multi_node():
                log("data: multi-node job: using the finished preparation (modmoe data prepare), not preparing here")
            else:
                try:
                    prepare_data(cfg, log=log, workers=cfg.prepare_workers)
                except BaseException as exc:  # re-raised after the barrier
                    error = exc
        barrier()
        if error is not None:
            raise error
        prepared = open_prepared(cfg)
    if prepared is not None:
        tokenizer_path, eos_id, vocab = prepared.tokenizer_path, prepared.eot_id, prepared.vocab_size
    else:
        assert cfg.tokenizer is not None  # the config requires it with Megatron sources
        tok = load_tokenizer(cfg.tokenizer)
        tokenizer_path = Path(cfg.tokenizer)
        _, eos_id = document_separator(tok, cfg.tokenizer, cfg.eos_token)
        vocab = vocab_bound(tok)
    if vocab > model_vocab_size:
        raise ConfigError(
            f"config error: model.vocab_size = {model_vocab_size}: must be >= the tokenizer's vocabulary "
            f"({vocab}, {tokenizer_path})"
        )
    train: list[BlendSource] = []
    val: list[BlendSource] = []
    for src in cfg.source_list():
        name = src.resolved_name()
        if src.resolved_kind() == "megatron":
            train_stream, val_stream = _megatron_source(cfg, src)
        else:
            assert prepared is not None
            entry = prepared.index["sources"][name]
            if entry["max_token_id"] >= model_vocab_size:
                raise DataError(
                    f"source {name} in {prepared.dir}: token id {entry['max_token_id']} is outside the model "
                    f"vocabulary (model.vocab_size = {model_vocab_size})"
                )
            train_stream, val_stream = prepared.open("train", name), prepared.open("val", name)
        train.append(BlendSource(name, src.weight, train_stream))
        val.append(BlendSource(name, src.weight, val_stream))
    return TrainingData(cfg, tokenizer_path, vocab, eos_id, train, val, model_vocab_size)
