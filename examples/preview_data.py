"""Show tokenized examples with trained tokens highlighted (see sftkit/data/preview.py).

    uv run examples/preview_data.py --config examples/configs/quickstart.yaml [overrides] \
        [--split train|validation] [--num N] [--json]

A bad config or bad data is reported in one line (exit code 2), as `run_sft.py` does;
SFTKIT_TRACEBACK=1 shows the traceback too.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sftkit.cli import preview_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(preview_main(sys.argv[1:]))
