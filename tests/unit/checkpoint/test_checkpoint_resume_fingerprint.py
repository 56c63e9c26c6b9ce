"""The resume fingerprint keys on effective (derived) values; old fingerprints still resume;
a bad LoRA rank stops the run before any data is read."""

from __future__ import annotations

import builtins
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint.checkpointer import resume_fingerprint
from sftkit.config import MasterConfig, load_config
from sftkit.data.types import ExampleSet, PreparedData
from sftkit.log.redact import scrub

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "examples" / "configs" / "quickstart.yaml"
MEGATRON_LORA = (
    REPO / "tests/fixtures/nemo_configs/recipes/llm/sft-llama3.1-8b-1n8g-megatron-lora.yaml"
)
DATA = PreparedData(ExampleSet.empty(), ExampleSet.empty())
LORA = ["policy.dtensor_cfg.lora_cfg.enabled=true", "policy.dtensor_cfg.lora_cfg.dim=4"]


def old_fingerprint(cfg: MasterConfig, raw_lora: dict[str, Any] | None) -> dict[str, Any]:
    """What sftkit wrote before fingerprints keyed on derived values (a frozen copy):
    `raw_lora` is the lora_cfg as the user wrote it (before lora_dtype existed)."""
    p = cfg.policy
    return {
        "model": scrub(p.model_name),
        "tokenizer": scrub(str(p.tokenizer.name)),
        "chat_template_sha": hashlib.sha256(b"").hexdigest()[:16],
        "lora": raw_lora,
        "megatron_peft": asdict(p.megatron_cfg.peft) if p.megatron_cfg.enabled else None,
        "train_data": DATA.train.digest(),
        "train_global_batch_size": p.train_global_batch_size,
        "max_total_sequence_length": p.max_total_sequence_length,
        "seed": cfg.sft.seed,
        "shuffle": cfg.data.shuffle,
    }


def write_checkpoint(directory: Path, fingerprint: dict[str, Any]) -> Path:
    step = directory / "step_10"
    step.mkdir(parents=True)
    info = {"step": 10, "format_version": ckpt.FORMAT_VERSION, "fingerprint": fingerprint}
    (step / ckpt.INFO).write_text(json.dumps(info))
    return step


def raw_lora_of(cfg: MasterConfig, use_triton: bool = True) -> dict[str, Any]:
    raw = asdict(cfg.policy.dtensor_cfg.lora_cfg)
    raw.pop("lora_dtype")
    raw.pop("use_dora")  # added after the legacy form: no old checkpoint holds it
    raw.pop("target_experts")  # newer than the old form too
    for key in [k for k in raw if k.startswith("quantize_")]:  # keys newer than that form
        raw.pop(key)
    return raw | {"use_triton": use_triton}


@pytest.mark.parametrize(
    ("path", "overrides", "lora"),
    [
        (QUICKSTART, [], "none"),
        (QUICKSTART, LORA, "raw"),
        (QUICKSTART, [*LORA, "policy.dtensor_cfg.tensor_parallel_size=2"], "raw"),  # use_triton off
        (QUICKSTART, ["data.max_input_seq_length=32"], "none"),
        (MEGATRON_LORA, [], "none"),  # the LoRA came from megatron_cfg.peft
    ],
    ids=["full", "lora", "lora-tp2", "max-input-set", "megatron-peft"],
)
def test_a_checkpoint_fingerprinted_the_old_way_still_resumes(
    tmp_path: Path, path: Path, overrides: list[str], lora: str
) -> None:
    cfg = load_config(path, ["cluster.device=cpu", *overrides])
    old = old_fingerprint(cfg, raw_lora_of(cfg) if lora == "raw" else None)
    step = write_checkpoint(tmp_path, json.loads(json.dumps(old)))  # as JSON stores it
    ckpt.check_resumable(step, resume_fingerprint(cfg, None, DATA))  # no mismatch
    changed = load_config(path, ["cluster.device=cpu", *overrides, "sft.seed=7"])
    with pytest.raises(ckpt.ResumeMismatchError, match="seed: checkpoint has 42"):
        ckpt.check_resumable(step, resume_fingerprint(changed, None, DATA))


def test_fingerprint_keys_on_effective_values(tmp_path: Path) -> None:
    def fingerprint(path: Path, *overrides: str) -> dict[str, Any]:
        fp = resume_fingerprint(load_config(path, list(overrides)), None, DATA)
        fp.pop(ckpt.LEGACY_FINGERPRINT)
        return fp

    base = fingerprint(QUICKSTART, "data.max_input_seq_length=64")
    # the raw max_total_sequence_length differs, the limit applied does not
    assert fingerprint(QUICKSTART, "policy.max_total_sequence_length=128",
                       "data.max_input_seq_length=64") == base  # fmt: skip
    assert fingerprint(QUICKSTART, "data.max_input_seq_length=32") != base
    # Megatron's peft and the lora_cfg it translates into are the same LoRA
    megatron = fingerprint(MEGATRON_LORA)
    lora = megatron["lora"]
    assert lora is not None and lora["enabled"]
    as_lora_cfg = [f"policy.dtensor_cfg.lora_cfg.{k}={json.dumps(v)}" for k, v in lora.items()]
    plain = fingerprint(MEGATRON_LORA, "policy.megatron_cfg.enabled=false",
                        "policy.megatron_cfg.peft.enabled=false", *as_lora_cfg)  # fmt: skip
    assert plain["lora"] == megatron["lora"]
    # what a new checkpoint stores resumes; the legacy form is not stored
    step = write_checkpoint(tmp_path, base)
    full = resume_fingerprint(load_config(QUICKSTART, ["data.max_input_seq_length=64"]), None, DATA)
    ckpt.check_resumable(step, full)


def test_use_dora_is_fingerprinted_when_set() -> None:
    """Set, it refuses resuming a DoRA checkpoint as LoRA (or back); unset, it is left out,
    so LoRA checkpoints written before the key existed resume."""
    lora = ["policy.dtensor_cfg.lora_cfg.enabled=true"]
    plain = resume_fingerprint(load_config(QUICKSTART, lora), None, DATA)
    dora = ["policy.dtensor_cfg.lora_cfg.use_dora=true"]
    with_dora = resume_fingerprint(load_config(QUICKSTART, [*lora, *dora]), None, DATA)
    assert "use_dora" not in plain["lora"] and with_dora["lora"]["use_dora"] is True
    assert {k: v for k, v in with_dora["lora"].items() if k != "use_dora"} == plain["lora"]


def test_bad_lora_rank_fails_before_any_data_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sftkit import cli
    from sftkit.train import recipe

    train = tmp_path / "train.jsonl"
    train.write_text('{"input": "1+1", "output": "2"}\n')
    opened: list[str] = []
    real_open = builtins.open

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    prepared: list[object] = []
    monkeypatch.setattr(recipe, "prepare_data", lambda *a: prepared.append(a))
    monkeypatch.setattr(builtins, "open", spy_open)
    code = cli.sft_main([
        "--config", str(QUICKSTART), f"data.train.data_path={train}", "~data.validation",
        "sft.val_period=0", f"checkpointing.checkpoint_dir={tmp_path / 'ck'}",
        f"logger.log_dir={tmp_path / 'logs'}", "cluster.device=cpu", *LORA[:1],
        "policy.dtensor_cfg.lora_cfg.dim=0",
    ])  # fmt: skip
    monkeypatch.undo()
    assert code == 2
    assert "policy.dtensor_cfg.lora_cfg.dim is 0" in capsys.readouterr().err
    assert prepared == [] and str(train) not in opened
    assert not (tmp_path / "ck").exists()  # nothing of the run was started


def test_lora_on_experts_is_in_the_fingerprint_only_when_on() -> None:
    lora = ["policy.dtensor_cfg.lora_cfg.enabled=true"]
    off = resume_fingerprint(load_config(QUICKSTART, lora), None, DATA)
    on = resume_fingerprint(
        load_config(QUICKSTART, [*lora, "++policy.dtensor_cfg.lora_cfg.target_experts=true"]),
        None,
        DATA,
    )
    assert "target_experts" not in off["lora"]  # checkpoints written before the key resume
    assert on["lora"]["target_experts"] is True
