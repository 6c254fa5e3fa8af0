"""transformers model of an exported modmoe MoDE model (loaded with trust_remote_code).

Written by ``modmoe export``; needs transformers and torch, not modmoe. The computation is in
``modmoe_core.py`` beside this file, the same code modmoe's own runtime runs. ``generate()``
works with a KV cache: routed blocks keep K/V only for the tokens that entered them, so each
routed layer has its own length per sequence (``ModMoECache``). Left-padded batches (what
``generate`` makes) are handled by moving each row's real tokens to the front; padding never
enters attention. Inference only: the forward runs without gradients.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_modmoe import ModMoEConfig
from .modmoe_core import CoreConfig, DecoderMixin, RaggedKVCache


class ModMoECache:
    """The generation cache handed between ``forward`` calls: the core's ragged cache, plus
    the number of input columns consumed (padding included), which is what ``generate``
    calls the sequence length."""

    is_compileable = False
    is_croppable = False

    def __init__(self, core: RaggedKVCache) -> None:
        self.core = core
        self.columns = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def __len__(self) -> int:
        return len(self.core.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.core.select(beam_idx.to(self.core.positions.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.core.select(indices.to(self.core.positions.device))


class ModMoEForCausalLM(DecoderMixin, PreTrainedModel, GenerationMixin):
    config_class = ModMoEConfig
    base_model_prefix = "modmoe"
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: ModMoEConfig) -> None:
        super().__init__(config)
        self.build_decoder(CoreConfig.from_dict(config.modmoe["model"]))
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model creates its own ModMoECache on the first forward

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # Only reached for tensors missing from the checkpoint; an export has them all.
        for name, p in module.named_parameters(recurse=False):
            if p.dim() == 1 and name != "bias":
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        for name, b in module.named_buffers(recurse=False):
            if name == "expert_bias":
                b.zero_()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.tok_embeddings

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.output

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: ModMoECache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """Positions come from the cache (tokens seen per row), so ``position_ids`` is not needed."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("ModMoEForCausalLM takes input_ids (inputs_embeds is not supported)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        B, S = input_ids.shape
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, -S:].bool()
        router = self.config.causal_router
        cache = None
        if self.config.routing == "topk":
            if past_key_values is not None or use_cache:
                raise ValueError(
                    "routing='topk' looks at whole sequences and cannot use a KV cache: pass use_cache=False"
                )
            if not bool(real.all()):
                raise ValueError("routing='topk' needs unpadded sequences of equal length (attention_mask all ones)")
            logits = self.run_topk(input_ids, causal_router=router)
        elif self.config.routing == "causal":
            cache = past_key_values if past_key_values is not None else ModMoECache(self.new_cache(B))
            ar = torch.arange(S, device=input_ids.device)
            ranked = torch.where(real, ar, ar + S).sort(dim=1).values  # real tokens first, in order
            index, valid = ranked % S, ranked < S  # (B, S)
            packed = input_ids.gather(1, index)
            if logits_to_keep == 1 and bool(real[:, -1].all()):  # generate(): only the last token's logits
                logits = self.run_tokens(packed, cache.core, valid, causal_router=router, last_only=True)
            else:
                packed_logits = self.run_tokens(packed, cache.core, valid, causal_router=router)  # (B, S, V)
                packed_logits = packed_logits * valid[..., None].to(packed_logits.dtype)  # padding: zeros
                logits = torch.zeros_like(packed_logits).scatter(
                    1, index[..., None].expand_as(packed_logits), packed_logits
                )
            cache.columns += S
        else:
            raise ValueError(f"config.routing = {self.config.routing!r}: allowed causal, topk")
        if logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted, ignore_index=-100
            )
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)
        return out if return_dict is not False else out.to_tuple()
