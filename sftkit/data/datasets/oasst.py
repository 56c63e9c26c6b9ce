"""OpenAssistant oasst1 trees (`2023-04-12_oasst_all.trees.jsonl.gz`) expanded to threads."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

from sftkit.data.datasets.base import RawDataset, Row, TaskDataSpec
from sftkit.data.datasets.files import read_json
from sftkit.data.errors import DataError

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
HUB_FILE = "2023-04-12_oasst_all.trees.jsonl.gz"
ROLES = {"prompter": "user", "assistant": "assistant"}


class OasstDataset(RawDataset):
    """Every root-to-leaf path of every tree becomes one conversation.

    Trailing user turns are cut (nothing to train after them) and threads without an
    assistant reply are dropped. `data_path` reads a local trees file (.jsonl or .jsonl.gz).
    """

    def __init__(
        self,
        data_path: str | None = None,
        split_validation_size: float | int = 0.05,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
    ) -> None:
        path = Path(data_path) if data_path else _download()
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        rows: list[Row] = []
        for tree in read_json(path, raw):
            where = tree.get("_origin", str(path))
            for k, thread in enumerate(_threads(tree.get("prompt") or {})):
                rows.append(
                    {
                        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, *thread],
                        "_origin": f"{where} thread {k}",
                    }
                )
        self.task_spec = TaskDataSpec("oasst", prompt_file, system_prompt_file)
        self.set_splits(rows, split_validation_size, seed)


def _threads(
    node: dict[str, Any], prefix: list[dict[str, str]] | None = None
) -> list[list[dict[str, str]]]:
    role = ROLES.get(node.get("role", ""))
    text = node.get("text")
    if role is None or not isinstance(text, str):
        return []
    path = [*(prefix or []), {"role": role, "content": text}]
    replies = node.get("replies") or []
    if not replies:
        while path and path[-1]["role"] != "assistant":
            path = path[:-1]
        return [path] if len(path) >= 2 else []
    out = []
    for reply in replies:
        out.extend(_threads(reply, path))
    return out


def _download() -> Path:
    from huggingface_hub import hf_hub_download  # lazy: hub access only when asked for

    try:
        return Path(hf_hub_download("OpenAssistant/oasst1", HUB_FILE, repo_type="dataset"))
    except Exception as err:  # offline, gated or moved: the hub raises many types
        first = (str(err).strip().splitlines() or ["no message"])[0][:300]
        raise DataError(
            "open_assistant (OpenAssistant/oasst1)",
            f"could not download {HUB_FILE} from the Hugging Face Hub "
            f"({type(err).__name__}: {first}).",
            "download it where the hub is reachable and set data_path to the local file.",
        ) from None
