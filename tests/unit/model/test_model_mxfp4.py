"""gpt-oss's MXFP4 experts load dequantized with `policy.dequantize_base_checkpoint: true`,
on one process (transformers' loader) and sharded (each rank converts its own experts), and
equal the known weights the test encoded; without the key such a checkpoint is refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from mxfp4_checkpoint import write_mxfp4_gpt_oss

from sftkit.model.load import load_model
from sftkit.model.mxfp4 import read_dequantized
from sftkit.model.parallel import build_meta_model, load_sharded_weights, materialize


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    return directory, write_mxfp4_gpt_oss(directory)


def assert_weights(model: torch.nn.Module, known: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(known) <= set(state)
    for key, value in known.items():
        assert torch.equal(state[key].float(), value.float()), key
    assert getattr(model.config, "quantization_config", None) is None  # exports say bf16/fp32


def test_one_process_dequantizes_exactly(mxfp4_dir) -> None:
    directory, known = mxfp4_dir
    assert_weights(load_model(str(directory), dequantize=True), known)


def test_sharded_loading_dequantizes_each_block(mxfp4_dir) -> None:
    directory, known = mxfp4_dir
    model = build_meta_model(
        str(directory), param_dtype=torch.float32, trust_remote_code=False,
        attn_implementation=None, config_overrides={}, dequantize=True,
    )  # fmt: skip
    materialize(model, torch.device("cpu"))
    load_sharded_weights(model, [directory / "model.safetensors"])
    assert_weights(model, known)


def test_a_rank_converts_only_its_experts(mxfp4_dir) -> None:
    """An expert-parallel or FSDP2 block: experts 1-2, half of the output columns."""
    from safetensors import safe_open

    directory, known = mxfp4_dir
    key = "model.layers.1.mlp.experts.gate_up_proj"
    handle = safe_open(str(directory / "model.safetensors"), framework="pt", device="cpu")
    where = dict.fromkeys(handle.keys(), handle)  # noqa: SIM118 (not a dict)
    index = (slice(1, 3), slice(0, 64), slice(32, 64))
    block = read_dequantized(where, key, index, torch.bfloat16)
    assert block is not None and block.dtype == torch.bfloat16
    assert torch.equal(block.float(), known[key][index])
    assert read_dequantized(where, "model.embed_tokens.weight", index, torch.float32) is None


def test_mxfp4_without_the_key_is_refused(mxfp4_dir) -> None:
    directory, _ = mxfp4_dir
    with pytest.raises(ValueError, match=r"MXFP4; set policy.dequantize_base_checkpoint=true"):
        load_model(str(directory))


def test_other_quantization_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"quantized with 'bitsandbytes'; sftkit trains full"):
        load_model(str(tmp_path / "m"), dequantize=True)


def test_unquantized_checkpoint_is_a_no_op_said_once(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="sftkit"):
        plain = load_model(str(tiny_model_dir), dequantize=True)
    said = [
        r.getMessage() for r in caplog.records if "dequantize_base_checkpoint" in r.getMessage()
    ]
    assert len(said) == 1 and "is not quantized; it loads as stored" in said[0]
    assert_weights(plain, dict(load_model(str(tiny_model_dir)).state_dict()))
