"""Evaluate a model: `uv run examples/run_eval.py [--config <yaml>] [overrides...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sftkit.cli import eval_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(eval_main(sys.argv[1:]))
