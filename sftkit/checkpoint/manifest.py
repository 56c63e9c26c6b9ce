"""A checkpoint's manifest (size and sha256 of every file), written and verified in parallel.

The files are split into one disjoint share per rank (`owners`): a rank's own files first
(`__R_0.distcp`, `rank_R.pt`: still in its page cache after the write), the rest by size to
the least-loaded rank. At save each rank hashes its share and rank 0 writes the manifest
from everyone's results; at resume each rank hashes its share of the manifest's files and
the ranks agree on one verdict (one bad file fails every rank, naming the file). So a
checkpoint of B bytes costs each of W ranks about B/W of reads, not B (docs/scale.md).

Fault injection for tests (inert unless the variable is set): `SFTKIT_TEST_SAVE_FAULT=<point>`
or `<point>@<step>` kills the process with SIGKILL at that point of a save, and
`SFTKIT_TEST_SLOW_SAVE=<seconds>` sleeps at every point, so a test can kill a real process
mid-save. The points, in order: start, files_written, info_written, manifest_tmp,
manifest_written, renamed, retention.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftkit.log.progress import Progress

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INFO = "training_info.json"
FAULT_ENV = "SFTKIT_TEST_SAVE_FAULT"
SLOW_ENV = "SFTKIT_TEST_SLOW_SAVE"
FAULT_POINTS = (
    "start", "files_written", "info_written", "manifest_tmp", "manifest_written", "renamed",
    "retention",
)  # fmt: skip
# The rank that wrote a file, from its name: DCP's `__R_0.distcp`, `rng/rank_R.pt`.
_WRITER = re.compile(r"(?:^|/)(?:__(\d+)_\d+\.distcp|rank_(\d+)\.pt)$")
_BLOCK = 1 << 22
# Hashing runs at 0.3-1 GB/s a core: below this a verification ends in seconds and stays
# quiet (a quick start's resume logs no ten progress lines for 1 MB).
PROGRESS_BYTES = 2 * 10**9


def fault_point(point: str, step: int | None = None) -> None:
    """Test hook: sleep and/or SIGKILL this process here when the environment asks for it."""
    slow = os.environ.get(SLOW_ENV)
    if slow:
        time.sleep(float(slow))
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    name, _, at = wanted.partition("@")
    if name == point and (not at or step is None or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def _alone(value: Any) -> list[Any]:
    return [value]


@dataclass(frozen=True)
class Share:
    """This rank's place among the ranks that hash a checkpoint together. `gather(x)` returns
    every rank's `x` in rank order (a collective: every rank calls it the same number of
    times); one process is its own world."""

    rank: int = 0
    world: int = 1
    gather: Callable[[Any], list[Any]] = field(default=_alone, compare=False)

    def barrier(self) -> None:
        self.gather(None)


ALONE = Share()  # one process: hashes everything itself
_GROUPS: dict[int, Any] = {}


def rank_share(rank: int, world: int, timeout_s: float | None = None) -> Share:
    """The `Share` of this process in the job's process group (one process: alone).

    The ranks gather over a gloo group of their own, built on the first call (every rank
    makes that call at the same point: resume discovery) with that call's `timeout_s`
    (`cluster.collective_timeout_s`; None: gloo's 30 minutes): an async save gathers from a
    background thread, which must never interleave with the training loop's collectives."""
    if world <= 1:
        return ALONE
    from datetime import timedelta

    import torch.distributed as dist

    key = id(dist.group.WORLD)  # a new process group (tests re-initialise) gets a new one
    if key not in _GROUPS:
        _GROUPS.clear()
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        _GROUPS[key] = dist.new_group(backend="gloo", timeout=timeout)
    group = _GROUPS[key]

    def gather(value: Any) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, value, group=group)
        return out

    return Share(rank, world, gather)


def checkpoint_group(world: int) -> Any:
    """The gloo group `rank_share` gathers over (None with one process): DCP's async save
    writes through it too, off the training loop's group."""
    if world <= 1:
        return None
    import torch.distributed as dist

    rank_share(dist.get_rank(), world)
    return _GROUPS[id(dist.group.WORLD)]


def owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """The rank that hashes each file: its writer when the name says (and that rank exists),
    the others largest first to the least-loaded rank. Deterministic in `sizes` alone, so
    every rank computes the same split from the same manifest."""
    load = [0] * world
    owner: dict[str, int] = {}
    for name in sorted(sizes):
        match = _WRITER.search(name)
        writer = int(match.group(1) or match.group(2)) if match else world
        if writer < world:
            owner[name] = writer
            load[writer] += sizes[name]
    for name in sorted((n for n in sizes if n not in owner), key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += sizes[name]
    return owner


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)  # hashlib drops the GIL here: a save's writer thread runs
            if progress is not None:
                progress.update(len(block))
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_share(
    directory: Path, sizes: dict[str, int], share: Share, what: str | None, sync: bool = False
) -> dict[str, str]:
    """sha256 of this rank's share of `sizes` (`sync`: fsync each file first); progress
    lines named `what` on rank 0 when the share is large enough to take a while."""
    mine = sorted(n for n, r in owners(sizes, share.world).items() if r == share.rank)
    total = sum(sizes[n] for n in mine)
    hashes = {}
    shown = what is not None and share.rank == 0 and total >= PROGRESS_BYTES
    with Progress(what or "", total=total, unit="B", enabled=shown) as progress:
        for name in mine:
            if sync:
                with open(directory / name, "rb") as f:
                    os.fsync(f.fileno())
            hashes[name] = sha256_file(directory / name, progress)
    return hashes


def write_manifest(
    directory: Path, step: int | None = None, parts: Iterable[str] = (), share: Share = ALONE
) -> None:
    """Record size and hash of every file and the registered `parts`' names, then fsync:
    the commit point of a save. Collective over `share`: every rank hashes its share, rank
    0 writes the file (every rank's files must be on disk first)."""
    names = sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp")
    )
    sizes = {name: (directory / name).stat().st_size for name in names}
    # no progress lines: a save logs one line when published, not ten per save
    mine = _hash_share(directory, sizes, share, None, sync=True)
    hashes = {k: v for found in share.gather(mine) for k, v in found.items()}
    if share.rank != 0:
        return
    files = {name: {"size": sizes[name], "sha256": hashes[name]} for name in names}
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        manifest = {"format_version": FORMAT_VERSION, "parts": sorted(parts), "files": files}
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fault_point("manifest_tmp", step)
    os.replace(tmp, directory / MANIFEST)


def inside(root: Path, path: Path) -> bool:
    """True when `path`, symlinks resolved, lies within `root` (a checkpoint never points out)."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _manifest_problem(directory: Path, manifest: Any) -> str | None:
    """Why a parsed manifest.json cannot be trusted (wrong shape, a path leading out)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return "malformed manifest.json (not an object with a 'files' mapping)"
    for name, meta in files.items():
        if not (
            isinstance(meta, dict)
            and type(meta.get("size")) is int
            and isinstance(meta.get("sha256"), str)
        ):
            return f"malformed manifest.json (entry {name!r} needs an integer size and a sha256)"
        relative = Path(name)
        if (
            relative.is_absolute()
            or ".." in relative.parts
            or not inside(directory, directory / name)
        ):
            return f"manifest.json names {name!r}, outside the checkpoint"
    return None


def checkpoint_bytes(directory: Path) -> int:
    """The size of a checkpoint by its manifest (0 when it has none readable)."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
        return sum(int(meta["size"]) for meta in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def read_info(directory: Path) -> dict[str, Any]:
    return json.loads((directory / INFO).read_text())


def verify(directory: Path, hashes: bool = True, share: Share = ALONE) -> str | None:
    """None when `directory` is a complete checkpoint, else the reason it is not.

    A checkpoint is untrusted input: a manifest of the wrong shape, a path leading out of the
    directory or a symlink inside it make it "not a checkpoint", like a bad hash. With
    `hashes`, collective over `share`: each rank hashes its share and all return the first
    rank's problem, so every rank reaches the same verdict.
    """
    problem = _local_problem(directory, hashes, share)
    if hashes and share.world > 1:
        problem = next((p for p in share.gather(problem) if p is not None), None)
    return problem


def _local_problem(directory: Path, hashes: bool, share: Share) -> str | None:
    """`verify` on this rank: structure and sizes of every file, hashes of its share."""
    manifest_path = directory / MANIFEST
    if directory.is_symlink() or not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, OSError) as err:
        return f"unreadable manifest.json ({err})"
    problem = _manifest_problem(directory, manifest)
    if problem:
        return problem
    links = [p for p in directory.rglob("*") if p.is_symlink()]
    if links:
        return f"{links[0].relative_to(directory)} is a symlink (checkpoints hold plain files)"
    files: dict[str, dict[str, Any]] = manifest["files"]
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
    if hashes:
        sizes = {name: meta["size"] for name, meta in files.items()}
        found = _hash_share(directory, sizes, share, f"verifying {directory.name}")
        for name, digest in found.items():
            if digest != files[name]["sha256"]:
                return f"{name} does not match its sha256 (corrupted)"
    if INFO not in files:
        return f"the manifest does not list {INFO}"
    try:
        info = read_info(directory)
    except (ValueError, OSError) as err:
        return f"unreadable {INFO} ({err})"
    if not isinstance(info, dict) or type(info.get("step")) is not int:
        return f"malformed {INFO} (not an object with an integer step)"
    if not isinstance(info.get("fingerprint", {}), dict) or any(
        not isinstance(v, (int, float)) for k, v in info.items() if k.startswith(("val:", "train:"))
    ):
        return f"malformed {INFO} (fingerprint or metric of the wrong type)"
    return None
