"""A model directory holding pickled weights only is refused in one line; no code runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from sftkit.model.load import load_model
from sftkit.model.parallel import build_meta_model


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "code ran"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
@pytest.mark.parametrize("sharded", [False, True], ids=["load", "meta"])
def test_pickled_weights_are_refused_naming_the_file(
    tmp_path: Path, name: str, sharded: bool
) -> None:
    model_dir = tmp_path / "m"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(model_dir)  # fmt: skip
    marker = tmp_path / "pwned"
    (model_dir / name).write_bytes(pickle.dumps(_Payload(marker)))
    build = build_meta_model if sharded else load_model
    with pytest.raises(ValueError, match="holds pickled weights") as err:
        build(str(model_dir), param_dtype=torch.float32, trust_remote_code=False,
              attn_implementation=None, config_overrides={})  # fmt: skip
    assert str(model_dir / name) in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert not marker.exists()
