"""Spellings and values of other NeMo RL versions: automodel_cfg, bare metric names, flat
data next to data.train, HSDP, disabled dtensor_cfg, Megatron optimizer and schedule."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
from nemo_fixture_paths import NEMO_CONFIGS

from sftkit.config import ConfigError, ignored_settings, load_config

OTHER = NEMO_CONFIGS / "recipes" / "other_versions"
NEWER = OTHER / "sft-newer-automodel-lora.yaml"
OLDER = OTHER / "sft-older-flat-standalone.yaml"
MEGATRON = OTHER / "sft-megatron-cosine-decay.yaml"


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "sftkit")


def test_automodel_cfg_is_dtensor_cfg(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        cfg = load_config(NEWER)
    d = cfg.policy.dtensor_cfg
    assert d.lora_cfg.enabled and d.lora_cfg.dim == 16 and not d.lora_cfg.use_triton
    assert d.lora_cfg.match_all_linear  # merged with the parent's dtensor_cfg
    assert d.expert_parallel_size == 2 and d.automodel_kwargs["backend"]["attn"] == "sdpa"
    assert cfg.policy.make_sequence_length_divisible_by == 1  # ${policy.automodel_cfg...}
    found = ignored_settings(cfg)
    # expert_parallel_size now acts (expert parallelism): no longer reported as ignored
    assert "policy.dtensor_cfg.expert_parallel_size" not in found
    for key in ("policy.dynamic_batching.logprob_mb_tokens",):
        assert key in found and key in _warnings(caplog)
    # Acted on since gpt-oss's MXFP4 experts load dequantized (tests/unit/model/test_model_mxfp4.py).
    assert (
        cfg.policy.dequantize_base_checkpoint and "policy.dequantize_base_checkpoint" not in found
    )


@pytest.mark.parametrize(
    ("parent", "child", "expected"),
    [
        ("automodel_cfg", "dtensor_cfg", 4),  # a newer base under an older recipe
        ("dtensor_cfg", "automodel_cfg", 4),  # an older base under a newer recipe
    ],
)
def test_the_recipe_wins_whichever_name_each_file_uses(
    write_yaml: Any, parent: str, child: str, expected: int
) -> None:
    write_yaml("sft.yaml", f"policy:\n  {parent}: {{tensor_parallel_size: 2, cpu_offload: true}}\n")
    recipe = write_yaml(
        "recipes/r.yaml",
        f"defaults: ../sft.yaml\npolicy:\n  {child}: {{tensor_parallel_size: 4}}\n",
    )
    d = load_config(recipe).policy.dtensor_cfg
    assert (d.tensor_parallel_size, d.cpu_offload) == (expected, True)


def test_automodel_cfg_in_overrides() -> None:
    cfg = load_config(
        NEWER,
        [
            "policy.automodel_cfg.tensor_parallel_size=2",
            "++policy.automodel_cfg.lora_cfg.dim=4",
            "~policy.automodel_cfg.automodel_kwargs",
        ],
    )
    d = cfg.policy.dtensor_cfg
    assert (d.tensor_parallel_size, d.lora_cfg.dim, d.automodel_kwargs) == (2, 4, {})
    assert cfg.policy.make_sequence_length_divisible_by == 2
    with pytest.raises(ConfigError, match="policy.dtensor_cfg.tensor_paralel_size"):
        load_config(NEWER, ["policy.automodel_cfg.tensor_paralel_size=2"])


def test_older_standalone_recipe(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        cfg = load_config(OLDER)
    assert cfg.checkpointing.metric_name == "val:val_loss"
    assert "'val:val_loss'" in _warnings(caplog)
    assert cfg.policy.max_grad_norm == 1.0 and cfg.policy.tokenizer.chat_template == "default"
    assert cfg.data.flat_dataset() == {
        "dataset_name": "ResponseDataset",
        "train_data_path": "train.jsonl",
        "val_data_path": "validation.jsonl",
        "input_key": "input",
        "output_key": "output",
        "seed": 7,
    }
    assert "flat data layout" not in _warnings(caplog)  # no data.train: the flat form is used
    with pytest.raises(ConfigError, match="must start with 'val:' or 'train:'"):
        load_config(OLDER, ["checkpointing.metric_name=eval:loss"])


def test_flat_data_next_to_train_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        cfg = load_config(
            OLDER, ["++data.train={dataset_name: ResponseDataset, data_path: t.jsonl}"]
        )
    assert cfg.data.train["data_path"] == "t.jsonl"
    text = _warnings(caplog)
    assert "data.dataset_name='ResponseDataset'" in text and "data.train_data_path" in text
    assert "not used: data.train is set" in text


def test_disabled_dtensor_parallel_sizes_are_not_read() -> None:
    off = ["policy.dtensor_cfg.enabled=false", "policy.dtensor_cfg.tensor_parallel_size=4"]
    assert load_config(OLDER, off).policy.dtensor_cfg.tensor_parallel_size == 1
    on = ["policy.dtensor_cfg.tensor_parallel_size=4"]
    assert load_config(OLDER, on).policy.dtensor_cfg.tensor_parallel_size == 4


def test_expert_parallel_sizes_are_read() -> None:
    """dtensor_cfg's EP size acts; with Megatron enabled its EP size is the run's (one line
    when both are set and differ); a disabled dtensor_cfg's is not read."""
    on = ["policy.dtensor_cfg.expert_parallel_size=4"]
    assert load_config(OLDER, on).policy.dtensor_cfg.expert_parallel_size == 4
    off = ["policy.dtensor_cfg.enabled=false", *on]
    assert load_config(OLDER, off).policy.dtensor_cfg.expert_parallel_size == 1
    meg = ["policy.megatron_cfg.expert_model_parallel_size=8"]
    assert load_config(MEGATRON, meg).policy.dtensor_cfg.expert_parallel_size == 8
    assert "policy.megatron_cfg.expert_model_parallel_size" not in ignored_settings(
        load_config(MEGATRON, meg)
    )
    with pytest.raises(
        ConfigError, match="expert_model_parallel_size=8 and policy.dtensor_cfg.exp"
    ):
        load_config(MEGATRON, [*meg, "policy.dtensor_cfg.enabled=true", *on])


def test_megatron_optimizer_is_translated(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        cfg = load_config(MEGATRON)
    opt = cfg.policy.optimizer
    assert opt is not None and opt.name == "torch.optim.AdamW"
    assert opt.kwargs == {"lr": 3e-6, "weight_decay": 0.02, "betas": [0.9, 0.999], "eps": 1e-8}
    assert cfg.policy.max_grad_norm is None  # clip_grad: 0
    text = _warnings(caplog)
    assert "policy.optimizer is not used while policy.megatron_cfg.enabled" in text
    found = ignored_settings(cfg)
    assert "policy.megatron_recipe" in found and "policy.megatron_cfg.attention_backend" in found
    assert not [
        p
        for p in found
        if p.startswith(("policy.megatron_cfg.optimizer.", "policy.megatron_cfg.scheduler."))
    ]
    sgd = load_config(MEGATRON, ["policy.megatron_cfg.optimizer.optimizer=sgd"]).policy.optimizer
    assert sgd is not None and sgd.name == "torch.optim.SGD" and sgd.kwargs["momentum"] == 0.9
    with pytest.raises(ConfigError, match="lr_decay_style is 'WSD'"):
        load_config(MEGATRON, ["policy.megatron_cfg.scheduler.lr_decay_style=WSD"])


def test_disabled_megatron_cfg_is_not_reported(write_yaml: Any) -> None:
    recipe = write_yaml(
        "r.yaml", "policy:\n  megatron_cfg: {enabled: false, moe_permute_fusion: false}\n"
    )
    cfg = load_config(recipe)
    assert ignored_settings(cfg) == []
    assert cfg.policy.optimizer is not None and cfg.policy.optimizer.kwargs["lr"] == 5e-6


def _megatron_lr(lr: float, min_lr: float, s: dict[str, Any], step: int, steps: int) -> float:
    """Megatron-Core's OptimizerParamScheduler.get_lr after `step` increments."""
    warmup, init = s["lr_warmup_iters"], s["lr_warmup_init"]
    if warmup > 0 and step <= warmup:
        return init + (lr - init) * step / warmup
    if s["lr_decay_style"] == "constant":
        return lr
    end = s["lr_decay_iters"] or steps
    if step > end:
        return min_lr
    ratio = (step - warmup) / (end - warmup)
    coeff = 1 - ratio if s["lr_decay_style"] == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1)
    return min_lr + coeff * (lr - min_lr)


@pytest.mark.parametrize(
    "schedule",
    [
        {"lr_decay_style": "cosine", "lr_warmup_iters": 5, "lr_decay_iters": 60},
        {"lr_decay_style": "linear", "lr_warmup_iters": 0, "lr_decay_iters": None},
        {"lr_decay_style": "constant", "lr_warmup_iters": 7, "lr_decay_iters": 60},
        {"lr_decay_style": "constant", "lr_warmup_iters": 0, "lr_decay_iters": 60},
    ],
    ids=lambda s: f"{s['lr_decay_style']}-warmup{s['lr_warmup_iters']}",
)
def test_megatron_schedule_matches_megatron(schedule: dict[str, Any]) -> None:
    torch = pytest.importorskip("torch")
    from sftkit.train.optim import build_optimizer, build_scheduler

    overrides = [
        f"policy.megatron_cfg.scheduler.{k}={'null' if v is None else v}"
        for k, v in schedule.items()
    ]
    cfg = load_config(MEGATRON, overrides)
    assert cfg.policy.optimizer is not None
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([param], cfg.policy.optimizer.name, cfg.policy.optimizer.kwargs)
    sched = build_scheduler(opt, cfg.policy.scheduler)
    spec = {**schedule, "lr_warmup_init": 3e-8}
    steps = cfg.sft.max_num_steps
    for step in range(steps + 10):  # the lr the optimizer uses at optimizer step `step + 1`
        expected = _megatron_lr(3e-6, 3e-7, spec, step, steps)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6, abs=1e-13), step
        opt.step()
        sched.step()


def test_every_other_version_fixture_loads() -> None:
    for recipe in sorted(Path(OTHER).glob("*.yaml")):
        load_config(recipe)
