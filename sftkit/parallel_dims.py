"""`ParallelDims`: the one owner of a run's parallel layout (after torchtitan's
`distributed/parallel_dims.py`).

Built once from `policy.dtensor_cfg` and the world size, before any process forks or data
is read (`sftkit.dist.init_distributed`, the self-launcher), and never changed after. It
answers every layout question: the degrees, whether a layout is possible (one line per
impossible one, naming the config keys), each rank's coordinates, how many batch shares
there are, the gradient divide factor, the sequence-length divisor and, lazily, the device
mesh (computing the layout needs no process group).

Ranks sit on one ("dp_replicate", "dp_shard", "cp", "tp") grid, "tp" varying fastest:
tensor-parallel peers hold the same tokens; context-parallel peers hold different chunks of
the same rows; data-parallel ranks (replica x shard) hold different examples. A new
dimension is one field here, one name in `MESH_DIMS` and the place that uses it.

Expert parallelism borrows its ranks from "dp_shard", as torchtitan's does: with ep > 1 the
mesh splits "dp_shard" into ("efsdp", "ep"), "ep" inner, so a rank's coordinates and batch
share do not change. Each "ep" group holds one copy of the experts, E / ep per rank, and
FSDP2 shards those over "efsdp"; every other parameter is sharded over all "dp_shard_cp".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from sftkit.config.schema import DTensorConfig

# The mesh's dims, outermost first ("tp" fastest: a rank's batch share is rank // (cp x tp)).
MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")
# Flattened views of several dims, and who uses each.
FLAT_DIMS = {
    "dp_shard_cp": ("dp_shard", "cp"),  # FSDP2 shards parameters and reduces gradients here
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),  # sums of per-rank numbers (`DistEnv.sum`)
}
# With expert parallelism "dp_shard" is itself the flattening of ("efsdp", "ep").
EP_MESH_DIMS = ("dp_replicate", "efsdp", "ep", "cp", "tp")
# The config key behind each degree, for error messages.
KEYS = {
    "tp": "policy.dtensor_cfg.tensor_parallel_size",
    "cp": "policy.dtensor_cfg.context_parallel_size",
    "dp_replicate": "policy.dtensor_cfg.dp_replicate_size",
    "ep": "policy.dtensor_cfg.expert_parallel_size",
    "pp": "policy.megatron_cfg.pipeline_model_parallel_size",
}


class Coordinates(NamedTuple):
    """One rank's index along each mesh dim."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of one run; their product is the world size. Immutable."""

    dp_replicate: int = 1  # HSDP replicas: gradients all-reduced across them
    dp_shard: int = 1  # FSDP2 shards parameters over these (x cp)
    cp: int = 1  # context parallel: ranks that split each sequence
    tp: int = 1  # tensor parallel: ranks that split each layer's weights
    # Expert parallel: ranks of "dp_shard" that split the experts (E / ep each); it divides
    # dp_shard and adds no ranks. Pipeline parallelism is not implemented (refused > 1).
    ep: int = 1
    pp: int = 1
    _meshes: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        degrees = {k: getattr(self, k) for k in (*MESH_DIMS, "ep", "pp")}
        bad = [f"{k}={v}" for k, v in degrees.items() if v < 1]
        assert not bad, f"parallel degrees must be >= 1: {bad}"  # from_config checks input
        lines = problems(self.world_size, self.tp, self.cp, self.dp_replicate, self.ep, self.pp)
        if lines:
            raise ValueError("\n".join(lines))

    @classmethod
    def from_config(cls, d: DTensorConfig, world_size: int) -> ParallelDims:
        """The layout `policy.dtensor_cfg` asks for on `world_size` ranks.

        One process trains unsharded whatever the recipe's layout says (the maths is the
        same; `check_before_model` warns once); with several ranks the layout must fit.
        """
        if world_size == 1:
            return cls()
        tp, cp, rep = d.tensor_parallel_size, d.context_parallel_size, d.dp_replicate_size
        ep = d.expert_parallel_size
        lines = problems(world_size, tp, cp, rep, ep)
        if lines:
            raise ValueError("\n".join(lines))
        return cls(dp_replicate=rep, dp_shard=world_size // (tp * cp * rep), cp=cp, tp=tp, ep=ep)

    # ------------------------------------------------------------------------- degrees

    @property
    def world_size(self) -> int:
        return math.prod(getattr(self, k) for k in MESH_DIMS) * self.pp  # ep borrows dp_shard

    @property
    def dp(self) -> int:
        """Data-parallel ranks: how many shares each global batch is cut into."""
        return self.dp_replicate * self.dp_shard

    @property
    def gradient_divide_factor(self) -> int:
        """Ranks FSDP2/HSDP average gradients over: every rank holding different tokens
        (data x context). The loss is already divided by the global token count, so the
        step multiplies gradients back by this (`StepOptions.grad_scale`)."""
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def seq_len_divisor(self) -> int:
        """Under context parallelism a row's width is padded to a multiple of this: 2 x cp
        chunks (causal load balancing), each a multiple of tp tokens (sequence-parallel
        regions split every chunk over tp). 1 without CP: rows keep their width."""
        return 2 * self.cp * self.tp if self.cp > 1 else 1

    # ------------------------------------------------------------------------- ranks

    def coordinates(self, rank: int) -> Coordinates:
        """`rank`'s index along each mesh dim ("tp" fastest)."""
        assert 0 <= rank < self.world_size, f"rank {rank} outside a world of {self.world_size}"
        rest, tp = divmod(rank, self.tp)
        rest, cp = divmod(rest, self.cp)
        replicate, shard = divmod(rest, self.dp_shard)
        return Coordinates(replicate, shard, cp, tp)

    def dp_rank(self, rank: int) -> int:
        """Which share of each global batch `rank` trains on (0 .. dp-1)."""
        c = self.coordinates(rank)
        return c.dp_replicate * self.dp_shard + c.dp_shard

    # ------------------------------------------------------------------------- meshes

    def mesh(self, device_type: str) -> DeviceMesh | None:
        """The device mesh (None with one rank), built on first use and kept: collective,
        every rank calls it the first time. Named dims `MESH_DIMS` plus `FLAT_DIMS`."""
        if self.world_size == 1:
            return None
        if device_type not in self._meshes:
            from torch.distributed.device_mesh import init_device_mesh

            names: tuple[str, ...] = MESH_DIMS
            flat = FLAT_DIMS
            if self.ep > 1:  # "dp_shard" = ("efsdp", "ep"), in the same rank order
                names = EP_MESH_DIMS
                flat = {k: _split_shard(v) for k, v in {"dp_shard": ("dp_shard",), **flat}.items()}
            sizes = tuple(self._size(k) for k in names)
            mesh = init_device_mesh(device_type, sizes, mesh_dim_names=names)
            for name, dims in flat.items():
                mesh[dims]._flatten(name)
            self._meshes[device_type] = mesh
        return self._meshes[device_type]

    def _size(self, dim: str) -> int:
        if dim == "efsdp":
            return self.dp_shard // self.ep
        return int(getattr(self, dim))

    def fsdp_mesh(self, device_type: str) -> DeviceMesh:
        """What FSDP2 wraps over: (replicate, shard) for HSDP, else the shard dim."""
        mesh = self.mesh(device_type)
        assert mesh is not None, "one process has no FSDP mesh"
        return mesh["dp_replicate", "dp_shard_cp"] if self.dp_replicate > 1 else mesh["dp_shard_cp"]

    def expert_fsdp_mesh(self, device_type: str) -> DeviceMesh:
        """What FSDP2 wraps the experts over under EP: ("dp_replicate", "efsdp") for HSDP,
        else "efsdp" (one rank when ep = dp_shard: FSDP2 then only reduces gradients)."""
        mesh = self.mesh(device_type)
        assert mesh is not None and self.ep > 1, "no expert-parallel mesh"
        return mesh["dp_replicate", "efsdp"] if self.dp_replicate > 1 else mesh["efsdp"]

    def group(self, device_type: str, name: str) -> Any:
        """The process group of one (possibly flattened) mesh dim; None with one rank."""
        mesh = self.mesh(device_type)
        return None if mesh is None else mesh[name].get_group()


def _split_shard(dims: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(d for dim in dims for d in (("efsdp", "ep") if dim == "dp_shard" else (dim,)))


def problems(
    world_size: int, tp: int, cp: int, dp_replicate: int, ep: int = 1, pp: int = 1
) -> list[str]:
    """One line per reason `world_size` ranks cannot hold this layout (empty: it fits)."""
    sizes = {"tp": tp, "cp": cp, "dp_replicate": dp_replicate, "ep": ep, "pp": pp}
    lines = [f"{KEYS[k]}={v} must be at least 1" for k, v in sizes.items() if v < 1]
    if lines:
        return lines
    if pp > 1:
        lines.append(f"{KEYS['pp']}={pp}: sftkit has no pp parallelism; set it to 1")
    if ep > 1 and (tp > 1 or cp > 1):
        lines.append(
            f"{KEYS['ep']}={ep} with tensor_parallel_size={tp} and context_parallel_size={cp}: "
            "sftkit's expert parallelism borrows FSDP ranks only; set both to 1 (or ep to 1)"
        )
    elif ep > 1 and world_size % (dp_replicate * ep):
        lines.append(
            f"{KEYS['ep']}={ep} must divide the {world_size // dp_replicate} FSDP ranks of "
            f"each replica (world {world_size} / dp_replicate_size={dp_replicate}); set it to "
            "a divisor of them"
        )
    if cp > 1 and dp_replicate > 1:
        lines.append(
            f"policy.dtensor_cfg.context_parallel_size={cp} with dp_replicate_size={dp_replicate} "
            "(HSDP) is not supported; set dp_replicate_size=1 (FSDP2 then shards over all "
            "data x context ranks)"
        )
    if world_size % (tp * cp * dp_replicate):
        lines.append(
            f"policy.dtensor_cfg.tensor_parallel_size={tp} x context_parallel_size={cp} x "
            f"dp_replicate_size={dp_replicate} needs a multiple of {tp * cp * dp_replicate} "
            f"ranks but this run has {world_size}: set cluster.gpus_per_node x "
            "cluster.num_nodes (or the torchrun ranks) to a multiple of it, or lower those sizes"
        )
    return lines
