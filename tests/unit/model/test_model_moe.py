"""`sftkit.model.moe`: the grouped experts compute equals transformers' experts (Qwen3-MoE's
gated experts, gpt-oss's transposed, biased, clamped ones) in output and every gradient,
with torch's grouped GEMM and with the per-expert fallback; the all-to-all dispatch of
expert parallelism is tested on ranks in tests/integration/test_expert_parallel.py and
`test_ep_experts_match_one_process` below (2 gloo ranks, `slow`)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from sftkit.model import moe

FAMILIES = ("qwen3_moe", "gpt_oss")


def moe_block(family: str, hidden: int = 16) -> nn.Module:
    """A tiny MoE block of `family` (4 experts, top-2) with random weights."""
    torch.manual_seed(0)
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(hidden_size=hidden, num_experts=4,
                                             num_experts_per_tok=2, moe_intermediate_size=8)  # fmt: skip
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        block: nn.Module = Qwen3MoeSparseMoeBlock(config)
    else:
        config = transformers.GptOssConfig(hidden_size=hidden, num_local_experts=4,
                                           num_experts_per_tok=2, intermediate_size=8)  # fmt: skip
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

        block = GptOssMLP(config)
    config._experts_implementation = "grouped_mm"  # transformers' default for a loaded model
    for param in block.parameters():
        nn.init.normal_(param, std=0.3)
    return block


def run_experts(experts: nn.Module, forward: object, seed: int = 1) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(11, 16, generator=g, requires_grad=True)
    index = torch.randint(0, 4, (11, 2), generator=g)
    weights = torch.rand(11, 2, generator=g, requires_grad=True)
    out = forward(experts, hidden, index, weights)  # type: ignore[operator]
    out.backward(torch.randn(out.shape, generator=g))
    grads = {n: p.grad for n, p in experts.named_parameters()}
    return out, {**grads, "hidden": hidden.grad, "weights": weights.grad}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fallback", [False, True], ids=["grouped_mm", "per_expert"])
def test_grouped_experts_equal_transformers(
    family: str, fallback: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = moe_block(family).experts
    ours = copy.deepcopy(ref)
    if fallback:
        monkeypatch.setattr(moe, "_grouped_mm_fits", lambda x, w: False)
    out_ref, grads_ref = run_experts(ref, lambda m, *a: m(*a))
    out, grads = run_experts(ours, moe.local_experts_forward)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_grouped_mm_is_used_only_where_it_runs() -> None:
    aligned = torch.randn(6, 16), torch.randn(3, 16, 8)
    assert moe._grouped_mm_fits(*aligned)
    assert not moe._grouped_mm_fits(torch.randn(6, 6), torch.randn(3, 6, 8))  # 24-byte rows
    assert not moe._grouped_mm_fits(aligned[0].double(), aligned[1])  # mixed dtypes
    # empty experts and an empty batch both come out right
    x, w = torch.randn(5, 16), torch.randn(3, 16, 8)
    counts = torch.tensor([0, 5, 0])
    out = moe.grouped_mm(x, w, counts, torch.cumsum(counts, 0, dtype=torch.int32))
    torch.testing.assert_close(out, x @ w[1])
    none = torch.zeros(3, dtype=torch.long)
    assert moe.grouped_mm(x[:0], w, none, none.int()).shape == (0, 8)


def test_expert_modules_finds_transformers_fused_experts() -> None:
    block = moe_block("qwen3_moe")
    assert [name for name, _ in moe.expert_modules(block)] == ["experts"]
    assert moe.expert_modules(nn.Linear(2, 2)) == []


def test_per_expert_files_read_into_fused_blocks(tmp_path: Path) -> None:
    """transformers writes Qwen3-MoE's experts one matrix per expert; a rank's block of the
    fused `gate_up_proj`/`down_proj` is read from those keys, only its experts loaded."""
    from safetensors import safe_open

    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    handle = safe_open(str(tmp_path / "model.safetensors"), framework="pt", device="cpu")
    where = {key: handle for key in handle.keys()}  # noqa: SIM118 (not a dict)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in where  # stored per expert
    experts = model.model.layers[0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        read = moe.per_expert_reader(model, f"model.layers.0.mlp.experts.{name}", where)
        assert read is not None
        block = (slice(2, 4), slice(3, 7), slice(0, 8))  # experts 2-3, some rows, some columns
        torch.testing.assert_close(read(block), getattr(experts, name).detach()[block])
    assert moe.per_expert_reader(model, "model.layers.0.self_attn.q_proj.weight", where) is None


WORKER = Path(__file__).with_name("ep_worker.py")


@pytest.mark.slow
def test_ep_experts_match_one_process(tmp_path: Path) -> None:
    """2 gloo ranks, each with its own tokens and half the experts: outputs, input and
    router gradients equal one process's; expert gradients (summed over the ranks' tokens
    by the all-to-all's backward, divided by ep) times ep equal one process's on the whole
    batch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok") == 2 * len(FAMILIES), done.stdout
