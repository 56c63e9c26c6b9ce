"""The Checkpointer: every piece of state a run saves, and how it comes back, side by side.

Modelled on torchtitan's `CheckpointManager`: setup builds one `Checkpointer` over the
stateful parts of the run, the loop asks `should_save(step, ...)` and calls `save(state)`,
setup calls `load()`, and `save_final()` writes the run's outputs. The files and the
atomic save (tmp dir, manifest, rename, retention) are `sftkit.train.checkpoint`'s; this
module decides what goes in them.

    state                   one process                         several ranks
    model weights           policy/weights/model.safetensors    policy/dcp (DCP shards)
      LoRA runs             policy/weights/trainable.safetensors  policy/dcp, frozen left out
    optimizer               policy/optimizer/optimizer.pt       policy/dcp ("optim")
    scheduler               policy/optimizer/scheduler.pt (rank 0, with save_optimizer)
    data position           train_dataloader.pt (rank 0)
    every RNG               rng/rank_R.pt (each rank)
    counters, fingerprint   training_info.json (rank 0)
    config, tokenizer       config.yaml, policy/tokenizer/ (rank 0)
    save_consolidated       policy/consolidated/ (an HF directory; LoRA merged into a copy)

Any checkpoint loads into any rank count: DCP reshards `policy/dcp`, and a one-process
checkpoint is sliced per rank (`load_sharded_weights`, `load_full_optimizer_state`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from sftkit.config import MasterConfig, config_to_yaml
from sftkit.config.checks import unmeasured_saves
from sftkit.config.schema import CheckpointingConfig
from sftkit.data import PreparedData
from sftkit.data.loader import GlobalBatchSampler
from sftkit.dist import DistEnv
from sftkit.log.model_card import write_model_card
from sftkit.log.redact import scrub
from sftkit.model.builtin import adapter_base_name
from sftkit.model.load import save_hf
from sftkit.model.lora import LoraSpec, lora_modules, merge_lora, save_adapter
from sftkit.model.parallel import load_sharded_weights
from sftkit.train import checkpoint as ckpt
from sftkit.train.safe_load import dcp_load, load_state_file
from sftkit.train.state import TrainState, rng_state, set_rng_state

logger = logging.getLogger("sftkit")


@dataclass
class Checkpointer:
    """Saves and loads the run's model, optimizer, scheduler, sampler, RNG and counters."""

    cfg: MasterConfig
    env: DistEnv
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch LRScheduler (state_dict / load_state_dict)
    sampler: GlobalBatchSampler
    tokenizer: Any
    lora: LoraSpec | None
    fingerprint: dict[str, Any]  # `resume_fingerprint`, stored in and checked against info
    resume_dir: Path | None = None  # `pick_resume_dir`'s choice, read by `load`
    unmeasured_warned: bool = False  # the "metric not measured" warning is said once a run

    @property
    def directory(self) -> Path:
        return Path(self.cfg.checkpointing.checkpoint_dir)

    def should_save(self, step: int, last_step: bool, stopping: bool = False) -> bool:
        """Save at the last step, every `save_period` / `ft_save_period` steps, and before
        stopping early (signal or deadline); never when checkpointing is off."""
        c = self.cfg.checkpointing
        if not c.enabled:
            return False
        periodic = c.save_period > 0 and step % c.save_period == 0
        ft = bool(c.ft_save_period) and step % c.ft_save_period == 0  # type: ignore[operator]
        return last_step or periodic or ft or stopping

    def save(self, state: TrainState, last: bool = False) -> Path:
        """An atomic checkpoint of everything the next step depends on, then retention.

        `last`: the run's final or stopping save; it stays the latest checkpoint, so an
        unmeasured ranking metric costs nothing there and is not warned about."""
        c = self.cfg.checkpointing
        # A misaligned save_period was reported once at load (unmeasured_saves).
        warn = not (last or self.unmeasured_warned) and unmeasured_saves(self.cfg) is None
        self.unmeasured_warned |= warn and c.metric_name not in state.metrics
        ckpt.check_finite_weights(self.model.parameters(), state.step, self.env.max)
        state.epoch = self.sampler.epoch
        info = {**state.to_json(), "format_version": ckpt.FORMAT_VERSION}
        info["fingerprint"] = {
            k: v for k, v in self.fingerprint.items() if k != ckpt.LEGACY_FINGERPRINT
        }
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        path = ckpt.save_checkpoint(
            self.directory, state.step, info, self._write_files, self.env.rank, self.env.barrier,
            size_hint=weights * (3 if c.save_optimizer else 1),  # Adam: weights + 2 moments
        )  # fmt: skip
        if self.env.is_main:
            ckpt.apply_retention(
                self.directory, c.metric_name, c.keep_top_k, c.higher_is_better,
                c.ft_keep_latest_k, warn_missing=warn,
            )  # fmt: skip
            logger.info("Saved checkpoint %s", path)
        return path

    def _write_files(self, directory: Path) -> None:
        """This rank's files of a checkpoint in `directory` (called on every rank)."""
        c = self.cfg.checkpointing
        rank, sharded = self.env.rank, self.env.world_size > 1
        (directory / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), directory / "rng" / f"rank_{rank}.pt")
        if sharded:  # every rank writes its shards (policy/dcp, torch.distributed.checkpoint)
            optimizer = self.optimizer if c.save_optimizer else None
            save_sharded(self.model, optimizer, directory / "policy" / "dcp", self.lora is not None)
            if c.save_consolidated:
                self.export_hf(directory / "policy" / "consolidated", merge=False)
        if rank != 0:
            return
        (directory / "config.yaml").write_text(config_to_yaml(self.cfg))
        torch.save(self.sampler.state_dict(), directory / "train_dataloader.pt")
        opt_dir = directory / "policy" / "optimizer"
        if c.save_optimizer:
            opt_dir.mkdir(parents=True, exist_ok=True)
            torch.save(self.scheduler.state_dict(), opt_dir / "scheduler.pt")
        if not sharded:
            save_model_weights(
                self.model, directory / "policy" / "weights", trainable_only=self.lora is not None
            )
            if c.save_optimizer:
                torch.save(self.optimizer.state_dict(), opt_dir / "optimizer.pt")
        self.tokenizer.save_pretrained(directory / "policy" / "tokenizer")
        if c.save_consolidated and not sharded:
            self.export_hf(directory / "policy" / "consolidated", merge=False)

    def load(self) -> TrainState:
        """Restore model, optimizer, scheduler, data position and RNG from `resume_dir`;
        returns its counters (a fresh `TrainState` when there is nothing to resume)."""
        directory = self.resume_dir
        if directory is None:
            return TrainState()
        opt_dir = directory / "policy" / "optimizer"
        with_optimizer = (opt_dir / "scheduler.pt").exists()
        load_policy(
            self.model,
            self.optimizer if with_optimizer else None,
            directory,
            trainable_only=self.lora is not None,
            world_size=self.env.world_size,
        )
        if with_optimizer:
            self.scheduler.load_state_dict(load_state_file(opt_dir / "scheduler.pt"))
        else:
            logger.warning(
                "%s has no optimizer state (save_optimizer=false): fresh optimizer", directory
            )
        sampler_state = load_state_file(directory / "train_dataloader.pt")
        self.sampler.load_state_dict(sampler_state)
        rng_file = directory / "rng" / f"rank_{self.env.rank}.pt"
        if rng_file.exists():
            set_rng_state(load_state_file(rng_file))
        state = TrainState.from_json(ckpt.read_info(directory))
        logger.info("Resumed from %s at step %d", directory, state.step)
        return state

    def export_hf(self, directory: Path, merge: bool) -> None:
        """HF directory of the current weights; LoRA runs merge (in place only when `merge`).

        Sharded runs gather the full weights to rank 0 (collective: every rank calls)."""
        if self.env.world_size > 1:
            gather_hf(self.model, self.tokenizer, directory, self.env.is_main, merge_lora=True)
            return
        if self.lora is None:
            save_hf(self.model, self.tokenizer, directory)
            return
        model = self.model if merge else copy.deepcopy(self.model)
        merge_lora(model)
        save_hf(model, self.tokenizer, directory)

    def save_final(self, step: int, exp_dir: Path | None) -> Path:
        """Write `final_hf/` (and `final_adapter/` for LoRA) under the checkpoint directory,
        or with checkpointing disabled under the run's `exp_dir` (None off rank 0, which
        writes nothing), each atomically (a kill never leaves half a model there); refused
        when the weights are non-finite."""
        out = self.directory if self.cfg.checkpointing.enabled else exp_dir or self.directory
        ckpt.check_finite_weights(self.model.parameters(), step, self.env.max)
        if self.lora is not None:
            base = adapter_base_name(self.cfg.policy.model_name)  # loadable without sftkit
            with ckpt.atomic_output_dir(out / "final_adapter", write=self.env.is_main) as tmp:
                save_adapter(self.model, tmp, base, self.lora)
        if self.env.is_main or self.env.world_size > 1:  # sharded: every rank gathers
            with ckpt.atomic_output_dir(out / "final_hf", write=self.env.is_main) as tmp:
                self.export_hf(tmp, merge=True)
                if self.env.is_main:
                    write_model_card(
                        tmp, self.cfg, step, exp_dir, adapter_base_name(self.cfg.policy.model_name)
                    )
        if self.env.is_main:
            logger.info("Final model: %s", out / "final_hf")
        self.env.barrier()
        return out / "final_hf"


# ----------------------------------------------------------------------------- resume pick


def resume_fingerprint(cfg: MasterConfig, tokenizer: Any, data: PreparedData) -> dict[str, Any]:
    """What makes resuming meaningful, keyed on the effective (derived) values: a LoRA set
    through Megatron's peft or lora_cfg alike, the length limit actually applied. Micro-batch
    size, token budget and `use_triton` are left out: they cannot change the loss or the
    gradient, so changing them to fit memory or a layout is allowed.

    `ckpt.LEGACY_FINGERPRINT` holds the raw-value form that checkpoints written before
    derived values stored; `ckpt.check_resumable` compares such a checkpoint against it."""
    p = cfg.policy
    template = getattr(tokenizer, "chat_template", None) or ""
    lora = asdict(p.dtensor_cfg.lora_cfg)  # Megatron's peft is translated into it at load
    lora.pop("use_triton")
    common = {
        # scrubbed: training_info.json is written as is (a URL password in a model path
        # must not reach it); both sides of the resume check are scrubbed alike
        "model": scrub(p.model_name),
        "tokenizer": scrub(str(p.tokenizer.name)),
        "chat_template_sha": hashlib.sha256(str(template).encode()).hexdigest()[:16],
        "train_data": data.train.digest(),  # tokens, masks, dataset names and weights
        "train_global_batch_size": p.train_global_batch_size,
        "seed": cfg.sft.seed,
        "shuffle": cfg.data.shuffle,
    }
    # The old form keyed on the raw lora_cfg; after load it differs from the effective one
    # only in lora_dtype (new) and use_triton (turned off under TP; True is its default).
    d = p.dtensor_cfg
    raw_lora = {k: v for k, v in lora.items() if k != "lora_dtype"}
    raw_lora["use_triton"] = d.lora_cfg.use_triton or d.tensor_parallel_size > 1
    legacy_lora = raw_lora if lora["enabled"] and not p.megatron_cfg.enabled else None
    return {
        **common,
        "fingerprint_version": 2,
        "lora": lora if lora["enabled"] else None,
        "max_input_seq_length": cfg.data.max_input_seq_length,  # the limit applied
        ckpt.LEGACY_FINGERPRINT: {
            **common,
            "lora": legacy_lora,
            "megatron_peft": asdict(p.megatron_cfg.peft) if p.megatron_cfg.enabled else None,
            "max_total_sequence_length": p.max_total_sequence_length,
        },
    }


def pick_resume_dir(
    c: CheckpointingConfig, fingerprint: dict[str, Any], env: DistEnv
) -> Path | None:
    """The checkpoint to resume from, or None (after moving old ones aside if starting fresh).

    Runs before the (slow) model load, so a mismatch is reported at once."""
    if not c.enabled:
        return None
    directory = Path(c.checkpoint_dir)
    latest = ckpt.latest_checkpoint(directory)
    if latest is not None and c.resume:
        try:
            ckpt.check_resumable(latest, fingerprint)
            return latest
        except ckpt.ResumeMismatchError:
            if c.resume_mismatch != "fresh":
                raise
            logger.warning("Checkpoint %s does not match this run: starting fresh", latest)
    if env.is_main and ckpt.step_dirs(directory):
        ckpt.archive_old_checkpoints(directory)
    env.barrier()
    return None


# ----------------------------------------------------------------------------- model weights


def load_policy(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    directory: Path,
    trainable_only: bool,
    world_size: int,
) -> None:
    """The model (and `optimizer`, when given) from checkpoint `directory` of any rank count.

    `trainable_only`: a LoRA run, whose checkpoints hold the LoRA weights only."""
    opt_dir, dcp_dir = directory / "policy" / "optimizer", directory / "policy" / "dcp"
    if dcp_dir.is_dir():
        load_sharded(model, optimizer, dcp_dir, trainable_only=trainable_only)
    elif world_size > 1:
        files = sorted((directory / "policy" / "weights").glob("*.safetensors"))
        load_sharded_weights(model, files, lambda name: not trainable_only or ".lora_" in name)
        if optimizer is not None:
            load_full_optimizer_state(model, optimizer, opt_dir / "optimizer.pt")
    else:
        load_model_weights(model, directory / "policy" / "weights")
        if optimizer is not None:
            optimizer.load_state_dict(load_state_file(opt_dir / "optimizer.pt"))


def save_model_weights(model: nn.Module, directory: Path, trainable_only: bool) -> Path:
    """Write the model's weights (or only its trainable ones) as one safetensors file."""
    from safetensors.torch import save_file, save_model

    directory.mkdir(parents=True, exist_ok=True)
    if trainable_only:
        path = directory / "trainable.safetensors"
        tensors = {
            name: p.detach().contiguous().cpu()
            for name, p in model.named_parameters()
            if p.requires_grad
        }
        save_file(tensors, path)
    else:
        path = directory / "model.safetensors"
        save_model(model, str(path))  # handles tied (shared) tensors
    return path


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """Inverse of save_model_weights; strict about names so a mismatch is loud."""
    from safetensors.torch import load_file, load_model

    full = directory / "model.safetensors"
    if full.exists():
        missing, unexpected = load_model(model, str(full), strict=False)
        if unexpected or missing:
            raise ValueError(
                f"{full} does not fit the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        return
    tensors = load_file(str(directory / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"{directory}: checkpoint has parameters the model lacks: {unknown[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


# ----------------------------------------------------------------------------- sharded state


def _state_options(trainable_only: bool, full: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, full_state_dict=full)


def save_sharded(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    directory: Path,
    trainable_only: bool,
) -> None:
    """Model (and optimizer) state through torch.distributed.checkpoint: each rank writes
    its own shards, keyed by parameter name, so any number of ranks can load them back.
    Collective: every rank calls. `trainable_only` leaves frozen (LoRA base) weights out."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    options = _state_options(trainable_only)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state: dict[str, Any] = {"model": get_model_state_dict(model, options=options)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state = {"model": model_sd, "optim": optim_sd}
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    directory: Path,
    trainable_only: bool,
) -> None:
    """Inverse of `save_sharded`, resharding to this run's ranks (one process works too).
    The checkpoint is untrusted: its metadata loads through `safe_load`'s allow-list."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    options = _state_options(trainable_only)
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model, options=options)}
        dcp_load(state, directory)
        set_model_state_dict(model, state["model"], options=options)
        return
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp_load(state, directory)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=options,
    )


def load_full_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path
) -> None:
    """Load a one-process `optimizer.state_dict()` file (keyed by parameter index) into a
    sharded run's optimizer: indices become names, then each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    saved = load_state_file(path)
    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    full: dict[str, Any] = {
        "state": {fqns[int(i)]: value for i, value in saved["state"].items()},
        "param_groups": [
            {**group, "params": [fqns[int(i)] for i in group["params"]]}
            for group in saved["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, full, options=_state_options(False, full=True))


# ----------------------------------------------------------------------------- HF directories


def gather_hf(
    model: nn.Module, tokenizer: Any, directory: Path, is_main: bool, merge_lora: bool
) -> None:
    """An HF directory of a sharded (FSDP2/TP) model: the full state dict is gathered to
    rank 0's CPU and written there. Collective: every rank calls; the model is unchanged.

    LoRA layers are merged into the written weights when `merge_lora` (W + scale * B @ A)
    and left out otherwise.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))
    if not is_main:
        return
    for name, module in lora_modules(model).items():
        a, b = state.pop(f"{name}.lora_A.weight"), state.pop(f"{name}.lora_B.weight")
        if merge_lora:
            weight = state[f"{name}.weight"]
            delta = module.lora_scale * (b.float() @ a.float())
            state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    save_hf_state_dict(model, state, tokenizer, directory)


def save_hf_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], tokenizer: Any, directory: Path
) -> None:
    """Write `state` as the HF model directory of `model` (config, safetensors, tokenizer)."""
    from huggingface_hub import save_torch_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    config: Any = copy.deepcopy(model.config)
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # stored once, as the input embeddings
    save_torch_state_dict(state, directory)
    # FSDP2 subclasses the model class on the fly (`FSDPLlamaForCausalLM`): name the original.
    original = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers"))
    config.architectures = [original.__name__]
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
