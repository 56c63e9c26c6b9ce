"""bf16 parameters at SFT learning rates: float32 master weights vs bf16 with torch's AdamW
(round to nearest) vs bf16 with stochastic rounding vs bf16 with Kahan updates.

Each mode is one run of the real entry point (one process each, same data and seed) with a
constant learning rate; one JSON line per mode gives the mean train loss over windows of
steps and the gap to float32 master weights. CPU default: the built-in tiny Llama on the
bundled addition data:

    uv run python bench/bf16_updates.py --lr 3e-5 --steps 400 --out /tmp/bf16.jsonl
    PYTHONPATH=. python bench/bf16_updates.py --device cuda --model <dir> ...   (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import emit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "fp32_master": ["policy.precision=bfloat16"],
    "bf16_nearest": ["policy.precision=bfloat16", "policy.dtensor_cfg.bf16_params=true"],
    "bf16_stochastic": [
        "policy.precision=bfloat16",
        "policy.dtensor_cfg.bf16_params=true",
        "policy.dtensor_cfg.bf16_params_update=stochastic_rounding",
    ],
    "bf16_kahan": [
        "policy.precision=bfloat16",
        "policy.dtensor_cfg.bf16_params=true",
        "policy.dtensor_cfg.bf16_params_update=kahan",
    ],
}


def run_mode(mode: str, args: argparse.Namespace, work: Path) -> list[float]:
    """Train losses by step of one mode's run."""
    overrides = [
        *MODES[mode],
        f"policy.model_name={args.model}",
        f"policy.optimizer.kwargs.lr={args.lr}",
        "policy.optimizer.kwargs.weight_decay=0.0",
        "policy.scheduler=null",
        f"sft.max_num_steps={args.steps}",
        "sft.val_period=0",
        "sft.val_at_start=false",
        "checkpointing.enabled=false",
        f"logger.log_dir={work / mode}",
        "logger.tensorboard_enabled=false",
        "logger.progress_bar=false",
        f"cluster.device={args.device}",
        *args.extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "run_sft.py"), *overrides],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=(work / f"{mode}.log").open("w"),
    )
    lines = (next((work / mode).glob("exp_*")) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return [r["train/loss"] for r in sorted(rows, key=lambda r: r["step"]) if "train/loss" in r]


def windows(losses: list[float], count: int) -> list[float]:
    """Mean loss over `count` equal windows of steps (per-batch losses are noisy)."""
    size = max(len(losses) // count, 1)
    return [sum(losses[i : i + size]) / size for i in range(0, size * count, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sftkit:tiny-llama")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="more config overrides for every run")
    args = parser.parse_args()
    curves: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            losses = run_mode(mode, args, Path(tmp))
            curves[mode] = windows(losses, args.windows)
            ref = curves.get("fp32_master")
            gap = [c / r - 1 for c, r in zip(curves[mode], ref, strict=True)] if ref else None
            record = {"mode": mode, "lr": args.lr, "steps": args.steps, "first": losses[0]}
            record |= {"window_loss": [round(x, 5) for x in curves[mode]]}
            if gap is not None:
                record["max_gap_vs_fp32"] = round(max(abs(g) for g in gap), 4)
                record["last_gap_vs_fp32"] = round(gap[-1], 4)
            emit(record, args.out)


if __name__ == "__main__":
    main()
