"""Tokenizer loading from a local directory and every chat_template setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TEMPLATES

from sftkit.config.derive import derive_config
from sftkit.config.schema import MasterConfig, PolicyConfig, TokenizerConfig
from sftkit.data.tokenizer import PASSTHROUGH_TEMPLATE, load_tokenizer


def _policy(name: str, **tok) -> PolicyConfig:
    policy = PolicyConfig(model_name=name, tokenizer=TokenizerConfig(**tok))
    return derive_config(MasterConfig(policy=policy)).policy  # as load_config derives it


def test_local_directory_default_template_and_pad(tokenizer_dir: Path):
    tok = load_tokenizer(_policy(str(tokenizer_dir)))
    assert tok.chat_template == (TEMPLATES / "qwen25.jinja").read_text()
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_template_choices(tokenizer_dir: Path, tmp_path: Path):
    assert (
        load_tokenizer(_policy(str(tokenizer_dir), chat_template=None)).chat_template
        == PASSTHROUGH_TEMPLATE
    )
    path = TEMPLATES / "llama3.jinja"
    assert (
        load_tokenizer(_policy(str(tokenizer_dir), chat_template=str(path))).chat_template
        == path.read_text()
    )
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_tokenizer(_policy(str(tokenizer_dir), chat_template=inline)).chat_template == inline
    alias = load_tokenizer(
        _policy(str(tokenizer_dir), chat_template="default", custom_template=inline)
    )
    assert alias.chat_template == inline
    with pytest.raises(ValueError, match="file not found"):
        load_tokenizer(_policy(str(tokenizer_dir), chat_template=str(tmp_path / "x.jinja")))


def test_missing_default_template_is_a_clear_error(tokenizer_dir: Path):
    config = tokenizer_dir / "tokenizer_config.json"
    text = config.read_text()
    (tokenizer_dir / "chat_template.jinja").unlink(missing_ok=True)
    import json

    data = json.loads(text)
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="has no chat template.*null to concatenate"):
        load_tokenizer(_policy(str(tokenizer_dir)))
