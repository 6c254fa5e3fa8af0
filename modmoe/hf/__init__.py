"""Pretrained transformers checkpoints: import (``model.from_hf``) and the stock-architecture export.

``config`` completes a job config from a checkpoint's ``config.json`` (config layer, no torch);
``names`` maps native tensors to the checkpoint's; ``checkpoint`` reads them (or slices of them)
through safetensors memory maps; ``load`` fills a (parallelized) model. Import what you need from
the submodules: this package file imports nothing, so the config layer stays light.
"""
