"""A tokenizer without EOS and pad is one line at setup, not a TypeError at step 1."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import byte_level_backend
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from sftkit.config.schema import PolicyConfig, TokenizerConfig
from sftkit.data.tokenizer import load_tokenizer


def _saved(tmp_path: Path, **special: str) -> Path:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(byte_level_backend().to_str()), **special
    )
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def _policy(path: Path) -> PolicyConfig:
    tokenizer = TokenizerConfig(name=str(path), chat_template=None)
    return PolicyConfig(model_name=str(path), tokenizer=tokenizer)


def test_a_tokenizer_without_eos_and_pad_is_refused_at_setup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a pad nor an EOS token") as err:
        load_tokenizer(_policy(_saved(tmp_path)))
    assert len(str(err.value).splitlines()) == 1 and "policy.tokenizer.name=" in str(err.value)


@pytest.mark.parametrize("special", [{"eos_token": "a"}, {"pad_token": "b"}])
def test_eos_or_pad_alone_is_enough(tmp_path: Path, special: dict[str, str]) -> None:
    assert load_tokenizer(_policy(_saved(tmp_path, **special))).pad_token_id is not None
