"""transformers model of an exported modmoe MoDE model (loaded with trust_remote_code).

Written by ``modmoe export``; needs transformers and torch, not modmoe. The computation is modmoe's
own model code, copied beside this file (``transformer.py`` and the files it imports): the same
code modmoe trains and generates with.

- ``train()`` mode with ``labels``: the forward routes top-k, as modmoe's training does, and the
  loss is the language-model loss plus the auxiliary losses weighted as the run trained them
  (``config.include_aux_losses = False`` leaves them out; ``aux_loss`` in the output holds their
  weighted sum either way). Gradients reach every parameter; PEFT and TRL train it; activation
  checkpointing works (non-reentrant: the auxiliary losses ride on non-tensor block outputs).
- ``base_model`` is the decoder without its LM head (final hidden states), which tools that
  compute the loss themselves call (TRL's SFTTrainer does). In training the auxiliary losses
  ride on those hidden states: their gradient is added in backward (weight 1 per backward pass,
  whatever the caller scales its own loss by), so such tools train the routers too.
- ``eval()`` mode and ``generate()``: causal routing with a KV cache. Routed blocks keep K/V only
  for the tokens that entered them, so each routed layer has its own length per sequence
  (``ModMoECache``). Left-padded batches (what ``generate`` makes) are handled by moving each
  row's real tokens to the front; padding never enters attention.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast

from .args import ModelArgs
from .configuration_modmoe import ModMoEConfig
from .kv_cache import RaggedKVCache
from .routing import entering_first
from .transformer import DecoderMixin, ModelOutput


class ModMoECache:
    """The generation cache handed between ``forward`` calls: the model's ragged cache, plus
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


class _AttachLoss(torch.autograd.Function):
    """Returns ``hidden`` unchanged; in backward, ``loss`` gets gradient 1, so the loss trains
    its parameters through whatever objective the hidden states feed."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape = loss.shape
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.loss_shape, device=grad.device, dtype=torch.float32)


class _Backbone:
    """The decoder without its LM head, as transformers tools expect ``model.base_model``: called
    like the model, it returns the final hidden states (``last_hidden_state``)."""

    _tp_plan = None
    _pp_plan = None

    def __init__(self, owner: ModMoEForCausalLM) -> None:
        self.owner = owner

    def __call__(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs) -> BaseModelOutputWithPast:
        owner = self.owner
        owner._check_input(input_ids, kwargs.get("inputs_embeds"))
        if owner.training:
            hidden, out = owner._train_hidden(input_ids, attention_mask)
            if owner.config.include_aux_losses:
                hidden = _AttachLoss.apply(hidden, out.aux_total)
            return BaseModelOutputWithPast(last_hidden_state=hidden)
        hidden, cache = owner._causal_forward(input_ids, attention_mask, past_key_values, 0, head=False)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.owner.tok_embeddings


def _shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """transformers' labels (the inputs, -100 where ignored) -> next-token targets (B, T)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)


class ModMoEForCausalLM(DecoderMixin, PreTrainedModel, GenerationMixin):
    config_class = ModMoEConfig
    base_model_prefix = "modmoe"
    _no_split_modules = ["TransformerBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    # Routing decisions are discrete: the router, the predictor, the expert gates and the
    # expert bias stay float32 under any load dtype (regular expressions over tensor names).
    _keep_in_fp32_modules = [r"router\.", r"gate\.weight", "expert_bias"]
    _keep_in_fp32_modules_strict = [r"router\.", r"gate\.weight", "expert_bias"]
    supports_gradient_checkpointing = True
    gradient_checkpointing = False

    def __init__(self, config: ModMoEConfig) -> None:
        super().__init__(config)
        # The export stores the output projection apart from the embedding, even when tied.
        args = dataclasses.replace(ModelArgs.from_dict(config.modmoe["model"]), tie_embeddings=False)
        self.build_modules(args)
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
            elif name == "bias":
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        for name, b in module.named_buffers(recurse=False):
            if name == "expert_bias":
                b.zero_()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.tok_embeddings

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.output

    @property
    def base_model(self) -> _Backbone:
        return _Backbone(self)

    @staticmethod
    def _check_input(input_ids, inputs_embeds) -> None:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("ModMoEForCausalLM takes input_ids (inputs_embeds is not supported)")
        if input_ids.shape[-1] == 0:
            raise ValueError("ModMoEForCausalLM: input_ids is empty (give at least one token)")

    # ------------------------------------------------------------------ training
    def _checkpoint(self):
        """How blocks run: through the activation checkpoint function transformers set, or directly."""
        func = getattr(self, "_gradient_checkpointing_func", None)
        if not (self.gradient_checkpointing and self.training and func is not None):
            return None
        if getattr(func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "ModMoEForCausalLM: activation checkpointing must be non-reentrant (the auxiliary losses ride on "
                "non-tensor block outputs): pass gradient_checkpointing_kwargs={'use_reentrant': False}"
            )
        return lambda block, *inputs: func(block.__call__, *inputs)

    def _train_hidden(self, input_ids, attention_mask, labels=None):
        """Top-k routing over whole sequences, as modmoe trains: the final hidden states in the
        caller's columns, and the model output (loss against ``labels`` when given). Padded rows
        are packed real tokens first; padding is never chosen while real tokens compete for a
        routed block."""
        real = None if attention_mask is None else attention_mask.bool()
        padded = real is not None and not bool(real.all())
        if padded:
            index, _ = entering_first(real, width=input_ids.shape[1])  # (B, T) real tokens first
            input_ids, real = input_ids.gather(1, index), real.gather(1, index)
            labels = None if labels is None else labels.gather(1, index)
        hidden, layer_aux = self.decode_sequences(
            input_ids, "topk", checkpoint=self._checkpoint(), token_valid=real if padded else None
        )
        out = self.head(hidden, labels, layer_aux)
        if padded:  # back to the caller's columns
            unpack = lambda t: torch.zeros_like(t).scatter(1, index[..., None].expand_as(t), t)
            hidden, out.logits = unpack(hidden), unpack(out.logits)
        return hidden, out

    def head(self, hidden, labels, layer_aux):
        """The LM head, the language-model loss against transformers' ``labels`` and the auxiliary losses."""
        logits = self.output(hidden)
        loss = None
        if labels is not None:
            targets = _shifted_targets(labels)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        aux_total, aux_losses = self.aux_losses(layer_aux, logits.device)
        return ModelOutput(logits, loss, aux_total, aux_losses, layer_aux)

    # ------------------------------------------------------------------ inference
    def _causal_forward(self, input_ids, attention_mask, past_key_values, logits_to_keep, head: bool = True):
        """Causal routing over the cache: logits (B, S, V), or final hidden states without ``head``."""
        B, S = input_ids.shape
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, -S:].bool()
        router = self.config.causal_router
        cache = past_key_values if past_key_values is not None else ModMoECache(self.new_cache(B))
        index, valid = entering_first(real, width=S)  # (B, S): real tokens first, in order
        packed = input_ids.gather(1, index)
        if logits_to_keep == 1 and head and bool(real[:, -1].all()):  # generate(): only the last token's logits
            logits = self.run_tokens(packed, cache.core, valid, causal_router=router, last_only=True)
        else:
            packed_logits = self.run_tokens(packed, cache.core, valid, causal_router=router, head=head)  # (B, S, V)
            packed_logits = packed_logits * valid[..., None].to(packed_logits.dtype)  # padding: zeros
            logits = torch.zeros_like(packed_logits).scatter(
                1, index[..., None].expand_as(packed_logits), packed_logits
            )
        cache.columns += S
        return logits, cache

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
        self._check_input(input_ids, inputs_embeds)
        aux_loss, cache, loss = None, None, None
        if self.training:
            if past_key_values is not None:
                raise ValueError(
                    "ModMoEForCausalLM: training routes top-k over whole sequences; pass no past_key_values"
                )
            _, out = self._train_hidden(input_ids, attention_mask, labels)
            logits, aux_loss = out.logits, out.aux_total
            if out.loss is not None:
                loss = out.loss + out.aux_total if self.config.include_aux_losses else out.loss
        elif self.config.routing == "topk":
            if past_key_values is not None or use_cache:
                raise ValueError(
                    "routing='topk' looks at whole sequences and cannot use a KV cache: pass use_cache=False"
                )
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError("routing='topk' needs unpadded sequences of equal length (attention_mask all ones)")
            logits = self.forward_sequences(input_ids, routing="topk").logits
        elif self.config.routing == "causal":
            use_cache = self.config.use_cache if use_cache is None else use_cache
            logits, cache = self._causal_forward(input_ids, attention_mask, past_key_values, logits_to_keep)
        else:
            raise ValueError(f"config.routing = {self.config.routing!r}: allowed causal, topk")
        if logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        if labels is not None and loss is None:
            shifted = labels[:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted, ignore_index=-100
            )
        out = MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, past_key_values=cache if use_cache else None
        )
        return out if return_dict is not False else out.to_tuple()

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """``GenerationMixin.generate``, checked first: an empty prompt is refused, and a request
        that would run past the context (``max_seq_len``) stops there with a warning and
        returns what was generated."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is not None:
            if ids.shape[-1] == 0:
                raise ValueError("generate: the prompt is empty (input_ids has no tokens; give at least one)")
            context = self.cfg.max_seq_len
            room = context - ids.shape[-1]
            if room < 0:
                raise ValueError(f"generate: the prompt has {ids.shape[-1]} tokens, more than the context ({context})")
            gen = kwargs.get("generation_config") or self.generation_config
            max_new = kwargs.get("max_new_tokens", gen.max_new_tokens)
            max_length = kwargs.get("max_length", gen.max_length)
            wanted = max_new if max_new is not None else (max_length or 0) - ids.shape[-1]
            if wanted > room:
                warnings.warn(
                    f"generate: {wanted} new tokens would run past the context ({context} tokens); generating {room}",
                    stacklevel=2,
                )
                if room == 0:
                    return ids
                kwargs["max_new_tokens"] = room
                kwargs.pop("max_length", None)
        return super().generate(inputs, **kwargs)
