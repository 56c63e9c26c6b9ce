"""One rank of `test_data_once.py`'s two-rank runs (a script, started once per rank).

    python once_rank.py RANK WORLD_SIZE PORT DATA_FILE CACHE_DIR OUT_DIR

Joins a gloo group on 127.0.0.1:PORT, calls `prepare_data` on DATA_FILE with this
directory's tiny tokenizer, counts the batches this process tokenized, and writes
`OUT_DIR/rank<RANK>.json`: the count, the examples it got or its error, and the seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this directory's conftest

from conftest import make_tokenizer  # noqa: E402

from sftkit.config.derive import derive_config  # noqa: E402
from sftkit.config.schema import MasterConfig  # noqa: E402
from sftkit.data import prepare_data  # noqa: E402
from sftkit.data.processor import Processor  # noqa: E402
from sftkit.dist import init_distributed, shutdown_distributed  # noqa: E402


def main(rank: str, world: str, port: str, data: str, cache_dir: str, out: str) -> None:
    os.environ.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world,
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
    env = init_distributed("cpu")
    batches = []
    tokenize = Processor.process_batch

    def counted(self: Processor, *args: object, **kwargs: object) -> object:
        batches.append(1)
        return tokenize(self, *args, **kwargs)

    Processor.process_batch = counted  # type: ignore[method-assign]
    cfg = MasterConfig()
    cfg.data.train = {"dataset_name": "openai_format", "data_path": data}
    cfg.data.cache_dir = cache_dir
    cfg.data.prepare_timeout_s = 120.0
    cfg = derive_config(cfg)
    start = time.monotonic()
    result: dict[str, object] = {}
    try:
        result["examples"] = len(prepare_data(cfg, make_tokenizer(), env).train)
    except Exception as err:  # noqa: BLE001 (reported to the test)
        result["error"] = f"{type(err).__name__}: {err}"
    result.update(batches=len(batches), seconds=time.monotonic() - start)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if "error" not in result:
        env.barrier()  # as a run's next collectives do: rank 0 holds the group's store
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:7])
