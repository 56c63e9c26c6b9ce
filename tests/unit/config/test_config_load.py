"""Loading: `defaults:` chains, resolvers, `_override_`, recipes, flat data, errors, YAML out."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
from nemo_fixture_paths import NEMO_BASE, NEMO_RECIPES
from omegaconf import DictConfig, OmegaConf

import sftkit.config.load as load_module
from sftkit.config import (
    ConfigError,
    MasterConfig,
    config_to_yaml,
    load_config,
    load_config_dict,
    redact_secrets,
    register_resolvers,
)

EXAMPLE_RECIPES = sorted(
    (Path(load_module.__file__).parents[2] / "examples/configs/recipes/llm").glob("*.yaml")
)


def test_inheritance_chain_resolvers_and_override(write_yaml) -> None:
    write_yaml(
        "base.yaml",
        """
sft: {max_num_steps: 10, val_period: 5, seed: 1}
policy:
  train_micro_batch_size: 2
  max_total_sequence_length: 256
  optimizer: {name: torch.optim.AdamW, kwargs: {lr: 1.0e-3, weight_decay: 0.1, eps: 1e-8}}
  dtensor_cfg: {lora_cfg: {enabled: true, dim: 4, alpha: 8}}
""",
    )
    write_yaml(
        "mid/mid.yaml",
        """
defaults: ../base.yaml
sft: {max_num_steps: 20}
policy:
  train_global_batch_size: ${mul:${policy.train_micro_batch_size}, 8}
""",
    )
    write_yaml("mid/other.yaml", "sft: {val_period: 7}\n")
    child = write_yaml(
        "recipes/llm/child.yaml",
        """
defaults: [../../mid/mid.yaml, ../../mid/other.yaml]
sft:
  max_num_epochs: ${add:${sft.seed}, 2}
  val_global_batch_size: ${div:${policy.train_global_batch_size}, 4}
  val_batches: ${max:${sft.val_period}, 3}
policy:
  optimizer:
    kwargs: {_override_: true, lr: 2.0e-4}
  dtensor_cfg:
    lora_cfg: {_override_: true, dim: 16}
""",
    )
    cfg = load_config(child)
    assert cfg.sft.max_num_steps == 20  # mid over base
    assert cfg.sft.val_period == 7  # the later entry of a defaults list wins
    assert cfg.sft.seed == 1
    assert cfg.policy.train_global_batch_size == 16  # mul
    assert cfg.sft.max_num_epochs == 3  # add
    assert cfg.sft.val_global_batch_size == 4 and isinstance(cfg.sft.val_global_batch_size, int)
    assert cfg.sft.val_batches == 7  # max
    assert cfg.policy.optimizer is not None
    assert cfg.policy.optimizer.kwargs == {"lr": 2.0e-4}  # replaced, not merged
    assert cfg.policy.optimizer.name == "torch.optim.AdamW"  # sibling of the replaced key kept
    lora = cfg.policy.dtensor_cfg.lora_cfg
    assert (lora.enabled, lora.dim, lora.alpha) == (False, 16, 32)  # schema defaults return


@pytest.mark.parametrize("recipe", NEMO_RECIPES, ids=lambda p: p.name)
def test_nemo_recipes_load_unchanged(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert cfg.policy.model_name == "meta-llama/Llama-3.1-8B"
    assert cfg.policy.tokenizer.name == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg.policy.tokenizer.chat_template == "default"
    assert cfg.data.validation is None and cfg.data.train["seed"] == 42  # ${sft.seed}
    assert cfg.cluster.gpus_per_node == 8


def test_nemo_recipe_values() -> None:
    recipes = {p.name: load_config(p) for p in NEMO_RECIPES}
    lora = recipes["sft-llama3.1-8b-1n8g-fsdp2tp1-lora.yaml"].policy
    assert lora.dtensor_cfg.lora_cfg.enabled and lora.dtensor_cfg.lora_cfg.dim == 128
    assert lora.optimizer is not None and lora.optimizer.kwargs["lr"] == 2.0e-5
    assert lora.optimizer.kwargs["betas"] == [0.9, 0.98]  # merged with the parent's kwargs
    mega = recipes["sft-llama3.1-8b-1n8g-megatron-lora.yaml"].policy
    assert mega.megatron_cfg.enabled and mega.megatron_cfg.peft.enabled
    assert mega.megatron_cfg.peft.lora_dtype is None
    assert mega.megatron_cfg.peft.target_modules[0] == "linear_qkv"
    assert mega.make_sequence_length_divisible_by == 2
    pack = recipes["sft-llama3.1-8b-1n8g-megatron-seqpack.yaml"]
    # NeMo RL trains a Megatron recipe with megatron_cfg.optimizer/scheduler: translated
    assert pack.policy.optimizer is not None and pack.policy.optimizer.name == "torch.optim.AdamW"
    assert pack.policy.optimizer.kwargs["lr"] == 2.0e-5
    assert pack.policy.optimizer.kwargs["weight_decay"] == 0.01
    assert pack.policy.sequence_packing.train_mb_tokens == 16384
    assert pack.policy.dynamic_batching.train_mb_tokens == 8192  # derived: 4096 * 2
    assert pack.policy.make_sequence_length_divisible_by == 8
    assert pack.sft.val_global_batch_size == 128
    assert pack.data.default == {"prompt_file": "examples/prompts/math.txt"}  # _override_


@pytest.mark.parametrize("recipe", EXAMPLE_RECIPES, ids=lambda p: p.name)
def test_example_recipes_load_over_a_nemo_base(recipe: Path, tmp_path: Path) -> None:
    shutil.copy(NEMO_BASE, tmp_path / "sft.yaml")
    # Some of NeMo RL's recipes inherit a sibling (`defaults: ./sft-...-1n8g-....yaml`).
    shutil.copytree(recipe.parent, tmp_path / "recipes/llm")
    assert isinstance(load_config(tmp_path / "recipes/llm" / recipe.name), MasterConfig)
    if load_module.DEFAULT_CONFIG_PATH.exists():
        assert isinstance(load_config(recipe), MasterConfig)


def test_example_recipes_exist_with_launch_command() -> None:
    assert len(EXAMPLE_RECIPES) >= 2
    for recipe in EXAMPLE_RECIPES:
        text = recipe.read_text()
        parent = re.search(r"^defaults: (\S+)$", text, re.MULTILINE)
        assert parent, f"{recipe.name}: no defaults line"
        assert parent[1] == "../../sft.yaml" or (
            parent[1].startswith("./sft-") and (recipe.parent / parent[1]).is_file()
        ), recipe.name
        assert "uv run examples/run_sft.py --config examples/configs/recipes/llm/" in text


def test_default_path_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(load_module, "DEFAULT_CONFIG_PATH", NEMO_BASE)
    assert load_config(None, ["sft.max_num_steps=3"]).sft.max_num_steps == 3
    monkeypatch.setattr(load_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="absent.yaml.*--config"):
        load_config()


def test_load_config_dict_is_resolved() -> None:
    tree = load_config_dict(NEMO_BASE, ["policy.dtensor_cfg.tensor_parallel_size=4"])
    assert isinstance(tree, DictConfig)
    assert tree.policy.make_sequence_length_divisible_by == 4  # NeMo's ${...tensor_parallel_size}
    assert not OmegaConf.is_interpolation(tree.policy, "make_sequence_length_divisible_by")
    assert tree.policy.tokenizer.name == "meta-llama/Llama-3.2-1B"


def test_null_derived_keys_take_their_source(write_yaml) -> None:
    path = write_yaml(
        "c.yaml",
        "policy: {model_name: m, max_total_sequence_length: 64, tokenizer: {name: null}}\n"
        "data: {max_input_seq_length: null}\n",
    )
    cfg = load_config(path)
    assert cfg.policy.tokenizer.name == "m"
    assert cfg.data.max_input_seq_length == 64
    assert cfg.policy.make_sequence_length_divisible_by == 1


def test_flat_data_form_goes_to_extra(write_yaml) -> None:
    path = write_yaml(
        "flat.yaml",
        """
data:
  dataset_name: openai_format
  data_path: train.jsonl
  chat_key: messages
  system_key: null
  system_prompt: "You are helpful."
  tool_key: tools
  use_preserving_dataset: true
  split_validation_size: 0.1
  seed: 7
""",
    )
    data = load_config(path).data
    assert data.dataset_name == "openai_format"
    assert data.extra["data_path"] == "train.jsonl" and data.extra["use_preserving_dataset"]
    assert data.flat_dataset() == {
        "dataset_name": "openai_format",
        "data_path": "train.jsonl",
        "chat_key": "messages",
        "system_key": None,
        "system_prompt": "You are helpful.",
        "tool_key": "tools",
        "use_preserving_dataset": True,
        "split_validation_size": 0.1,
        "seed": 7,
    }
    assert load_config(NEMO_BASE).data.flat_dataset() is None


def test_unknown_data_key_still_fails(write_yaml) -> None:
    path = write_yaml("flat.yaml", "data: {dataset_name: openai_format, data_pth: x.jsonl}\n")
    with pytest.raises(ConfigError, match=r"'data.data_pth'. Did you mean 'data.data_path'\?"):
        load_config(path)


def test_unknown_yaml_key_names_path_suggestion_and_file(write_yaml) -> None:
    write_yaml("base.yaml", "sft: {max_num_steps: 3}\n")
    path = write_yaml("recipes/r.yaml", "defaults: ../base.yaml\nsft:\n  max_num_step: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "Unknown config key 'sft.max_num_step'. Did you mean 'sft.max_num_steps'?" in message
    assert str(path) in message and err.value.path == "sft.max_num_step"


def test_wrong_type_in_yaml_names_path_value_type_and_file(write_yaml) -> None:
    write_yaml("base.yaml", "sft: {max_num_steps: abc}\n")
    path = write_yaml("child.yaml", "defaults: base.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "'sft.max_num_steps'" in message and "'abc'" in message and "expected int" in message
    assert "base.yaml" in message


def test_bad_interpolation_names_key_and_origin(write_yaml) -> None:
    path = write_yaml("c.yaml", "policy: {model_name: '${policy.nope}'}\n")
    with pytest.raises(ConfigError, match=r"'policy.model_name' = '\$\{policy.nope\}'.*c.yaml"):
        load_config(path)


def test_defaults_errors(write_yaml) -> None:
    a = write_yaml("a.yaml", "defaults: b.yaml\n")
    write_yaml("b.yaml", "defaults: a.yaml\n")
    with pytest.raises(ConfigError, match="include each other.*a.yaml -> b.yaml -> a.yaml"):
        load_config(a)
    c = write_yaml("c.yaml", "defaults: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*listed in defaults of .*c.yaml"):
        load_config(c)
    d = write_yaml("d.yaml", "defaults: {x: 1}\n")
    with pytest.raises(ConfigError, match="'defaults' in .*d.yaml must be a path"):
        load_config(d)
    e = write_yaml("e.yaml", "sft: [1\n")
    with pytest.raises(ConfigError, match="Cannot parse config file .*e.yaml"):
        load_config(e)


def test_custom_template_alias(caplog: pytest.LogCaptureFixture, write_yaml) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    plain = write_yaml("c.yaml", f'policy: {{tokenizer: {{custom_template: "{template}"}}}}\n')
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        assert load_config(plain).policy.tokenizer.chat_template == template
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        cfg = load_config(NEMO_BASE, [f"policy.tokenizer.custom_template='{template}'"])
    assert cfg.policy.tokenizer.chat_template == template
    assert any("custom_template" in r.getMessage() for r in caplog.records)


def test_yaml_round_trip(tmp_path: Path) -> None:
    for recipe in [NEMO_BASE, *NEMO_RECIPES]:
        cfg = load_config(recipe)
        out = tmp_path / "config.yaml"
        out.write_text(config_to_yaml(cfg))
        assert load_config(out) == cfg, recipe.name


def test_secrets_redacted_in_yaml_and_dicts() -> None:
    cfg = load_config(
        NEMO_BASE,
        [
            "++policy.dtensor_cfg.env_vars.WANDB_API_KEY=abcdef0123456789",
            "++data.train.input_key=question",
        ],
    )
    text = config_to_yaml(cfg)
    assert "abcdef0123456789" not in text and "WANDB_API_KEY: '***'" in text
    assert "input_key: question" in text  # a data field name, not a secret
    assert "train_mb_tokens: 1024" in text
    assert "abcdef0123456789" in config_to_yaml(cfg, redacted=False)
    nested = {
        "a": [{"hf_token": "hf_abcdefgh"}, {"password": "hunter22"}],
        "client_secret": "s3cr3t-value",
        "output_key": "answer",
        "max_new_tokens": 5,
        "api_key": None,
    }
    assert redact_secrets(nested) == {
        "a": [{"hf_token": "***"}, {"password": "***"}],
        "client_secret": "***",
        "output_key": "answer",
        "max_new_tokens": 5,
        "api_key": None,
    }
    assert nested["client_secret"] == "s3cr3t-value"  # a copy; the input is unchanged


def test_resolvers_registered_once() -> None:
    register_resolvers()
    register_resolvers()  # idempotent: no "resolver already registered" error
    cfg = OmegaConf.create({"a": 6, "b": "${div:${a},4}", "c": "${sub:${a},1}"})
    assert (cfg.b, cfg.c) == (1.5, 5)


def test_secrets_from_the_environment_never_reach_the_saved_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However a secret got into the config (an `${oc.env:...}` interpolation, a literal copy,
    a URL), the saved YAML hides it, keeps everything else, and still loads."""
    monkeypatch.setenv("DB_PASS", "s3cr7")  # short, but interpolated from a secret name
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789abcdef")
    cfg = load_config(
        None,
        [
            "logger.wandb.name=run-${oc.env:DB_PASS}",
            "logger.mlflow.run_name=tok-0123456789abcdef",
            "logger.mlflow.tracking_uri=https://bob:${oc.env:DB_PASS}-x@mlflow.example.com",
            "logger.wandb.project=https://alice:hunter2@example.com/p",
            "++data.train.input_key=question",
        ],
    )
    assert cfg.logger.wandb.name == "run-s3cr7"  # the run itself sees the real values
    text = config_to_yaml(cfg)
    for secret in ("s3cr7", "tok-0123456789abcdef", "hunter2"):
        assert secret not in text, secret
    assert "name: run-***" in text and "tracking_uri: https://bob:***@mlflow.example.com" in text
    assert "input_key: question" in text  # a data field name, not a secret
    saved = tmp_path / "config.yaml"
    saved.write_text(text)
    reloaded = load_config(saved)
    assert reloaded.policy == cfg.policy and reloaded.data == cfg.data
    assert reloaded.logger.wandb.project == "https://alice:***@example.com/p"


def test_non_integer_seed_is_one_line_naming_the_key() -> None:
    quickstart = Path(load_module.__file__).parents[2] / "examples/configs/quickstart.yaml"
    with pytest.raises(ConfigError, match=r"sft\.seed.*'abc'.*expected int") as err:
        load_config(quickstart, ["sft.seed=abc"])
    assert "\n" not in str(err.value)
