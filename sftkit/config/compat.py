"""NeMo RL config spellings from other NeMo RL versions, read into sftkit's one schema.

- `policy.automodel_cfg` (NeMo RL's newer name, #4282) is `policy.dtensor_cfg`: renamed in
  each file before files merge (so a recipe overrides its parent whichever spelling each
  uses), in override keys, and in `${...}` references.
- A bare `checkpointing.metric_name` (`val_loss`, NeMo RL's older format) means `val:val_loss`.
- With `policy.megatron_cfg.enabled`, NeMo RL trains with `megatron_cfg.optimizer` and
  `megatron_cfg.scheduler`, not `policy.optimizer`; they are translated to the equivalent
  torch AdamW/SGD and LinearLR/CosineAnnealingLR chain so the recipe's learning rates hold;
  an enabled `megatron_cfg.fp8_cfg` becomes `dtensor_cfg.fp8_cfg` (FP8 through torchao).
- With `policy.megatron_cfg.enabled`, NeMo RL trains LoRA from `megatron_cfg.peft`: it is
  translated into `policy.dtensor_cfg.lora_cfg` (Megatron module names to Hugging Face
  names, `lora_dtype` spellings), the one LoRA section the rest of sftkit reads.
- A disabled `dtensor_cfg`'s parallel sizes are not read (as in NeMo RL).
- The flat data layout next to `data.train` is reported: `data.train` wins.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sftkit.config.errors import ConfigError
from sftkit.config.schema import LoraConfig, OptimizerConfig

logger = logging.getLogger("sftkit")

ALIASES: dict[str, str] = {"policy.automodel_cfg": "policy.dtensor_cfg"}

# Megatron optimizer/scheduler keys the translation honours (not reported as ignored).
MEGATRON_HONOURED: tuple[str, ...] = tuple(
    f"policy.megatron_cfg.{key}"
    for key in (
        "optimizer.optimizer", "optimizer.lr", "optimizer.min_lr", "optimizer.weight_decay",
        "optimizer.adam_beta1", "optimizer.adam_beta2", "optimizer.adam_eps",
        "optimizer.sgd_momentum", "optimizer.clip_grad", "scheduler.start_weight_decay",
        "scheduler.end_weight_decay", "scheduler.weight_decay_incr_style",
        "scheduler.lr_decay_style", "scheduler.lr_decay_iters", "scheduler.lr_warmup_iters",
        "scheduler.lr_warmup_init", "context_parallel_size", "expert_model_parallel_size",
        "fp8_cfg.enabled", "fp8_cfg.fp8",
        "fp8_cfg.fp8_recipe", "fp8_cfg.fp8_param",
    )
)  # fmt: skip
_DECAY_STYLES = ("constant", "linear", "cosine")
_PARALLEL_DEFAULTS: dict[str, Any] = {
    "tensor_parallel_size": 1,
    "context_parallel_size": 1,
    "expert_parallel_size": 1,
    "sequence_parallel": False,
}
_MIN_START_FACTOR = 1e-12  # torch's LinearLR needs a start factor > 0

# Megatron-Core module names -> the Hugging Face (Llama-style) modules they stand for.
MEGATRON_TO_HF: dict[str, tuple[str, ...]] = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}
# Megatron path components with a different Hugging Face spelling.
_MEGATRON_PATH_PARTS = {"decoder": "model", "self_attention": "self_attn"}
_PEFT_HONOURED = (
    "enabled", "target_modules", "exclude_modules", "dim", "alpha", "dropout",
    "dropout_position", "lora_A_init_method", "lora_B_init_method", "lora_dtype",
    "quantize_base", "quantize_compute_dtype", "quantize_block_size",
    "quantize_scaler_block_size",
)  # fmt: skip
# Megatron's lora_dtype spellings -> the schema's dtype names.
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32",
                "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16", "half": "float16"}  # fmt: skip


def translate(cfg: DictConfig) -> None:
    """Spellings and values of other NeMo RL versions and of Megatron, read as this schema
    means them (in place, after the derived defaults are filled)."""
    legacy_metric_name(cfg)
    disabled_dtensor(cfg)
    megatron_optimizer(cfg)
    megatron_layout(cfg)
    megatron_peft(cfg)
    report_flat_data(cfg)


# ---- automodel_cfg ----------------------------------------------------------------------


def alias_key(key: str) -> str:
    """`key` with a newer NeMo RL section name replaced by the schema's name."""
    for old, new in ALIASES.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return key


def rename_aliases(data: dict[str, Any], path: str) -> None:
    """Move `policy.automodel_cfg` into `policy.dtensor_cfg` in one file's tree, in place;
    in a file that sets both, automodel_cfg's keys win."""
    for old, new in ALIASES.items():
        parent_key, _, old_leaf = old.rpartition(".")
        new_leaf = new.rpartition(".")[2]
        parent = data.get(parent_key)
        if not isinstance(parent, dict) or old_leaf not in parent:
            continue
        value = parent.pop(old_leaf)
        target = parent.get(new_leaf)
        if isinstance(value, dict) and isinstance(target, dict):
            _merge_into(target, value)
        elif value is not None or new_leaf not in parent:
            parent[new_leaf] = value
        logger.debug("%s: read %s as %s", path, old, new)


def _merge_into(base: dict[str, Any], child: dict[str, Any]) -> None:
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge_into(base[key], value)
        else:
            base[key] = value


def rewrite_references(node: Any) -> Any:
    """`node` with `${policy.automodel_cfg...}` references pointing at the schema's name."""
    if isinstance(node, dict):
        return {k: rewrite_references(v) for k, v in node.items()}
    if isinstance(node, list):
        return [rewrite_references(v) for v in node]
    if isinstance(node, str) and "${" in node:
        for old, new in ALIASES.items():
            node = node.replace(old + ".", new + ".")
    return node


# ---- values read differently ------------------------------------------------------------


def legacy_metric_name(cfg: DictConfig) -> None:
    """Read NeMo RL's older bare metric name (`val_loss`) as `val:val_loss`.

    Only names of validation metrics (`val_*`) qualify: any other bare name stays as written
    and is rejected with the `val:`/`train:` rule, since there is no older meaning to read.
    """
    name = cfg.checkpointing.metric_name
    if isinstance(name, str) and name.startswith("val_"):
        logger.warning(
            "checkpointing.metric_name=%r is NeMo RL's older bare format: reading it as "
            "'val:%s' (write it that way to silence this).", name, name,
        )  # fmt: skip
        cfg.checkpointing.metric_name = f"val:{name}"


def disabled_dtensor(cfg: DictConfig) -> None:
    """`dtensor_cfg.enabled: false` (Megatron recipes): NeMo RL does not read its parallel
    sizes, so an inherited `tensor_parallel_size: 4` must not demand 4 ranks here either.
    sftkit still trains with its own engine; Megatron's parallel sizes are not used."""
    d = cfg.policy.dtensor_cfg
    if d.enabled:
        return
    unused = {key: d[key] for key, default in _PARALLEL_DEFAULTS.items() if d[key] != default}
    if unused:
        logger.warning(
            "policy.dtensor_cfg.enabled is false, so its %s (NeMo RL does not read them) are "
            "not used: sftkit trains on all ranks with FSDP2. Enable dtensor_cfg to use them.",
            ", ".join(f"{k}={v}" for k, v in unused.items()),
        )
        for key, default in _PARALLEL_DEFAULTS.items():
            d[key] = default


def report_flat_data(cfg: DictConfig) -> None:
    """NeMo RL's older flat layout (`data.dataset_name`, `data.split`, ...) is not used when
    `data.train` is set; say so rather than train on something the user did not expect."""
    data = cfg.data
    if data.train is None:
        return
    extra = OmegaConf.to_container(data.extra)
    assert isinstance(extra, dict)
    flat = {"dataset_name": data.dataset_name, **extra}
    set_keys = {k: v for k, v in flat.items() if v is not None}
    if set_keys:
        listed = ", ".join(f"data.{k}={v!r}" for k, v in set_keys.items())
        logger.warning(
            "%s (NeMo RL's older flat data layout) not used: data.train is set and names the "
            "training data. Move these keys into data.train (or data.default) to apply them.",
            listed,
        )


# ---- Megatron LoRA (peft) -------------------------------------------------------------


def megatron_to_hf_patterns(patterns: list[str]) -> list[str]:
    """Map Megatron names (`linear_qkv`, ...; wildcards kept) onto Llama-style HF names."""
    out: list[str] = []
    for pattern in patterns:
        parts = [_MEGATRON_PATH_PARTS.get(p, p) for p in pattern.split(".")]
        leaf = parts[-1]
        for hf_leaf in MEGATRON_TO_HF.get(leaf, (leaf,)):
            out.append(".".join([*parts[:-1], hf_leaf]))
    return out


def megatron_peft(cfg: DictConfig) -> None:
    """With `policy.megatron_cfg.enabled`, NeMo RL trains LoRA from `megatron_cfg.peft`
    (and ignores `dtensor_cfg.lora_cfg`): write it into `lora_cfg`, which sftkit reads."""
    meg, lora = cfg.policy.megatron_cfg, cfg.policy.dtensor_cfg.lora_cfg
    peft = meg.peft
    if not meg.enabled:
        if peft.enabled:
            logger.warning(
                "policy.megatron_cfg.peft.enabled=true is ignored because "
                "policy.megatron_cfg.enabled=false; use policy.dtensor_cfg.lora_cfg.enabled=true."
            )
        return
    # info, not a warning: the keys sftkit ignores are in warn_ignored's one warning
    logger.info(
        "policy.megatron_cfg.enabled=true: sftkit runs Megatron LoRA on its own engine. "
        "Honoured: %s. Ignored: peft.a2a_experimental.",
        ", ".join("peft." + k for k in _PEFT_HONOURED),
    )
    new = _peft_as_lora(peft)
    old = OmegaConf.to_container(lora) if isinstance(lora, DictConfig) else dataclasses.asdict(lora)
    if lora.enabled and old != dataclasses.asdict(new):  # set by the user, not translated
        logger.warning(
            "policy.dtensor_cfg.lora_cfg is ignored because policy.megatron_cfg.enabled=true; "
            "LoRA comes from megatron_cfg.peft."
        )
    cfg.policy.dtensor_cfg.lora_cfg = new


def _peft_as_lora(peft: Any) -> LoraConfig:
    if peft.target_modules and peft.exclude_modules:
        raise ConfigError(
            "policy.megatron_cfg.peft: target_modules and exclude_modules are mutually "
            "exclusive (Megatron's rule); empty one of them.",
            path="policy.megatron_cfg.peft.target_modules",
        )
    if str(peft.lora_B_init_method).lower() != "zero":
        raise ConfigError(
            f"policy.megatron_cfg.peft.lora_B_init_method={peft.lora_B_init_method!r}: only "
            "'zero' is supported (it makes the first forward equal the base model).",
            path="policy.megatron_cfg.peft.lora_B_init_method",
        )
    a_init = str(peft.lora_A_init_method).lower()
    dtype = "float32" if peft.lora_dtype is None else str(peft.lora_dtype).strip()
    dtype = dtype.removeprefix("torch.").lower()
    if dtype not in _DTYPE_NAMES:
        raise ConfigError(
            f"policy.megatron_cfg.peft.lora_dtype={peft.lora_dtype!r} is not a dtype; "
            f"use one of {sorted(_DTYPE_NAMES)} or None.",
            path="policy.megatron_cfg.peft.lora_dtype",
        )
    return LoraConfig(
        enabled=bool(peft.enabled),
        target_modules=megatron_to_hf_patterns(list(peft.target_modules)),
        exclude_modules=megatron_to_hf_patterns(list(peft.exclude_modules)),
        match_all_linear=not peft.target_modules,  # Megatron: empty list = all linear layers
        dim=int(peft.dim),
        alpha=float(peft.alpha),
        dropout=float(peft.dropout),
        dropout_position=peft.dropout_position,
        lora_A_init="uniform" if a_init in ("kaiming", "kaiming_uniform") else a_init,
        use_triton=True,
        lora_dtype=_DTYPE_NAMES[dtype],
        quantize_base=peft.quantize_base,
        quantize_compute_dtype=peft.quantize_compute_dtype,
        quantize_block_size=int(peft.quantize_block_size),
        quantize_scaler_block_size=int(peft.quantize_scaler_block_size),
    )


# ---- Megatron optimizer and scheduler ---------------------------------------------------


def megatron_layout(cfg: DictConfig) -> None:
    """With `policy.megatron_cfg.enabled`, its `context_parallel_size` (NeMo RL's Megatron
    spelling, e.g. the yarn-128k recipe's CP 8) and `expert_model_parallel_size` are the
    run's context- and expert-parallel sizes."""
    meg, d = cfg.policy.megatron_cfg, cfg.policy.dtensor_cfg
    if not meg.enabled:
        return
    for mkey, dkey in (("context_parallel_size", "context_parallel_size"),
                       ("expert_model_parallel_size", "expert_parallel_size")):  # fmt: skip
        size = meg[mkey]
        if size in (None, 1):
            continue
        if d[dkey] not in (1, size):
            raise ConfigError(
                f"policy.megatron_cfg.{mkey}={size} and policy.dtensor_cfg.{dkey}={d[dkey]} "
                "differ; set one of them",
                path=f"policy.megatron_cfg.{mkey}",
            )
        d[dkey] = size


def megatron_optimizer(cfg: DictConfig) -> bool:
    """With `policy.megatron_cfg.enabled`, set `policy.optimizer`, `policy.scheduler` and
    `policy.max_grad_norm` from the Megatron sections, as NeMo RL trains with those.
    Returns True when it did."""
    meg = cfg.policy.megatron_cfg
    if not meg.enabled:
        return False
    opt, sched = meg.optimizer, meg.scheduler
    if opt.optimizer == "sgd":
        name = "torch.optim.SGD"
        kwargs: dict[str, Any] = {"momentum": opt.sgd_momentum}
    elif opt.optimizer == "adam":  # Megatron's Adam decouples weight decay: AdamW
        name = "torch.optim.AdamW"
        kwargs = {"betas": [opt.adam_beta1, opt.adam_beta2], "eps": opt.adam_eps}
    else:
        raise ConfigError(
            f"policy.megatron_cfg.optimizer.optimizer is {opt.optimizer!r}; choose 'adam' or "
            "'sgd' (or disable megatron_cfg and set policy.optimizer).",
            path="policy.megatron_cfg.optimizer.optimizer",
        )
    kwargs = {"lr": opt.lr, "weight_decay": _weight_decay(sched, opt.weight_decay), **kwargs}
    new = {"name": name, "kwargs": kwargs}
    old = OmegaConf.to_container(cfg.policy.optimizer) if cfg.policy.optimizer else None
    if old not in (None, new, dataclasses.asdict(OptimizerConfig())):  # set by the user
        logger.warning(
            "policy.optimizer is not used while policy.megatron_cfg.enabled (NeMo RL trains "
            "with megatron_cfg.optimizer): training with %s(%s).",
            name, ", ".join(f"{k}={v}" for k, v in kwargs.items()),
        )  # fmt: skip
    cfg.policy.optimizer = OptimizerConfig(name=name, kwargs=kwargs)
    if cfg.policy.scheduler is not None:
        logger.warning(
            "policy.scheduler is not used while policy.megatron_cfg.enabled; "
            "megatron_cfg.scheduler sets the learning rate schedule."
        )
    cfg.policy.scheduler = megatron_schedule(opt.lr, opt.min_lr, sched, cfg.sft.max_num_steps)
    clip = opt.clip_grad
    cfg.policy.max_grad_norm = float(clip) if clip else None
    if meg.fp8_cfg.enabled:  # FP8 runs through torchao (sftkit.model.fp8)
        cfg.policy.dtensor_cfg.fp8_cfg = meg.fp8_cfg
    return True


def _weight_decay(sched: DictConfig, weight_decay: float) -> float:
    """Megatron's constant weight-decay style applies `end_weight_decay`."""
    if sched.weight_decay_incr_style != "constant":
        raise ConfigError(
            "policy.megatron_cfg.scheduler.weight_decay_incr_style is "
            f"{sched.weight_decay_incr_style!r}; only 'constant' is supported: set it to "
            "'constant'.",
            path="policy.megatron_cfg.scheduler.weight_decay_incr_style",
        )
    end = sched.end_weight_decay
    return float(weight_decay if end is None else end)


def megatron_schedule(
    lr: float, min_lr: float, sched: DictConfig, max_steps: int
) -> list[dict[str, Any]] | None:
    """Megatron's OptimizerParamScheduler as torch schedulers (NeMo RL steps it once per
    optimizer step): linear warmup from `lr_warmup_init` over `lr_warmup_iters`, then
    constant, or linear/cosine decay to `min_lr` at `lr_decay_iters` (default: the run's
    steps) and `min_lr` after it. None means a constant learning rate."""
    style = sched.lr_decay_style
    if style not in _DECAY_STYLES:
        raise ConfigError(
            f"policy.megatron_cfg.scheduler.lr_decay_style is {style!r}; choose one of "
            f"{', '.join(map(repr, _DECAY_STYLES))}.",
            path="policy.megatron_cfg.scheduler.lr_decay_style",
        )
    warmup = int(sched.lr_warmup_iters or 0)
    entries: list[dict[str, Any]] = []
    if warmup > 0:
        start = sched.lr_warmup_init / lr if lr else 1.0
        if start > 1.0:
            raise ConfigError(
                f"policy.megatron_cfg.scheduler.lr_warmup_init ({sched.lr_warmup_init}) is "
                f"above optimizer.lr ({lr}); warmup rises to lr: lower lr_warmup_init.",
                path="policy.megatron_cfg.scheduler.lr_warmup_init",
            )
        start = max(start, _MIN_START_FACTOR)
        entries.append(_linear(start, 1.0, warmup))
    decay_end = int(sched.lr_decay_iters or max_steps)
    if style != "constant" and decay_end > warmup and lr:
        floor = min_lr / lr
        if style == "linear":
            entries.append(_linear(1.0, floor, decay_end - warmup))
        else:
            entries.append(
                {
                    "name": "torch.optim.lr_scheduler.CosineAnnealingLR",
                    "kwargs": {"T_max": decay_end - warmup, "eta_min": min_lr},
                }
            )
        entries.append(_linear(max(floor, _MIN_START_FACTOR), floor, 1))  # hold min_lr
        milestones = [warmup, decay_end] if warmup > 0 else [decay_end]
        return [*entries, {"milestones": milestones}]
    return entries or None  # a lone warmup LinearLR holds lr after its last step


def _linear(start: float, end: float, iters: int) -> dict[str, Any]:
    return {
        "name": "torch.optim.lr_scheduler.LinearLR",
        "kwargs": {"start_factor": start, "end_factor": end, "total_iters": iters},
    }
