"""The Megatron-Core engine: MoDE layers hosted by Megatron's ``GPTModel`` (DESIGN.md §2).

Modules, from the bottom up:

- ``config``: :class:`MegatronConfig`, the Megatron-only knobs (pp, cp, etp, sp, dispatcher,
  grouped GEMM, FP8, optimizer choice). Imports no Megatron code.
- ``translate``: modmoe config -> ``TransformerConfig`` kwargs, ``GPTModel`` kwargs and the
  process layout, with one-line errors for every combination either side cannot express.
- ``routing``: the depth router's top-k, gather and scatter as pure functions on ``[s, b, h]``,
  sequence parallelism included.
- ``layer`` / ``spec``: the MoDE ``TransformerLayer`` subclass and the ``ModuleSpec`` list
  that puts it into ``GPTModel``.
- ``convert``: native state dict <-> Megatron ``GPTModel`` state dict.
- ``load``: one rank's part of a ``GPTModel`` from native tensors read by name (the initial
  weights of every layout are the native model's).
- ``checkpoint``: ``dist_checkpointing`` of a run, and its export to native tensors.
- ``cpu_emulation``: Megatron's local layers on CPU. The training step is the ``megatron``
  backend of the Trainer (``modmoe/train/backends/megatron.py``).

Only ``config`` is imported here; the rest needs ``megatron-core`` (the ``megatron`` extra).
"""

from modmoe.engines.megatron.config import MegatronConfig

__all__ = ["MegatronConfig"]
