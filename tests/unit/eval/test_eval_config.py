"""The eval config is checked by the training config's checks: same messages, same rules."""

from __future__ import annotations

import logging

import pytest

from sftkit.config import ConfigError
from sftkit.eval.config import load_eval_config


def test_misplaced_key_names_its_section() -> None:
    # The training checks look for a key of the same name elsewhere in the schema.
    with pytest.raises(ConfigError, match="'max_new_tokens'. Did you mean 'generation.max_new_to"):
        load_eval_config(None, ["++max_new_tokens=3"])


def test_typo_in_a_file_and_in_an_override_give_the_same_message(tmp_path) -> None:
    path = tmp_path / "eval.yaml"
    path.write_text("eval:\n  metrc: exact_match\n")
    with pytest.raises(ConfigError) as from_file:
        load_eval_config(str(path), [])
    with pytest.raises(ConfigError) as from_override:
        load_eval_config(None, ["eval.metrc=exact_match"])
    said = "Unknown config key 'eval.metrc'. Did you mean 'eval.metric'?"
    assert str(from_file.value).startswith(said) and str(path) in str(from_file.value)
    assert str(from_override.value).startswith(said)


def test_choices_are_listed_and_every_problem_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_eval_config(None, ["eval.metric=bleu", "generation.device=tpu"])
    text = str(info.value)
    assert "eval.metric is 'bleu'; choose one of 'exact_match'" in text
    assert "generation.device is 'tpu'; choose one of 'auto', 'cpu', 'cuda'" in text
    assert "override 'eval.metric=bleu'" in text  # where it was set


def test_ignored_settings_are_reported_with_their_reason(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        load_eval_config(None, ["generation.backend=hf", "cluster.gpus_per_node=8"])
    assert "sftkit eval ignores 2 NeMo RL setting(s)" in caplog.text
    assert "generation.backend='hf': sftkit generates with transformers" in caplog.text
    assert "cluster={'gpus_per_node': 8}: cluster.gpus_per_node ranks generate" in caplog.text
