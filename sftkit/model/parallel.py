"""The scale-out transforms `sftkit.model.build.build_model` applies, and loading weights
shard by shard into a sharded model.

`ParallelDims.mesh` gives the ("dp_replicate", "dp_shard", "cp", "tp") mesh; DTensor tensor
parallelism runs over "tp" and FSDP2 `fully_shard` (per decoder layer, then the root) over
"dp_shard_cp", with float32 master weights and float32 gradient reduction, computing in
`policy.precision`. With `dp_replicate_size` > 1 `fully_shard` on the 2-D
("dp_replicate", "dp_shard_cp") mesh is HSDP.
A sharded model is built on the meta device, transformed, then allocated (`materialize`)
and filled block by block (`load_sharded_weights`, `init_lora_sharded`).
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint

from sftkit.dist import DistEnv
from sftkit.model.load import decoder_layers
from sftkit.model.moe import expert_modules, file_key, per_expert_reader

logger = logging.getLogger("sftkit")


# ----------------------------------------------------------------------------- activation checkpointing


AC_MODES = ("full", "selective")


def _selective_save_ops() -> set[Any]:
    """The ops whose outputs selective checkpointing keeps: matmuls and attention kernels.

    They are where a layer's compute is; everything else in a layer (RMSNorm, RoPE, SiLU,
    the gate product, residual adds, dtype casts) is elementwise and recomputed in a few
    percent of the layer's time, yet its outputs are about half of what a layer saves: on
    the Llama-3.1-8B shape the norms' float32 outputs, SiLU(gate) and SiLU(gate) x up alone
    take 90 KB per token and layer (2 x 4096 x 4 B + 2 x 14336 x 2 B), all the bf16 matmul
    outputs (q, k, v, attention, o, gate, up, down) 94 KB.
    """
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_flash_attention_forward", "_efficient_attention_forward")  # fmt: skip
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _selective_context() -> Any:
    """Forward and recompute contexts of selective checkpointing (torch's SAC)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = _selective_save_ops()

    def policy(_ctx: Any, op: Any, *_args: Any, **_kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(
    model: nn.Module, mode: str | None = "full", offload: bool = False
) -> None:
    """Recompute each decoder layer in backward (`mode`), and/or keep what it saves for
    backward in host memory (`offload`).

    `mode`: "full" keeps only each layer's input; "selective" also keeps the outputs of its
    matmuls and attention (`_selective_save_ops`) and recomputes the elementwise rest;
    None: no recomputation (offload alone). `offload` puts the saved tensors in pinned host
    memory (torch's `save_on_cpu`, outside the checkpoint): with "full" that is just the
    layer inputs, 2 B x hidden per token and layer, which at 128k tokens on the 8B shape is
    32 GiB of GPU memory for a copy over PCIe per layer; without recomputation it is every
    activation, which is slower than recomputing them.

    The layer's `forward` is wrapped in place (names, and module hooks such as FSDP2's,
    stay as they are); keyword arguments (rotary tables, masks: shared by all layers) are
    held by the wrapper, not saved or offloaded.
    """
    if mode is not None and mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}: choose one of {AC_MODES}")
    for layer in decoder_layers(model):
        layer.forward = _checkpointed(layer.forward, mode, offload)


# Selective checkpointing's kept tensors bypass an outer `save_on_cpu` unless told (torch
# 2.15 warns that the default will change); older versions have no such argument.
_SAC_TAKES_HOOKS = "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters


def _checkpointed(inner: Callable[..., Any], mode: str | None, offload: bool) -> Any:
    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation: nothing is saved
            return inner(*args, **kwargs)
        with _offload_context(args) if offload else nullcontext():
            if mode is None:
                return inner(*args, **kwargs)
            options: dict[str, Any] = {"use_reentrant": False}
            if mode == "selective":
                options["context_fn"] = _selective_context
                if _SAC_TAKES_HOOKS:  # the kept outputs are offloaded too (torch >= 2.15)
                    options["respect_saved_tensors_hooks"] = True
            return checkpoint(functools.partial(inner, **kwargs), *args, **options)

    return forward


def _offload_context(args: tuple[Any, ...]) -> Any:
    """`save_on_cpu`, with pinned host memory (asynchronous copies) for CUDA tensors."""
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    return save_on_cpu(pin_memory=cuda)


# ----------------------------------------------------------------------------- FSDP2


def apply_fsdp(
    model: nn.Module,
    dp_mesh: Any,
    param_dtype: torch.dtype | None,
    cpu_offload: bool,
    expert_mesh: Any = None,
) -> None:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, lm_head).

    Parameters stay as loaded (float32 masters unless `bf16_params`); FSDP all-gathers them
    in `param_dtype` and reduce-scatters gradients in float32, averaging over ranks.
    `expert_mesh` (EP: "efsdp", with "dp_replicate" for HSDP): each expert-parallel experts
    module is its own FSDP2 unit over it, first (`model/moe.py` already divides its
    gradients by ep, so averaging over this mesh divides by every data-parallel rank).
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    options: dict[str, Any] = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    if expert_mesh is not None:
        for _, module in expert_modules(model):
            if hasattr(module, "_sftkit_ep"):
                fully_shard(module, **{**options, "mesh": expert_mesh})
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    _route_body_through_root(model)


def _route_body_through_root(model: nn.Module) -> None:
    """Let `model.model(...)` (the chunked loss calls the decoder body, then uses
    `lm_head.weight` directly) run the root's FSDP pre/post-forward, as `model(...)` does.

    Without this the root's parameters (embeddings, final norm, lm_head) would stay sharded
    and their gradients unreduced. This is what `register_fsdp_forward_method` does for a
    method of the root; here the method lives on a child, so it is done with module hooks,
    skipped while the root's own forward is running. Can go when the loss calls the root.
    """
    body = getattr(model, "model", None)
    if not isinstance(body, nn.Module):
        return
    state = model._get_fsdp_state()  # type: ignore[operator]
    inside_root: list[bool] = [False]
    standalone: list[bool] = []

    def root_enter(_module: nn.Module, args: Any, kwargs: Any) -> None:
        inside_root[0] = True

    def root_exit(_module: nn.Module, _args: Any, _output: Any) -> None:
        inside_root[0] = False

    def body_enter(_module: nn.Module, args: Any, kwargs: Any) -> Any:
        standalone.append(not inside_root[0])
        if inside_root[0]:
            return None
        return state._pre_forward(model, args, kwargs)

    def body_exit(_module: nn.Module, args: Any, output: Any) -> Any:
        if not standalone.pop():
            return None
        return state._post_forward(model, args, output)

    model.register_forward_pre_hook(root_enter, with_kwargs=True, prepend=True)
    model.register_forward_hook(root_exit)
    body.register_forward_pre_hook(body_enter, with_kwargs=True, prepend=True)
    body.register_forward_hook(body_exit)


# ----------------------------------------------------------------------------- tensor parallel


def _partition_lora_linear(name: str, module: nn.Module, mesh: Any, col: bool) -> None:
    """Split a Linear layer that may carry LoRA's A and B (`sftkit.model.lora`).

    Column-wise: W, bias and B split by output rows, A replicated. Row-wise: W and A split
    by input columns, B and the bias replicated. Any split would be correct (DTensor
    redistributes); this one adds no communication to the LoRA branch.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    leaf = name.rsplit(".", 1)[-1]
    for pname, param in list(module.named_parameters(recurse=False)):
        if col:
            place = Replicate() if leaf == "lora_A" else Shard(0)
        else:
            place = Shard(1) if pname == "weight" and leaf != "lora_B" else Replicate()
        dparam = distribute_tensor(param, mesh, [place], src_data_rank=None)
        module.register_parameter(pname, nn.Parameter(dparam, param.requires_grad))


@functools.cache
def _style_classes() -> tuple[type, type]:
    """ColwiseParallel / RowwiseParallel that also split LoRA branches."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    class LoraColwiseParallel(ColwiseParallel):
        def _partition_linear_fn(self, name: str, module: nn.Module, mesh: Any) -> None:
            _partition_lora_linear(name, module, mesh, col=True)

    class LoraRowwiseParallel(RowwiseParallel):
        def _partition_linear_fn(self, name: str, module: nn.Module, mesh: Any) -> None:
            _partition_lora_linear(name, module, mesh, col=False)

    return LoraColwiseParallel, LoraRowwiseParallel


def _style(name: str, pattern: str) -> Any:
    """A torch ParallelStyle for an HF plan style name."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import SequenceParallel

    col, row = _style_classes()
    table = {
        "colwise": lambda: col(),
        "rowwise": lambda: row(),
        "colwise_rep": lambda: col(output_layouts=Replicate()),
        "colwise_gather_output": lambda: col(output_layouts=Replicate()),
        "rowwise_rep": lambda: row(input_layouts=Replicate()),
        "sequence_parallel": lambda: SequenceParallel(),
    }
    if name not in table:
        raise ValueError(
            f"tensor-parallel plan {pattern}: {name!r} is not one of {sorted(table)}; "
            "use a torch ParallelStyle object instead"
        )
    return table[name]()


def _hf_plan(model: nn.Module) -> dict[str, str]:
    """The model's own plan (`config.base_model_tp_plan`, prefixed with the body's name).

    The lm_head entry is left out: the chunked loss multiplies by `lm_head.weight` itself,
    so the head stays whole per tensor-parallel rank (FSDP still shards it over dp ranks).
    So is the vocabulary-parallel embedding some transformers versions add for tied
    embeddings (`embed_tokens: embedding_rowwise`, 5.17): its weight is that same head.
    """
    base = getattr(getattr(model, "config", None), "base_model_tp_plan", None) or {}
    prefix = getattr(model, "base_model_prefix", "model")
    if not base:
        raise ValueError(
            f"{type(model).__name__} has no tensor-parallel plan (config.base_model_tp_plan); "
            "set policy.dtensor_cfg.custom_parallel_plan to a dotted path of a plan "
            "(dict of module pattern -> 'colwise' | 'rowwise' | ParallelStyle)"
        )
    return {f"{prefix}.{k}": v for k, v in base.items() if v != "embedding_rowwise"}


def _sequence_parallel_plan(model: nn.Module) -> dict[str, Any]:
    """Sequence-sharded norms and residual stream between layers (Llama-style names).

    The residual stream is split along the sequence from the first layer's input to the
    final norm's output, which is gathered back so the loss sees whole rows; the causal
    mask and rotary embeddings are built on whole rows before the first layer.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        PrepareModuleInput,
        PrepareModuleOutput,
        SequenceParallel,
    )

    layers = decoder_layers(model)
    body = getattr(model, "base_model_prefix", "model")
    needed = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    if not all(hasattr(layers[0], n) for n in needed) or not hasattr(model.model, "norm"):
        raise ValueError(
            "policy.dtensor_cfg.sequence_parallel needs Llama-style layer names "
            f"({', '.join(needed)}, norm); give a custom_parallel_plan for this model"
        )
    seq, rep = Shard(1), Replicate()
    plan: dict[str, Any] = {
        f"{body}.layers.0": PrepareModuleInput(
            input_layouts=(rep,), desired_input_layouts=(seq,), use_local_output=True
        ),
        f"{body}.norm": [
            SequenceParallel(),
            PrepareModuleOutput(output_layouts=seq, desired_output_layouts=rep),
        ],
        f"{body}.layers.*.input_layernorm": SequenceParallel(),
        f"{body}.layers.*.post_attention_layernorm": SequenceParallel(),
        f"{body}.layers.*.self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": seq},
            desired_input_kwarg_layouts={"hidden_states": rep},
            use_local_output=True,
        ),
        f"{body}.layers.*.mlp": PrepareModuleInput(
            input_layouts=(seq,), desired_input_layouts=(rep,), use_local_output=True
        ),
    }
    return plan


def tensor_parallel_plan(
    model: nn.Module, custom: str | None, sequence_parallel: bool
) -> dict[str, Any]:
    """Module pattern -> style(s): `custom_parallel_plan` (dotted path to a dict, or to a
    function of the model returning one) else the model's own plan; plus sequence parallel.

    Patterns use `*` for one name component (`model.layers.*.mlp.up_proj`); values are HF
    style names ('colwise', 'rowwise', ...) or torch `ParallelStyle` objects.
    """
    if custom:
        from sftkit.config.dotted import import_object

        found = import_object(custom, "policy.dtensor_cfg.custom_parallel_plan")
        plan = dict(found(model) if callable(found) else found)
    else:
        plan = _hf_plan(model)
    if not sequence_parallel:
        return plan
    from torch.distributed.tensor import Shard

    _, row = _style_classes()
    for key, value in plan.items():  # row-parallel outputs leave the region sequence-sharded
        if value == "rowwise":
            plan[key] = row(output_layouts=Shard(1))
    return {**plan, **_sequence_parallel_plan(model)}


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + ".".join(fnmatch.translate(p)[4:-3] for p in pattern.split(".")) + "$")


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any, plan: dict[str, Any]) -> None:
    """Apply `plan` module by module (`parallelize_module`); every pattern must match."""
    from torch.distributed.tensor.parallel import parallelize_module

    names = [n for n, _ in model.named_modules() if n]
    config = getattr(model, "config", None)
    heads = getattr(config, "num_key_value_heads", None) or getattr(
        config, "num_attention_heads", 0
    )
    if heads and heads % tp_mesh.size():
        raise ValueError(
            f"tensor_parallel_size={tp_mesh.size()} does not divide the model's "
            f"{heads} key/value heads; pick a divisor"
        )
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for pattern, value in plan.items():
        regex = _pattern_regex(pattern)
        matched = [n for n in names if regex.match(n)]
        if not matched:
            raise ValueError(f"tensor-parallel plan entry {pattern!r} matches no module")
        for value_one in value if isinstance(value, list) else [value]:
            for name in matched:
                style = _style(value_one, pattern) if isinstance(value_one, str) else value_one
                parallelize_module(model.get_submodule(name), tp_mesh, style)
    # torch's SequenceParallel re-creates the norms' weights as new Parameters that require
    # grad, which made frozen norms trainable under LoRA (the gradient norm was off by 1e-4).
    for name, param in model.named_parameters():
        param.requires_grad_(trainable[name])


# ----------------------------------------------------------------------------- meta loading


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device and buffers as usual (rotary tables
    keep their values); each parameter is allocated once, uninitialised, then dropped."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            meta = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            self._parameters[name] = meta

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_meta_model(
    model_name: str,
    *,
    param_dtype: torch.dtype,
    trust_remote_code: bool,
    attn_implementation: str | None,
    config_overrides: dict[str, Any],
    dequantize: bool = False,
    check_size: bool = True,
) -> nn.Module:
    """The HF model's architecture with parameters on the meta device (no weights read)."""
    from transformers import AutoModelForCausalLM

    from sftkit.model.load import keep_attention_softcap, model_config
    from sftkit.model.mxfp4 import drop_quantization, plan_dequantize

    _, config = model_config(model_name, trust_remote_code, config_overrides, check_size)
    if plan_dequantize(config, model_name, dequantize):  # read in load_sharded_weights
        drop_quantization(config)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    config.use_cache = False
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(
            config, dtype=param_dtype, trust_remote_code=trust_remote_code
        )
    keep_attention_softcap(model)
    return model


def weight_files(model_name: str, env: DistEnv) -> list[Path]:
    """The safetensors files of a model (local directory, `sftkit:` built-in or hub id)."""
    from sftkit.model.builtin import resolve_model_path

    path = Path(resolve_model_path(model_name))
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        patterns = ["*.safetensors", "*.json"]
        if env.is_main:  # one download; the others find it in the cache
            snapshot_download(model_name, allow_patterns=patterns)
        env.barrier()
        path = Path(snapshot_download(model_name, allow_patterns=patterns))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{path} has no *.safetensors files; sharded loading reads safetensors only "
            "(convert the checkpoint, or run on one process)"
        )
    return files


def _local_index(param: torch.Tensor) -> tuple[slice, ...]:
    """This rank's block of a (possibly DTensor) parameter, as slices of the full tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return tuple(slice(0, s) for s in param.shape)
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    return tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


@torch.no_grad()
def load_sharded_weights(
    model: nn.Module,
    files: list[Path],
    select: Callable[[str], bool] = lambda _: True,
    progress: bool = False,
) -> None:
    """Copy each selected parameter's own block from safetensors `files`, reading only that
    block from disk: no rank ever holds a whole tensor it does not own.

    A tied parameter is found under any of its names. Raises when one is missing.
    `progress`: report the bytes this rank has read (`Progress`).
    """
    from safetensors import safe_open

    from sftkit.log.progress import Progress
    from sftkit.model.mxfp4 import read_dequantized

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    where = {key: h for h in handles for key in h.keys()}  # noqa: SIM118 (not a dict)
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    missing = []
    converted = False  # read from a layout other than the model's own names
    chosen = [(n, p) for n, p in model.named_parameters() if select(n)]
    size = sum(_local(p).numel() * _local(p).element_size() for _, p in chosen)
    with Progress("loading weights", size, "B", enabled=progress) as bar:
        for name, param in chosen:
            local = _local(param)
            key = next((n for n in aliases[id(param)] if n in where), None)
            if key is None:
                key = file_key(model, name, where)
                converted = converted or key is not None
            if key is not None:
                local.copy_(where[key].get_slice(key)[_local_index(param)])
            elif (read := per_expert_reader(model, name, where)) is not None:
                local.copy_(read(_local_index(param)))  # one matrix per expert on disk
                converted = True
            else:  # gpt-oss's MXFP4 experts (`sftkit.model.mxfp4`), else missing
                block = read_dequantized(where, name, _local_index(param), param.dtype)
                if block is None:
                    missing.append(name)
                else:
                    local.copy_(block)
            bar.update(local.numel() * local.element_size())
    if missing:
        raise ValueError(
            f"{files[0].parent} lacks {len(missing)} of the model's parameters, e.g. "
            f"{missing[:3]}; is it a checkpoint of this model (policy.model_name)?"
        )
    if not converted:
        # As `from_pretrained` records for a checkpoint stored under the model's own names:
        # no conversion to revert at export, so `final_hf` keeps the base's layout (fused
        # experts stay fused) on any number of ranks, as one process writes it.
        model._weight_conversions = []  # type: ignore[assignment]


@torch.no_grad()
def init_lora_sharded(model: nn.Module, init: str, rng: torch.Tensor) -> None:
    """Give LoRA A and B the values `apply_lora` gives them on one process from CPU RNG
    state `rng`, on whole CPU tensors of which each rank keeps its block.

    Mirrors apply_lora's draws per adapted layer, in module order: nn.Linear's default init
    of A, then of B (`_inject` builds both), then A's own init; B is then zeroed.
    """
    import math

    from sftkit.model import lora_experts
    from sftkit.model.lora import lora_modules

    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        for module in lora_modules(model).values():
            a_param, b_param = module.lora_A.weight, module.lora_B.weight
            a = nn.Linear(module.in_features, a_param.shape[0], bias=False, dtype=a_param.dtype)
            nn.Linear(a_param.shape[0], module.out_features, bias=False, dtype=b_param.dtype)
            if init == "xavier":
                nn.init.xavier_normal_(a.weight)
            else:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            _local(a_param).copy_(a.weight[_local_index(a_param)])
            _local(b_param).zero_()
        # LoRA on experts (`apply_lora` draws them after the linear layers): whole A per weight
        for experts in lora_experts.adapted_expert_modules(model).values():
            for pname in lora_experts.adapted_params(experts):
                a_param, b_param = lora_experts.lora_pair(experts, pname)
                full = torch.empty(a_param.shape, dtype=a_param.dtype)
                lora_experts.init_expert_lora_values(full, init)
                _local(a_param).copy_(full[_local_index(a_param)])
                _local(b_param).zero_()


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device (possibly sharded) model on `device`, keeping buffer values
    and the tensors already there (QLoRA's NF4 weights, quantized before FSDP2 cut them)."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])


def is_lora_param(name: str) -> bool:
    """A LoRA parameter's name (`sftkit.model.lora`): initialised, not loaded from the base."""
    return ".lora_A." in name or ".lora_B." in name or ".lora_magnitude_vector." in name
