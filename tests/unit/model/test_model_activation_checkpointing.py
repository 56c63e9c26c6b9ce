"""Activation checkpointing (full, selective) and activation offload leave gradients as they
are and keep fewer bytes for backward (`sftkit.model.parallel.apply_activation_checkpointing`).

Bytes are counted with an outer `saved_tensors_hooks`: it sees what the model keeps for
backward outside any checkpoint (layer inputs, selective checkpointing's kept outputs, the
head), i.e. what would stay on the accelerator.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from sftkit.config import ConfigError, load_config
from sftkit.model import parallel
from sftkit.model.load import decoder_layers


@pytest.fixture(scope="module")
def tiny_llama() -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, use_cache=False)  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


def _step(model: nn.Module) -> tuple[int, dict[str, torch.Tensor]]:
    """(bytes saved for backward outside checkpoints, gradients) of one forward/backward."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return saved[0], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _with(model: nn.Module, mode: str | None, offload: bool) -> nn.Module:
    model = copy.deepcopy(model)
    parallel.apply_activation_checkpointing(model, mode, offload)
    return model


@pytest.mark.parametrize(("mode", "offload"), [("full", False), ("selective", False),
                                               (None, True), ("full", True),
                                               ("selective", True)])  # fmt: skip
def test_gradients_are_unchanged(tiny_llama: nn.Module, mode: str | None, offload: bool) -> None:
    _, expected = _step(copy.deepcopy(tiny_llama))
    _, got = _step(_with(tiny_llama, mode, offload))
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6, msg=name)


def test_checkpointing_keeps_fewer_bytes(tiny_llama: nn.Module) -> None:
    plain, _ = _step(copy.deepcopy(tiny_llama))
    full, _ = _step(_with(tiny_llama, "full", False))
    selective, _ = _step(_with(tiny_llama, "selective", False))
    # Full keeps each layer's input (2 x 24 x 32 float32 = 6 KiB per layer) and the head's
    # tensors; selective also keeps its matmul and attention outputs.
    assert full < selective < plain
    layer_inputs = 2 * (2 * 24 * 32 * 4)
    full_offloaded, _ = _step(_with(tiny_llama, "full", True))
    assert full - full_offloaded == layer_inputs  # the inputs went to host memory


def test_offload_moves_what_layers_save(
    tiny_llama: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    packed: list[int] = []

    class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def counting(t: torch.Tensor) -> Any:
                packed.append(t.numel() * t.element_size())
                return pack(t)

            self.pack_hook = counting

    monkeypatch.setattr(parallel, "save_on_cpu", CountingSaveOnCpu)
    plain, _ = _step(copy.deepcopy(tiny_llama))
    kept, _ = _step(_with(tiny_llama, None, True))
    # Everything the decoder layers save went through the offload hook; the rest (embedding,
    # final norm, head, loss) stays.
    assert packed and kept + sum(packed) == plain
    packed.clear()
    _step(_with(tiny_llama, "full", True))
    assert sum(packed) == 2 * (2 * 24 * 32 * 4)  # with full checkpointing: the layer inputs


def test_names_and_evaluation_unchanged(tiny_llama: nn.Module) -> None:
    model = _with(tiny_llama, "selective", True)
    assert model.state_dict().keys() == tiny_llama.state_dict().keys()
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
    assert all(layer.forward.__wrapped__ is not None for layer in decoder_layers(model))
    with pytest.raises(ValueError, match="choose one of"):
        parallel.apply_activation_checkpointing(copy.deepcopy(tiny_llama), "op")


def test_config_keys() -> None:
    cfg = load_config(
        None,
        [
            "policy.dtensor_cfg.activation_checkpointing=true",
            "policy.dtensor_cfg.activation_checkpointing_mode=selective",
            "policy.dtensor_cfg.activation_offload=true",
        ],
    )
    assert cfg.policy.dtensor_cfg.activation_checkpointing_mode == "selective"
    with pytest.raises(ConfigError, match="choose one of 'full', 'selective'"):
        load_config(None, ["policy.dtensor_cfg.activation_checkpointing_mode=op"])
    with pytest.raises(ConfigError, match="activation_offload and compile"):
        load_config(
            None, ["policy.dtensor_cfg.activation_offload=true", "policy.dtensor_cfg.compile=true"]
        )
