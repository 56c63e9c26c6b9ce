"""Security: safe loading only, sandboxed templates, loud trust_remote_code, no leaked secrets."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from tests.conftest import CANARY_ENV, REPO


def unsafe_loads(source: str) -> list[int]:
    """Lines calling torch.load without weights_only=True, pickle.load(s), or allow_pickle=True."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        is_true = lambda v: isinstance(v, ast.Constant) and v.value is True  # noqa: E731
        if (owner, node.func.attr) == ("torch", "load") and not is_true(
            keywords.get("weights_only")
        ):
            bad.append(node.lineno)
        elif owner in ("pickle", "dill", "cloudpickle") and node.func.attr in ("load", "loads"):
            bad.append(node.lineno)
        elif is_true(keywords.get("allow_pickle")):
            bad.append(node.lineno)
    return bad


def test_no_unsafe_deserialization_in_the_package() -> None:
    assert unsafe_loads("torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)") == [
        1,
        2,
        3,
    ]
    assert unsafe_loads("torch.load(p, weights_only=True)") == []
    found = {
        str(path.relative_to(REPO)): lines
        for path in sorted((REPO / "sftkit").rglob("*.py"))
        if (lines := unsafe_loads(path.read_text()))
    }
    assert found == {}


def test_weights_are_safetensors(reference_run) -> None:
    step = reference_run.checkpoint_dir / "step_14"
    assert [p.name for p in (step / "policy" / "weights").iterdir()] == ["model.safetensors"]
    final = reference_run.checkpoint_dir / "final_hf"
    assert (final / "model.safetensors").is_file()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))


# Poisoned pickles in a checkpoint's state files: test_untrusted_checkpoints.py.


def test_trust_remote_code_is_off_by_default_and_warns(tiny_model_dir: Path, caplog) -> None:
    from sftkit.config import load_config
    from sftkit.model.load import load_model

    assert load_config(None, []).policy.trust_remote_code is False
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        load_model(str(tiny_model_dir), trust_remote_code=True)
    assert "trust_remote_code=true" in caplog.text


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% for m in messages %}{{ m.__class__.__base__.__subclasses__() }}{% endfor %}",
    ],
)
def test_chat_template_runs_in_the_sandbox(
    small_run, tmp_path: Path, capsys, template: str
) -> None:
    path = tmp_path / "evil.jinja"
    path.write_text(template)
    capsys.readouterr()
    result = small_run.inprocess(tmp_path, f"policy.tokenizer.chat_template={path}")
    err = capsys.readouterr().err
    assert result.returncode == 2
    assert "unsafe" in err or "undefined" in err.lower(), err[-1500:]
    assert not list((tmp_path / "ckpt").glob("step_*"))


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_canary_secrets_never_reach_logs_configs_or_trackers(preempted_run) -> None:
    """The run had WANDB_API_KEY/HF_TOKEN set and one of them inside two config values."""
    canaries = [v.encode() for v in CANARY_ENV.values()]
    scanned = files_under(preempted_run.work)  # stdout, stderr, logs (jsonl, tensorboard,
    names = {p.name for p in scanned}  # mlflow store), checkpoints (config, info, tokenizer)
    assert {"config.yaml", "training_info.json", "metrics.jsonl", "stderr.txt"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert any("mlflow" in str(p) for p in scanned)
    leaks = [str(p) for p in scanned for c in canaries if c in p.read_bytes()]
    assert [p for p in leaks if not is_mlflow_run_name(p)] == []
    config = (preempted_run.checkpoint_dir / f"step_{max(preempted_run.train_rows())}"
              / "config.yaml").read_text()  # fmt: skip
    assert "leak-***" in config  # the value was kept, only the secret was replaced


def is_mlflow_run_name(path: str) -> bool:
    return "/mlflow/" in path and (path.endswith("meta.yaml") or path.endswith("mlflow.runName"))


@pytest.mark.slow
def test_mlflow_run_name_is_scrubbed(preempted_run) -> None:
    canary = CANARY_ENV["WANDB_API_KEY"].encode()
    leaks = [p for p in files_under(preempted_run.work) if canary in p.read_bytes()]
    assert leaks == []


def test_interpolated_and_url_secrets_never_reach_files_or_stderr(
    small_run, tmp_path: Path, capsys
) -> None:
    """A short password read with `${oc.env:...}` and a password inside a URL: the run uses
    them, and no file it writes (config.yaml, metrics, MLflow store) nor stderr holds them."""
    secret, url_password = "s3cr7x", "url-pw-0417"
    capsys.readouterr()
    result = small_run.inprocess(
        tmp_path,
        "sft.max_num_steps=1",
        "logger.mlflow_enabled=true",
        "logger.wandb.name=run-${oc.env:DB_PASS}",
        f"logger.mlflow.run_name=https://bob:{url_password}@mlflow.example.com",
        env={"DB_PASS": secret},
    )
    err = capsys.readouterr().err
    assert result.returncode == 0, err[-2000:]
    config = (result.checkpoint_dir / "step_1" / "config.yaml").read_text()
    assert "name: run-***" in config and "https://bob:***@mlflow.example.com" in config
    leaks = [
        str(p)
        for p in files_under(tmp_path)
        for s in (secret, url_password)
        if s.encode() in p.read_bytes()
    ]
    assert leaks == [] and secret not in err and url_password not in err
