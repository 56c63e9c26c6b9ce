"""The memory estimate: parameter, gradient and optimizer bytes equal a built model's tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sftkit.config import load_config
from sftkit.model.memory import GiB, estimate_memory
from sftkit.model.qlora import tensor_bytes

QUICKSTART = Path(__file__).resolve().parents[3] / "examples" / "configs" / "quickstart.yaml"
LORA = ("policy.dtensor_cfg.lora_cfg.enabled=true",)
NF4 = (*LORA, "policy.dtensor_cfg.lora_cfg.quantize_base=nf4")


@pytest.mark.parametrize("setting", [(), LORA, NF4], ids=["full", "lora", "qlora"])
def test_parameter_gradient_and_optimizer_bytes_are_exact(tiny_model_dir: Path, setting) -> None:
    from sftkit.dist import DistEnv
    from sftkit.model.build import build_model

    cfg = load_config(str(QUICKSTART), [f"policy.model_name={tiny_model_dir}", *setting])
    est = estimate_memory(cfg, world_size=1)
    model = build_model(cfg, DistEnv())
    assert est.weights + est.adapters == sum(tensor_bytes(p) for p in model.parameters())
    lora = sum(tensor_bytes(p) for n, p in model.named_parameters() if ".lora_" in n)
    assert est.adapters == lora
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.ones_like(p)
    assert est.gradients == sum(tensor_bytes(p.grad) for p in trainable)
    optimizer = torch.optim.AdamW(trainable, **dict(cfg.policy.optimizer.kwargs))
    optimizer.step()
    states = [t for s in optimizer.state.values() for t in s.values()]
    assert est.optimizer == sum(tensor_bytes(t) for t in states)
    assert 0 < est.activations and 0 < est.loss and est.fsdp_gather == 0
    assert est.peak == sum(vars(est).values())


def test_fsdp_shards_the_state_and_print_config_ends_with_the_estimate(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sftkit.cli import sft_main

    overrides = [f"policy.model_name={tiny_model_dir}", *NF4]
    cfg = load_config(str(QUICKSTART), overrides)
    one, two = estimate_memory(cfg, 1), estimate_memory(cfg, 2)
    assert two.optimizer < 0.51 * one.optimizer and two.weights < 0.51 * one.weights
    assert two.fsdp_gather > 0
    assert sft_main(["--config", str(QUICKSTART), "--print-config", *overrides]) == 0
    tail = capsys.readouterr().out.splitlines()[-9:]
    assert tail[0].startswith("# estimated peak memory per GPU (1 rank(s), micro-batch 32 x 64")
    assert tail[-1].split()[1:] == ["peak", f"{one.peak / GiB:.3f}", "GiB"]
