"""The eval config is checked by the training config's checks: same messages, same rules;
NeMo RL's eval configs ship under their names with NeMo RL's values, the audio ones refused."""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from sftkit.config import ConfigError
from sftkit.eval.config import QUICKSTART_EVAL_CONFIG, load_eval_config


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
        load_eval_config(
            str(QUICKSTART_EVAL_CONFIG), ["generation.backend=hf", "cluster.gpus_per_node=8"]
        )
    assert "sftkit eval ignores 2 NeMo RL setting(s)" in caplog.text
    assert "generation.backend='hf': sftkit generates with transformers" in caplog.text
    assert "cluster={'gpus_per_node': 8}: cluster.gpus_per_node ranks generate" in caplog.text


# -- NeMo RL's eval configs ---------------------------------------------------------------
REPO = Path(__file__).resolve().parents[3]
SHIPPED = REPO / "examples" / "configs" / "evals"
VALUES = REPO / "tests" / "fixtures" / "nemo_rl_values"
NEMO = VALUES / "nemo_rl_7ea279ab" / "evals"  # values-only copies of NeMo RL's files
TEXT_CONFIGS = ("eval", "math_eval", "gpqa_eval", "local_eval", "mmlu", "mmlu_pro", "mmlu_zh_cn")


def nemo_resolved(name: str) -> dict[str, Any]:
    """NeMo RL's own reading of its file (its `defaults:` inheritance, resolved)."""
    sys.path.insert(0, str(VALUES))
    try:
        import nemo_rl_values
    finally:
        sys.path.remove(str(VALUES))
    return nemo_rl_values.resolve(NEMO / f"{name}.yaml")


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or not node:
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(leaves(value, f"{prefix}{key}."))
    return out


def test_every_nemo_eval_config_is_shipped_or_refused() -> None:
    assert sorted(p.stem for p in NEMO.glob("*.yaml")) == sorted(
        [*TEXT_CONFIGS, "mmau", "daily_omni"]
    )
    assert sorted(p.stem for p in SHIPPED.glob("*.yaml")) == sorted([*TEXT_CONFIGS, "quickstart"])


@pytest.mark.parametrize("name", TEXT_CONFIGS)
def test_shipped_config_loads_to_nemo_rls_values(name: str) -> None:
    cfg = load_eval_config(str(SHIPPED / f"{name}.yaml"), [])
    got = leaves(dataclasses.asdict(cfg))
    want = leaves(nemo_resolved(name))
    assert len(want) >= 40
    for key, value in want.items():
        if key.startswith("generation.val_"):  # equal to the sampling value: not reported
            base = key.replace("val_", "")
            assert value == want[base] and got[key] is None, key
            continue
        assert key in got, key  # every key NeMo RL's file sets is a key of sftkit's schema
        assert got[key] == value, (key, got[key], value)


def test_default_config_is_nemo_rls_eval_yaml() -> None:
    assert load_eval_config(None, []) == load_eval_config(str(SHIPPED / "eval.yaml"), [])
    assert load_eval_config(None, []).data.dataset_name == "AIME2024"


@pytest.mark.parametrize("name", ["mmau", "daily_omni"])
def test_audio_configs_are_refused_in_one_line(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_eval_config(str(NEMO / f"{name}.yaml"), [])
    text = str(info.value)
    assert "\n" not in text and "audio / audio-visual evaluation" in text
    assert "text-only" in text


def test_audio_benchmark_by_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="data.dataset_name='daily-omni' is an audio"):
        load_eval_config(None, ["data.dataset_name=daily-omni"])


def test_nemo_keys_are_accepted_and_ignored_ones_listed_once(caplog) -> None:
    overrides = ["generation.val_temperature=0.7", "data.repeat=2", "data.processor=default"]
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        cfg = load_eval_config(str(SHIPPED / "math_eval.yaml"), overrides)
    assert cfg.data.repeat == 2 and cfg.data.processor == "default"
    assert caplog.text.count("sftkit eval ignores") == 1  # one summary warning
    assert "generation.val_temperature=0.7: GRPO's validation sampling" in caplog.text
    assert "generation.val_top_p" not in caplog.text  # equal to top_p: nothing to say
    assert "generation.backend" not in caplog.text  # vllm is the default: accepted
    assert "generation.vllm_cfg=" in caplog.text and "cluster=" in caplog.text


def test_unsupported_processor_and_verifier_list_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        load_eval_config(None, ["data.processor=sft_processor", "env.math.verifier_type=code"])
    assert "data.processor is 'sft_processor'; choose one of 'default'" in str(info.value)
    assert "env.math.verifier_type is 'code'; choose one of 'math'" in str(info.value)


def test_no_data_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="no data: set data.dataset_name to a benchmark"):
        load_eval_config(None, ["data.dataset_name=null"])


def readme_eval_commands() -> list[list[str]]:
    """The `run_eval.py` command lines of the README's Evaluation section, as argv."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Evaluation\n") : text.index("## Scaling out\n")]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if "examples/run_eval.py" in words:
                commands.append(words[words.index("examples/run_eval.py") + 1 :])
    return commands


def test_readme_runs_nemo_rls_eval_commands_as_written() -> None:
    commands = readme_eval_commands()
    assert len(commands) >= 7
    for argv in commands:
        config = argv[argv.index("--config") + 1] if "--config" in argv else None
        overrides = [a for a in argv if "=" in a]
        load_eval_config(str(REPO / config) if config else None, overrides)
