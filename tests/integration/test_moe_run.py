"""An MoE model through the real entry point: the router loss is trained when the config
asks for it, NeMo RL's `hf_config_overrides.router_aux_loss_coef: 0.0` turns it off, and
metrics.jsonl has `train/aux_loss` and the expert load beside the NLL `train/loss`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from moe_model import write_tiny_qwen3_moe

from tests.conftest import SmallRun

ON = "++policy.hf_config_overrides.output_router_logits=true"


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen3_moe(tmp_path_factory.mktemp("qwen3_moe"))


def losses(small_run: SmallRun, work: Path, model: Path, *more: str) -> dict[int, dict]:
    result = small_run.inprocess(work, f"policy.model_name={model}", "sft.max_num_steps=2",
                                 "checkpointing.enabled=false", "sft.val_period=0",
                                 "++policy.hf_config_overrides.attention_dropout=0.0", *more)  # fmt: skip
    assert result.returncode == 0
    return result.train_rows()


def test_router_loss_is_trained_logged_and_turned_off_by_the_recipe_key(
    small_run: SmallRun, qwen3_moe_dir: Path, tmp_path: Path
) -> None:
    coef = "++policy.hf_config_overrides.router_aux_loss_coef"
    big = losses(small_run, tmp_path / "big", qwen3_moe_dir, ON, f"{coef}=10.0")
    off = losses(small_run, tmp_path / "off", qwen3_moe_dir, ON, f"{coef}=0.0")
    packed = losses(small_run, tmp_path / "packed", qwen3_moe_dir, ON, f"{coef}=0.0",
                    "policy.sequence_packing.enabled=true")  # fmt: skip
    # train/loss is the NLL: equal at step 1 (same weights), apart once the term has trained.
    assert big[1]["train/loss"] == pytest.approx(off[1]["train/loss"], rel=1e-6)
    assert abs(big[2]["train/loss"] - off[2]["train/loss"]) > 1e-4
    # Padding never counts: packed rows route the padded run's real tokens to the same
    # experts (the step's load is a sum over them); the aux loss differs only because
    # packing groups other examples into a micro-batch (measured 2.01286 vs 2.01310).
    for key in ("train/loss", "train/moe/load_cv_max"):
        assert packed[1][key] == pytest.approx(off[1][key], rel=1e-6), key
    assert packed[1]["train/aux_loss"] == pytest.approx(off[1]["train/aux_loss"], rel=1e-3)
    row = big[1]
    assert row["train/aux_loss"] > 0
    assert row["train/moe/load_cv_max"] == max(row["train/moe/load_cv/layer_0"],
                                               row["train/moe/load_cv/layer_1"])  # fmt: skip


EXPERT_LORA = ("policy.dtensor_cfg.lora_cfg.enabled=true", "policy.dtensor_cfg.lora_cfg.dim=4",
               "++policy.dtensor_cfg.lora_cfg.target_experts=true",
               "policy.dtensor_cfg.lora_cfg.match_all_linear=false",
               "policy.dtensor_cfg.lora_cfg.target_modules=[q_proj,v_proj]",
               "++policy.hf_config_overrides.attention_dropout=0.0",
               "policy.optimizer.kwargs.lr=1e-2", "sft.max_num_steps=4", "sft.val_period=0")  # fmt: skip


def test_lora_on_experts_trains_adapters_resumes_exactly_and_loads_in_peft(
    small_run: SmallRun, qwen3_moe_dir: Path, tmp_path: Path
) -> None:
    from safetensors import safe_open

    peft = pytest.importorskip("peft")
    model = f"policy.model_name={qwen3_moe_dir}"
    full = small_run.inprocess(tmp_path / "full", model, *EXPERT_LORA)
    assert full.returncode == 0
    rows = full.train_rows()
    assert rows[4]["train/loss"] < rows[1]["train/loss"]
    # A step checkpoint holds the adapters only, the experts' under their own names.
    weights = full.checkpoint_dir / "step_2" / "policy" / "weights"
    with safe_open(str(next(weights.glob("*.safetensors"))), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118 (not a dict)
    assert "model.layers.1.mlp.experts.lora_B.down_proj" in keys
    assert all(".lora_" in k for k in keys), sorted(keys)[:4]
    # Resumed from step 2, steps 3 and 4 are the uninterrupted run's.
    work = tmp_path / "resumed"
    shutil.copytree(full.checkpoint_dir / "step_2", work / "ckpt" / "step_2")
    resumed = small_run.inprocess(work, model, *EXPERT_LORA)
    assert resumed.returncode == 0
    got = resumed.train_rows()
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step]["train/loss"] == rows[step]["train/loss"]
        assert got[step]["train/grad_norm"] == rows[step]["train/grad_norm"]
    # PEFT loads final_adapter onto the base with final_hf's (merged) logits.
    base = transformers.AutoModelForCausalLM.from_pretrained(qwen3_moe_dir, dtype=torch.float32)
    adapter = full.checkpoint_dir / "final_adapter"
    loaded = peft.PeftModel.from_pretrained(base, adapter).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        full.checkpoint_dir / "final_hf", dtype=torch.float32
    ).eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got_logits = merged(input_ids=ids).logits, loaded(input_ids=ids).logits
    torch.testing.assert_close(got_logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.heavy  # two gloo ranks and one process: minutes of CPU on 2 cores
@pytest.mark.slow
def test_lora_on_experts_under_fsdp2_matches_one_rank(
    small_run: SmallRun, qwen3_moe_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    # The base in transformers 5's fused layout: several ranks read weight blocks by the
    # model's own names, and `save_pretrained` writes one tensor per expert instead.
    fused = tmp_path / "fused"
    shutil.copytree(qwen3_moe_dir, fused)
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen3_moe_dir, dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}  # fmt: skip
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    more = (f"policy.model_name={fused}", *EXPERT_LORA, "checkpointing.save_period=0",
            "policy.train_micro_batch_size=4")  # fmt: skip
    one = small_run.inprocess(tmp_path / "one", *more)
    two = small_run.subprocess(tmp_path / "two", *more, "cluster.gpus_per_node=2", timeout=600)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    rows_one, rows_two = one.train_rows(), two.train_rows()
    assert sorted(rows_two) == [1, 2, 3, 4]
    for step in rows_two:  # the experts' A and B are sharded on their expert dimension
        for key in ("train/loss", "train/grad_norm"):
            assert rows_two[step][key] == pytest.approx(rows_one[step][key], rel=1e-5)
    for part in ("final_adapter/adapter_model.safetensors", "final_hf/model.safetensors"):
        a, b = load_file(one.checkpoint_dir / part), load_file(two.checkpoint_dir / part)
        assert sorted(a) == sorted(b)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
