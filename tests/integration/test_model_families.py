"""sftkit trains real model families correctly, not only Llama.

Tiny random-init models (2 layers, hidden 48, float32) of each family that the installed
transformers has are saved with a tokenizer and trained through `sft_main` for 3 steps in
each mode. What is checked, per family:

- padded: the logged step-1 loss equals HF's own `model(input_ids, labels=...)` loss on the
  same micro-batches (token mean), and the loss falls. This catches a chunked loss that drops
  logit softcapping (Gemma2) or `logits_scaling` (Granite), or uses the wrong head.
- packed: per-document logits of packed rows equal each document run alone with the model's
  HF default attention (sliding window and softcapping included), and the packed run logs
  the padded run's losses.
- LoRA: the expected modules are adapted (fused qkv/gate_up for Phi3; GPT-2's Conv1D is a
  clear error), only adapted weights change, and `final_adapter` loaded with PEFT gives the
  logits of the merged `final_hf`.
- resume (Gemma2, Qwen3-MoE): a run resumed from step 2 logs the uninterrupted run's step 3.
- attention features (windows per layer, softcaps, sinks, chunks): dropping one changes the
  loss here, so the packed equalities can fail; the start-up probe catches a dropped one.
- hybrids (Qwen3-Next, Nemotron-H): padded runs are exact, packing is one clear error.
- MFU: active parameters equal half a token's forward matmul FLOPs (torch's counter).
- fused kernels (Triton interpreter): patched families give equal logits and gradients,
  other families are left untouched.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import (  # noqa: E402
    QUICKSTART,
    _drop_sftkit_handlers,
    exp_dirs,
    read_metrics,
    write_addition_data,
)
from family_configs import tiny_configs  # noqa: E402

STEPS, GLOBAL, MICRO, SEQ = 3, 8, 4, 64
RESUME_FAMILIES = ("gemma2", "qwen3_moe")


FAMILIES = sorted(tiny_configs(8, 0, 1))
MOE = {"qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3", "glm4_moe", "llama4",
       "qwen3_next", "nemotron_h"}  # fmt: skip
HYBRIDS = {"qwen3_next", "nemotron_h"}  # state crosses document boundaries: padded only
PACKABLE = [f for f in FAMILIES if f not in HYBRIDS]
ATTN_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj"}
LLAMA_LEAVES = ATTN_LEAVES | {"gate_proj", "up_proj", "down_proj"}
# MoE: attention and dense / shared-expert projections; never the router, and routed
# experts are fused 3-D weights (not nn.Linear), left to full fine-tuning.
LORA_LEAVES = {
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    **dict.fromkeys(["qwen3_moe", "mixtral", "olmoe", "gpt_oss"], ATTN_LEAVES),
    # PEFT would load dense / shared-expert gate/up/down onto the routed experts of these
    # (`lora_unsafe_leaves`), and Mamba's out_proj bypasses LoRA on CUDA: left out.
    "glm4_moe": ATTN_LEAVES,
    "deepseek_v3": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
    "qwen3_next": ATTN_LEAVES | {"in_proj_qkvz", "in_proj_ba", "out_proj"},
    "nemotron_h": ATTN_LEAVES | {"in_proj", "up_proj", "down_proj"},
}  # fmt: skip
FEATURES = ["segments", "sdpa", "flex"]
PACKED_BACKENDS = {"mistral": ["segments", "sdpa"], "gemma2": FEATURES, "gemma3": FEATURES,
                   "gpt_oss": FEATURES, "llama4": FEATURES, "deepseek_v3": FEATURES}  # fmt: skip


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family saved as an HF directory (random weights + the built-in tokenizer)."""
    from sftkit.model.builtin import build_tokenizer

    root = tmp_path_factory.mktemp("families")
    tokenizer = build_tokenizer(384)
    configs = tiny_configs(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    out = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


@dataclass
class FamilyRun:
    """One `sft_main` run: exit code, logged losses by step, and HF's step-1 loss."""

    code: int
    work: Path
    losses: dict[int, float] = field(default_factory=dict)
    hf_step1: float | None = None


class Runs:
    """Runs each (family, mode) once per module, on first use."""

    def __init__(self, dirs: dict[str, Path], root: Path) -> None:
        self.dirs, self.root = dirs, root
        self.train = write_addition_data(root / "train.jsonl", 2 * GLOBAL, seed=0)
        self.val = write_addition_data(root / "val.jsonl", 4, seed=1)
        self.cache: dict[tuple[str, str], FamilyRun] = {}

    def get(self, family: str, mode: str) -> FamilyRun:
        key = (family, mode)
        if key not in self.cache:
            extra = {"padded": [], "packed": ["policy.sequence_packing.enabled=true"],
                     "lora": ["policy.dtensor_cfg.lora_cfg.enabled=true"]}[mode]  # fmt: skip
            if family in RESUME_FAMILIES and mode == "padded":
                extra = ["checkpointing.save_period=2"]
            self.cache[key] = self.run(family, self.root / f"{family}-{mode}", extra)
        return self.cache[key]

    def overrides(self, family: str, work: Path, extra: list[str]) -> list[str]:
        return [
            "--config",
            str(QUICKSTART),
            f"policy.model_name={self.dirs[family]}",
            f"data.train.data_path={self.train}",
            f"data.validation.data_path={self.val}",
            f"data.cache_dir={self.root / 'cache'}",
            f"policy.train_global_batch_size={GLOBAL}",
            f"policy.train_micro_batch_size={MICRO}",
            f"policy.max_total_sequence_length={SEQ}",
            "policy.optimizer.kwargs.lr=1e-2",
            "policy.scheduler=null",
            f"sft.max_num_steps={STEPS}",
            "sft.val_period=0",
            "sft.val_at_start=false",
            f"checkpointing.checkpoint_dir={work / 'ckpt'}",
            "checkpointing.save_period=100",
            f"logger.log_dir={work / 'logs'}",
            "logger.tensorboard_enabled=false",
            "logger.monitor_gpus=false",
            "cluster.device=cpu",
            *extra,
        ]

    def run(self, family: str, work: Path, extra: list[str]) -> FamilyRun:
        """`sft_main` in process; HF's own loss is computed on step 1's micro-batches."""
        import sftkit.train.step as step_mod
        from sftkit.cli import sft_main

        original = step_mod.micro_batch_nll
        hf: list[tuple[float, int]] = []  # (HF mean loss x targets, targets) per micro-batch

        def spy(model: nn.Module, batch: Any, opts: Any) -> torch.Tensor:
            nll = original(model, batch, opts)
            if model.training and len(hf) < GLOBAL // MICRO and batch.cu_seqlens is None:
                # sftkit's MoE router recorder must not see this reference forward
                recorded = _router_records(model)
                sizes = [len(r) for r in recorded]
                with torch.no_grad():
                    mask = (batch.input_ids != model.config.pad_token_id).long()
                    out = model(input_ids=batch.input_ids, attention_mask=mask,
                                labels=batch.labels, use_cache=False)  # fmt: skip
                hf.append((float(out.loss) * batch.num_target_tokens, batch.num_target_tokens))
                for r, n in zip(recorded, sizes, strict=True):
                    del r[n:]
            return nll

        before = set(exp_dirs(work / "logs"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        _drop_sftkit_handlers()
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(step_mod, "micro_batch_nll", spy)
                code = sft_main(self.overrides(family, work, extra))
        finally:
            _drop_sftkit_handlers()
            torch.set_num_threads(threads)
        new = [p for p in exp_dirs(work / "logs") if p not in before]
        rows = [r for p in new for r in read_metrics(p) if "train/loss" in r]
        result = FamilyRun(code, work, {r["step"]: r["train/loss"] for r in rows})
        if len(hf) == GLOBAL // MICRO:
            result.hf_step1 = sum(s for s, _ in hf) / sum(n for _, n in hf)
        return result


def _router_records(model: nn.Module) -> list[list[Any]]:
    """The lists sftkit's router hooks (`sftkit.train.moe`) append to during a step."""
    found: list[list[Any]] = []
    for module in model.modules():
        for hook in module._forward_hooks.values():
            for cell in getattr(hook, "__closure__", None) or ():
                rec = getattr(cell.cell_contents, "_recorded", None)
                if isinstance(rec, list) and all(rec is not f for f in found):
                    found.append(rec)
    return found


@pytest.fixture(scope="module")
def runs(family_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(family_dirs, tmp_path_factory.mktemp("family_runs"))


def load(path: Path, **kwargs: Any) -> nn.Module:
    """The reference: HF's model with eager attention, the model's exact definition (SDPA,
    transformers 5.17's default for Gemma2, silently drops its attention softcap)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **kwargs
    )
    return model.eval()


# ----------------------------------------------------------------------------- padded


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_loss_equals_hf_loss_and_falls(runs: Runs, family: str) -> None:
    run = runs.get(family, "padded")
    assert run.code == 0
    assert sorted(run.losses) == list(range(1, STEPS + 1))
    assert run.hf_step1 is not None
    assert abs(run.losses[1] - run.hf_step1) < 1e-5, (run.losses[1], run.hf_step1)
    assert run.losses[STEPS] < run.losses[1] - 0.2, run.losses


def test_chunked_loss_sees_logit_transforms(family_dirs: dict[str, Path], monkeypatch) -> None:
    # The config list names softcapping and logits_scaling; without it the logit probe must
    # still catch them (an unlisted transform of a new family), and a plain model passes.
    from sftkit.train import loss as loss_mod

    monkeypatch.setattr(loss_mod, "LOGIT_TRANSFORMS", ())
    for family in ("gemma2", "granite"):
        if family in family_dirs:
            reason = loss_mod.chunked_loss_blocker(load(family_dirs[family]))
            assert reason is not None and "probe" in reason, (family, reason)
    for family in ("llama", "gemma", "gpt2"):  # untied, tied with sqrt(H) embeddings, Conv1D
        if family in family_dirs:
            assert loss_mod.chunked_loss_blocker(load(family_dirs[family])) is None, family


# ----------------------------------------------------------------------------- packed


def packed_documents(vocab: int) -> tuple[list[tuple[list[int], list[int]]], list[list[int]]]:
    rng = random.Random(0)
    lengths = [5, 13, 3, 9, 11, 16]
    docs = [([rng.randrange(3, vocab) for _ in range(n)], [1] * n) for n in lengths]
    return docs, [[0, 1, 2], [3, 4], [5]]  # pad tails on every row but the last


@pytest.mark.parametrize(
    ("family", "backend"),
    [(f, b) for f in PACKABLE for b in PACKED_BACKENDS.get(f, ["segments"])],
)
def test_packed_logits_equal_each_document_alone(
    family_dirs: dict[str, Path], family: str, backend: str
) -> None:
    from sftkit.batch import collate_packed, collate_padded
    from sftkit.model.attention import enable_packed_attention

    reference = load(family_dirs[family])
    model = load(family_dirs[family])
    enable_packed_attention(model, backend)  # type: ignore[arg-type]
    docs, bins = packed_documents(reference.config.vocab_size)
    row = 24
    packed = collate_packed(docs, bins, row, pad_id=0)
    padded = collate_padded(docs, pad_id=0, multiple_of=8)
    with torch.no_grad():
        logits = model(**packed.model_kwargs(), use_cache=False).logits
        padded_logits = model(**padded.model_kwargs(), use_cache=False).logits
        worst = 0.0
        for r, bin_ in enumerate(bins):
            start = 0
            for d in bin_:
                ids = torch.tensor([docs[d][0]])
                ref = reference(input_ids=ids, use_cache=False).logits[0]
                got = logits[r, start : start + len(ids[0])]
                worst = max(worst, float((got - ref).abs().max()))
                worst = max(worst, float((padded_logits[d, : len(ids[0])] - ref).abs().max()))
                start += len(ids[0])
    assert worst < 1e-5, worst


FULL = ["full_attention", "full_attention"]


@pytest.mark.parametrize(
    ("family", "drop"),
    [("mistral", {"sliding_window": None}), ("gemma2", {"sliding_window": 256}),
     ("gemma2", {"attn_logit_softcapping": None}), ("gemma2", {"final_logit_softcapping": None}),
     ("gemma3", {"layer_types": FULL}), ("gpt_oss", {"layer_types": FULL}),
     ("gpt_oss", "sinks"), ("llama4", {"layer_types": FULL})],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()),
)  # fmt: skip
def test_attention_features_matter_here(
    family_dirs: dict[str, Path], family: str, drop: str | dict[str, Any]
) -> None:
    # The packed equalities in this file can fail: the same weights without the window, a
    # softcap, the per-layer windows, the chunks or the sinks give another loss (by more
    # than the 1e-5 the loss tests allow) on these documents.
    reference = load(family_dirs[family])
    changed = load(family_dirs[family], **({} if drop == "sinks" else drop))
    if drop == "sinks":  # a dropped sink is a logit of -inf (weight 0)
        with torch.no_grad():
            for name, param in changed.named_parameters():
                if name.endswith(".sinks"):
                    param.fill_(float("-inf"))
    ids = torch.tensor([packed_documents(reference.config.vocab_size)[0][5][0]])
    with torch.no_grad():
        a = changed(input_ids=ids, labels=ids, use_cache=False).loss
        b = reference(input_ids=ids, labels=ids, use_cache=False).loss
    assert abs(float(a - b)) > 1e-4, (a, b)


def test_mla_value_heads_differ_from_query_heads(family_dirs: dict[str, Path]) -> None:
    # DeepSeek-V3's packed test above runs value heads of another size than query/key heads.
    config = load(family_dirs["deepseek_v3"]).config
    assert config.v_head_dim != config.qk_nope_head_dim + config.qk_rope_head_dim


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_setup_probe_compares_with_hf_eager(
    family_dirs: dict[str, Path], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A feature sftkit's attention would drop (as it dropped gpt-oss's sinks and Llama 4's
    # chunks before) is caught at setup, since the probe's reference is HF's eager attention.
    from sftkit.model import attention
    from sftkit.model.attention_features import LayerFeatures

    model = load(family_dirs[family])
    real = attention.read_features
    monkeypatch.setattr(attention, "read_features", lambda m, kw: LayerFeatures(
        window=real(m, kw).window))  # fmt: skip
    with pytest.raises(ValueError, match=f"model_type '{family}(_text)?'.*HF's eager attention"):
        attention.enable_packed_attention(model, "segments")
    monkeypatch.setattr(attention, "read_features", real)
    attention.enable_packed_attention(model, "segments")


@pytest.mark.parametrize("family", PACKABLE)
def test_packed_run_logs_the_padded_losses(runs: Runs, family: str) -> None:
    packed, padded = runs.get(family, "packed"), runs.get(family, "padded")
    assert packed.code == 0
    assert sorted(packed.losses) == list(range(1, STEPS + 1))
    assert abs(packed.losses[1] - padded.losses[1]) < 1e-5, (packed.losses, padded.losses)
    for step in range(2, STEPS + 1):  # the gradients agree too
        assert abs(packed.losses[step] - padded.losses[step]) < 1e-4, (step, packed.losses)


@pytest.mark.parametrize("family", sorted(HYBRIDS))
def test_hybrids_train_padded_and_refuse_packing(
    runs: Runs, family_dirs: dict[str, Path], family: str
) -> None:
    # Gated delta-net (Qwen3-Next) and Mamba2 (Nemotron-H) layers carry state from one
    # document into the next: padded runs are exact (test above), packing is one error.
    from sftkit.model.attention import enable_packed_attention

    assert runs.get(family, "packed").code == 2
    with pytest.raises(ValueError, match="leaks across packed documents"):
        enable_packed_attention(load(family_dirs[family]), "segments")


@pytest.mark.skipif(not hasattr(transformers, "FalconH1Config"), reason="no Falcon-H1")
def test_hybrid_ssm_model_gets_clear_packing_error_and_exact_loss(monkeypatch) -> None:
    # Falcon-H1 mixes Mamba2 layers (state crosses document boundaries) with attention, and
    # multiplies its logits by lm_head_multiplier (the chunked loss was 0.036 off with it).
    from sftkit.model.attention import enable_packed_attention
    from sftkit.train import loss as loss_mod

    config = transformers.FalconH1Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=64, mamba_n_heads=4,
        mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16,
        lm_head_multiplier=0.25,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    assert "lm_head_multiplier=0.25" in str(loss_mod.chunked_loss_blocker(model))
    monkeypatch.setattr(loss_mod, "LOGIT_TRANSFORMS", ())
    assert "probe" in str(loss_mod.chunked_loss_blocker(model))
    with pytest.raises(ValueError, match="leaks across packed documents"):
        enable_packed_attention(model)


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapts_the_right_modules_and_peft_loads_it(
    runs: Runs, family_dirs: dict[str, Path], family: str
) -> None:
    from safetensors.torch import load_file

    from sftkit.model.lora import LoraSpec, apply_lora

    run = runs.get(family, "lora")
    if family == "gpt2":  # Conv1D layers: one clear error, no training
        assert run.code == 2 and not run.losses
        with pytest.raises(ValueError, match="does not support transformers Conv1D"):
            apply_lora(load(family_dirs[family]), LoraSpec())
        return
    assert run.code == 0
    assert min(run.losses[s] for s in range(2, STEPS + 1)) < run.losses[1], run.losses
    assert run.hf_step1 is not None and abs(run.losses[1] - run.hf_step1) < 1e-5
    ckpt = run.work / "ckpt"
    adapter = json.loads((ckpt / "final_adapter" / "adapter_config.json").read_text())
    expected = LORA_LEAVES.get(family, LLAMA_LEAVES)
    assert set(adapter["target_modules"]) == expected

    # Only the adapted weights moved (merged into final_hf); norms, embeddings, biases did not.
    base_sd = load_file(str(family_dirs[family] / "model.safetensors"))
    merged_sd = load_file(str(ckpt / "final_hf" / "model.safetensors"))
    assert set(base_sd) == set(merged_sd)
    changed = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    leaves = {k.rsplit(".", 2)[-2] for k in changed}
    assert changed and all(k.endswith(".weight") for k in changed)
    assert leaves == expected, leaves
    # Every layer's copy of those leaves, and nothing of a router or a routed expert.
    assert changed == {k for k in base_sd if k.endswith(".weight") and ".experts." not in k
                       and k.rsplit(".", 2)[-2] in expected}, sorted(changed)  # fmt: skip
    assert not [k for k in changed if "router" in k or ".gate." in k or ".experts." in k]

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load(family_dirs[family]), ckpt / "final_adapter")
    merged = load(ckpt / "final_hf")
    ids = torch.tensor([packed_documents(merged.config.vocab_size)[0][5][0]])
    with torch.no_grad():
        got, want = peft_model.eval()(input_ids=ids).logits, merged(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, scale)
    assert float((base - want).abs().max()) > 1e-3  # the adapter does something


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("family", RESUME_FAMILIES)  # Gemma2, and an MoE
def test_resume_beyond_llama_is_exact(runs: Runs, family: str) -> None:
    reference = runs.get(family, "padded")
    assert reference.code == 0
    work = runs.root / f"{family}-resumed"
    shutil.copytree(reference.work / "ckpt" / "step_2", work / "ckpt" / "step_2")
    resumed = runs.run(family, work, ["checkpointing.save_period=2"])
    assert resumed.code == 0
    assert sorted(resumed.losses) == [3]
    assert resumed.losses[3] == reference.losses[3]


# ----------------------------------------------------------------------------- fused


FUSED_SCRIPT = textwrap.dedent(
    """
    import copy, sys, torch, transformers
    sys.path.insert(0, "tests/integration")
    from test_model_families import tiny_configs
    from sftkit.model.fused import apply_fused_kernels, restore_rope

    def run(model, ids):
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        return [out.logits.detach()] + [p.grad for p in model.parameters()]

    for family, config in tiny_configs(300, 0, 1).items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).float()
        with torch.no_grad():  # norm weights away from their init, so (1 + w) != w shows
            for name, p in model.named_parameters():
                if "norm" in name or ".ln_" in name:
                    p.add_(0.3 * torch.randn_like(p))
        ids = torch.randint(2, 300, (2, 12))
        want = run(model, ids)
        fused = copy.deepcopy(model)
        classes = [type(m) for m in fused.modules()]
        applied = apply_fused_kernels(fused, device="cpu")
        got = run(fused, ids)
        restore_rope()
        if not applied:
            assert classes == [type(m) for m in fused.modules()], family
        err = max(float((g - w).abs().max()) for g, w in zip(got, want) if w is not None)
        assert err < 1e-5, (family, applied, err)
        print(family, applied, err)
    print("OK")
    """
)


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
@pytest.mark.slow
def test_fused_kernels_patch_families_exactly_or_not_at_all(run_triton_interpreted) -> None:
    out = run_triton_interpreted(FUSED_SCRIPT)
    patched = {line.split()[0] for line in out.splitlines() if "'rms_norm'" in line}
    assert {"llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral", "olmoe"} <= patched, out
    assert not {"gemma", "gemma2"} & patched, out  # (1 + w) norms keep HF's code


@pytest.mark.parametrize("family", sorted(MOE) + ["llama", "gpt2"])
def test_mfu_counts_active_parameters(family_dirs: dict[str, Path], family: str) -> None:
    # N of MFU equals half the forward matmul FLOPs of one token by torch's own counter (a
    # token runs through num_experts_per_tok experts, MLA's projections, shared experts),
    # up to that token's attention over itself (at most 4 x heads x head_dim = 256 here).
    # HF's Llama 4 runs every expert on every token, and the hybrids' reference scans pad
    # to 64-token chunks: for those, only fewer than all parameters count.
    from torch.utils.flop_counter import FlopCounterMode

    from sftkit.log import active_matmul_params

    model = load(family_dirs[family], experts_implementation="eager")  # counted as matmuls
    n = active_matmul_params(model)
    dense = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert (n < dense - model.get_input_embeddings().weight.numel()) == (family in MOE), n
    if family in HYBRIDS or family == "llama4":
        return
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=torch.tensor([[5]]), use_cache=False)
    assert 0 <= counter.get_total_flops() / 2 - n <= 256, (counter.get_total_flops(), n)


def test_families_cover_the_brief() -> None:
    # Guard against a transformers upgrade silently dropping families from this file.
    assert len(FAMILIES) >= 16 and len(MOE & set(FAMILIES)) >= 5, FAMILIES
    assert {"gemma3", "llama4", "qwen3_next", "nemotron_h", "deepseek_v3"} <= set(FAMILIES)
