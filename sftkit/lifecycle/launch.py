"""Self-launch: `run_sft.py cluster.gpus_per_node=N` starts N ranks with torch's elastic agent.

Under torchrun, torch's elastic agent or `srun` with one task per rank, the process joins
the existing group instead (`sftkit.dist.init_distributed`). Several nodes need one
launcher per node (`examples/slurm/sft.sbatch`, or `torchrun --nnodes`); self-launch is for
one node.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path

from sftkit.config import MasterConfig
from sftkit.dist import in_launcher
from sftkit.errors import EXIT_REQUEUE
from sftkit.lifecycle.signals import preempted_marker
from sftkit.parallel_dims import ParallelDims

logger = logging.getLogger("sftkit")


def requested_ranks(cfg: MasterConfig) -> int:
    """World size the config asks for: `cluster.gpus_per_node * cluster.num_nodes`."""
    return cfg.cluster.gpus_per_node * cfg.cluster.num_nodes


def child_command(argv: list[str], command: str = "sft") -> list[str]:
    """The per-rank command: the same `sft` (or `eval`) invocation, with the same overrides."""
    return ["-m", "sftkit.cli", command, *argv]


def launch_ranks(nproc: int, device: str, command: list[str]) -> int:
    """Start `nproc` ranks of `python -m sftkit.cli <command>` on this node (`sftkit eval`'s
    data-parallel generation) and wait; the exit code as for training."""
    try:
        _check_devices(device, nproc)
    except ValueError as err:  # eval's device key is generation.device
        raise ValueError(str(err).replace("cluster.device", "generation.device")) from None
    marker = Path(tempfile.mkdtemp(prefix="sftkit-ranks-")) / "preempted"
    return _elastic_run(nproc, command[1:], marker, command[0])


def maybe_self_launch(cfg: MasterConfig, argv: list[str]) -> int | None:
    """Start `cluster.gpus_per_node` ranks on this node and wait for them; returns the exit
    code (rank 0's when ranks fail, so 75 "saved, start again" survives). None means "run
    in this process": one rank requested, or a launcher already started this one."""
    wanted = requested_ranks(cfg)
    if in_launcher(os.environ):
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        if wanted > 1 and world != wanted:
            logger.warning(
                "cluster.gpus_per_node x cluster.num_nodes = %d but the launcher started %d "
                "ranks: using the launcher's %d", wanted, world, world,
            )  # fmt: skip
        return None
    if wanted <= 1:
        return None
    if cfg.cluster.num_nodes > 1:
        raise ValueError(
            f"cluster.num_nodes={cfg.cluster.num_nodes}: several nodes need one launcher per "
            "node; submit examples/slurm/sft.sbatch or run torchrun --nnodes on each node"
        )
    nproc = cfg.cluster.gpus_per_node
    # Before any fork: a layout the ranks cannot hold is a config error, not a rank crash.
    ParallelDims.from_config(cfg.policy.dtensor_cfg, nproc)
    _check_devices(cfg.cluster.device, nproc)
    return _elastic_run(nproc, argv, preempted_marker(Path(cfg.checkpointing.checkpoint_dir)))


def _check_devices(preference: str, nproc: int) -> None:
    import torch

    if preference == "cpu":
        return
    if preference == "auto" and not torch.cuda.is_available():
        # A NeMo recipe named 1n8g on a laptop should not quietly fork 8 CPU trainers.
        raise ValueError(
            f"cluster.gpus_per_node={nproc} but no GPU is visible; set "
            "cluster.gpus_per_node=1 to train in one process, or cluster.device=cpu to run "
            f"{nproc} ranks on CPU (gloo)"
        )
    count = torch.cuda.device_count()
    if count < nproc:
        raise ValueError(
            f"cluster.gpus_per_node={nproc} but {count} GPUs are visible; lower "
            "cluster.gpus_per_node or set cluster.device=cpu to run the ranks on CPU (gloo)"
        )


def _elastic_run(nproc: int, argv: list[str], marker: Path, command: str = "sft") -> int:
    """Run the ranks; 75 whenever rank 0 left the preemption `marker` (it saved and stopped
    for requeue), also when this launcher was the one signalled: torch's agent then gives
    the ranks SIGTERM and a grace period, and raises SignalException."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    marker.unlink(missing_ok=True)

    # One thread per rank unless told otherwise: N ranks x all cores oversubscribes the CPU
    # (torchrun does the same).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = root if not path else f"{root}{os.pathsep}{path}"
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"sftkit-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=0,
        monitor_interval=0.5,
    )
    logger.info("Starting %d ranks on this node (torch elastic)", nproc)
    code = 0
    try:
        elastic_launch(config, sys.executable)(*child_command(argv, command))
    except ChildFailedError as err:
        codes = {rank: failure.exitcode for rank, failure in err.failures.items()}
        code = codes.get(0, next(iter(codes.values())))
        code = code if code > 0 else 1
    except SignalException as err:
        logger.warning("The launcher got %s; the ranks were told to stop", err.sigval.name)
        code = 128 + int(err.sigval)
    return EXIT_REQUEUE if marker.exists() else code
