"""`ParallelDims`: degrees, coordinates, the gradient divide factor and the sequence-length
divisor of a table of layouts and of every shipped recipe on its intended GPU count, all
computed without a process group (meshes are built lazily)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch.distributed as dist

from sftkit.config import load_config
from sftkit.config.schema import DTensorConfig
from sftkit.parallel_dims import Coordinates, ParallelDims

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "configs" / "recipes"


def layout(world: int, tp: int = 1, cp: int = 1, rep: int = 1) -> ParallelDims:
    d = DTensorConfig(tensor_parallel_size=tp, context_parallel_size=cp, dp_replicate_size=rep)
    return ParallelDims.from_config(d, world)


# world, (tp, cp, rep) -> (dp_replicate, dp_shard, cp, tp), divide factor, seq divisor,
# {rank: (coordinates, batch share)}: worked out by hand from the ("dp_replicate",
# "dp_shard", "cp", "tp") grid with tp varying fastest.
TABLE = [
    (1, (1, 1, 1), (1, 1, 1, 1), 1, 1, {0: ((0, 0, 0, 0), 0)}),
    (1, (4, 2, 2), (1, 1, 1, 1), 1, 1, {0: ((0, 0, 0, 0), 0)}),  # one process: unsharded
    (2, (1, 1, 1), (1, 2, 1, 1), 2, 1, {1: ((0, 1, 0, 0), 1)}),
    (8, (1, 1, 1), (1, 8, 1, 1), 8, 1, {5: ((0, 5, 0, 0), 5)}),
    (8, (2, 1, 1), (1, 4, 1, 2), 4, 1, {5: ((0, 2, 0, 1), 2), 7: ((0, 3, 0, 1), 3)}),
    (8, (4, 1, 1), (1, 2, 1, 4), 2, 1, {5: ((0, 1, 0, 1), 1)}),
    (8, (1, 2, 1), (1, 4, 2, 1), 8, 4, {5: ((0, 2, 1, 0), 2)}),
    (8, (1, 8, 1), (1, 1, 8, 1), 8, 16, {5: ((0, 0, 5, 0), 0)}),
    (8, (2, 2, 1), (1, 2, 2, 2), 4, 8, {5: ((0, 1, 0, 1), 1), 6: ((0, 1, 1, 0), 1)}),
    (16, (1, 1, 2), (2, 8, 1, 1), 16, 1, {9: ((1, 1, 0, 0), 9)}),
    (16, (2, 1, 2), (2, 4, 1, 2), 8, 1, {9: ((1, 0, 0, 1), 4), 15: ((1, 3, 0, 1), 7)}),
    (32, (8, 1, 1), (1, 4, 1, 8), 4, 1, {31: ((0, 3, 0, 7), 3), 9: ((0, 1, 0, 1), 1)}),
]


@pytest.mark.parametrize(("world", "sizes", "degrees", "factor", "divisor", "ranks"), TABLE)
def test_layout_table(
    world: int,
    sizes: tuple[int, int, int],
    degrees: tuple[int, int, int, int],
    factor: int,
    divisor: int,
    ranks: dict[int, tuple[tuple[int, ...], int]],
) -> None:
    dims = layout(world, *sizes)
    assert (dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp) == degrees
    assert (dims.ep, dims.pp) == (1, 1)
    assert dims.world_size == world
    assert dims.gradient_divide_factor == factor
    assert dims.seq_len_divisor == divisor
    for rank, (coords, share) in ranks.items():
        assert dims.coordinates(rank) == Coordinates(*coords)
        assert dims.dp_rank(rank) == share
    assert dims._meshes == {} and not dist.is_initialized()  # nothing built, no group


@pytest.mark.parametrize(
    ("world", "sizes", "lines"),
    [
        (2, (1, 1, 4), ["dp_replicate_size=4 needs a multiple of 4 ranks but this run has 2"]),
        (2, (1, 4, 1), ["context_parallel_size=4 x dp_replicate_size=1 needs"]),
        (6, (4, 1, 1), ["tensor_parallel_size=4 x context_parallel_size=1"]),
        (8, (0, 1, 1), ["policy.dtensor_cfg.tensor_parallel_size=0 must be at least 1"]),
        (8, (1, 2, 2), ["context_parallel_size=2 with dp_replicate_size=2 (HSDP)"]),
        (  # two impossibilities: two lines
            12,
            (1, 2, 4),
            ["(HSDP) is not supported", "needs a multiple of 8 ranks but this run has 12"],
        ),
    ],
)
def test_impossible_layouts_give_one_line_each(
    world: int, sizes: tuple[int, int, int], lines: list[str]
) -> None:
    with pytest.raises(ValueError) as raised:
        layout(world, *sizes)
    got = str(raised.value).splitlines()
    assert len(got) == len(lines)
    for line, expected in zip(got, lines, strict=True):
        assert expected in line


def test_pipeline_parallelism_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError) as raised:
        ParallelDims(dp_shard=2, pp=2)
    key = "policy.megatron_cfg.pipeline_model_parallel_size=2"
    assert str(raised.value) == f"{key}: sftkit has no pp parallelism; set it to 1"


def test_expert_parallel_borrows_fsdp_ranks() -> None:
    """EP adds no ranks: 4 ranks at ep 2 are 4 FSDP ranks, 2 expert groups of 2, and a
    rank's coordinates and batch share are those of the same run without EP."""
    d = DTensorConfig(expert_parallel_size=2)
    dims = ParallelDims.from_config(d, 4)
    assert (dims.dp_shard, dims.ep, dims.world_size, dims.dp) == (4, 2, 4, 4)
    assert dims.gradient_divide_factor == 4
    plain = layout(4)
    assert [dims.dp_rank(r) for r in range(4)] == [plain.dp_rank(r) for r in range(4)]
    rep = ParallelDims.from_config(DTensorConfig(expert_parallel_size=2, dp_replicate_size=2), 8)
    assert (rep.dp_replicate, rep.dp_shard, rep.ep) == (2, 4, 2)


@pytest.mark.parametrize(
    ("world", "sizes", "line"),
    [
        (6, {"expert_parallel_size": 4}, "expert_parallel_size=4 must divide the 6 FSDP ranks"),
        (8, {"expert_parallel_size": 4, "dp_replicate_size": 4},
         "expert_parallel_size=4 must divide the 2 FSDP ranks of each replica"),
        (4, {"expert_parallel_size": 2, "tensor_parallel_size": 2},
         "expert_parallel_size=2 with tensor_parallel_size=2 and context_parallel_size=1"),
    ],
)  # fmt: skip
def test_impossible_expert_layouts_give_one_line(world: int, sizes: dict, line: str) -> None:
    with pytest.raises(ValueError) as raised:
        ParallelDims.from_config(DTensorConfig(**sizes), world)
    assert len(str(raised.value).splitlines()) == 1 and line in str(raised.value)


def test_the_layout_is_immutable() -> None:
    dims = layout(4)
    with pytest.raises(AttributeError):
        dims.tp = 2  # type: ignore[misc]


# Recipes whose layout was worked out by hand from their file name and NeMo RL values:
# name -> (dp_replicate, dp_shard, cp, tp), gradient divide factor, sequence divisor.
RECIPE_HAND = {
    "sft-qwen2.5-0.5b-1n1g-fsdp2tp1.yaml": ((1, 1, 1, 1), 1, 1),
    "sft-llama3.2-1b-1n8g-fsdp2tp1.v3.yaml": ((1, 8, 1, 1), 8, 1),
    "sft-llama3.1-8b-1n8g-fsdp2tp1-lora.yaml": ((1, 8, 1, 1), 8, 1),
    "sft-qwen2.5-32b-4n8g-fsdp2tp8sp-actckpt.v3.yaml": ((1, 4, 1, 8), 4, 1),
    "sft-qwen3-0.6B-1n8g-megatron-yarn-128k.yaml": ((1, 1, 8, 1), 8, 16),
    # added with the rest of NeMo RL's recipes (checked when present)
    "sft-llama3.2-1b-2n8g-hsdp.yaml": ((2, 8, 1, 1), 16, 1),
    "sft-llama3.1-8b-1n8g-fsdp2tp2.yaml": ((1, 4, 1, 2), 4, 1),
    "sft-llama3.1-8b-1n8g-fsdp2tp4-dynamicbatch.yaml": ((1, 2, 1, 4), 2, 1),
    "sft-gpt-oss-20b-1n8g-fsdp8ep8-automodel.yaml": ((1, 8, 1, 1), 8, 1),  # ep 8 of the 8
    "sft-qwen2.5-math7b-2n8g-megatron.yaml": ((1, 8, 2, 1), 16, 4),
}
RECIPE_FILES = sorted(RECIPES.rglob("*.yaml"))


def test_the_recipe_folder_is_found() -> None:
    names = {p.name for p in RECIPE_FILES}
    assert len(names) >= 7 and "sft-qwen2.5-0.5b-1n1g-fsdp2tp1.yaml" in names


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_every_recipe_on_its_intended_gpu_count(path: Path) -> None:
    match = re.search(r"-(\d+)n(\d+)g-", path.name)
    assert match, f"{path.name}: recipe names carry NnMg (nodes x GPUs per node)"
    world = int(match[1]) * int(match[2])
    logging.disable(logging.WARNING)  # recipes' ignored-key notes: not this test's subject
    try:
        cfg = load_config(path)
    finally:
        logging.disable(logging.NOTSET)
    d = cfg.policy.dtensor_cfg
    dims = ParallelDims.from_config(d, world)
    tp, cp, rep = d.tensor_parallel_size, d.context_parallel_size, d.dp_replicate_size
    if world > 1:
        assert (dims.dp_replicate, dims.cp, dims.tp) == (rep, cp, tp)
        assert dims.ep == d.expert_parallel_size  # borrowed from dp_shard: no extra ranks
        assert dims.dp_shard == world // (rep * cp * tp)
    assert dims.world_size == world
    assert dims.gradient_divide_factor == world // dims.tp
    if path.name in RECIPE_HAND:
        degrees, factor, divisor = RECIPE_HAND[path.name]
        assert (dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp) == degrees
        assert (dims.gradient_divide_factor, dims.seq_len_divisor) == (factor, divisor)
    # Every rank has its own grid point; the last rank sits at the far corner, and each batch
    # share is held by cp x tp ranks.
    grid = [dims.coordinates(r) for r in range(world)]
    assert len(set(grid)) == world
    assert grid[-1] == Coordinates(
        dims.dp_replicate - 1, dims.dp_shard - 1, dims.cp - 1, dims.tp - 1
    )
    shares = [dims.dp_rank(r) for r in range(world)]
    assert all(shares.count(s) == dims.cp * dims.tp for s in range(dims.dp))
    assert dims._meshes == {} and not dist.is_initialized()
