"""The Checkpointer: a registry of the run's stateful parts, saved and loaded together.

Modelled on torchtitan's `CheckpointManager` (a `states` dict of `Stateful`): setup builds
one `Checkpointer`, which registers the run's parts; the loop asks `should_save(step, ...)`
and calls `save(state)`, setup calls `load()`, and `save_final()` writes the run's outputs.
Where files lie and the atomic save (tmp dir, manifest, rename, retention) are
`sftkit.checkpoint.layout`'s; a part decides what goes in its files.

    part          object                      file (step_N/...)
    model         weights.ModelPart           policy/weights/ (one process), policy/dcp
    optimizer     weights.OptimizerPart       policy/optimizer/optimizer.pt, policy/dcp
    scheduler     the LR scheduler            policy/optimizer/scheduler.pt (save_optimizer)
    sampler       the batch sampler           train_dataloader.pt (rank 0)
    rng           state.RngState              rng/rank_R.pt (each rank)
    (header)      state.TrainState            training_info.json, with the fingerprint
    (outputs)     config, tokenizer, HF copy  config.yaml, policy/tokenizer/, consolidated/

One process vs several ranks differs only inside the model and optimizer parts. A new piece
of state (EMA weights, another sampler's position) is one class with `state_dict` and
`load_state_dict` and one `register` call (below, or on the built Checkpointer): it is
saved on every save as `state/NAME.pt`, listed in the manifest, and resumed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint.layout import CheckpointLayout, StepDir
from sftkit.checkpoint.manifest import (
    PROGRESS_BYTES,
    checkpoint_bytes,
    checkpoint_group,
    rank_share,
)
from sftkit.checkpoint.outputs import atomic_output_dir
from sftkit.checkpoint.safe_load import load_state_file
from sftkit.checkpoint.state import RngState, TrainState, check_finite_weights
from sftkit.checkpoint.weights import (
    ModelPart,
    OptimizerPart,
    cpu_copy,
    gather_hf,
    save_shards,
)
from sftkit.config import MasterConfig, config_to_yaml
from sftkit.config.checks import unmeasured_saves
from sftkit.config.schema import CheckpointingConfig
from sftkit.data import PreparedData
from sftkit.data.loader import GlobalBatchSampler
from sftkit.dist import DistEnv
from sftkit.log.model_card import write_model_card
from sftkit.log.progress import Progress
from sftkit.log.redact import scrub
from sftkit.model.builtin import adapter_base_name
from sftkit.model.load import save_hf
from sftkit.model.lora import LoraSpec, merge_lora, save_adapter

logger = logging.getLogger("sftkit")


@runtime_checkable
class Stateful(Protocol):
    """Anything whose state a checkpoint can hold (torch's `Stateful` protocol)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Part(Protocol):
    """A registered part: writes its files of a step, and loads them back. A part may also
    have `stage(step, rank, shards)`: `save` split into taking a copy of its state now and
    a returned function that writes it later (an async save's writer thread); without it, an
    async save calls `save` on the training thread."""

    def save(self, step: StepDir, rank: int, shards: dict[str, Any]) -> None:
        """This rank's files in `step`; state for the step's one DCP save goes in `shards`."""

    def load(self, step: StepDir, rank: int) -> None: ...


@dataclass
class FilePart:
    """A `Stateful` kept as one torch file (loaded weights-only): rank 0's, or one per rank."""

    name: str
    state: Stateful
    path: Callable[[StepDir, int], Path]  # where in a step, for a rank
    per_rank: bool = False  # every rank saves and loads its own file (RNG)
    optional: bool = False  # a checkpoint without the file resumes, this state left as it is
    enabled: bool = True  # saved at all (the scheduler follows checkpointing.save_optimizer)

    def save(self, step: StepDir, rank: int, shards: dict[str, Any]) -> None:
        write = self.stage(step, rank, shards)
        if write is not None:
            write()

    def stage(self, step: StepDir, rank: int, shards: dict[str, Any]) -> Callable[[], None] | None:
        """`save` in two halves: the state is copied now, the returned function writes it."""
        if not self.enabled or (rank != 0 and not self.per_rank):
            return None
        path, state = self.path(step, rank), cpu_copy(self.state.state_dict())

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)

        return write

    def load(self, step: StepDir, rank: int) -> None:
        path = self.path(step, rank if self.per_rank else 0)
        if path.exists():
            self.state.load_state_dict(load_state_file(path))
        elif not self.optional:
            raise ckpt.ResumeMismatchError(
                f"{step.path} has no {path.relative_to(step.path)}: it was saved without this "
                f"run's {self.name!r} state. Resume from a checkpoint that has it, or start "
                "fresh with checkpointing.resume=false"
            )


class InFlight:
    """One async save: `finish` runs on a thread; `wait` joins it and re-raises its error."""

    def __init__(self, finish: Callable[[], Path]) -> None:
        self.path: Path | None = None
        self.error: BaseException | None = None
        # daemon: a run dying of another error must not hang on it; the kill leaves only a
        # tmp_step_N, which is not a checkpoint (the previous one stays the resume point)
        self.thread = threading.Thread(
            target=self._run, args=(finish,), name="sftkit-async-save", daemon=True
        )
        self.thread.start()

    def _run(self, finish: Callable[[], Path]) -> None:
        try:
            self.path = finish()
        except BaseException as err:  # re-raised on the training thread by `wait`
            self.error = err

    def wait(self) -> Path:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.path is not None
        return self.path


@dataclass
class Checkpointer:
    """Saves and loads every registered part of the run, and the run's counters."""

    cfg: MasterConfig
    env: DistEnv
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch LRScheduler (state_dict / load_state_dict)
    sampler: GlobalBatchSampler
    tokenizer: Any
    lora: LoraSpec | None
    fingerprint: dict[str, Any]  # `resume_fingerprint`, stored in and checked against info
    resume_dir: Path | None = None  # `pick_resume_dir`'s choice, read by `load`
    new_stage: bool = False  # resume_mismatch=stage on new data: the sampler starts afresh
    unmeasured_warned: bool = False  # the "metric not measured" warning is said once a run
    in_flight: InFlight | None = None  # the async save being written (checkpointing.is_async)
    save_seconds: float = 0.0  # how long the last finished save took, background part included
    states: dict[str, Part] = field(init=False, default_factory=dict)  # the registry

    def __post_init__(self) -> None:
        c, world, lora = self.cfg.checkpointing, self.env.world_size, self.lora is not None
        # Saved in this order; loaded in it too, except the RNG, which is restored last.
        self.states = {
            "rng": FilePart("rng", RngState(), StepDir.rng, per_rank=True, optional=True),
            "model": ModelPart(self.model, lora, world),
            "optimizer": OptimizerPart(self.model, self.optimizer, lora, world, c.save_optimizer),
            "scheduler": FilePart(
                "scheduler",
                self.scheduler,
                lambda step, _: step.scheduler,
                optional=True,
                enabled=c.save_optimizer,
            ),  # fmt: skip
            "sampler": FilePart("sampler", self.sampler, lambda step, _: step.sampler),
        }

    def register(
        self, name: str, state: Part | Stateful, per_rank: bool = False, optional: bool = False
    ) -> None:
        """Save and resume `state` with the rest: a `Part`, or any `Stateful`, which is kept
        in `state/NAME.pt` (`per_rank`: `state/NAME/rank_R.pt`). `optional`: checkpoints
        written before it was registered still resume, leaving it as it is."""
        if name in self.states or name == "train_state":
            raise ValueError(f"a checkpoint part named {name!r} is already registered")
        if not isinstance(state, Part):

            def path(step: StepDir, rank: int) -> Path:
                return step.part(name, rank if per_rank else None)

            state = FilePart(name, state, path, per_rank=per_rank, optional=optional)
        self.states[name] = state

    @property
    def directory(self) -> Path:
        return Path(self.cfg.checkpointing.checkpoint_dir)

    @property
    def layout(self) -> CheckpointLayout:
        return CheckpointLayout(self.directory)

    def should_save(self, step: int, last_step: bool, stopping: bool = False) -> bool:
        """Save at the last step, every `save_period` / `ft_save_period` steps, and before
        stopping early (signal or deadline); never when checkpointing is off."""
        c = self.cfg.checkpointing
        if not c.enabled:
            return False
        periodic = c.save_period > 0 and step % c.save_period == 0
        ft = bool(c.ft_save_period) and step % c.ft_save_period == 0  # type: ignore[operator]
        return last_step or periodic or ft or stopping

    def save(self, state: TrainState, last: bool = False) -> Path:
        """An atomic checkpoint of everything the next step depends on, then retention.

        `checkpointing.is_async`: the state is copied and the call returns; writing,
        hashing, publishing and retention go on in a background thread while training
        continues, at most one save in flight (the next save waits for it, and so does
        `last`). `last`: the run's final or stopping save; it stays the latest checkpoint,
        so an unmeasured ranking metric costs nothing there and is not warned about."""
        c, env = self.cfg.checkpointing, self.env
        self.wait()  # at most one save in flight, and its failure is this save's failure
        started = time.monotonic()
        # A misaligned save_period was reported once at load (unmeasured_saves).
        warn = not (last or self.unmeasured_warned) and unmeasured_saves(self.cfg) is None
        self.unmeasured_warned |= warn and c.metric_name not in state.metrics
        check_finite_weights(self.model.parameters(), state.step, env.max)
        state.epoch = self.sampler.epoch
        info = {**state.state_dict(), "format_version": ckpt.FORMAT_VERSION}
        info["fingerprint"] = {
            k: v for k, v in self.fingerprint.items() if k != ckpt.LEGACY_FINGERPRINT
        }
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        size_hint = weights * (3 if c.save_optimizer else 1)  # Adam: weights + 2 moments
        parts, step = [*self.states, "train_state"], state.step
        share = rank_share(env.rank, env.world_size if env.initialized else 1)
        tmp = ckpt.begin_save(self.directory, step, env.rank, env.barrier)
        with ckpt.full_disk_error(self.directory, step, size_hint):
            writes = self._write_files(tmp, defer=c.is_async)

        def finish() -> Path:
            with ckpt.full_disk_error(self.directory, step, size_hint):
                for write in writes:
                    write()
                share.barrier()
                path = ckpt.finish_save(self.directory, step, info, env.rank, parts, share)
            if env.is_main:
                ckpt.apply_retention(
                    self.directory, c.metric_name, c.keep_top_k, c.higher_is_better,
                    c.ft_keep_latest_k, warn_missing=warn,
                )  # fmt: skip
                logger.info("Saved checkpoint %s", path)
            self.save_seconds = time.monotonic() - started
            return path

        if not c.is_async:
            return finish()
        self.in_flight = InFlight(finish)
        if last:  # the run stops after it: published before `save` returns
            published = self.wait()
            assert published is not None
            return published
        return self.layout.step(step).path

    def wait(self) -> Path | None:
        """Wait for the async save in flight, if any; returns its path, raises its error."""
        flight, self.in_flight = self.in_flight, None
        return None if flight is None else flight.wait()

    def finish_in_flight(self) -> None:
        """`wait` on the way out of a failed run: its error is logged, not raised (the run's
        own error is the one to report); the previous checkpoint stays valid either way."""
        try:
            self.wait()
        except Exception as err:
            logger.error("The checkpoint save in the background failed: %s", err)

    def _write_files(self, directory: Path, defer: bool = False) -> list[Callable[[], None]]:
        """This rank's files of a checkpoint in `directory` (called on every rank). `defer`:
        copy the state now and return the writes, for a background thread to run."""
        c = self.cfg.checkpointing
        step, rank, sharded = StepDir(directory), self.env.rank, self.env.world_size > 1
        shards: dict[str, Any] = {}
        writes: list[Callable[[], None]] = []
        for part in self.states.values():
            stage = getattr(part, "stage", None) if defer else None
            if stage is None:
                part.save(step, rank, shards)
            elif (write := stage(step, rank, shards)) is not None:
                writes.append(write)
        if shards:  # every rank writes its shards (torch.distributed.checkpoint)
            group = checkpoint_group(self.env.world_size) if defer else None
            if (wait := save_shards(shards, step.dcp, group, defer)) is not None:
                writes.append(wait)
        if c.save_consolidated and (sharded or rank == 0):  # sharded: every rank gathers
            self.export_hf(step.consolidated, merge=False)
        if rank == 0:

            def outputs() -> None:
                step.config.write_text(config_to_yaml(self.cfg))
                self.tokenizer.save_pretrained(step.tokenizer)

            writes.append(outputs)
        if not defer:
            for write in writes:
                write()
            return []
        return writes

    def load(self) -> TrainState:
        """Restore every registered part from `resume_dir`; returns its counters (a fresh
        `TrainState` when there is nothing to resume)."""
        if self.resume_dir is None:
            return TrainState()
        step = StepDir(self.resume_dir)
        # The RNG last: nothing restored after it may draw from a generator.
        ordered = sorted(self.states.items(), key=lambda item: item[0] == "rng")
        desc = f"loading {step.path.name}"
        shown = self.env.is_main and checkpoint_bytes(step.path) >= PROGRESS_BYTES
        with Progress(desc, len(ordered), unit="parts", enabled=shown) as progress:
            for name, part in ordered:
                if not (self.new_stage and name == "sampler"):  # new data: its first batch
                    part.load(step, self.env.rank)
                progress.update()
        state = TrainState()
        state.load_state_dict(ckpt.read_info(step.path))
        if self.new_stage:
            state.epoch, state.validation_due = 0, False
        logger.info("Resumed from %s at step %d", step.path, state.step)
        return state

    def export_hf(self, directory: Path, merge: bool) -> None:
        """HF directory of the current weights; LoRA runs merge (in place only when `merge`).

        Sharded runs gather the full weights to rank 0 (collective: every rank calls)."""
        if self.env.world_size > 1:
            gather_hf(self.model, self.tokenizer, directory, self.env.is_main, merge_lora=True)
            return
        if self.lora is None:
            save_hf(self.model, self.tokenizer, directory)
            return
        model = self.model if merge else copy.deepcopy(self.model)
        merge_lora(model)
        save_hf(model, self.tokenizer, directory)

    def save_final(self, step: int, exp_dir: Path | None) -> Path:
        """Write `final_hf/` (and `final_adapter/` for LoRA) under the checkpoint directory,
        or with checkpointing disabled under the run's `exp_dir` (None off rank 0, which
        writes nothing), each atomically (a kill never leaves half a model there); refused
        when the weights are non-finite."""
        out = self.directory if self.cfg.checkpointing.enabled else exp_dir or self.directory
        outputs = CheckpointLayout(out)
        check_finite_weights(self.model.parameters(), step, self.env.max)
        if self.lora is not None:
            base = adapter_base_name(self.cfg.policy.model_name)  # loadable without sftkit
            with atomic_output_dir(outputs.final_adapter, write=self.env.is_main) as tmp:
                save_adapter(self.model, tmp, base, self.lora)
        if self.env.is_main or self.env.world_size > 1:  # sharded: every rank gathers
            with atomic_output_dir(outputs.final_hf, write=self.env.is_main) as tmp:
                self.export_hf(tmp, merge=True)
                if self.env.is_main:
                    write_model_card(
                        tmp, self.cfg, step, exp_dir, adapter_base_name(self.cfg.policy.model_name)
                    )
        if self.env.is_main:
            logger.info("Final model: %s", outputs.final_hf)
        self.env.barrier()
        return outputs.final_hf


# ----------------------------------------------------------------------------- resume pick


def resume_fingerprint(cfg: MasterConfig, tokenizer: Any, data: PreparedData) -> dict[str, Any]:
    """What makes resuming meaningful, keyed on the effective (derived) values: a LoRA set
    through Megatron's peft or lora_cfg alike, the length limit actually applied. Micro-batch
    size, token budget and `use_triton` are left out: they cannot change the loss or the
    gradient, so changing them to fit memory or a layout is allowed.

    `ckpt.LEGACY_FINGERPRINT` holds the raw-value form that checkpoints written before
    derived values stored; `ckpt.check_resumable` compares such a checkpoint against it."""
    p = cfg.policy
    template = getattr(tokenizer, "chat_template", None) or ""
    lora = asdict(p.dtensor_cfg.lora_cfg)  # Megatron's peft is translated into it at load
    lora.pop("use_triton")
    if not lora["target_experts"]:  # a later key: fingerprints written before it still match
        lora.pop("target_experts")
    if not lora["use_dora"]:  # keys added later count only when set: older LoRA checkpoints
        lora.pop("use_dora")  # resume as before
    if lora["quantize_base"] is None:  # LoRA checkpoints from before QLoRA keep resuming
        lora = {k: v for k, v in lora.items() if not k.startswith("quantize_")}
    common = {
        # scrubbed: training_info.json is written as is (a URL password in a model path
        # must not reach it); both sides of the resume check are scrubbed alike
        "model": scrub(p.model_name),
        "tokenizer": scrub(str(p.tokenizer.name)),
        "chat_template_sha": hashlib.sha256(str(template).encode()).hexdigest()[:16],
        "train_data": data.train.digest(),  # tokens, masks, dataset names and weights
        "train_global_batch_size": p.train_global_batch_size,
        "seed": cfg.sft.seed,
        "shuffle": cfg.data.shuffle,
    }
    # The old form keyed on the raw lora_cfg; after load it differs from the effective one
    # only in lora_dtype (new) and use_triton (turned off under TP; True is its default).
    d = p.dtensor_cfg
    raw_lora = {k: v for k, v in lora.items() if k != "lora_dtype"}
    raw_lora["use_triton"] = d.lora_cfg.use_triton or d.tensor_parallel_size > 1
    legacy_lora = raw_lora if lora["enabled"] and not p.megatron_cfg.enabled else None
    # without optimizer state in the checkpoint a fresh optimizer takes the new settings
    o = p.optimizer if cfg.checkpointing.save_optimizer else None
    return {
        **common,
        "fingerprint_version": 2,
        # the checkpoint's optimizer and scheduler state win on resume: a changed lr was
        # ignored, a changed class ended in KeyError; both are refused instead
        "optimizer": None
        if o is None
        else {
            "name": o.name,
            "kwargs": {k: v for k, v in dict(o.kwargs).items() if k not in ("foreach", "fused")},
        },
        "scheduler": None if o is None else json.loads(json.dumps(p.scheduler, default=str)),
        "base_weights": base_weights(p.model_name) if lora["enabled"] else None,
        "lora": lora if lora["enabled"] else None,
        "max_input_seq_length": cfg.data.max_input_seq_length,  # the limit applied
        ckpt.LEGACY_FINGERPRINT: {
            **common,
            "lora": legacy_lora,
            "megatron_peft": asdict(p.megatron_cfg.peft) if p.megatron_cfg.enabled else None,
            "max_total_sequence_length": p.max_total_sequence_length,
        },
    }


def base_weights_digest(model_dir: Path) -> str | None:
    """A cheap content digest of a base model's safetensors files (None: none found).

    Each file's header (names, dtypes, shapes) plus 16 evenly spaced 4 KiB samples of its
    data: a base whose weights changed under the same name and shapes (a LoRA resumed on it
    trained on: grad norm 12 -> 1.4e-5) differs, and a 16 GB model costs < 1 MiB of reads."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(f.read(min(header_len, 100_000_000)))
            start = 8 + header_len
            for i in range(16):
                f.seek(start + (size - start) * i // 16)
                h.update(f.read(4096))
    return h.hexdigest()[:16]


def base_weights(model_name: str) -> str | None:
    """`base_weights_digest` of the base model when it is on disk (None: not yet)."""
    from sftkit.model.builtin import resolve_model_path

    path = Path(resolve_model_path(model_name))
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model_name, local_files_only=True))
        except Exception:  # not in the cache yet: unknown, not a mismatch
            return None
    return base_weights_digest(path)


def pick_resume_dir(
    c: CheckpointingConfig,
    fingerprint: dict[str, Any],
    env: DistEnv,
    timeout_s: float | None = None,
) -> tuple[Path | None, bool]:
    """The checkpoint to resume from, or None (after moving old ones aside if starting
    fresh), and whether it starts a new stage (`resume_mismatch=stage` on new data).

    Runs before the (slow) model load, so a mismatch is reported at once. Collective:
    every rank verifies its share of the checkpoint (`timeout_s` bounds the waits)."""
    if not c.enabled:
        return None, False
    directory = Path(c.checkpoint_dir)
    # every rank hashes its share of the checkpoint, and all agree on one verdict;
    # `timeout_s` (cluster.collective_timeout_s) bounds the checkpoint group's collectives
    world = env.world_size if env.initialized else 1
    latest = ckpt.latest_checkpoint(directory, rank_share(env.rank, world, timeout_s))
    if latest is not None and c.resume:
        try:
            return latest, ckpt.check_resumable(latest, fingerprint, c.resume_mismatch == "stage")
        except ckpt.ResumeMismatchError:
            if c.resume_mismatch != "fresh":
                raise
            logger.warning("Checkpoint %s does not match this run: starting fresh", latest)
    if env.is_main and ckpt.step_dirs(directory):
        ckpt.archive_old_checkpoints(directory)
    env.barrier()
    return None, False
