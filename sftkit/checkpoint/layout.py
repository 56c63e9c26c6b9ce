"""Where a checkpoint's files lie, and the atomic save, manifest, retention and resume
discovery around them, in NeMo RL's layout. Every path of a checkpoint is asked of
`CheckpointLayout` (the run's directory) or `StepDir` (one `step_N` in it):

    checkpoint_dir/step_N/
      training_info.json      counters, ranking metric, format version, fingerprint
      config.yaml             the resolved config, secrets redacted
      train_dataloader.pt     sampler position (two ints)
      rng/rank_R.pt           every RNG of rank R
      policy/weights/         model.safetensors (full) or trainable.safetensors (LoRA)
      policy/optimizer/       optimizer.pt, scheduler.pt (when save_optimizer)
      policy/dcp/             model and optimizer shards of a multi-rank run (DCP)
      policy/tokenizer/       the tokenizer with the training chat template
      state/NAME.pt           a part registered by name (`Checkpointer.register`)
      manifest.json           size and sha256 of every file above, the part names: last
    checkpoint_dir/final_hf/, final_adapter/   the run's outputs

A save is written to `tmp_step_N/` and renamed to `step_N/` by rank 0 after a barrier, once
the manifest is on disk; every rank hashes its share of the files for it. An async save
(`checkpointing.is_async`) writes and finishes on a background thread, at most one in
flight. A directory without a manifest, or whose files do not match it, is not a checkpoint: resume skips it with a warning and uses the one before.

FORMAT_VERSION rule: it names what a reader must understand to resume. Adding a file that
older checkpoints lack (a new registered part loaded as optional, a new manifest key) keeps
the version. Moving, renaming or re-encoding an existing file, or making a new file
required, raises it; `check_resumable` then either reads the old version through a reader
written for it, or refuses it in one line naming both versions. Version 1 is the layout
above (sftkit's first; the part names in the manifest are optional, so version 1 still).

The manifest, its parallel hashing and verification, and the fault-injection hook that
tests use to kill a save at a named point are `sftkit.checkpoint.manifest`'s.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftkit.checkpoint.manifest import (  # noqa: F401 (the layout's public names)
    ALONE,
    FAULT_ENV,
    FAULT_POINTS,
    FORMAT_VERSION,
    INFO,
    MANIFEST,
    SLOW_ENV,
    Share,
    fault_point,
    fsync_dir,
    inside,
    read_info,
    verify,
    write_manifest,
)
from sftkit.errors import RunFailure

logger = logging.getLogger("sftkit")

# The resume fingerprint's entry holding the pre-derive (raw-value) form, never stored:
# checkpoints written before fingerprints keyed on derived values are compared with it.
LEGACY_FINGERPRINT = "legacy"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^tmp_step_(\d+)$")


@dataclass(frozen=True)
class StepDir:
    """The files of one checkpoint (`step_N`, or `tmp_step_N` while it is written)."""

    path: Path

    @property
    def info(self) -> Path:
        return self.path / INFO

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def sampler(self) -> Path:
        return self.path / "train_dataloader.pt"

    @property
    def weights(self) -> Path:
        return self.path / "policy" / "weights"

    @property
    def optimizer_dir(self) -> Path:
        return self.path / "policy" / "optimizer"

    @property
    def optimizer(self) -> Path:
        return self.optimizer_dir / "optimizer.pt"

    @property
    def scheduler(self) -> Path:
        return self.optimizer_dir / "scheduler.pt"

    @property
    def dcp(self) -> Path:
        return self.path / "policy" / "dcp"

    @property
    def tokenizer(self) -> Path:
        return self.path / "policy" / "tokenizer"

    @property
    def consolidated(self) -> Path:
        return self.path / "policy" / "consolidated"

    def rng(self, rank: int) -> Path:
        return self.path / "rng" / f"rank_{rank}.pt"

    def part(self, name: str, rank: int | None = None) -> Path:
        """A registered part's file: `state/NAME.pt`, or `state/NAME/rank_R.pt` per rank."""
        if rank is None:
            return self.path / "state" / f"{name}.pt"
        return self.path / "state" / name / f"rank_{rank}.pt"

    @property
    def has_optimizer(self) -> bool:
        """Saved with `save_optimizer` (the scheduler is written with the optimizer state)."""
        return self.scheduler.exists()


@dataclass(frozen=True)
class CheckpointLayout:
    """The paths of a run's checkpoint directory (`checkpointing.checkpoint_dir`)."""

    root: Path

    def step(self, step: int) -> StepDir:
        return StepDir(self.root / f"step_{step}")

    def tmp(self, step: int) -> StepDir:
        return StepDir(self.root / f"tmp_step_{step}")

    @property
    def final_hf(self) -> Path:
        return self.root / "final_hf"

    @property
    def final_adapter(self) -> Path:
        return self.root / "final_adapter"

    def holds_checkpoints(self) -> bool:
        """`root` is a step_N directory or a checkpoint directory with one (eval, export)."""
        return StepDir(self.root).info.is_file() or any(self.root.glob(f"step_*/{INFO}"))

    def steps(self) -> list[tuple[int, Path]]:
        return step_dirs(self.root)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)


class ResumeMismatchError(ValueError):
    """The checkpoint was made with settings that make resuming meaningless."""


class CheckpointWriteError(RunFailure):
    """A save could not be written (disk full); the previous checkpoint is intact (exit 1)."""


def step_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """`step_N` directories, newest first (tmp_ and other names ignored)."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and not path.is_symlink():  # a link may lead anywhere
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def latest_checkpoint(checkpoint_dir: str | Path, share: Share = ALONE) -> Path | None:
    """The newest complete, verified checkpoint; broken ones are skipped with a warning.
    Collective over `share`: each rank hashes its share, all agree (the same answer)."""
    for _, path in step_dirs(Path(checkpoint_dir)):
        problem = verify(path, share=share)
        if problem is None:
            return path
        logger.warning("Skipping checkpoint %s: %s; trying the one before", path, problem)
    return None


def ranking_metric(metric_name: str | None, metrics: dict[str, float]) -> dict[str, float]:
    """`{metric_name: value}` when the logged `metrics` hold it, else `{}`.

    `train:<name>` reads `train/<name>` and `val:<name>` reads `validation/<name>` (NeMo RL's
    `val:val_loss` is `validation/val_loss`), so any logged train or validation metric ranks.
    """
    if not metric_name or ":" not in metric_name:
        return {}
    prefix, name = metric_name.split(":", 1)
    logged = {"train": "train/", "val": "validation/"}.get(prefix, "\0") + name
    value = metrics.get(logged)
    return {} if value is None else {metric_name: float(value)}


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two resume fingerprints."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


# What a new stage (`resume_mismatch=stage`) may change: the data (README: Staged SFT).
STAGE_KEYS = frozenset({"train_data", "max_input_seq_length", "shuffle"})
# Keys added after fingerprint_version 2: a checkpoint without them resumes, with one warning.
ADDED_KEYS = ("optimizer", "scheduler", "base_weights")


def check_resumable(directory: Path, fingerprint: dict[str, Any], stage: bool = False) -> bool:
    """Raise ResumeMismatchError naming every difference between checkpoint and run; True
    when `stage` allows them (new data: a new stage). A checkpoint without
    `fingerprint_version` (pre-derive) is compared with `fingerprint[LEGACY_FINGERPRINT]`."""
    info = read_info(directory)
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise ResumeMismatchError(
            f"{directory} has checkpoint format {version}, this sftkit writes {FORMAT_VERSION}"
        )
    saved = info.get("fingerprint", {})
    current = {k: v for k, v in fingerprint.items() if k != LEGACY_FINGERPRINT}
    if "fingerprint_version" not in saved and LEGACY_FINGERPRINT in fingerprint:
        current = fingerprint[LEGACY_FINGERPRINT]
    unchecked = [k for k in ADDED_KEYS if k in current and k not in saved]
    if unchecked:
        logger.warning("%s was written before sftkit recorded %s: not checked on this resume",
                       directory, ", ".join(unchecked))  # fmt: skip
    # Unknown on one side is no change: not LoRA, or the base not yet downloaded; no optimizer
    # state (save_optimizer=false), so a fresh optimizer takes the run's settings.
    unknown = set(unchecked)
    for key, drop in (
        ("base_weights", {"base_weights"}),
        ("optimizer", {"optimizer", "scheduler"}),
    ):
        if saved.get(key) is None or current.get(key) is None:
            unknown |= drop
    saved = {k: v for k, v in saved.items() if k not in unknown}
    current = {k: v for k, v in current.items() if k not in unknown}
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if stage and keys and set(keys) <= STAGE_KEYS:
        logger.warning(
            "New stage from %s (checkpointing.resume_mismatch=stage; changed: %s): weights, "
            "optimizer, LR schedule and step counter continue; the data starts at epoch 0",
            directory, ", ".join(keys),
        )  # fmt: skip
        return True
    diffs = fingerprint_differences(saved, current)
    if diffs:
        raise ResumeMismatchError(
            f"Cannot resume from {directory}: the run's settings differ from the checkpoint's:\n  "
            + "\n  ".join(diffs)
            + "\nRestore those settings to resume, or start fresh with "
            "checkpointing.resume=false (old checkpoints are moved aside, not deleted)"
            + (", or continue on the new data with checkpointing.resume_mismatch=stage."
               if set(keys) <= STAGE_KEYS else ".")
        )  # fmt: skip
    return False


def archive_old_checkpoints(checkpoint_dir: Path) -> Path | None:
    """Move existing step_N dirs aside so a fresh run never mixes with an old one."""
    existing = step_dirs(checkpoint_dir)
    if not existing:
        return None
    archive = checkpoint_dir / f"previous_{time.strftime('%Y%m%d-%H%M%S')}"
    archive.mkdir(parents=True, exist_ok=True)
    for _, path in existing:
        shutil.move(str(path), archive / path.name)
    logger.warning("Starting fresh: moved %d old checkpoints to %s", len(existing), archive)
    return archive


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    info: dict[str, Any],
    write_files: Callable[[Path], None],
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    size_hint: int = 0,
    parts: Iterable[str] = (),
    share: Share = ALONE,
) -> Path:
    """Write one checkpoint atomically and return its final path.

    `write_files(tmp_dir)` runs on every rank (each writes its own parts); then every rank
    hashes its share of the files (`share`), rank 0 writes training_info.json and the
    manifest and renames after a barrier. A full disk removes the partial `tmp_step_N` and
    raises CheckpointWriteError saying how much space the save needs (the previous
    checkpoint's size, else `size_hint` bytes). `parts`: the names the manifest lists.
    """
    tmp = begin_save(checkpoint_dir, step, rank, barrier)
    with full_disk_error(checkpoint_dir, step, size_hint):
        write_files(tmp)
        barrier()
        return finish_save(checkpoint_dir, step, info, rank, parts, share)


def begin_save(checkpoint_dir: Path, step: int, rank: int, barrier: Callable[[], None]) -> Path:
    """Make the empty `tmp_step_N` every rank writes into (collective); returns it."""
    tmp = CheckpointLayout(checkpoint_dir).tmp(step).path
    with full_disk_error(checkpoint_dir, step, 0):
        if rank == 0:
            fault_point("start", step)
            remove_stale_tmp_dirs(checkpoint_dir)
            tmp.mkdir(parents=True)
    barrier()
    return tmp


def finish_save(
    checkpoint_dir: Path,
    step: int,
    info: dict[str, Any],
    rank: int,
    parts: Iterable[str],
    share: Share = ALONE,
) -> Path:
    """Publish `tmp_step_N` once every rank's files are in it: training_info.json, the
    manifest (each rank hashes its share), the rename to `step_N` (collective over `share`)."""
    layout = CheckpointLayout(checkpoint_dir)
    tmp, final = layout.tmp(step).path, layout.step(step).path
    if rank == 0:
        fault_point("files_written", step)
        with open(StepDir(tmp).info, "w") as f:
            json.dump(info, f, indent=1)
        fault_point("info_written", step)
    share.barrier()  # every rank lists the same files, training_info.json among them
    write_manifest(tmp, step, parts, share)
    if rank == 0:
        fault_point("manifest_written", step)
        if final.is_symlink():  # never follow a link out of checkpoint_dir
            final.unlink()
        elif final.exists():  # a broken save of the same step, skipped when this run resumed
            shutil.rmtree(final)
        os.rename(tmp, final)
        fault_point("renamed", step)
        fsync_dir(checkpoint_dir)
    share.barrier()
    return final


@contextmanager
def full_disk_error(checkpoint_dir: Path, step: int, size_hint: int) -> Iterator[None]:
    """Turn a full disk inside a save into CheckpointWriteError: the partial `tmp_step_N` is
    removed and the message says how much space a checkpoint needs (the previous
    checkpoint's size, else `size_hint` bytes) and how much is free."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        tmp = CheckpointLayout(checkpoint_dir).tmp(step).path
        written = _tree_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = step_dirs(checkpoint_dir)
        needed = max(_tree_size(previous[0][1]) if previous else size_hint, written)
        free = shutil.disk_usage(checkpoint_dir).free
        raise CheckpointWriteError(
            f"no space left on the device of {checkpoint_dir} while saving step {step} "
            f"({err.filename or tmp}): a checkpoint needs about {_gb(needed)}, {_gb(free)} is "
            f"free. The partial {tmp.name} was removed and the previous checkpoint is intact; "
            "free space (or lower checkpointing.keep_top_k) and start the same command again"
        ) from err


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def _tree_size(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and not p.is_symlink())


def check_writable(directory: Path, key: str) -> None:
    """Create `directory` and a probe file in it, before any slow work; a ValueError names
    the config `key` when that fails (a file in the path, no permission, read-only disk)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sftkit-write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"{key}={directory} is not a writable directory ({err.strerror or err}"
            f"{': ' + str(err.filename) if err.filename else ''}); choose another path or fix "
            "its permissions"
        ) from err


def remove_stale_tmp_dirs(checkpoint_dir: Path) -> None:
    """Delete `tmp_step_N` left by a killed save (an async save in flight was waited for)."""
    if not checkpoint_dir.is_dir():
        return
    for path in checkpoint_dir.iterdir():
        if _TMP_DIR.match(path.name) and path.is_dir() and not path.is_symlink():
            logger.info("Removing %s, left by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)


def checkpoints_to_delete(
    entries: list[tuple[int, float | None]],
    keep_top_k: int | None,
    higher_is_better: bool,
    keep_latest_k: int | None = None,
) -> list[int]:
    """Steps to remove: keep the best `keep_top_k` by metric (ties go to the newer step),
    the latest `keep_latest_k`, and always the newest. Steps without the metric rank last."""
    if keep_top_k is None or not entries:
        return []
    by_step = sorted(entries, key=lambda e: e[0], reverse=True)
    keep = {by_step[0][0]}
    keep.update(step for step, _ in by_step[: keep_latest_k or 0])

    def rank_key(entry: tuple[int, float | None]) -> tuple[int, float, int]:
        step, value = entry
        if value is None:
            return (1, 0.0, -step)
        return (0, -value if higher_is_better else value, -step)

    keep.update(step for step, _ in sorted(entries, key=rank_key)[:keep_top_k])
    return sorted(step for step, _ in entries if step not in keep)


def apply_retention(
    checkpoint_dir: Path,
    metric_name: str | None,
    keep_top_k: int | None,
    higher_is_better: bool,
    keep_latest_k: int | None = None,
    warn_missing: bool = True,
) -> list[Path]:
    """Delete checkpoints outside the retention policy; returns what was deleted.

    `warn_missing` False: the config already said at load that some saves lack the metric
    (`config.checks.unmeasured_saves`), so a save without it is expected, not news."""
    if keep_top_k is None:
        return []
    entries = []
    paths = {}
    for step, path in step_dirs(checkpoint_dir):
        if verify(path, hashes=False) is not None:
            continue
        value = read_info(path).get(metric_name) if metric_name else None
        entries.append((step, None if value is None else float(value)))
        paths[step] = path
    if warn_missing and metric_name and entries and entries[0][1] is None:  # the newest only
        logger.warning(
            "checkpointing.metric_name=%s was not measured at step %d; that checkpoint ranks "
            "last and is kept only while it is the latest (check the metric's name, or use a "
            "train: metric)",
            metric_name,
            entries[0][0],
        )
    deleted = []
    for step in checkpoints_to_delete(entries, keep_top_k, higher_is_better, keep_latest_k):
        fault_point("retention", entries[0][0])  # the step just saved
        try:
            shutil.rmtree(paths[step])
            deleted.append(paths[step])
        except OSError as err:  # a failed delete must not kill a healthy run
            logger.warning("Could not delete old checkpoint %s: %s", paths[step], err)
    return deleted


def parse_deadline(text: str | None) -> float | None:
    """`DD:HH:MM:SS` as seconds (checkpointing.checkpoint_must_save_by)."""
    if not text:
        return None
    days, hours, minutes, seconds = (int(x) for x in str(text).split(":"))
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
