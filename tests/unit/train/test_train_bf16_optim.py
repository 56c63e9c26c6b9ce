"""bf16 parameter updates: stochastic rounding is unbiased and reproducible, the update is
torch's AdamW, resuming is bit-exact, and on a learnable task the loss tracks float32 master
weights where round-to-nearest stalls."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from sftkit.config.errors import ConfigError
from sftkit.config.schema import MasterConfig
from sftkit.train.bf16_optim import BF16AdamW, stochastic_round_
from sftkit.train.optim import build_optimizer


def _round_many(value: float, n: int, seed: int) -> torch.Tensor:
    x = torch.full((n,), value, dtype=torch.float32)
    out = torch.empty(n, dtype=torch.bfloat16)
    stochastic_round_(out, x.clone(), torch.Generator().manual_seed(seed))
    return out


@pytest.mark.parametrize("value", [1.0 + 0.3 * 2**-7, -0.0123456, 3.0e-5, 1234.567])
def test_stochastic_rounding_is_unbiased_and_brackets_the_value(value: float) -> None:
    out = _round_many(value, 200_000, seed=1)
    below = torch.tensor(value).to(torch.bfloat16).float()  # nearest; the other neighbour:
    ulp = torch.finfo(torch.bfloat16).eps * 2 ** torch.floor(torch.log2(torch.tensor(abs(value))))
    assert set(out.float().unique().tolist()) <= {
        float(below),
        float(below + ulp),
        float(below - ulp),
    }
    assert len(out.float().unique()) == 2
    # The standard error of the mean is <= ulp / (2 sqrt(n)); 6 of them is a loose bound.
    assert abs(out.double().mean().item() - value) < 6 * float(ulp) / (2 * 200_000**0.5)
    nearest_error = abs(float(below) - value)
    assert abs(out.double().mean().item() - value) < nearest_error / 10


def test_stochastic_rounding_is_deterministic_and_exact_on_bf16_values() -> None:
    assert torch.equal(_round_many(0.1, 1000, seed=3), _round_many(0.1, 1000, seed=3))
    assert not torch.equal(_round_many(0.1, 1000, seed=3), _round_many(0.1, 1000, seed=4))
    exact = torch.randn(1000).to(torch.bfloat16)
    out = torch.empty_like(exact)
    stochastic_round_(out, exact.float(), torch.Generator().manual_seed(0))
    assert torch.equal(out, exact)
    inf = torch.tensor([float("inf"), -float("inf")])
    stochastic_round_(out[:2], inf.clone(), torch.Generator().manual_seed(0))
    assert torch.equal(out[:2].float(), inf)


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_update_is_torch_adamw_in_float32(cls: type) -> None:
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.98), "eps": 1e-5, "weight_decay": 0.1}
    torch_opt = cls(ref, **kwargs)
    our_opt = build_optimizer(
        ours, f"torch.optim.{cls.__name__}", kwargs, bf16_update="stochastic_rounding"
    )
    assert isinstance(our_opt, BF16AdamW)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ref]
        for params in (ref, ours):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
        torch_opt.step()
        our_opt.step()  # float32 parameters: nothing to round
    for a, b in zip(ref, ours, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _regression(mode: str, steps: int, lr: float = 1e-4, seed: int = 0) -> list[float]:
    """Fit W (32x32, entries ~1) to a target 0.02 away: at lr 1e-4 each AdamW update is
    ~1e-4, below half a bf16 ulp (2**-9 of the weight), so round-to-nearest drops it."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(32, 32, generator=gen)
    target = w0 + 0.02 * torch.randn(32, 32, generator=gen)
    w = torch.nn.Parameter(w0 if mode == "fp32" else w0.to(torch.bfloat16))
    rounding = {"fp32": "none", "torch_bf16": "none"}.get(mode, mode)
    opt = build_optimizer(
        [w], "torch.optim.AdamW", {"lr": lr, "weight_decay": 0.0}, False, rounding
    )
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 32, generator=gen)
        loss = ((x @ (w.float() - target).T) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_bf16_updates_track_float32_master_weights_where_nearest_stalls(one_thread: None) -> None:
    modes = ("fp32", "torch_bf16", "stochastic_rounding", "kahan")
    curves = {m: _regression(m, 300) for m in modes}

    def late(mode: str) -> float:  # mean of the last 30 steps (the loss is noisy per batch)
        return sum(curves[mode][-30:]) / 30

    start = curves["fp32"][0]
    assert late("fp32") < start / 5  # the task is learnable at this LR
    assert late("torch_bf16") > 0.9 * start  # round-to-nearest: the updates are lost
    # Kahan tracks float32 closely all along the curve; stochastic rounding is unbiased but
    # adds rounding noise (a random walk of ~sqrt(steps * lr * ulp) per weight).
    for i in range(30, 300, 30):
        window = slice(i - 30, i)
        ref = sum(curves["fp32"][window]) / 30
        assert sum(curves["kahan"][window]) / 30 < 1.15 * ref
        assert sum(curves["stochastic_rounding"][window]) / 30 < 2.0 * ref
    assert late("stochastic_rounding") < start / 3


@pytest.mark.parametrize("rounding", ["stochastic_rounding", "kahan"])
def test_resume_from_state_dict_is_bit_exact(rounding: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).to(torch.bfloat16)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(6)]

    def run(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: list[list]) -> None:
        for step_grads in steps:
            for p, g in zip(model.parameters(), step_grads, strict=True):
                p.grad = g.clone()
            opt.step()

    def make(m: torch.nn.Module) -> torch.optim.Optimizer:
        kw = {"lr": 1e-3, "weight_decay": 0.1}
        return build_optimizer(m.parameters(), "torch.optim.AdamW", kw, False, rounding, seed=7)

    straight = copy.deepcopy(model)
    run(straight, make(straight), grads)
    first = copy.deepcopy(model)
    opt = make(first)
    run(first, opt, grads[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved["model"])
    opt = make(resumed)
    opt.load_state_dict(saved["optim"])
    assert all(
        v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if "exp" in k
    )
    run(resumed, opt, grads[3:])
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_config_needs_bf16_parameters_and_adam() -> None:
    from sftkit.config.checks import check_config

    cfg = MasterConfig()
    cfg.policy.dtensor_cfg.bf16_params_update = "kahan"
    with pytest.raises(ConfigError, match="bf16_params=true"):
        check_config(cfg)
    cfg.policy.dtensor_cfg.bf16_params = True
    check_config(cfg)
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="torch.optim.AdamW or torch.optim.Adam"):
        build_optimizer([p], "torch.optim.SGD", {"lr": 0.1}, bf16_update="kahan")
