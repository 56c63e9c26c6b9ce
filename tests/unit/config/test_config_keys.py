"""The schema is the one source of key docs: every key has one, `sftkit keys` prints them,
`sftkit --help` and `sftkit sft --help` exit 0 and show the sections and override grammar."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from sftkit.cli import main as cli_main
from sftkit.config.keys import key_docs
from sftkit.config.schema import MasterConfig

REPO = Path(__file__).resolve().parents[3]


def _leaves(tree: object, base: str = "") -> list[str]:
    if not isinstance(tree, dict) or not tree:
        return [base.rstrip(".")]
    return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{base}{k}.")]


def test_every_schema_key_has_a_doc() -> None:
    rows = key_docs()
    assert len(rows) > 200  # the whole tree, Megatron sections included
    assert not [r.path for r in rows if not r.doc.strip()]
    # each section printed by `sftkit sft --help` has a one-line docstring
    for f in dataclasses.fields(MasterConfig):
        assert f.default_factory().__doc__, f.name  # type: ignore[misc]


def test_nemo_flag_matches_nemo_rl_sft_yaml() -> None:
    """Keys of NeMo RL's sft.yaml (examples/configs/sft.yaml) are never marked sftkit-only."""
    nemo = yaml.safe_load((REPO / "examples/configs/sft.yaml").read_text())
    rows = {r.path: r for r in key_docs()}
    sftkit_only = {path for path, r in rows.items() if not r.nemo}
    assert "checkpointing.resume" in sftkit_only and "data.overlong_policy" in sftkit_only
    wrongly = [leaf for leaf in _leaves(nemo) if leaf in sftkit_only]
    assert not wrongly


def test_keys_prints_type_default_doc_and_origin(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keys", "policy.sequence_packing"]) == 0
    out = capsys.readouterr().out
    assert "policy.sequence_packing.algorithm: str = 'modified_first_fit_decreasing'" in out
    assert "bin packing algorithm" in out and "[NeMo RL key]" in out
    assert "one of modified_first_fit_decreasing, first_fit_decreasing" in out
    assert "sftkit ignores it: packed microbatches" in out  # microbatch_order
    assert "policy.dtensor_cfg" not in out
    assert cli_main(["keys", "data.overlong_policy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("data.overlong_policy: str = 'truncate'  [sftkit only]")


def test_keys_unknown_prefix_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keys", "policy.sequence_pack"]) == 2
    err = capsys.readouterr().err
    assert "no config key is 'policy.sequence_pack'" in err and "sections: checkpointing" in err


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_exits_0(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([flag]) == 0
    out = capsys.readouterr().out
    for command in ("sft", "preview", "eval", "export", "keys", "plot"):
        assert f"\n  {command} " in out


def test_sft_help_lists_sections_and_override_grammar(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sft", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(MasterConfig):
        assert f"\n  {f.name} " in out
    for form in ("a.b=1", "++a.b=1", "~a.b", "a.b=[1,2]"):
        assert f"\n  {form} " in out
