"""Loading torch.distributed.checkpoint (DCP) directories without running their pickles.

A checkpoint directory is untrusted input: whoever can write it can also rewrite its
manifest. DCP stores its `.metadata` with plain `pickle` and non-tensor values (optimizer
hyperparameters) as `torch.save` bytes, and loads both without restriction (torch 2.9-2.15:
`FileSystemReader.read_metadata` calls `pickle.load`, `DefaultLoadPlanner.load_bytes` calls
`torch.load(weights_only=False)`), so a crafted `.metadata` runs any code on resume or on
`sftkit export`. `dcp_load` reads the metadata with an unpickler that builds only DCP's own
types, and the byte items with `torch.load(weights_only=True)`; anything else is refused
with `UnsafeCheckpointError` naming the file.
"""

from __future__ import annotations

import builtins
import io
import pickle
from pathlib import Path
from typing import Any

import torch

# Containers and scalars the metadata may hold (no callables: `getattr`, `eval` stay out).
_BUILTINS = frozenset(
    {"set", "frozenset", "list", "dict", "tuple", "int", "float", "bool", "str", "bytes",
     "bytearray", "complex", "slice", "range"}
)  # fmt: skip
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# (module, name) of the other globals DCP's metadata pickles: its file index entry, the
# checkpoint id (a path), torch's sizes and tensor layouts (dtypes are checked by type).
_ALLOWED = frozenset(
    {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("pathlib._local", "PosixPath"),
        ("pathlib._local", "PurePosixPath"),
    }
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than the data sftkit wrote there."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch sizes/dtypes and plain containers; nothing else."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _BUILTINS:
            return getattr(builtins, name)
        if module == _METADATA_MODULE and not name.startswith("__"):
            import torch.distributed.checkpoint.metadata as metadata

            value = getattr(metadata, name, None)
            # Only the classes DCP defines there (dataclasses and enums), not its imports.
            if isinstance(value, type) and value.__module__ == _METADATA_MODULE:
                return value
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.path} refers to {module}.{name}, which a checkpoint's metadata never "
            "holds: refusing to load it (the checkpoint was tampered with or is not sftkit's)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.path} holds a persistent id: refusing to load it")


def load_metadata(path: Path) -> Any:
    """The DCP `Metadata` in `path`, unpickled with the allow-list above."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as err:
        raise UnsafeCheckpointError(f"{path} is not readable DCP metadata ({err})") from err
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = str(getattr(info, "relative_path", ""))
        if not name or Path(name).name != name or name in (".", ".."):
            raise UnsafeCheckpointError(
                f"{path} points at {name!r}: DCP data files sit next to their metadata"
            )
    return metadata


def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """FileSystemReader whose `read_metadata` uses the restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if hasattr(self, "_get_metadata_path"):
                path = Path(self._get_metadata_path(kwargs.get("rank")))
            else:  # older readers: the fixed name
                path = Path(self.path) / ".metadata"
            metadata = load_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return SafeFileSystemReader


def _safe_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner reading non-tensor values with `weights_only=True`."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                fqn = read_item.dest_index.fqn
                raise UnsafeCheckpointError(
                    f"the DCP value {fqn!r} is not plain data: refusing to load it ({err})"
                ) from err
            # Handed on re-serialised: the parent's own torch.load then reads plain data only,
            # and where it stores the value (nested or flat state dicts) stays torch's.
            clean = io.BytesIO()
            torch.save(loaded, clean)
            clean.seek(0)
            super().load_bytes(read_item, clean)

    return SafeLoadPlanner()


def load_state_file(path: Path) -> Any:
    """`torch.load(path, weights_only=True)`; a file holding anything but tensors and plain
    data is refused with one line naming it, instead of an unpickling traceback."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(
            f"{path} holds more than tensors and plain data: refusing to load it ({first})"
        ) from err


def dcp_load(state: dict[str, Any], directory: Path) -> None:
    """`torch.distributed.checkpoint.load(state, checkpoint_id=directory)`, pickle-safe."""
    import torch.distributed.checkpoint as dcp

    # Checked here first: dcp.load turns a reader's error into an AssertionError listing the
    # global and the rank-local attempts, and the refusal should read as one line.
    load_metadata(directory / ".metadata")
    reader = _safe_reader_class()(str(directory))
    dcp.load(state, storage_reader=reader, planner=_safe_planner())
