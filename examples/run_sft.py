"""Fine-tune a model: `uv run examples/run_sft.py [--config <yaml>] [overrides...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sftkit.cli import sft_main  # noqa: E402

if __name__ == "__main__":
    from sftkit.lifecycle.signals import own_process

    own_process()  # after a stop for requeue, repeated signals cannot change the exit code
    sys.exit(sft_main(sys.argv[1:]))
