"""Secrets never reach configs or logs: by key name and by environment value."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from sftkit.log import RedactingFilter, install_redaction, is_secret_name, redact, scrub

CANARY = "canary-secret-0123456789"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", CANARY)
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to scrub ordinary text
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-but-long")  # not a secret name


@pytest.mark.parametrize(
    "name",
    [
        "hf_token",
        "HF_TOKEN",
        "api_key",
        "WANDB_API_KEY",
        "password",
        "aws_secret_access_key",
        "token",
        "client_secret",
        "auth_token",
        "credentials",
    ],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "input_key",
        "output_key",
        "problem_key",
        "solution_key",
        "pad_token",
        "eos_token",
        "bos_token_id",
        "tokenizer",
        "model_name",
        "lr",
        "chat_template",
    ],
)
def test_public_names(name: str) -> None:
    assert not is_secret_name(name)


def test_redact_nested_config() -> None:
    config = {
        "policy": {
            "model_name": "meta-llama/Llama-3.2-1B",
            "tokenizer": {"name": "tok", "pad_token": "<pad>"},
            "dtensor_cfg": {"env_vars": {"HF_TOKEN": "hf_abcdefgh12345", "NCCL_DEBUG": "WARN"}},
            "dynamic_batching": {"train_mb_tokens": 4096},
        },
        "data": {"train": [{"input_key": "input", "output_key": "output"}]},
        "logger": {"mlflow": {"tracking_uri": f"https://user:{CANARY}@mlflow.example"}},
        "secrets": {"api_keys": ["k1-aaaaaaaa", "k2-bbbbbbbb"], "password": None, "hf_token": ""},
        "notes": ("plain", CANARY),
    }
    out = redact(config)
    assert out["policy"]["model_name"] == "meta-llama/Llama-3.2-1B"
    assert out["policy"]["tokenizer"] == {"name": "tok", "pad_token": "<pad>"}
    assert out["policy"]["dtensor_cfg"]["env_vars"] == {"HF_TOKEN": "***", "NCCL_DEBUG": "WARN"}
    assert out["policy"]["dynamic_batching"]["train_mb_tokens"] == 4096
    assert out["data"]["train"] == [{"input_key": "input", "output_key": "output"}]
    assert out["logger"]["mlflow"]["tracking_uri"] == "https://user:***@mlflow.example"
    assert out["secrets"] == {"api_keys": ["***", "***"], "password": None, "hf_token": ""}
    assert out["notes"] == ("plain", "***")
    # The input is not modified.
    assert config["policy"]["dtensor_cfg"]["env_vars"]["HF_TOKEN"] == "hf_abcdefgh12345"


def test_redact_omegaconf_and_dataclasses() -> None:
    @dataclass
    class Section:
        hf_token: str = "hf_zzzzzzzzzzzz"
        items: list[str] = field(default_factory=lambda: [CANARY])

    assert redact(Section()) == {"hf_token": "***", "items": ["***"]}
    conf = OmegaConf.create({"a": {"api_key": "xyz-123456789"}, "b": ["x", CANARY]})
    assert redact(conf) == {"a": {"api_key": "***"}, "b": ["x", "***"]}


def test_scrub_uses_current_environment_only_for_long_secret_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert scrub(f"a {CANARY} b 1 false-but-long") == "a *** b 1 false-but-long"
    monkeypatch.delenv("WANDB_API_KEY")
    assert scrub(f"a {CANARY}") == f"a {CANARY}"


def _logger_to(stream: io.StringIO) -> logging.Logger:
    logger = logging.getLogger("sftkit.test_redact")
    handler = logging.StreamHandler(stream)
    logging.getLogger("sftkit").addHandler(handler)
    return logger


def test_install_redaction_scrubs_messages_args_and_tracebacks() -> None:
    stream = io.StringIO()
    logger = _logger_to(stream)  # a child logger: records reach the handler by propagation
    logger.setLevel(logging.INFO)
    install_redaction()
    install_redaction()  # idempotent
    handler = logging.getLogger("sftkit").handlers[-1]
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    logger.info("using key %s", CANARY)
    try:
        raise RuntimeError(f"bad key {CANARY}")
    except RuntimeError:
        logger.exception("failed")
    text = stream.getvalue()
    assert CANARY not in text
    assert "using key ***" in text and "RuntimeError: bad key ***" in text


def test_without_redaction_the_canary_would_leak() -> None:
    stream = io.StringIO()
    logger = _logger_to(stream)
    logger.setLevel(logging.INFO)
    logger.info("using key %s", CANARY)
    assert CANARY in stream.getvalue()  # the filter above is what removes it


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("https://bob:pa55w0rd@mlflow.example.com:5000/x", "https://bob:***@mlflow.example.com:5000/x"),
        ("postgresql+psycopg2://u:p@db/x and s3://k:v@b", "postgresql+psycopg2://u:***@db/x and s3://k:***@b"),
        ("https://:tok@host", "https://:***@host"),
        ("https://bob@host/x", "https://bob@host/x"),  # no password
        ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
        ("mail me at a@b.c: thanks", "mail me at a@b.c: thanks"),
    ],
)  # fmt: skip
def test_url_passwords_are_scrubbed(text: str, scrubbed: str) -> None:
    assert scrub(text) == scrubbed
    assert redact({"logger": {"tracking_uri": text}}) == {"logger": {"tracking_uri": scrubbed}}


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("DB_PASS", True),
        ("PGPASSWORD", True),
        ("SSH_PASSPHRASE", True),
        ("MLFLOW_TRACKING_PASSWORD", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("GITHUB_TOKEN", True),
        ("PWD", False),  # the working directory
        ("OLDPWD", False),
        ("TOKENIZERS_PARALLELISM", False),
        ("PASSTHROUGH_MODE", False),
    ],
)
def test_secret_environment_names(name: str, secret: bool) -> None:
    from sftkit.log.redact import is_secret_env_name

    assert is_secret_env_name(name) is secret


def test_pass_variables_are_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_PASS", "db-pass-value-42")
    monkeypatch.setenv("PGPASSWORD", "pg-password-value-42")
    assert scrub("a db-pass-value-42 b pg-password-value-42") == "a *** b ***"
