"""`sftkit sft|preview|eval|export`; `examples/*.py` are thin wrappers over these."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any

logger = logging.getLogger("sftkit")

USAGE = """usage: sftkit <command> [args]

commands:
  sft      fine-tune:   sftkit sft [--config YAML] [--print-config] [overrides...]
  preview  see tokens:  sftkit preview --config YAML [--split train] [--num N] [--json]
  eval     evaluate:    sftkit eval [--config YAML] [overrides...]
  export   to HF:       sftkit export <checkpoint_dir/step_N> <out_dir> [--adapter]
"""


QUICKSTART_HINT = (
    " (no --config: this is NeMo RL's base, Llama-3.2-1B on SQuAD from the Hugging Face Hub;"
    " offline, try the quick start: uv run examples/run_sft.py --config"
    " examples/configs/quickstart.yaml)"
)


def _config_args(argv: list[str], prog: str) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog=prog, add_help=True)
    parser.add_argument("--config", default=None, help="YAML config (default: the embedded one)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return parser.parse_known_args(argv)


def sft_main(argv: list[str]) -> int:
    """Entry point of `examples/run_sft.py`; returns the exit code (75: resubmit to resume)."""
    from sftkit.config import ConfigError, config_to_yaml, load_config
    from sftkit.log import setup_logging

    args, overrides = _config_args(argv, "run_sft.py")
    setup_logging()
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"Config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from sftkit.hub import offline_if_unreachable

    offline_if_unreachable(cfg)  # offline: hub errors in seconds, not after retries
    # No --config is NeMo RL's base (a gated hub model, SQuAD): point at the offline start.
    hint = QUICKSTART_HINT if args.config is None else ""
    launched = _run_reporting_errors(lambda c: _maybe_self_launch(c, argv), cfg, hint)
    if launched is not None:
        return launched
    from sftkit.train.recipe import run_sft

    code = _run_reporting_errors(run_sft, cfg, hint)
    assert code is not None  # run_sft always returns an exit code
    return code


def _run_reporting_errors(run_sft: Any, cfg: Any, hint: str = "") -> int | None:
    """Run, turning expected failures into one clear paragraph and an exit code.

    0 done, 1 training failure (non-finite loss, unreachable tracker), 2 config or usage
    error (ValueError: bad settings, resume mismatch, bad data), 75 saved early: requeue.
    Set SFTKIT_TRACEBACK=1 to see the traceback as well.
    """
    from sftkit.log import scrub
    from sftkit.train.step import NonFiniteError

    try:
        code = run_sft(cfg)
        return None if code is None else int(code)
    except (NonFiniteError, ConnectionError) as err:
        code, kind = 1, "Training stopped"
        error: BaseException = err
    except ValueError as err:  # ConfigError and DataError included: the fix is in the text
        code, kind = 2, "Config error" if type(err).__name__ == "ConfigError" else "Error"
        error = err
    if os.environ.get("SFTKIT_TRACEBACK"):
        traceback.print_exception(error)
    print(f"{kind}: {scrub(str(error))}{hint if code == 2 else ''}", file=sys.stderr)
    return code


def _maybe_self_launch(cfg: Any, argv: list[str]) -> int | None:
    """With cluster.gpus_per_node > 1 outside any launcher, start the ranks ourselves."""
    from sftkit.train.launch import maybe_self_launch

    return maybe_self_launch(cfg, argv)


def eval_main(argv: list[str]) -> int:
    from sftkit.eval.run import main

    return main(argv)


def preview_main(argv: list[str]) -> int:
    """Entry point of `examples/preview_data.py`: bad config or data is one line, exit 2."""
    from sftkit.data.preview import main

    return _run_reporting_errors(lambda _: main(argv), None) or 0


def export_main(argv: list[str]) -> int:
    from sftkit.train.export import main

    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"sft": sft_main, "eval": eval_main, "preview": preview_main, "export": export_main}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
