"""Random-init HF Llama models with real shapes, shared by the GPU benchmarks.

Speed depends on shapes, not values, so nothing is downloaded: the model is built on the
meta device, materialised with `to_empty` and filled with N(0, 0.02) weights.
"""

from __future__ import annotations

from typing import Any

import torch


def random_llama(config: Any, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 **from_config: Any) -> Any:  # fmt: skip
    """An HF causal LM for `config` (a LlamaConfig, or any decoder config with
    `from_config` options such as `experts_implementation`) with random weights, in train
    mode; SDPA attention unless `from_config` names another."""
    from transformers import AutoModelForCausalLM

    config.use_cache = False
    options = {"attn_implementation": "sdpa", **from_config}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **options)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)  # RMSNorm weights
        for mod in model.modules():  # non-persistent rotary buffers are garbage after to_empty
            if hasattr(mod, "inv_freq") and hasattr(mod, "config"):
                fresh = type(mod)(mod.config)
                for name, buf in fresh.named_buffers(recurse=False):
                    getattr(mod, name).copy_(buf.to(device))
    return model.train()
