"""Hydra-style overrides: value parsing, each syntax, and errors that name the override."""

from __future__ import annotations

import math
from typing import Any

import pytest
from nemo_fixture_paths import NEMO_BASE

from sftkit.config import ConfigError, load_config
from sftkit.config.overrides import parse_override, parse_value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5", 5),
        ("-3", -3),
        ("1_000", 1000),
        ("1e-5", 1e-5),
        ("5.0e-6", 5.0e-6),
        (".5", 0.5),
        ("2.", 2.0),
        ("true", True),
        ("False", False),
        ("null", None),
        ("NULL", None),
        ("None", "None"),  # Hydra has no None literal; Megatron's lora_dtype: None is a string
        ("abc", "abc"),
        ("sft-dev 1", "sft-dev 1"),
        ("'quoted, string'", "quoted, string"),
        ('"007"', "007"),
        ("007", "007"),  # leading zeros keep a string, as in Hydra
        ("00:03:30:00", "00:03:30:00"),
        ("", ""),
        ("${sft.seed}", "${sft.seed}"),
        ("${mul:${a}, 2}", "${mul:${a}, 2}"),
        ("[]", []),
        ("[1, 2.5, x]", [1, 2.5, "x"]),
        ("['a,b', \"c]\"]", ["a,b", "c]"]),
        ("[[1, 2], [3]]", [[1, 2], [3]]),
        ("{}", {}),
        ("{a: 1, b: [x, y], c: {d: null}}", {"a": 1, "b": ["x", "y"], "c": {"d": None}}),
        ("{'k:1': 'v'}", {"k:1": "v"}),
    ],
)
def test_parse_value(text: str, expected: Any) -> None:
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_parse_inf() -> None:
    assert parse_value("inf") == math.inf and parse_value("-inf") == -math.inf


@pytest.mark.parametrize(
    ("text", "op", "key"),
    [
        ("a.b=1", "set", "a.b"),
        ("++a.b=1", "force", "a.b"),
        ("+a.b=1", "add", "a.b"),
        ("~a.b", "delete", "a.b"),
        ("~a.b=1", "delete", "a.b"),
        ("a.b_c-d.0=1", "set", "a.b_c-d.0"),
    ],
)
def test_parse_override_syntax(text: str, op: str, key: str) -> None:
    parsed = parse_override(text)
    assert (parsed.op, parsed.key, parsed.text) == (op, key, text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("=5", "Invalid override '=5'"),
        ("a..b=1", "Invalid override 'a..b=1'"),
        ("sft.max_num_steps", "missing '=value'"),
        ("+sft.seed", "missing '=value'"),
        ("x=[1,2", "unbalanced '\\['"),
        ("x={a: 1", "unbalanced '\\{'"),
        ("x='abc", "unclosed"),
        ("x={a}", "expected key: value"),
    ],
)
def test_invalid_override_names_it(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as err:
        load_config(NEMO_BASE, [text])
    assert text in str(err.value)


def test_each_override_syntax_on_a_nemo_config() -> None:
    cfg = load_config(
        NEMO_BASE,
        [
            "sft.max_num_steps=7",
            "sft.max_num_steps=8",  # later overrides win
            "policy.optimizer.kwargs.lr=1e-4",
            "policy.optimizer.kwargs.betas=[0.8,0.9]",
            "++policy.dtensor_cfg.automodel_kwargs.force_hf=true",
            "+data.train.data_path=train.jsonl",
            "++data.validation={dataset_name: ResponseDataset, data_path: val.jsonl}",
            "~policy.tokenizer.chat_template",
            "~sft.seed=42",
            "logger.wandb.name='run 1'",
            "checkpointing.save_period=${sft.val_period}",
            "policy.attn_implementation=sdpa",  # a schema key the file does not set
        ],
    )
    assert cfg.sft.max_num_steps == 8
    assert cfg.policy.optimizer is not None
    assert cfg.policy.optimizer.kwargs["lr"] == 1e-4
    assert cfg.policy.optimizer.kwargs["betas"] == [0.8, 0.9]
    assert cfg.policy.dtensor_cfg.automodel_kwargs == {"force_hf": True}
    assert cfg.data.train == {"dataset_name": "squad", "split": "train", "data_path": "train.jsonl"}
    assert cfg.data.validation == {"dataset_name": "ResponseDataset", "data_path": "val.jsonl"}
    assert cfg.policy.tokenizer.chat_template == "default"  # deleted: the schema default
    assert cfg.sft.seed == 42
    assert cfg.logger.wandb.name == "run 1"
    assert cfg.checkpointing.save_period == 10
    assert cfg.policy.attn_implementation == "sdpa"


def test_null_section_then_key() -> None:
    cfg = load_config(NEMO_BASE, ["policy.optimizer=null"])
    assert cfg.policy.optimizer is None
    cfg = load_config(NEMO_BASE, ["policy.optimizer=null", "policy.optimizer.name=torch.optim.SGD"])
    assert cfg.policy.optimizer is not None and cfg.policy.optimizer.name == "torch.optim.SGD"


def test_override_replaces_free_form_mapping() -> None:
    cfg = load_config(NEMO_BASE, ["policy.optimizer={name: torch.optim.SGD, kwargs: {lr: 0.1}}"])
    assert cfg.policy.optimizer is not None and cfg.policy.optimizer.kwargs == {"lr": 0.1}


def test_list_index_override(write_yaml) -> None:
    path = write_yaml("c.yaml", "sft: {max_num_steps: 1}\n")  # no ${data.train.*} in names
    cfg = load_config(
        path,
        ["data.train=[{dataset_name: a}, {dataset_name: b}]", "data.train.1.data_path=b.jsonl"],
    )
    assert cfg.data.train == [{"dataset_name": "a"}, {"dataset_name": "b", "data_path": "b.jsonl"}]


def test_add_existing_key_fails() -> None:
    with pytest.raises(ConfigError, match=r"'sft.seed' is already set .*\+\+sft.seed="):
        load_config(NEMO_BASE, ["+sft.seed=3"])


def test_delete_errors() -> None:
    with pytest.raises(ConfigError, match="'sft.seed' is 42, not 7"):
        load_config(NEMO_BASE, ["~sft.seed=7"])
    with pytest.raises(
        ConfigError, match=r"Unknown config key 'sft.sed'. Did you mean 'sft.seed'\?"
    ):
        load_config(NEMO_BASE, ["~sft.sed"])
    # A known key that the file leaves at its default: nothing to delete, no error.
    assert (
        load_config(NEMO_BASE, ["~policy.attn_implementation"]).policy.attn_implementation is None
    )


def test_key_below_a_scalar_fails() -> None:
    with pytest.raises(ConfigError, match="'policy.model_name' holds 'meta-llama/Llama-3.2-1B'"):
        load_config(NEMO_BASE, ["policy.model_name.x=1"])


def test_unknown_override_key_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(NEMO_BASE, ["sft.max_num_step=5"])
    assert str(err.value).startswith(
        "Unknown config key 'sft.max_num_step'. Did you mean 'sft.max_num_steps'?"
    )
    assert "override 'sft.max_num_step=5'" in str(err.value)
    assert err.value.path == "sft.max_num_step"


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("policy.max_num_steps=3", "sft.max_num_steps"),  # a key put in the wrong section
        ("policy.tokenizer.custom_templat=x", "policy.tokenizer.custom_template"),
        ("policy.dtensor_cfg.lora_cfg.dimm=4", "policy.dtensor_cfg.lora_cfg.dim"),
        ("polcy.model_name=x", "policy"),
    ],
)
def test_unknown_key_suggestions(override: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"Did you mean '{suggestion}'"):
        load_config(NEMO_BASE, [override])


def test_wrong_type_override_names_path_value_and_type() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(NEMO_BASE, ["sft.max_num_steps=abc"])
    message = str(err.value)
    assert "'sft.max_num_steps'" in message and "'abc'" in message and "expected int" in message
    assert "override 'sft.max_num_steps=abc'" in message
    with pytest.raises(ConfigError, match=r"'policy.tokenizer' has value 3 .*expected a mapping"):
        load_config(NEMO_BASE, ["policy.tokenizer=3"])
    with pytest.raises(
        ConfigError, match=r"lora_cfg.alpha' has value \[1\] \(list\); expected float"
    ):
        load_config(NEMO_BASE, ["policy.dtensor_cfg.lora_cfg.alpha=[1]"])
    with pytest.raises(ConfigError, match=r"resolves?|could not be converted.*expected int"):
        load_config(NEMO_BASE, ["policy.sequence_packing.train_mb_tokens=${div:7,2}"])
