"""Model and optimizer tensors on disk: one safetensors file (one process), DCP shards
(several ranks, `torch.distributed.checkpoint`), and HF directories gathered from shards.

Any checkpoint loads into any rank count: DCP reshards `policy/dcp`, and a one-process
checkpoint is sliced per rank (`load_sharded_weights`, `load_full_optimizer_state`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from sftkit.checkpoint.layout import StepDir
from sftkit.checkpoint.safe_load import dcp_load, load_state_file
from sftkit.model import dora
from sftkit.model.lora import lora_modules
from sftkit.model.lora_experts import merge_expert_lora_state
from sftkit.model.parallel import load_sharded_weights

logger = logging.getLogger("sftkit")


# ----------------------------------------------------------------------------- the parts


@dataclass
class ModelPart:
    """The policy's weights as a checkpoint part (LoRA runs: only the trainable ones).

    One process writes `policy/weights/*.safetensors`; several ranks add their shards to the
    step's one DCP save (`policy/dcp`, key "model"). Either loads into any rank count."""

    model: nn.Module
    trainable_only: bool  # a LoRA run: the frozen base comes from the model, not the checkpoint
    world_size: int
    staging: Staging = field(default_factory=lambda: Staging())  # an async save's copies

    def state_dict(self) -> dict[str, Any]:
        """By parameter name, this rank's shards (DCP's form)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=_state_options(self.trainable_only))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state, options=_state_options(self.trainable_only))

    def save(self, step: StepDir, rank: int, shards: dict[str, Any]) -> None:
        write = self.stage(step, rank, shards, snapshot=False)
        if write is not None:
            write()

    def stage(
        self, step: StepDir, rank: int, shards: dict[str, Any], snapshot: bool = True
    ) -> Callable[[], None] | None:
        """`save` in two halves: what to write is taken now (`snapshot`: a CPU copy, so training
        may go on), the returned function writes it. Sharded state goes to `shards` (DCP
        copies it when the async save starts)."""
        if self.world_size > 1:
            shards["model"] = self.state_dict()
            return None
        if rank != 0:
            return None
        staging = self.staging if snapshot else None
        tensors, metadata, name = model_tensors(self.model, self.trainable_only, staging)
        return lambda: write_tensors(tensors, metadata, step.weights / name)

    def load(self, step: StepDir, rank: int) -> None:
        if step.dcp.is_dir():
            shards = {"model": self.state_dict()}
            dcp_load(shards, step.dcp)
            self.load_state_dict(shards["model"])
        elif self.world_size > 1:
            files = sorted(step.weights.glob("*.safetensors"))
            trainable = self.trainable_only
            load_sharded_weights(self.model, files, lambda name: not trainable or ".lora_" in name)
        else:
            load_model_weights(self.model, step.weights)


@dataclass
class OptimizerPart:
    """The optimizer's state as a checkpoint part, saved with `checkpointing.save_optimizer`.

    One process writes `policy/optimizer/optimizer.pt`; several ranks add their shards to
    the step's DCP save (key "optim"). A checkpoint without it resumes with a fresh one."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    trainable_only: bool
    world_size: int
    enabled: bool = True  # checkpointing.save_optimizer
    staging: Staging = field(default_factory=lambda: Staging())  # an async save's copies

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        options = _state_options(self.trainable_only)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        options = _state_options(self.trainable_only)
        set_optimizer_state_dict(self.model, self.optimizer, state, options=options)

    def save(self, step: StepDir, rank: int, shards: dict[str, Any]) -> None:
        write = self.stage(step, rank, shards, snapshot=False)
        if write is not None:
            write()

    def stage(
        self, step: StepDir, rank: int, shards: dict[str, Any], snapshot: bool = True
    ) -> Callable[[], None] | None:
        """`save` in two halves, as `ModelPart.stage`."""
        if not self.enabled:
            return None
        if self.world_size > 1:
            shards["optim"] = self.state_dict()
            return None
        if rank != 0:
            return None
        state = self.optimizer.state_dict()
        state = cpu_copy(state, self.staging) if snapshot else state  # the live moments

        def write() -> None:
            step.optimizer_dir.mkdir(parents=True, exist_ok=True)
            torch.save(state, step.optimizer)

        return write

    def load(self, step: StepDir, rank: int) -> None:
        if not step.has_optimizer:
            logger.warning(
                "%s has no optimizer state (save_optimizer=false): fresh optimizer", step.path
            )
        elif step.dcp.is_dir():
            shards = {"optim": self.state_dict()}
            dcp_load(shards, step.dcp)
            self.load_state_dict(shards["optim"])
        elif self.world_size > 1:
            load_full_optimizer_state(self.model, self.optimizer, step.optimizer)
        else:
            self.optimizer.load_state_dict(load_state_file(step.optimizer))


# ----------------------------------------------------------------------------- model weights


class Staging:
    """CPU buffers an async save copies the state into, reused from save to save (one in
    flight: the previous save is written before the next copies). Allocating and first
    touching fresh memory made the copy of a 25M-parameter model with Adam 2-5x slower
    (0.1-0.4 s against 0.06 s) on the training thread."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self.buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype)
        return buffer.copy_(tensor.detach())


def model_tensors(
    model: nn.Module, trainable_only: bool, staging: Staging | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str] | None, str]:
    """What `write_tensors` writes for the model (or only its trainable weights): tensors,
    safetensors metadata and file name. `staging`: copies in its CPU buffers, unaffected by
    later steps (else the tensors themselves)."""
    from safetensors.torch import _remove_duplicate_names

    metadata: dict[str, str] | None = None
    if trainable_only:
        name = "trainable.safetensors"
        tensors = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    else:
        name = "model.safetensors"
        tensors = dict(model.state_dict())
        # tied tensors (embeddings = lm_head) are stored once, as safetensors' save_model does
        for kept, removed in _remove_duplicate_names(tensors).items():
            for other in removed:
                metadata = {**(metadata or {}), other: kept}
                del tensors[other]
    if staging is not None:
        return {n: staging.copy(n, t) for n, t in tensors.items()}, metadata, name
    return {n: t.contiguous().cpu() for n, t in tensors.items()}, metadata, name


def cpu_copy(tree: Any, staging: Staging | None = None, key: str = "") -> Any:
    """`tree` (dicts, lists, tuples) with every tensor copied to CPU memory (into `staging`'s
    buffers when given): what a background writer may write while training changes the
    originals."""
    if isinstance(tensor := tree, torch.Tensor):
        if staging is not None:
            return staging.copy(key, tensor)
        return tensor.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: cpu_copy(v, staging, f"{key}/{k}") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cpu_copy(v, staging, f"{key}/{i}") for i, v in enumerate(tree))
    return copy.deepcopy(tree)


def write_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, path: Path
) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)


def save_model_weights(model: nn.Module, directory: Path, trainable_only: bool) -> Path:
    """Write the model's weights (or only its trainable ones) as one safetensors file."""
    tensors, metadata, name = model_tensors(model, trainable_only)
    write_tensors(tensors, metadata, directory / name)
    return directory / name


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


def save_shards(
    shards: dict[str, Any], directory: Path, group: Any = None, defer: bool = False
) -> Callable[[], None] | None:
    """The parts' shards through torch.distributed.checkpoint: each rank writes its own,
    keyed by parameter name, so any number of ranks can load them back (collective).

    `defer`: DCP's `async_save` over `group` (gloo: it runs off the training thread); the
    shards are copied to CPU before it returns, the returned function waits for the write."""
    import torch.distributed.checkpoint as dcp

    directory.mkdir(parents=True, exist_ok=True)
    if not defer:
        dcp.save(shards, checkpoint_id=str(directory))
        return None
    # a Future: no async_stager is given (that would return an AsyncSaveResponse)
    future = cast(Future, dcp.async_save(shards, checkpoint_id=str(directory), process_group=group))

    def wait() -> None:
        future.result()

    return wait


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
    for key, value in state.items():  # QLoRA: HF directories hold the dequantized base
        if type(value).__name__ == "NF4Tensor":
            state[key] = value.to(value.dtype)
    for name, module in lora_modules(model).items():
        a, b = state.pop(f"{name}.lora_A.weight"), state.pop(f"{name}.lora_B.weight")
        m = state.pop(f"{name}.{dora.MAGNITUDE}.weight", None)
        if merge_lora:
            weight = state[f"{name}.weight"]
            if m is not None:
                merged = dora.merged_weight(weight, a, b, module.lora_scale, m)
            else:
                merged = weight.float() + module.lora_scale * (b.float() @ a.float())
            state[f"{name}.weight"] = merged.to(weight.dtype)
    merge_expert_lora_state(model, state, merge_lora)
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
    # The layout `save_pretrained` writes: fused MoE experts back to one matrix per expert
    # where the family's checkpoints keep them so (transformers' conversion mapping).
    from transformers.core_model_loading import revert_weight_conversion

    reverted = revert_weight_conversion(cast(Any, model), state)
    # the per-expert matrices are views of one fused tensor; safetensors stores each alone
    state = {k: v if k in state else v.clone() for k, v in reverted.items()}
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
