"""One-GPU FSDP2 run of a Llama-3.2-1B-shaped model, activation checkpointing off and on.

Random init from LlamaConfig (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate
8192, vocab 128256, tied embeddings; no download), float32 master weights, bfloat16 compute
(FSDP2 MixedPrecisionPolicy, float32 gradient reduction), rows of 4096 fully trained
tokens, 2 rows per optimizer step, AdamW, clipping at 1.0. The model goes through sftkit's
own transforms (`apply_activation_checkpointing`, `apply_fsdp` on a one-rank mesh) and
steps through sftkit's `train_step` (chunked head + loss).

Each case runs in its own subprocess (an OOM cannot spoil the next) and appends one JSON
line to `$OUT/fsdp.jsonl` as it finishes: tokens/s over the timed steps, peak
`torch.cuda.max_memory_allocated` (CPU: peak RSS), first and last loss.

    PYTHONPATH=. OUT=/tmp/out python bench/gpu_fsdp.py        # GPU, both cases < 3 minutes
    OUT=/tmp/out uv run --group dev python bench/gpu_fsdp.py --tiny       # CPU, tiny model, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA_1B = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 500000.0,
}  # fmt: skip
TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "tie_word_embeddings": True, "max_position_embeddings": 256,
}  # fmt: skip


def settings(tiny: bool) -> dict[str, Any]:
    if tiny:
        return {"shape": TINY, "seq": 64, "rows": 2, "warmup": 1, "steps": 3, "device": "cpu"}
    return {"shape": LLAMA_1B, "seq": 4096, "rows": 2, "warmup": 2, "steps": 8, "device": "cuda"}


def run_case(activation_checkpointing: bool, tiny: bool) -> dict[str, Any]:
    """One case in this process: a one-rank process group, FSDP2, timed train steps."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftkit.batch import collate_padded
    from sftkit.dist import DistEnv
    from sftkit.model.parallel import apply_activation_checkpointing, apply_fsdp
    from sftkit.train.step import StepOptions, train_step

    s = settings(tiny)
    device = torch.device(s["device"])
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (1, 1), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    config = LlamaConfig(**s["shape"], attn_implementation="sdpa", use_cache=False)
    with device:
        model = LlamaForCausalLM(config)  # float32 masters
    params = sum(p.numel() for p in model.parameters())
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    compute = torch.float32 if tiny else torch.bfloat16
    apply_fsdp(model, mesh["dp"], None if compute == torch.float32 else compute, False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    env = DistEnv(device=device)
    opts = StepOptions(compute, 1.0, chunked_loss=True, chunk_size=1024, grad_scale=1.0)
    generator = torch.Generator().manual_seed(1)
    rows = [
        (torch.randint(0, config.vocab_size, (s["seq"],), generator=generator).tolist(),
         [1] * s["seq"])
        for _ in range(s["rows"])
    ]  # fmt: skip
    batch = collate_padded(rows, 0, 1)
    tokens = batch.num_target_tokens
    losses = []
    for step in range(s["warmup"] + s["steps"]):
        if step == s["warmup"]:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        losses.append(train_step(model, optimizer, [batch], tokens, opts, env, step + 1)["loss"])
    _sync(device)
    elapsed = time.perf_counter() - start
    dist.destroy_process_group()
    return {
        "activation_checkpointing": activation_checkpointing,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "params": params,
        "seq_len": s["seq"],
        "rows_per_step": s["rows"],
        "timed_steps": s["steps"],
        "tokens_per_s": tokens * s["steps"] / elapsed,
        "peak_mem_gib": _peak_memory_gib(device),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "torch": torch.__version__,
        "ok": all(map(_finite, losses)),
    }


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_gib(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny model (smoke test)")
    parser.add_argument("--case", choices=["off", "on"], help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=80.0, help="seconds per case")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    if args.case:  # the child: one case, one line
        row = {"case": f"fsdp2_ac_{args.case}"}
        try:
            row.update(run_case(args.case == "on", args.tiny))
        except Exception as err:  # noqa: BLE001 (recorded, the next case still runs)
            row.update({"ok": False, "error": f"{type(err).__name__}: {err}"[:500]})
        with (out / "fsdp.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return 0 if row.get("ok") else 1
    code = 0
    for case in ("off", "on"):
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
        cmd = [sys.executable, __file__, "--case", case] + (["--tiny"] if args.tiny else [])
        try:
            result = subprocess.run(cmd, env=env, timeout=args.timeout)
            code = code or result.returncode
        except subprocess.TimeoutExpired:
            with (out / "fsdp.jsonl").open("a") as f:
                f.write(json.dumps({"case": f"fsdp2_ac_{case}", "ok": False,
                                    "error": f"timeout {args.timeout}s"}) + "\n")  # fmt: skip
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
