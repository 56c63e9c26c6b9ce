"""The quick start's promise, measured: exact match and time for seeds x torch thread counts.

Each run is what a new user does, in a fresh `SFTKIT_HOME` (so the built-in model is created
and the data tokenized on first use, as on a fresh machine), from the repository root:

    OMP_NUM_THREADS=T python examples/run_sft.py --config examples/configs/quickstart.yaml \
        sft.seed=S   (+ checkpoint and log directories under a temp dir)
    python examples/run_eval.py --config examples/configs/evals/quickstart.yaml \
        generation.model_name=<that run's final_hf>

Per run: `exact_match` on the held-out prompts (`examples/configs/evals/quickstart.yaml`'s data),
`train_wall_s` and `train_cpu_s` (user + sys of the training process tree: on a shared
machine wall time grows with the load, CPU time much less), and the eval's times. Then one
`untrained` line (the freshly created model's exact match: about 0 on a real task) and a
`summary`: median wall and CPU seconds, the lowest exact match, and whether the promise
(>= 95% exact match on every run, median training wall time <= 180 s) held.

    uv run python bench/quickstart.py --seeds 42,1,2 --threads 1,2 --out /tmp/qs.jsonl
    uv run python bench/quickstart.py --tiny     # 2 steps, 16 prompts: checks the bench itself

Six full runs take 15-20 minutes on a quiet 2-core machine. Extra arguments are training
overrides (`sft.max_num_steps=500`), for trying a change before making it the default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not a package: reach bench/results.py by path
    sys.path.insert(0, str(ROOT))

from bench.results import emit  # noqa: E402

CONFIG = "examples/configs/quickstart.yaml"
EVAL_DATA = "examples/data/addition_validation.jsonl"
PROMISE_EXACT_MATCH = 0.95
PROMISE_WALL_S = 180.0
# --tiny: enough to run both scripts through every stage (train, save, export, generate).
TINY_TRAIN = ("sft.max_num_steps=2", "sft.val_at_start=false", "sft.val_period=0")
TINY_EVAL = ("data.max_samples=16",)


def timed(argv: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run `argv` from the repository root; its exit code, wall and CPU (user + sys) seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"rc": proc.returncode, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def evaluate(
    model: str, work: Path, env: dict[str, str], args: argparse.Namespace, tag: str
) -> dict[str, Any]:
    """`run_eval.py` on `model`: its exact match on the held-out prompts, and times."""
    saved = work / f"eval_{tag}.json"
    argv = [sys.executable, "examples/run_eval.py", "--config",
            "examples/configs/evals/quickstart.yaml", f"generation.model_name={model}",
            f"data.data_path={args.eval_data}", f"eval.save_path={saved}",
            *(TINY_EVAL if args.tiny else ())]  # fmt: skip
    result = timed(argv, env, work / f"eval_{tag}.log")
    if result["rc"] != 0:
        return {"eval_rc": result["rc"], "eval_log": str(work / f"eval_{tag}.log")}
    score = json.loads(saved.read_text())
    return {"exact_match": score["score"], "eval_samples": score["num_samples"],
            "eval_wall_s": result["wall_s"], "eval_cpu_s": result["cpu_s"]}  # fmt: skip


def run_one(seed: int, threads: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One quick start (fresh SFTKIT_HOME: model creation included) and its evaluation."""
    work.mkdir(parents=True)
    env = {**os.environ, "SFTKIT_HOME": str(work / "home"), "OMP_NUM_THREADS": str(threads)}
    argv = [sys.executable, "examples/run_sft.py", "--config", args.config, f"sft.seed={seed}",
            f"checkpointing.checkpoint_dir={work / 'results'}",
            f"logger.log_dir={work / 'logs'}", *(TINY_TRAIN if args.tiny else ()),
            *args.overrides]  # fmt: skip
    train = timed(argv, env, work / "train.log")
    record: dict[str, Any] = {"case": "run", "seed": seed, "threads": threads,
                              "train_rc": train["rc"], "train_wall_s": train["wall_s"],
                              "train_cpu_s": train["cpu_s"]}  # fmt: skip
    if train["rc"] != 0:
        return {**record, "train_log": str(work / "train.log")}
    record.update(evaluate(str(work / "results" / "final_hf"), work, env, args, "final"))
    if record["seed"] == args.seeds[0] and threads == args.threads[0]:
        # The model as created (the built-in's directory in this run's SFTKIT_HOME).
        models = sorted((work / "home" / "models").iterdir())
        models = [m for m in models if not m.name.startswith(".")]
        untrained = evaluate(str(models[0]), work, env, args, "untrained")
        emit({"case": "untrained", "model": models[0].name, **untrained}, args.out)
    return record


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs, the worst exact match, and whether the promise held."""
    done = [r for r in runs if "exact_match" in r]
    summary: dict[str, Any] = {
        "case": "summary",
        "runs": len(runs),
        "failed": len(runs) - len(done),
    }
    if done:
        walls = [r["train_wall_s"] for r in done]
        summary.update(
            median_train_wall_s=statistics.median(walls),
            median_train_cpu_s=statistics.median(r["train_cpu_s"] for r in done),
            min_exact_match=min(r["exact_match"] for r in done),
            median_exact_match=statistics.median(r["exact_match"] for r in done),
        )
        summary["promise_held"] = (
            not summary["failed"]
            and summary["min_exact_match"] >= PROMISE_EXACT_MATCH
            and summary["median_train_wall_s"] <= PROMISE_WALL_S
        )
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="42,1,2", help="comma-separated sft.seed values")
    parser.add_argument("--threads", default="1,2", help="comma-separated OMP_NUM_THREADS")
    parser.add_argument("--config", default=CONFIG, help="training config (repo-relative)")
    parser.add_argument("--eval-data", default=EVAL_DATA, help="held-out prompts (JSONL)")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    parser.add_argument("--work", type=Path, default=None, help="keep run dirs here")
    parser.add_argument("--tiny", action="store_true", help="2 steps, 16 prompts, 1 run")
    parser.add_argument("overrides", nargs="*", help="extra training overrides (a.b=v)")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.tiny:
        args.seeds, args.threads = args.seeds[:1], [1]
    with tempfile.TemporaryDirectory(prefix="qs-bench-") as tmp:
        root = args.work or Path(tmp)
        runs = []
        for seed in args.seeds:
            for threads in args.threads:
                record = run_one(seed, threads, args, root / f"seed{seed}_threads{threads}")
                emit(record, args.out)
                runs.append(record)
    summary = summarize(runs)
    emit(summary, args.out)
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(0 if not result["failed"] else 1)
