"""One rank of a multi-rank save and resume verification that counts the bytes each rank
hashes, for tests/integration/test_checkpoint_parallel_verify.py.

    RANK=r WORLD_SIZE=w MASTER_ADDR=... MASTER_PORT=... \
        python parallel_verify_worker.py CHECKPOINT_DIR OUT_DIR MB_PER_RANK

Each rank writes MB_PER_RANK of DCP shards and its RNG file into two checkpoints (steps 1
and 2) through `layout.save_checkpoint`; then steps 2 is verified as resume does, and as
one process hashing everything (sftkit before parallel verification); then rank 0 flips a
byte of the last rank's shard and every rank must skip step 2, naming that file. Each rank
writes OUT_DIR/rank_R.json with what it read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint import manifest

hashed = [0]  # bytes this rank read to hash, since the last reset
_sha256_file = manifest.sha256_file


def counting_sha256(path: Path, progress: Any = None) -> str:
    hashed[0] += path.stat().st_size
    return _sha256_file(path, progress)


manifest.sha256_file = counting_sha256  # type: ignore[assignment]


def measure(work: Any) -> tuple[Any, int]:
    hashed[0] = 0
    result = work()
    return result, hashed[0]


def main(root: Path, out: Path, mb: float) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    share = manifest.rank_share(rank, world)
    numel = int(mb * 2**20 / 4)

    def write_files(tmp: Path) -> None:
        weights = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        dcp.save({"model": {f"layer{rank}.weight": weights}}, checkpoint_id=str(tmp / "dcp"))
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        torch.save({"seed": torch.tensor([rank])}, tmp / "rng" / f"rank_{rank}.pt")
        if rank == 0:
            (tmp / "config.yaml").write_text("seed: 1\n")

    saved = []
    for step in (1, 2):
        info = {"step": step, "format_version": ckpt.FORMAT_VERSION}
        _, read = measure(
            lambda step=step, info=info: ckpt.save_checkpoint(
                root, step, info, write_files, rank, dist.barrier, share=share
            )
        )
        saved.append(read)
    step2 = root / "step_2"
    files = json.loads((step2 / ckpt.MANIFEST).read_text())["files"]
    problem, resume_read = measure(lambda: ckpt.verify(step2, share=share))
    assert problem is None, problem
    _, alone_read = measure(lambda: ckpt.verify(step2))  # one process hashing all of it
    victim = f"dcp/__{world - 1}_0.distcp"  # written and hashed by the last rank
    if rank == 0:
        data = bytearray((step2 / victim).read_bytes())
        data[len(data) // 2] ^= 0x01
        (step2 / victim).write_bytes(bytes(data))
    dist.barrier()
    latest = ckpt.latest_checkpoint(root, share)
    problem = ckpt.verify(step2, share=share)
    record = {
        "rank": rank,
        "checkpoint_bytes": sum(meta["size"] for meta in files.values()),
        "save_hashed": saved,
        "resume_hashed": resume_read,
        "alone_hashed": alone_read,
        "latest": latest.name if latest else None,
        "problem": problem,
        "victim": victim,
    }
    (out / f"rank_{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]))
