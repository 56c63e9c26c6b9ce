"""The process group: joining one started by torchrun/srun/self-launch, and small collectives.

Every rank runs the same loop (SPMD). With one process nothing here touches
torch.distributed, so the single-CPU path has no extra moving parts. Where a rank sits in
the parallel layout (degrees, coordinates, meshes) is `sftkit.parallel_dims.ParallelDims`,
built once in `init_distributed` and held, unchanged, as `DistEnv.dims`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from sftkit.parallel_dims import ParallelDims

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from sftkit.config.schema import DTensorConfig

logger = logging.getLogger("sftkit")

DEFAULT_MASTER_PORT = 29500


@dataclass
class DistEnv:
    """Where this process sits in the job: its rank, device and the run's layout."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dims: ParallelDims = field(default_factory=ParallelDims)  # the layout, built once

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    @property
    def dp_rank(self) -> int:
        """Which share of each global batch this rank trains on."""
        return self.dims.dp_rank(self.rank)

    @property
    def mesh(self) -> DeviceMesh | None:
        """The run's device mesh (None with one process); built on first use, collectively."""
        return self.dims.mesh(self.device.type) if self.initialized else None

    def group(self, name: str) -> Any:
        """The process group of mesh dim `name` (None with one process)."""
        return self.dims.group(self.device.type, name) if self.initialized else None

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def sum(self, value: float) -> float:
        """Sum of a per-batch-share number over data-parallel ranks (float64: counts stay exact).

        Tensor-parallel peers hold copies of the same value, so they are counted once;
        context-parallel peers hold different shares of one batch, so each is counted.
        """
        if not self.initialized:
            return value
        # None (the world) without tensor parallelism: building no mesh keeps the collective
        # as simple as before the model is built.
        group = self.group("dp_cp") if self.dims.tp > 1 else None
        tensor = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, group=group)
        return float(tensor.item())

    def sum_tensor(self, value: torch.Tensor) -> torch.Tensor:
        """`sum` for a tensor of per-batch-share counts (the same group, float64)."""
        if not self.initialized:
            return value
        group = self.group("dp_cp") if self.dims.tp > 1 else None
        tensor = value.to(self._collective_device(), torch.float64)
        dist.all_reduce(tensor, group=group)
        return tensor

    def max(self, value: float) -> float:
        """Max over every rank (stop signals, micro-batch counts)."""
        if not self.initialized:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- launchers


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `gpu[03-05,9],cpu1` -> `gpu03`."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launched_by_slurm(environ: MutableMapping[str, str]) -> bool:
    """True inside `srun` with several tasks (one task per rank) and no torch launcher."""
    return (
        "RANK" not in environ
        and int(environ.get("SLURM_NTASKS", "1")) > 1
        and ("SLURM_PROCID" in environ)
    )


def in_launcher(environ: MutableMapping[str, str]) -> bool:
    """True when a launcher (torchrun, elastic, srun with several tasks) started this process."""
    return "RANK" in environ or launched_by_slurm(environ)


def apply_slurm_env(environ: MutableMapping[str, str]) -> bool:
    """Fill torch's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from `srun`'s SLURM_*.

    Only when srun started one task per rank and no torch launcher set RANK; returns whether
    it did. The rendezvous host is the allocation's first node; the port is MASTER_PORT when
    set, else derived from the job id so that two jobs sharing a node do not collide.
    """
    if not launched_by_slurm(environ):
        return False
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    environ.setdefault("LOCAL_WORLD_SIZE", environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    if "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError(
                "srun started this task but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set; "
                "export MASTER_ADDR=<first node> in the job script"
            )
        environ["MASTER_ADDR"] = first_slurm_host(nodelist)
    job = int(environ.get("SLURM_JOB_ID", "0") or 0)
    environ.setdefault("MASTER_PORT", str(DEFAULT_MASTER_PORT + job % 10000))
    return True


# ----------------------------------------------------------------------------- the group


def pick_device(preference: str, local_rank: int) -> torch.device:
    """`cluster.device`: auto (CUDA when present), cpu or cuda."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            "cluster.device=cuda but no CUDA device is visible; use cluster.device=cpu"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(
    device_preference: str = "auto",
    layout: DTensorConfig | None = None,
    collective_timeout_s: float | None = None,
) -> DistEnv:
    """Join the process group described by the launcher's environment (RANK, WORLD_SIZE, ...).

    Under `srun` without torchrun, the SLURM_* variables are translated first. The layout
    (`policy.dtensor_cfg`) is checked against the world size before the group is joined.
    `collective_timeout_s` bounds every collective (`cluster.collective_timeout_s`; None:
    torch's default, 30 minutes on gloo and 10 on NCCL).
    """
    if apply_slurm_env(os.environ):
        logger.debug("Joined srun's task grid as rank %s", os.environ["RANK"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dims = ParallelDims() if layout is None else ParallelDims.from_config(layout, world_size)
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = None if collective_timeout_s is None else timedelta(seconds=collective_timeout_s)
        dist.init_process_group(
            backend=backend, device_id=device if backend == "nccl" else None, timeout=timeout
        )
    return DistEnv(rank, world_size, local_rank, device, dims)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- grad clipping


@torch.no_grad()
def clip_grad_norm(
    parameters: Sequence[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for parameters that live on different device meshes.

    With tensor parallelism, FSDP2 makes TP-split parameters 2-D (dp, tp) DTensors and the
    rest (embeddings, norms, lm_head) 1-D dp DTensors; torch's version stacks their norms
    and fails ("All operands in aten.stack must have the same mesh"). Here each group's
    norm is reduced to a plain number first. Equal to torch's on one mesh or one process.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    groups: dict[Any, list[torch.Tensor]] = {}
    for grad in grads:
        mesh = getattr(grad, "device_mesh", None)
        groups.setdefault(None if mesh is None else id(mesh), []).append(grad)
    if len(groups) <= 1:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type)
    norms = []
    for members in groups.values():
        norm = torch.nn.utils.get_total_norm(members, norm_type)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.nn.utils.get_total_norm(norms, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch's, inf max_norm: 1
    for grad in grads:
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        local.mul_(coef.to(local.device, local.dtype))
    return total
