"""Data preparation across ranks: CPU seconds of `prepare_data` on N gloo ranks, cold cache.

    uv run bench/prepare_ranks.py --ranks 1,2,4 --rows 40000
    uv run bench/prepare_ranks.py --tiny          # a few hundred rows: checks that it runs

For each rank count, a fresh cache directory, then `torch.distributed.run --standalone
--nproc-per-node N` starts N CPU ranks (gloo) that each load the quick start's tokenizer
and call `prepare_data` on the same JSONL file (~1 KB rows, the quick start's
ResponseDataset keys). Each rank reports the CPU seconds (user + sys, its own and its
tokenization workers') that `prepare_data` cost it; the record sums them over the ranks and
divides by the one-rank total (`ratio`): 1.0 means the data was prepared once, N means every
rank prepared it. CPU seconds, not wall time, so a loaded machine changes them little.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not a package: reach bench/results.py by path
    sys.path.insert(0, str(ROOT))

from bench.results import emit  # noqa: E402

WORDS = "the model data answer question because value number system city code run".split()


def write_jsonl(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for k in range(rows):
            reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
            f.write(json.dumps({"input": f"question {k}", "output": reply}) + "\n")


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def rank_main(data: str, cache_dir: str, workers: int) -> None:
    """One rank: join the group, prepare the data, print this rank's CPU seconds."""
    from sftkit.config import load_config
    from sftkit.data import load_tokenizer, prepare_data
    from sftkit.dist import init_distributed, shutdown_distributed

    cfg = load_config(
        ROOT / "examples/configs/quickstart.yaml",
        [f"data.train.data_path={data}", "data.validation=null", f"data.cache_dir={cache_dir}",
         f"data.num_workers={workers}", "cluster.device=cpu"],
    )  # fmt: skip
    env = init_distributed("cpu")
    tokenizer = load_tokenizer(cfg.policy)
    start = cpu_seconds()
    prepared = prepare_data(cfg, tokenizer, env)
    spent = cpu_seconds() - start
    print(json.dumps({"rank": env.rank, "cpu_s": spent, "hit": prepared.report["cache_hit"]}))
    shutdown_distributed()


def measure(ranks: int, data: Path, workers: int, home: Path) -> list[dict[str, Any]]:
    cache_dir = tempfile.mkdtemp(dir=home, prefix=f"cache{ranks}.")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={ranks}", __file__, "--rank-main", str(data), cache_dir,
        str(workers),
    ]  # fmt: skip
    env = {**os.environ, "SFTKIT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{ranks} ranks failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"rank"')]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """The records, one per rank count (also printed as JSON lines)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers per rank")
    parser.add_argument("--tiny", action="store_true", help="300 rows, 1 and 2 ranks")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    counts = [1, 2] if args.tiny else [int(n) for n in args.ranks.split(",")]
    rows = 300 if args.tiny else args.rows
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        data = home / "rows.jsonl"
        write_jsonl(data, rows)
        one = None
        records = []
        for n in counts:
            per_rank = measure(n, data, args.workers, home)
            total = sum(r["cpu_s"] for r in per_rank)
            one = total if one is None and n == 1 else one
            records.append(
                {"ranks": n, "rows": rows, "cpu_s_total": round(total, 2),
                 "cpu_s_per_rank": [round(r["cpu_s"], 2) for r in per_rank],
                 "ratio_to_one_rank": round(total / one, 2) if one else None}
            )  # fmt: skip
            emit(records[-1], args.out)
    return records


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--rank-main":
        rank_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
