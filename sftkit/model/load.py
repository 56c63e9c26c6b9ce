"""Loading the HF model (dtype, attention, config overrides) and writing HF directories.

Checkpoint weights are `sftkit.checkpoint`'s."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sftkit.log.progress import Progress
from sftkit.model.attention import set_attention_implementation
from sftkit.model.builtin import resolve_model_path
from sftkit.model.mxfp4 import from_pretrained_options, plan_dequantize
from sftkit.model.size_check import check_model_size

logger = logging.getLogger("sftkit")

# MoE router-loss switches: "off" on a model without a router loss is a no-op, not a typo.
ROUTER_LOSS_SWITCHES = ("router_aux_loss_coef", "output_router_logits")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    model_name: str,
    *,
    param_dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    dequantize: bool = False,
    progress: bool = False,
) -> nn.Module:
    """`AutoModelForCausalLM` from an HF id, a local directory or `sftkit:<builtin>`.

    Parameters stay in `param_dtype` (float32 master weights by default; compute precision
    comes from autocast in the loop). `dequantize`: `policy.dequantize_base_checkpoint`
    (`sftkit.model.mxfp4`). `progress`: a closing line for a long load.
    """
    from transformers import AutoModelForCausalLM

    if trust_remote_code:
        logger.warning(
            "policy.trust_remote_code=true: model code from %s will run on this machine", model_name
        )
    path, config = model_config(model_name, trust_remote_code, config_overrides)
    kwargs: dict[str, Any] = {"config": config, "dtype": param_dtype}
    if plan_dequantize(config, model_name, dequantize):
        kwargs.update(from_pretrained_options())
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # transformers reads the files itself (its own bar on a terminal): without a hook into
    # it, a log gets a closing line with the size and time of a load longer than `quiet_s`.
    with Progress("loading weights", None, "B", enabled=progress) as bar:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=trust_remote_code, **kwargs
            )
        except OSError as err:  # config found, weights not (partial download, no network)
            raise ValueError(_unloadable(model_name, err)) from err
        bar.update(sum(p.numel() * p.element_size() for p in model.parameters()))
    if getattr(model.config, "use_cache", False):
        # A KV cache during training only costs memory (and, with an attention mask,
        # changes how transformers builds masks for packed rows).
        model.config.use_cache = False
    keep_attention_softcap(model)
    return model


def keep_attention_softcap(model: nn.Module) -> None:
    """Run attention that honours the model's attention-logit softcap (Gemma2).

    Transformers up to at least 5.17 picks SDPA for Gemma2, and its SDPA path drops
    `attn_logit_softcapping` without a word: the model trains on other logits than it was
    defined with (0.5 apart on a tiny Gemma2). Later versions refuse SDPA there. Such a
    model is switched to eager attention with a warning; sftkit's packed attention (set
    later for packed batches) applies the softcap itself.
    """
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return
    logger.warning(
        "%s has attn_logit_softcapping=%s, which SDPA attention ignores; using eager "
        "attention (set policy.sequence_packing.enabled=true for sftkit's packed attention, "
        "which applies it)",
        type(model).__name__,
        softcap,
    )
    set_attention_implementation(model, "eager")


def model_config(
    model_name: str,
    trust_remote_code: bool,
    overrides: dict[str, Any] | None = None,
    check_size: bool = True,
) -> tuple[str, Any]:
    """(local path or hub id, HF config with `policy.hf_config_overrides` applied).

    A name that cannot be loaded (no network and not in the HF cache, a typo, a directory
    without config.json) is a ValueError saying how to fix it, not a traceback.
    """
    from transformers import AutoConfig

    path = resolve_model_path(model_name)
    _refuse_pickled_weights(model_name, Path(path))
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ValueError(_unloadable(model_name, err)) from err
    for key, value in (overrides or {}).items():
        if not hasattr(config, key) and key in ROUTER_LOSS_SWITCHES and not value:
            # NeMo RL's Nemotron-3 Nano recipes set router_aux_loss_coef: 0.0; transformers'
            # NemotronHConfig has no such field and its forward adds no router loss, so
            # turning it off changes nothing. Any other absent field is refused below.
            logger.warning(
                "policy.hf_config_overrides.%s=%r: %s has no such field and its model adds no "
                "router loss, so there is nothing to turn off; ignored",
                key,
                value,
                type(config).__name__,
            )
            continue
        if not hasattr(config, key):
            raise ValueError(
                f"policy.hf_config_overrides.{key}: {type(config).__name__} has no field "
                f"{key!r}; remove it (a recipe's overrides belong to its own model) or fix the "
                "spelling"
            )
        setattr(config, key, value)
    if check_size:  # the memory estimate (meta only) describes models this host cannot hold
        check_model_size(config, model_name)  # before anything is allocated, even on meta
    return path, config


def _refuse_pickled_weights(model_name: str, path: Path) -> None:
    """A local model directory with pickled weights only (`pytorch_model.bin`) is refused in
    one line: loading a pickle can run code, and transformers' weights-only unpickler
    ended in an `UnpicklingError` traceback."""
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for ext in ("bin", "pt", "pth", "ckpt") for p in path.glob(f"*.{ext}"))
    if pickles:
        raise ValueError(
            f"policy.model_name={model_name!r}: {path / pickles[0]} holds pickled weights, which "
            "sftkit does not load (unpickling can run code); convert the model to safetensors "
            "(model.save_pretrained(dir, safe_serialization=True) where you trust the file)"
        )


def _unloadable(model_name: str, err: OSError) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"policy.model_name={model_name!r} cannot be loaded ({reason}). Set policy.model_name "
        "to a local directory holding an HF model (config.json and safetensors weights), "
        f"download it first (`hf download {model_name}`), or check the name"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (`model.model.layers` or `model.layers`)."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"{type(model).__name__} has no `model.layers` ModuleList; sftkit shards, checkpoints "
        "and compiles per decoder layer, so it needs an HF decoder-only layout"
    )


def save_hf(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """An HF model directory (config, safetensors weights, tokenizer with its template)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)  # type: ignore[operator]  # HF model
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def moe_routers(model: nn.Module) -> set[str]:
    """Names of MoE router layers: an `nn.Linear` subclass named `*Router` (Llama 4), or a
    linear gate beside an `experts` module (Mixtral-style `gate`, Qwen3-Next's
    `shared_expert_gate`). LoRA never adapts them: a low-rank update to the router moves
    every token's expert choice, which the MoE recipes this follows keep frozen."""
    routers = {n for n, m in model.named_modules() if type(m).__name__.endswith("Router")}
    for name, module in model.named_modules():
        if hasattr(module, "experts"):
            for child, sub in module.named_children():
                if (
                    isinstance(sub, nn.Linear)
                    and ("gate" in child or "router" in child)
                    and (not child.endswith("_proj"))
                ):
                    routers.add(f"{name}.{child}" if name else child)
    return routers


# Mamba mixers whose CUDA path (`mamba_split_conv1d_scan_combined`) reads `out_proj.weight`
# directly: a LoRA there is skipped on GPU (PEFT refuses it for these model types too).
MAMBA_MODEL_TYPES = frozenset({"mamba", "mamba2", "falcon_mamba", "falcon_h1", "nemotron_h",
                               "bamba", "granitemoehybrid", "zamba2"})  # fmt: skip


def lora_unsafe_leaves(model: nn.Module) -> set[str]:
    """Leaf names that all-linear LoRA leaves out: Mamba's `out_proj` (above), and those that
    PEFT (0.21, transformers 5) re-targets onto an MoE model's fused experts when it loads an
    adapter, as if it came from transformers 4 (`gate_proj`, `up_proj`, `down_proj` for the
    Qwen2-MoE pattern: DeepSeek-V3, GLM-4.5, Qwen3-Next). An adapter on dense or
    shared-expert layers of those names loads wrong in PEFT (0.5 off on a tiny GLM-4.5)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    unsafe = {"out_proj"} if model_type in MAMBA_MODEL_TYPES else set()
    try:
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
        )
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # no PEFT (or another layout of it): nothing to avoid
        return unsafe
    base = _MODEL_TO_CONVERSION_PATTERN.get(str(model_type))
    if base is None or get_checkpoint_conversion_mapping(model_type) is None:
        return unsafe
    return unsafe | set(_MOE_TARGET_MODULE_MAPPING.get(base, {}))
