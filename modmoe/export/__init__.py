"""Export of a training checkpoint to a self-contained Hugging Face style directory."""

from modmoe.export.exporter import DEFAULT_MAX_SHARD_BYTES, ExportSummary, export_checkpoint
from modmoe.export.source import ExportError, open_checkpoint, resolve_checkpoint

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "ExportError",
    "ExportSummary",
    "export_checkpoint",
    "open_checkpoint",
    "resolve_checkpoint",
]
