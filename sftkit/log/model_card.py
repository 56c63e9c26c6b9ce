"""`final_hf/README.md`: a model card from the run itself (its config, the steps it trained,
the validation losses it logged), so a shared model says what it is."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from sftkit.config.schema import MasterConfig


def _plain(value: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value


def _datasets(data: Any) -> list[tuple[str, str, float | None]]:
    """(name, source, weight) of each training dataset; a missing name is the file stem or
    the dataset name, as the run's metrics call it (`sftkit.config.checks.default_name`)."""
    raw = _plain(data.train)
    entries = [raw] if isinstance(raw, dict) else list(raw or [])
    if not entries and data.dataset_name:  # the seed's flat form
        entries = [{"dataset_name": data.dataset_name, **(_plain(data.extra) or {})}]
    out = []
    for e in entries:
        source = str(e.get("data_path") or e.get("dataset_name") or "dataset")
        name = e.get("name") or (
            Path(source.rstrip("/")).stem if e.get("data_path") else source.rpartition(".")[2]
        )
        weight = e.get("weight")
        out.append((str(name), source, None if weight is None else float(weight)))
    return out


def final_validation_losses(exp_dir: Path | None) -> dict[str, tuple[int, float]]:
    """Each `validation/...val_loss` metric's last logged value, with its step."""
    path = exp_dir / "metrics.jsonl" if exp_dir else None
    if path is None or not path.is_file():
        return {}
    last: dict[str, tuple[int, float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        for key, value in row.items():
            if key.startswith("validation/") and key.endswith("val_loss"):
                last[key] = (int(row.get("step", 0)), float(value))
    return last


def base_license(base: str) -> str | None:
    """The base model's license: `license` in its config.json, else in its README's front
    matter (the Hub's model card); local directories and the Hub cache only, no network."""
    directory = Path(base)
    files = {name: directory / name for name in ("config.json", "README.md")}
    if not directory.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            for name in files:
                cached = try_to_load_from_cache(base, name)
                files[name] = Path(cached) if isinstance(cached, str) else Path("/nonexistent")
        except Exception:  # noqa: BLE001 - not a hub id, no cache: no license to report
            return None
    try:
        value = json.loads(files["config.json"].read_text()).get("license")
        if value:
            return str(value)
    except (OSError, ValueError):
        pass
    try:
        text = files["README.md"].read_text()
    except OSError:
        return None
    if text.startswith("---"):
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
        if isinstance(front, dict) and front.get("license"):
            return str(front["license"])
    return None


def _version() -> str:
    try:
        return metadata.version("sftkit")
    except metadata.PackageNotFoundError:
        return "unknown"


def model_card(cfg: MasterConfig, step: int, exp_dir: Path | None, base: str) -> str:
    """The card's Markdown: Hub front matter, then what was trained on what, and how."""
    p, lora = cfg.policy, cfg.policy.dtensor_cfg.lora_cfg
    license_ = base_license(base)
    datasets = _datasets(cfg.data)
    opt = _plain(p.optimizer.kwargs) if p.optimizer else {}
    front = {"base_model": p.model_name, "library_name": "transformers", "tags": ["sftkit", "sft"]}
    if license_:
        front["license"] = license_
    hyper = {
        "steps trained": step,
        "optimizer": f"{p.optimizer.name if p.optimizer else 'none'}, lr {opt.get('lr')}",
        "weight decay": opt.get("weight_decay"),
        "global batch size": p.train_global_batch_size,
        "micro batch size": p.train_micro_batch_size,
        "max sequence length": p.max_total_sequence_length,
        "precision": p.precision,
        "max grad norm": p.max_grad_norm,
        "seed": cfg.sft.seed,
        "LoRA": f"rank {lora.dim}, alpha {lora.alpha}, dropout {lora.dropout} (merged)"
        if lora.enabled
        else "no (all weights trained)",
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [f"# {Path(str(p.model_name)).name} fine-tuned with sftkit", ""]
    lines += [f"Base model: `{p.model_name}`. License of the base: {license_ or 'not stated'}."]
    lines += ["", "## Training data", "", "| name | source | weight |", "|---|---|---|"]
    lines += [f"| {n} | `{s}` | {w if w is not None else 'by size'} |" for n, s, w in datasets]
    lines += ["", "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items()]
    losses = final_validation_losses(exp_dir)
    lines += ["", "## Final validation losses", ""]
    lines += [f"- `{k}`: {v:.4f} (step {s})" for k, (s, v) in losses.items()] or ["- none logged"]
    lines += ["", f"Trained with sftkit {_version()} (supervised fine-tuning).", ""]
    return "\n".join(lines)


def write_model_card(
    directory: Path, cfg: MasterConfig, step: int, exp_dir: Path | None, base: str
) -> Path:
    """Write `directory/README.md` (the model card) and return its path."""
    path = directory / "README.md"
    path.write_text(model_card(cfg, step, exp_dir, base))
    return path
