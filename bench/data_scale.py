"""Memory against data size: prepare + 3 training steps on JSONL of growing size.

    uv run bench/data_scale.py --sizes-gb 0.25,1,2          # the issue's sizes (disk: ~2x)
    uv run bench/data_scale.py --sizes-gb 0.05,0.2 --big-row-mb 10
    uv run bench/data_scale.py --tiny                       # seconds: checks that it runs

Each size writes a JSONL file of ~1 KB rows (`input`/`output`, ResponseDataset) under
`--dir`, then runs the real entry point (`examples/run_sft.py`, the quick-start tiny
model on CPU, validation and checkpoints off, a fresh data cache) in a subprocess for 3
steps. While it runs, the summed `RssAnon` of the whole process tree (the run and its
tokenization workers; file-backed pages such as the memory-mapped cache do not count) is
sampled from `/proc/<pid>/status` every 50 ms. With `--big-row-mb`, the smallest size is
run again with one row of that many megabytes added. Prints one JSON record per run and a
summary with the ratios the issue targets; files are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the model data answer question because value number system paris weather city "
    "compute result first then finally explain reason step check list table code run "
    "train token loss mask batch learning rate python function return error fix"
).split()


def write_jsonl(path: Path, size_bytes: int, row_bytes: int = 1024, big_row_mb: float = 0) -> int:
    """About `size_bytes` of rows of about `row_bytes`; returns the row count."""
    rng = random.Random(0)
    width = row_bytes - 60  # a short prompt, a long reply: truncation keeps trained tokens
    pool = [" ".join(rng.choice(WORDS) for _ in range(width // 4))[:width] for _ in range(4096)]
    rows = written = 0
    with path.open("w") as f:
        if big_row_mb:
            big = " ".join(rng.choice(WORDS) for _ in range(int(big_row_mb * 2**20) // 6))
            line = json.dumps({"input": "summarize", "output": big}) + "\n"
            f.write(line)  # on top of the size: the other rows are the same as without it
            rows = 1
        while written < size_bytes:
            lines = []
            for _ in range(1024):
                k = rows + len(lines)
                lines.append(
                    f'{{"input": "{k} {pool[k % 4096][:20]}", "output": "{pool[(7 * k + 1) % 4096]}"}}\n'
                )
            block = "".join(lines)
            f.write(block)
            rows += len(lines)
            written += len(block)
    return rows


def tree_rss_anon_kb(root: int) -> int:
    """Summed RssAnon (kB) of `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        found = re.search(r"^RssAnon:\s+(\d+) kB", status, re.MULTILINE)
        total += int(found.group(1)) if found else 0
    return total


def run_case(data: Path, rows: int, work: Path, workers: int, steps: int) -> dict[str, Any]:
    """The entry point on `data` for `steps` steps; peak tree RssAnon, prep rate, cache size."""
    cache = work / "cache"
    command = [
        sys.executable, str(ROOT / "examples" / "run_sft.py"),
        "--config", str(ROOT / "examples" / "configs" / "quickstart.yaml"),
        f"data.train.data_path={data}", "data.validation=null", f"data.cache_dir={cache}",
        f"data.num_workers={workers}", f"sft.max_num_steps={steps}", "sft.val_period=0",
        "policy.max_total_sequence_length=256",
        "sft.val_at_start=false", "checkpointing.enabled=false",
        f"logger.log_dir={work / 'logs'}", "logger.tensorboard_enabled=false",
        "logger.monitor_gpus=false", "logger.progress_bar=false", "cluster.device=cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    with (work / "stderr.txt").open("w") as err:
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=err, stderr=err)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss_anon_kb(proc.pid))
            time.sleep(0.05)
    log = (work / "stderr.txt").read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}):\n{log[-3000:]}")
    found = re.search(r"data ready in ([0-9.]+)s", log)
    prep_s = float(found.group(1)) if found else float("nan")
    cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    return {
        "data_bytes": data.stat().st_size,
        "rows": rows,
        "peak_rss_anon_mb": round(peak / 1024, 1),
        "prep_s": prep_s,
        "prep_rows_per_s": round(rows / max(prep_s, 0.05), 1),
        "cache_mb": round(cache_bytes / 2**20, 2),
        "wall_s": round(time.monotonic() - start, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-gb", default="0.25,1,2", help="comma-separated JSONL sizes")
    parser.add_argument("--big-row-mb", type=float, default=10.0, help="0: skip that run")
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="1 and 2 MB, a 0.5 MB row")
    parser.add_argument("--out", default=None, help="append the records to this JSONL file")
    args = parser.parse_args(argv)
    sizes = [0.001, 0.002] if args.tiny else [float(s) for s in args.sizes_gb.split(",")]
    big_mb = 0.5 if args.tiny and args.big_row_mb else args.big_row_mb
    base = Path(tempfile.mkdtemp(prefix="sftkit-data-scale-", dir=args.dir))
    records: list[dict[str, Any]] = []
    try:
        cases = [(gb, 0.0) for gb in sizes] + ([(min(sizes), big_mb)] if big_mb else [])
        for gb, big in cases:
            work = base / f"{gb}gb-{big}mb"
            work.mkdir()
            data = work / "train.jsonl"
            rows = write_jsonl(data, int(gb * 1e9), big_row_mb=big)
            record = {"case": "size", "size_gb": gb, "big_row_mb": big,
                      **run_case(data, rows, work, args.workers, args.steps)}  # fmt: skip
            print(json.dumps(record), flush=True)
            records.append(record)
            shutil.rmtree(work)  # one size on disk at a time
    finally:
        shutil.rmtree(base, ignore_errors=True)
    plain = [r for r in records if not r["big_row_mb"]]
    summary: dict[str, Any] = {
        "case": "summary",
        "peak_ratio_largest_over_smallest": round(
            plain[-1]["peak_rss_anon_mb"] / plain[0]["peak_rss_anon_mb"], 3
        ),
    }
    big_runs = [r for r in records if r["big_row_mb"]]
    if big_runs:
        summary["peak_ratio_big_row"] = round(
            big_runs[0]["peak_rss_anon_mb"] / plain[0]["peak_rss_anon_mb"], 3
        )
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for record in [*records, summary]:
                f.write(json.dumps(record) + "\n")
    return {"records": records, "summary": summary}


if __name__ == "__main__":
    main()
