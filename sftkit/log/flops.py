"""Model FLOPs utilisation (MFU), with the conventions of `docs/perf.md` section 1.

MFU = tokens/s x (6N + causal attention flops) / 989e12 on an H100 SXM or H200, with N the
parameters that take part in matmuls: everything but the input embedding, the output
head included. LoRA counts 4N instead of 6N (and 4/6 of the attention flops): frozen
weights get no weight gradient. These reproduce the MFU column of the measured
baseline (Llama-3.2-1B shape at seq 4096: 49,060 tok/s -> 40.8 %; LoRA: 36,668 -> 20.3 %).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Dense bf16 peaks (FLOP/s). "H100" alone means SXM, as in torchtitan; HBM3 is SXM and
# HBM2e is PCIe, as in composer. Order matters: the first match wins.
_PEAKS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gb200",), 2500e12),
    (("b200",), 2250e12),
    (("h200",), 989e12),
    (("h100", "nvl"), 835e12),
    (("h100", "pcie"), 756e12),
    (("h100", "hbm2e"), 756e12),
    (("h100",), 989e12),
    (("a100",), 312e12),
)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a device name such as "NVIDIA H100 80GB HBM3"; None if unknown.

    H100 SXM/HBM3 and H200 989e12, H100 NVL 835e12, H100 PCIe 756e12, A100 312e12,
    B200 2250e12, GB200 2500e12. CPUs and other GPUs give None (no MFU is logged).
    """
    name = device_name.lower()
    for parts, peak in _PEAKS:
        if all(part in name for part in parts):
            return peak
    return None


def device_peak_flops(device: torch.device | str | None = None) -> float | None:
    """`peak_flops` of a CUDA device (the current one by default); None on CPU."""
    device = torch.device(device) if device is not None else None
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def matmul_params(model_config: Any) -> int:
    """N: parameters used in matmuls per token, for a Llama-style (gated MLP) HF config.

    Excludes the input embedding (a lookup) and norms; includes the output head even when
    tied to the embedding, since its matmul runs either way. For mixture-of-experts
    configs only the routed experts per token (and any shared expert) count.
    """
    hidden = _get(model_config, "hidden_size", "n_embd", "d_model")
    layers = _get(model_config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(model_config, "num_attention_heads", "n_head")
    vocab = _get(model_config, "vocab_size")
    if None in (hidden, layers, heads, vocab):
        raise ValueError(
            f"cannot count parameters of {type(model_config).__name__}: it lacks hidden_size, "
            "num_hidden_layers, num_attention_heads or vocab_size; pass n_params= instead"
        )
    kv_heads = _get(model_config, "num_key_value_heads", default=heads)
    head_dim = _get(model_config, "head_dim", default=hidden // heads)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v projections
    if getattr(model_config, "attention_bias", False):
        attention += head_dim * (heads + 2 * kv_heads)
    ffn = _get(model_config, "intermediate_size", "n_inner", default=4 * hidden)
    experts_per_token = _get(model_config, "num_experts_per_tok", default=0)
    if experts_per_token:
        expert_ffn = _get(model_config, "moe_intermediate_size", default=ffn)
        shared_ffn = _get(model_config, "shared_expert_intermediate_size", default=0)
        mlp = 3 * hidden * (experts_per_token * expert_ffn + shared_ffn)
    else:
        mlp = 3 * hidden * ffn  # gate, up and down projections (SwiGLU)
    return layers * (attention + mlp) + vocab * hidden


def active_matmul_params(model: nn.Module) -> int:
    """N counted on the model itself: the parameters a token's matmuls use.

    Every weight of two or more dimensions but the input embedding, the output head included
    (tied or not); LoRA's factors are left out (frozen-base convention above). Routed
    experts count `num_experts_per_tok / num_experts` of their weights: fused experts
    (transformers 5's `*Experts` modules, weights [experts, out, in]) and ModuleLists named
    `experts` alike. Config formulas miss MLA projections, shared experts, dense layers
    between MoE layers and SSM blocks; the model does not (DeepSeek-V3, Llama 4, Nemotron-H).
    """
    config: Any = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    per_token = int(_get(text, "num_experts_per_tok", "moe_topk", default=0) or 0)
    out = model.get_output_embeddings()  # type: ignore[operator]
    head = getattr(out, "weight", None)
    expert_params: set[int] = set()
    total = 0.0
    for name, module in model.named_modules():
        fused = type(module).__name__.endswith("Experts")
        listed = isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "experts"
        if not (fused or listed) or not per_token:
            continue
        params = [p for n, p in module.named_parameters() if "lora_" not in n]
        count = len(module) if listed else max((p.shape[0] for p in params), default=1)
        for p in params:
            expert_params.add(id(p))
            if p.dim() >= (3 if fused else 2):  # fused biases are [experts, out]
                total += p.numel() * min(per_token, count) / count
    # Lookups are no matmuls: the input embedding, GPT-2's position table (unless tied head)
    lookups = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
               for p in m.parameters() if p is not head}  # fmt: skip
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in expert_params or id(p) in lookups or p.dim() < 2 or "lora_" in name:
            continue
        if p is head and name != _head_name(model, out):
            continue  # a tied head is seen twice: count it once, as the head
        total += p.numel()
    return int(total)


def _head_name(model: nn.Module, out: Any) -> str:
    return next(f"{n}.weight" for n, m in model.named_modules() if m is out)


def flops_per_token(
    model_config: Any, seq_len: int, lora: bool = False, n_params: int | None = None
) -> float:
    """Training FLOPs per token: 6N + causal attention flops (LoRA: 4N + 4/6 of attention).

    Convention (docs/perf.md section 1): "MFU = tokens/s x (6N + causal attention flops) /
    989e12; LoRA counts 4N instead of 6N". N is `matmul_params(model_config)` unless
    `n_params` is given: non-embedding parameters, the lm_head included. Causal attention
    is 6 * layers * heads * head_dim * seq_len per token: QK^T and AV (2 matmuls, 2 flops
    per multiply-add, x3 for forward + backward) over the average causal context of
    seq_len / 2. For packed rows pass the typical document length, not the row length.
    """
    n = matmul_params(model_config) if n_params is None else n_params
    layers = _get(model_config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(model_config, "num_attention_heads", "n_head")
    hidden = _get(model_config, "hidden_size", "n_embd", "d_model")
    head_dim = _get(model_config, "head_dim", default=hidden // heads)
    attention = 6.0 * layers * heads * head_dim * seq_len
    if lora:
        return 4.0 * n + attention * 4.0 / 6.0
    return 6.0 * n + attention


def mfu(tokens_per_sec_per_gpu: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.408 = 40.8 %); None when the peak is unknown."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_sec_per_gpu * flops_per_token / peak


def throughput_metrics(
    real: float,
    processed: float,
    step_time: float,
    world_size: int,
    flops_per_token: float | None,
    peak: float | None,
) -> dict[str, float]:
    """Real (non-pad) tokens/s per GPU, padding fraction and, on GPUs with a known peak, MFU.

    `real` and `processed` are one step's example tokens and row tokens (pads included),
    summed over the data x context ranks.
    """
    per_gpu = real / step_time / world_size
    out = {
        "timing/train/real_tokens_per_sec_per_gpu": per_gpu,
        "train/padding_fraction": 1 - real / max(processed, 1),
    }
    value = mfu(per_gpu, flops_per_token or 0, peak)
    if value is not None:
        out["train/mfu"] = value
    return out
