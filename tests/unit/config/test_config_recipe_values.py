"""The shipped base and all 24 NeMo RL SFT recipes resolve to NeMo RL's values at 7ea279ab.

`tests/fixtures/nemo_rl_values/recipes.yaml` is written by `nemo_rl_values.py` beside it from
NeMo RL's own files (a values-only copy in `nemo_rl_7ea279ab/`), with NeMo RL's inheritance;
sftkit's files never feed it. Each shipped file is loaded with sftkit's loader (what
`--print-config` prints) and every key of its entry must match, except what sftkit
translates on purpose (listed in `translated`, each checked for what it becomes). The
learning rate is stepped through sftkit's scheduler: NeMo RL's DTensor recipes run a
constant rate, its Megatron recipes Megatron's warmup and then a constant rate.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sftkit.config import config_to_dict, load_config
from sftkit.train.optim import build_optimizer, build_scheduler

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "examples" / "configs"
VALUES = REPO / "tests" / "fixtures" / "nemo_rl_values"
sys.path.insert(0, str(VALUES))
import nemo_rl_values  # noqa: E402

FIXTURE = yaml.safe_load((VALUES / "recipes.yaml").read_text())
RECIPES: dict[str, Any] = FIXTURE["recipes"]
# NeMo RL's 24 SFT recipes at 7ea279ab (its `.disabled` nemotron-super file is not one).
NEMO_RL_RECIPES = [
    f"recipes/llm/sft-{name}.yaml"
    for name in (
        "gpt-oss-20b-1n4g-fsdp4ep4-automodel",
        "gpt-oss-20b-1n8g-fsdp8ep8-automodel",
        "llama3.1-70b-8n4g-tp2pp2-long-megatron",
        "llama3.1-70b-8n8g-tp4pp2-long-megatron",
        "llama3.1-8b-1n4g-fsdp2tp1-long",
        "llama3.1-8b-1n8g-fsdp2tp1-long",
        "llama3.1-8b-1n8g-fsdp2tp1-lora",
        "llama3.1-8b-1n8g-fsdp2tp2",
        "llama3.1-8b-1n8g-fsdp2tp4-dynamicbatch",
        "llama3.1-8b-1n8g-megatron-lora",
        "llama3.1-8b-1n8g-megatron-seqpack",
        "llama3.1-8b-1n8g-megatron",
        "llama3.2-1b-1n4g-fsdp2tp1.v3",
        "llama3.2-1b-1n8g-fsdp2tp1.v3",
        "llama3.2-1b-2n8g-hsdp",
        "nanov3-30BA3B-2n4g-fsdp2-lora",
        "nanov3-30BA3B-2n4g-fsdp2",
        "nanov3-30BA3B-2n8g-fsdp2-lora",
        "nanov3-30BA3B-2n8g-fsdp2",
        "qwen2.5-32b-4n8g-fsdp2tp8sp-actckpt.v3",
        "qwen2.5-math7b-1n8g-megatron_fused_linear_logprobs",
        "qwen2.5-math7b-2n4g-megatron",
        "qwen2.5-math7b-2n8g-megatron",
        "qwen3-0.6B-1n8g-megatron-yarn-128k",
    )
]
MEG = "policy.megatron_cfg."


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted}: no key {part!r}"
        node = node[part]
    return node


def _lrs(cfg: Any, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([param], cfg.policy.optimizer.name, dict(cfg.policy.optimizer.kwargs))
    sched = build_scheduler(opt, config_to_dict(cfg)["policy"]["scheduler"])
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_fixture_is_what_the_script_writes_from_nemo_rls_files(tmp_path: Path) -> None:
    out = tmp_path / "recipes.yaml"
    assert nemo_rl_values.main(["--out", str(out)]) == 0
    assert out.read_text() == (VALUES / "recipes.yaml").read_text(), (
        "recipes.yaml is stale: run python tests/fixtures/nemo_rl_values/nemo_rl_values.py"
    )


def test_script_resolves_with_nemo_rls_inheritance(tmp_path: Path) -> None:
    """Parents in order, the child wins, `_override_: true` drops the parent's section, and
    `${...}` sees the merged tree (NeMo RL's `load_config_with_inheritance`)."""
    (tmp_path / "a.yaml").write_text("x: {p: 1, q: 2}\nn: 3\nm: ${mul:${n},2}\n")
    (tmp_path / "b.yaml").write_text("defaults: a.yaml\nx: {q: 5}\n")
    (tmp_path / "c.yaml").write_text("defaults: [b.yaml]\nx: {_override_: true, r: 7}\nn: 4\n")
    assert nemo_rl_values.resolve(tmp_path / "b.yaml") == {"x": {"p": 1, "q": 5}, "n": 3, "m": 6}
    assert nemo_rl_values.resolve(tmp_path / "c.yaml") == {"x": {"r": 7}, "n": 4, "m": 8}
    text = "a: 1 # note\n# whole line\nb: ['#x'] # y\nc: \"v#w\"\n"
    assert nemo_rl_values.strip_comments(text) == "a: 1\nb: ['#x']\nc: \"v#w\"\n"


def test_fixture_lists_the_base_and_all_24_recipes() -> None:
    assert sorted(RECIPES) == sorted(["sft.yaml", *NEMO_RL_RECIPES])
    for name in NEMO_RL_RECIPES:
        assert RECIPES[name]["nemo_rl_file"] == f"examples/configs/{name}"


@pytest.mark.parametrize("name", NEMO_RL_RECIPES)
def test_shipped_recipe_is_nemo_rls_file(name: str) -> None:
    """Every key and value of NeMo RL's file, the commit and a launch command in the header."""
    shipped = (CONFIGS / name).read_text()
    nemo_rl = nemo_rl_values.BUNDLE / name
    assert yaml.safe_load(shipped) == yaml.safe_load(nemo_rl.read_text())
    header = shipped[: shipped.index("defaults:")]
    assert nemo_rl_values.COMMIT in header.replace("\n# ", ""), f"{name}: no commit in header"
    assert f"--config examples/configs/{name}" in header, f"{name}: no launch command"


def _translated(values: dict[str, Any]) -> set[str]:
    """Keys sftkit reads differently on purpose; each is checked in the test below."""
    keys = {"policy.optimizer"}
    if values.get(MEG + "enabled"):
        # NeMo RL trains with megatron_cfg's optimizer, clip and CP; sftkit moves them into
        # policy.optimizer/scheduler, max_grad_norm and dtensor_cfg.context_parallel_size.
        keys |= {"policy.max_grad_norm", "policy.dtensor_cfg.context_parallel_size"}
        # megatron_cfg.peft is sftkit's LoRA: lora_cfg is filled from it at load.
        keys.add("policy.dtensor_cfg.lora_cfg.enabled")
    return keys


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_config_resolves_to_nemo_rl_values(name: str) -> None:
    values = RECIPES[name]["values"]
    cfg = load_config(CONFIGS / name)
    tree = config_to_dict(cfg, redacted=False)
    skip = _translated(values)
    wrong = {
        key: (_get(tree, key), want)
        for key, want in values.items()
        if key not in skip and _get(tree, key) != want
    }
    assert not wrong, f"{name}: (sftkit, NeMo RL) differ: {wrong}"
    if values.get(MEG + "enabled"):
        _check_megatron_translation(cfg, values)
    else:
        assert tree["policy"]["optimizer"] == values["policy.optimizer"]
        assert tree["policy"]["scheduler"] is None  # NeMo RL's DTensor SFT: no scheduler
        lr = values["policy.optimizer"]["kwargs"]["lr"]
        assert _lrs(cfg, 30) == pytest.approx([lr] * 30)  # constant: no warmup, no decay


def _check_megatron_translation(cfg: Any, values: dict[str, Any]) -> None:
    """NeMo RL trains with megatron_cfg.optimizer (policy.optimizer unused): sftkit must train
    the same AdamW with Megatron's warmup from `lr_warmup_init`, then `lr` (min_lr == lr, or
    a constant decay style, in every recipe), clip `clip_grad` (0: none), its CP size and
    its `peft` as LoRA."""
    lr = values[MEG + "optimizer.lr"]
    assert cfg.policy.optimizer.name == "torch.optim.AdamW"
    kwargs = cfg.policy.optimizer.kwargs
    assert kwargs["lr"] == lr
    assert kwargs["weight_decay"] == values[MEG + "scheduler.end_weight_decay"]
    betas = [values[MEG + "optimizer.adam_beta1"], values[MEG + "optimizer.adam_beta2"]]
    assert list(kwargs["betas"]) == betas
    assert kwargs["eps"] == values[MEG + "optimizer.adam_eps"]
    clip = values[MEG + "optimizer.clip_grad"]
    assert cfg.policy.max_grad_norm == (clip or None)
    assert cfg.policy.dtensor_cfg.context_parallel_size == values[MEG + "context_parallel_size"]
    lora = cfg.policy.dtensor_cfg.lora_cfg
    assert lora.enabled == values.get(MEG + "peft.enabled", False)
    if lora.enabled:
        assert (lora.dim, lora.alpha) == (values[MEG + "peft.dim"], values[MEG + "peft.alpha"])
    warmup, init = (
        values[MEG + "scheduler.lr_warmup_iters"],
        values[MEG + "scheduler.lr_warmup_init"],
    )
    assert values[MEG + "optimizer.min_lr"] == pytest.approx(lr, rel=1e-5) or (
        values[MEG + "scheduler.lr_decay_style"] == "constant"
    )
    steps = min(values["sft.max_num_steps"], warmup + 30)
    lrs = _lrs(cfg, steps)
    assert lrs[0] == pytest.approx(init, rel=1e-3, abs=lr * 1e-6)
    assert lrs[warmup:] == pytest.approx([lr] * (steps - warmup), rel=1e-4)


def test_no_shipped_nemo_recipe_inherits_the_quick_start() -> None:
    """The toy's warmup + cosine schedule and 100 epochs belong to quickstart.yaml only."""
    for path in sorted((CONFIGS / "recipes" / "llm").glob("*.yaml")):
        assert "quickstart" not in path.read_text(), path.name
        cfg = load_config(path)
        assert cfg.sft.max_num_epochs == 1, path.name
        assert not cfg.policy.model_name.startswith("sftkit:"), path.name


def test_readme_recipe_table_lists_every_shipped_recipe() -> None:
    readme = (REPO / "README.md").read_text()
    rows = {line.split("`")[1] for line in readme.splitlines() if line.startswith("| `sft-")}
    shipped = {p.stem for p in (CONFIGS / "recipes" / "llm").glob("*.yaml")}
    assert rows >= shipped, f"README's recipe table misses {sorted(shipped - rows)}"
