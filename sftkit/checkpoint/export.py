"""`sftkit export <checkpoint> <out> [--adapter]`: any checkpoint to an HF directory.

The checkpoint's own `config.yaml` says which base model, tokenizer and LoRA settings it
was trained with, so no other input is needed. Full fine-tunes become an HF model
directory; LoRA runs become a merged HF directory, or with `--adapter` a PEFT adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint.layout import StepDir
from sftkit.checkpoint.manifest import PROGRESS_BYTES, checkpoint_bytes
from sftkit.checkpoint.outputs import atomic_output_dir
from sftkit.log.progress import Progress

logger = logging.getLogger("sftkit")


EXPORT_MARKER = ".sftkit_export"  # what makes a directory replaceable by a later export


def export_checkpoint(
    checkpoint: Path, out: Path, adapter: bool = False, trust_remote_code: bool = False
) -> Path:
    """Write `out` from `checkpoint` (a step_N dir, or a checkpoint_dir: its latest).

    The checkpoint is untrusted input: its config.yaml asking for `trust_remote_code` (the
    model's own Python code) is refused unless the caller passes `trust_remote_code`. A
    progress line per stage (verify, build the model, load the weights, write) on a large
    checkpoint."""
    in_the_way = _in_the_way(out)
    if in_the_way:
        raise ValueError(
            f"{out} exists and is not an earlier sftkit export (it holds {in_the_way}); "
            "export into a new or empty directory: an export replaces its directory whole"
        )
    checkpoint = resolve_checkpoint(checkpoint)
    shown = checkpoint_bytes(checkpoint) >= PROGRESS_BYTES  # a small one takes seconds
    with Progress(f"exporting {checkpoint.name}", 4, unit="stages", enabled=shown) as progress:
        return _export(checkpoint, out, adapter, trust_remote_code, progress)


def _export(
    checkpoint: Path, out: Path, adapter: bool, trust_remote_code: bool, progress: Progress
) -> Path:
    """`export_checkpoint`'s stages: verify, build the model, load the weights, write."""
    from sftkit.checkpoint.weights import ModelPart
    from sftkit.config import load_config
    from sftkit.model.builtin import adapter_base_name
    from sftkit.model.load import load_model, save_hf
    from sftkit.model.lora import apply_lora, lora_spec_from_config, merge_lora, save_adapter

    problem = ckpt.verify(checkpoint)  # logs its own progress while hashing
    progress.update()
    if problem:
        raise ValueError(f"{checkpoint} is not a complete checkpoint: {problem}")
    step = StepDir(checkpoint)
    cfg = load_config(step.config, [])
    if cfg.policy.trust_remote_code and not trust_remote_code:
        raise ValueError(
            f"{checkpoint}/config.yaml sets policy.trust_remote_code=true: loading its model "
            f"runs Python code from {cfg.policy.model_name}; pass --trust-remote-code if you "
            "trust that code"
        )
    model = load_model(
        cfg.policy.model_name,
        trust_remote_code=cfg.policy.trust_remote_code,
        config_overrides=dict(cfg.policy.hf_config_overrides or {}),
        dequantize=cfg.policy.dequantize_base_checkpoint,
    )
    spec = lora_spec_from_config(cfg.policy)
    if spec is not None:
        apply_lora(model, spec)
    elif adapter:
        raise ValueError(f"{checkpoint} is a full fine-tune; --adapter needs a LoRA run")
    if spec is not None:
        _check_base(checkpoint, cfg.policy.model_name)
    progress.update()
    # A multi-rank checkpoint (policy/dcp) is consolidated here, in one process.
    try:
        ModelPart(model, trainable_only=spec is not None, world_size=1).load(step, rank=0)
    except (OSError, RuntimeError, ValueError) as err:
        if not (checkpoint / ckpt.MANIFEST).exists():  # retention of a live run removed it
            raise ValueError(
                f"{checkpoint} was deleted while it was being exported (checkpoint retention "
                "of the run writing it?); export a step that run keeps, or after it ends"
            ) from err
        raise
    progress.update()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(step.tokenizer)
    with atomic_output_dir(out) as tmp:  # a kill never leaves a half model at `out`
        if adapter:
            base = adapter_base_name(cfg.policy.model_name)  # loadable without sftkit
            save_adapter(model, tmp, base, spec)  # type: ignore[arg-type]
            tokenizer.save_pretrained(tmp)
        else:
            if spec is not None:
                merge_lora(model)
            save_hf(model, tokenizer, tmp)
        (tmp / EXPORT_MARKER).write_text(f"exported by sftkit from {checkpoint.name}\n")
    progress.update()
    return out


def resolve_checkpoint(path: Path) -> Path:
    """`path` if it is a step_N directory, else the latest complete one inside it; a path
    that does not exist is said so, with the steps its parent holds (retention may have
    deleted the one asked for)."""
    if not path.exists():
        steps = [p.name for _, p in ckpt.step_dirs(path.parent)] if path.parent.is_dir() else []
        there = f"; {path.parent} holds {', '.join(steps)}" if steps else ""
        raise ValueError(f"{path} does not exist{there}")
    if StepDir(path).info.exists():
        return path
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path} holds no complete checkpoint (step_N with a manifest)")
    return latest


def _in_the_way(out: Path) -> str:
    """What in `out` an export must not replace ("" when nothing): an export replaces `out`
    whole, so only an empty directory or one sftkit marked as its own export (a config.json
    alone is no proof: a user's notes.txt and src/ beside one were deleted)."""
    if not out.exists() and not out.is_symlink():
        return ""
    if out.is_symlink() or not out.is_dir():
        return "a file, not a directory"
    names = sorted(p.name for p in out.iterdir())
    if not names or EXPORT_MARKER in names:
        return ""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return shown


def _check_base(checkpoint: Path, model_name: str) -> None:
    """A LoRA checkpoint merged onto a base whose weights changed under the same name."""
    from sftkit.checkpoint.checkpointer import base_weights

    saved = ckpt.read_info(checkpoint).get("fingerprint", {}).get("base_weights")
    current = base_weights(model_name) if saved else None
    if saved and current and saved != current:
        raise ValueError(
            f"{checkpoint} is a LoRA trained on other base weights than {model_name} holds now "
            f"(digest {saved}, now {current}): export with the base it was trained on"
        )


def main(argv: list[str]) -> int:
    """`sftkit export` (errors: `sftkit.cli.export_main`)."""
    from sftkit.errors import ArgumentParser
    from sftkit.log import setup_logging

    parser = ArgumentParser(prog="sftkit export", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="checkpoint_dir/step_N (or checkpoint_dir)")
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--adapter", action="store_true", help="write a PEFT adapter (LoRA runs)")
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow a checkpoint whose config sets policy.trust_remote_code=true",
    )  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging()
    checkpoint = resolve_checkpoint(args.checkpoint)
    out = export_checkpoint(checkpoint, args.out, args.adapter, args.trust_remote_code)
    kind = "a PEFT adapter" if args.adapter else "an HF model"
    print(f"exported {checkpoint.name} ({checkpoint}) as {kind} to {out}")
    return 0
