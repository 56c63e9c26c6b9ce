"""Show tokenized examples with trained tokens highlighted (see sftkit/data/preview.py).

    uv run examples/preview_data.py --config examples/configs/sft.yaml [overrides] \
        [--split train|validation] [--num N] [--json]

A bad config or bad data is reported in one line (exit code 2), as `run_sft.py` does;
SFTKIT_TRACEBACK=1 shows the traceback too.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sftkit.data.preview import main  # noqa: E402


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except ValueError as err:  # ConfigError and DataError: user mistakes, with the fix
        if os.environ.get("SFTKIT_TRACEBACK"):
            raise
        kind = "Config error" if type(err).__name__ == "ConfigError" else "Error"
        print(f"{kind}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
