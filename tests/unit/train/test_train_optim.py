"""Optimizer and scheduler from NeMo RL's schema; their state reloads weights-only."""

from __future__ import annotations

import io

import pytest
import torch

from sftkit.train.optim import build_optimizer, build_scheduler

WARMUP_COSINE = [
    {"name": "torch.optim.lr_scheduler.LinearLR",
     "kwargs": {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 3}},
    {"name": "torch.optim.lr_scheduler.CosineAnnealingLR", "kwargs": {"T_max": 5, "eta_min": 0.0}},
    {"milestones": [3]},
]  # fmt: skip


def make(spec: object) -> tuple[torch.optim.Optimizer, object]:
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = build_optimizer(params, "torch.optim.AdamW", {"lr": 1.0, "betas": [0.9, 0.95]})
    return opt, build_scheduler(opt, spec)


def lrs(opt: torch.optim.Optimizer, sched: object, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()  # type: ignore[attr-defined]
    return out


def test_warmup_then_cosine() -> None:
    opt, sched = make(WARMUP_COSINE)
    assert isinstance(sched, torch.optim.lr_scheduler.SequentialLR)
    values = lrs(opt, sched, 8)
    assert values[:3] == pytest.approx([0.1, 0.4, 0.7])
    assert values[3] == pytest.approx(1.0) and values[-1] < values[4]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)  # YAML lists become tuples


def test_scheduler_and_optimizer_state_roundtrip_weights_only() -> None:
    opt, sched = make(WARMUP_COSINE)
    lrs(opt, sched, 4)
    blobs = []
    for state in (opt.state_dict(), sched.state_dict()):  # type: ignore[attr-defined]
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        blobs.append(torch.load(buffer, weights_only=True))
    opt2, sched2 = make(WARMUP_COSINE)
    opt2.load_state_dict(blobs[0])
    sched2.load_state_dict(blobs[1])  # type: ignore[attr-defined]
    assert lrs(opt2, sched2, 4) == lrs(opt, sched, 4)


def test_null_scheduler_is_constant() -> None:
    opt, sched = make(None)
    assert lrs(opt, sched, 3) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ([WARMUP_COSINE[0], WARMUP_COSINE[1]], "milestones"),
        ({"name": "torch.optim.lr_scheduler.Nope"}, "cannot be imported"),
        ({"name": "torch.optim.lr_scheduler.LinearLR", "kwargs": {"bogus": 1}}, "do not fit"),
        ("cosine", "must be a mapping"),
    ],
)
def test_bad_scheduler_specs_say_how_to_fix(spec: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        make(spec)


def test_bad_optimizer_specs() -> None:
    params = [torch.nn.Parameter(torch.ones(1))]
    with pytest.raises(ValueError, match="dotted path"):
        build_optimizer(params, "AdamW", {})
    with pytest.raises(ValueError, match="do not fit"):
        build_optimizer(params, "torch.optim.AdamW", {"nope": 1})
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([torch.nn.Parameter(torch.ones(1), requires_grad=False)], None, None)


NEMO_KWARGS = {"lr": 1e-3, "weight_decay": 0.1, "foreach": False, "fused": False}


def test_nemo_loop_flags_become_the_fused_kernel_when_preferred(
    caplog: pytest.LogCaptureFixture,
) -> None:
    params = [torch.nn.Parameter(torch.ones(3))]
    with caplog.at_level("INFO", logger="sftkit"):
        opt = build_optimizer(params, "torch.optim.AdamW", NEMO_KWARGS, prefer_fused=True)
    assert opt.defaults["fused"] is True and opt.defaults["foreach"] is None
    assert "fused=True" in caplog.text and "foreach=true" in caplog.text
    # Not preferred (CPU, tensor parallel), an explicit foreach, or another optimizer: as set.
    as_set = build_optimizer(params, "torch.optim.AdamW", NEMO_KWARGS)
    assert as_set.defaults["fused"] is False and as_set.defaults["foreach"] is False
    foreach = build_optimizer(
        params, "torch.optim.AdamW", {**NEMO_KWARGS, "foreach": True}, prefer_fused=True
    )
    assert foreach.defaults["foreach"] is True and not foreach.defaults["fused"]
    sgd = build_optimizer(params, "torch.optim.SGD", {"lr": 0.1, "fused": False}, True)
    assert sgd.defaults["fused"] is False
