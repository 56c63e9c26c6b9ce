"""Config files and overrides are bounded: alias bombs, deep nesting, long defaults chains
and non-config files are refused in one line naming the file (or override), quickly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from nemo_fixture_paths import NEMO_BASE

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint.export import export_checkpoint
from sftkit.config import ConfigError, load_config
from sftkit.errors import classify

# 395 bytes that expand to 10^9 strings (the classic "billion laughs").
BOMB = "sft:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  {b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n"
    for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)
PASSWD = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


def _refused_quickly(path: Path, fragment: str, overrides: list[str] | None = None) -> str:
    start = time.monotonic()
    with pytest.raises(ConfigError, match=fragment) as err:
        load_config(path, overrides or [])
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert classify(err.value)[0] == 2  # type: ignore[index]
    return message


def test_alias_bomb_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(f"defaults: {NEMO_BASE}\n" + BOMB)
    assert str(path) in _refused_quickly(path, "aliases .* expand to")


def test_a_few_aliases_still_load(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text(
        f"defaults: {NEMO_BASE}\n"
        "policy:\n  optimizer:\n    name: torch.optim.AdamW\n    kwargs: &opt {lr: 1.0e-5, eps: 1.0e-8}\n"
        "  megatron_cfg:\n    env_vars: *opt\n"
    )
    assert load_config(path).policy.optimizer.kwargs["lr"] == 1.0e-5  # type: ignore[union-attr]


def test_untrusted_checkpoint_config_alias_bomb_is_refused_by_export(tmp_path: Path) -> None:
    step = tmp_path / "ckpt" / "step_3"
    step.mkdir(parents=True)
    (step / ckpt.INFO).write_text('{"step": 3}')
    (step / "config.yaml").write_text(BOMB)
    ckpt.write_manifest(step)
    import sftkit.checkpoint.checkpointer  # noqa: F401
    import sftkit.model.builtin  # noqa: F401 (export imports these; only the read is timed)
    import sftkit.model.load  # noqa: F401
    import sftkit.model.lora  # noqa: F401

    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"config\.yaml uses YAML aliases"):
        export_checkpoint(step, tmp_path / "out")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    "text",
    [
        "sft:\n  x: " + "[" * 3000 + "]" * 3000 + "\n",  # flow style: RecursionError today
        "sft:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(100)) + "  " * 101 + "v: 1\n",
    ],
    ids=["flow", "block"],
)
def test_deep_nesting_in_a_file_is_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    assert str(path) in _refused_quickly(path, "nest")


def test_a_defaults_chain_too_deep_is_one_line(tmp_path: Path) -> None:
    for i in range(2000):
        (tmp_path / f"c{i}.yaml").write_text(f"defaults: c{i + 1}.yaml\n")
    (tmp_path / "c2000.yaml").write_text("sft: {max_num_steps: 3}\n")
    _refused_quickly(tmp_path / "c0.yaml", "levels of defaults")


@pytest.mark.parametrize(
    "override",
    ["policy.hf_config_overrides.x=" + "[" * 3000 + "]" * 3000,
     "++data.extra.x=" + "{a:" * 3000 + "1" + "}" * 3000],
)  # fmt: skip
def test_an_override_nested_too_deep_is_one_line(override: str) -> None:
    message = _refused_quickly(NEMO_BASE, "brackets deep", [override])
    assert len(message) < 300


def test_defaults_naming_a_non_config_file_never_prints_it(tmp_path: Path) -> None:
    secret = tmp_path / "passwd"
    secret.write_text(PASSWD)
    path = tmp_path / "c.yaml"
    path.write_text(f"defaults: {secret}\n")
    message = _refused_quickly(path, "is not a config")
    assert str(secret) in message
    assert "root" not in message.replace(str(tmp_path), "") and "nologin" not in message


def test_defaults_naming_a_binary_file_is_one_line(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    path = tmp_path / "c.yaml"
    path.write_text(f"defaults: {blob}\n")
    assert str(blob) in _refused_quickly(path, "not a UTF-8 text file")
