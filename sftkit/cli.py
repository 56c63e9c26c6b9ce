"""`sftkit sft|preview|eval|export`; `examples/*.py` are thin wrappers over these."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `sftkit --help` stays fast
    from sftkit.config import MasterConfig

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
    from sftkit.errors import ArgumentParser

    parser = ArgumentParser(prog=prog, add_help=True)
    parser.add_argument("--config", default=None, help="YAML config (default: the embedded one)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return parser.parse_known_args(argv)


def sft_main(argv: list[str]) -> int:
    """Entry point of `examples/run_sft.py`; returns the exit code (75: resubmit to resume).

    0 done, 1 training failure (non-finite loss, unreachable tracker), 2 config or usage
    error (bad settings, resume mismatch, bad data), 75 saved early: requeue. Errors are
    reported by `sftkit.errors` (one message, secrets scrubbed).
    """
    return _command(_sft, argv)


def _sft(argv: list[str]) -> int:
    from sftkit.config import config_to_yaml, load_config
    from sftkit.errors import add_usage_hint
    from sftkit.log import setup_logging

    args, overrides = _config_args(argv, "run_sft.py")
    setup_logging()
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from sftkit.hub import offline_if_unreachable

    offline_if_unreachable(cfg)  # offline: hub errors in seconds, not after retries
    try:
        launched = _maybe_self_launch(cfg, argv)
        if launched is not None:
            return launched
        from sftkit.train.recipe import run_sft

        return int(run_sft(cfg))
    except Exception as err:
        if args.config is None:  # NeMo RL's base (a gated hub model, SQuAD): name the offline start
            add_usage_hint(err, QUICKSTART_HINT)
        raise


def _command(body: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a subcommand's body through the one error path (`sftkit.errors`)."""
    from sftkit.errors import install_excepthook, run_reporting_errors

    install_excepthook()
    return int(run_reporting_errors(body, argv))


def _maybe_self_launch(cfg: MasterConfig, argv: list[str]) -> int | None:
    """With cluster.gpus_per_node > 1 outside any launcher, start the ranks ourselves."""
    from sftkit.lifecycle.launch import maybe_self_launch

    return maybe_self_launch(cfg, argv)


def eval_main(argv: list[str]) -> int:
    """Entry point of `examples/run_eval.py`: 0 done, 2 bad config, data or model path."""
    from sftkit.eval.run import main

    return _command(main, argv)


def preview_main(argv: list[str]) -> int:
    """Entry point of `examples/preview_data.py`: bad config or data is one line, exit 2."""
    from sftkit.data.preview import main

    return _command(main, argv)


def export_main(argv: list[str]) -> int:
    """`sftkit export`: 0 done, 2 not a complete checkpoint or a bad option."""
    from sftkit.checkpoint.export import main

    return _command(main, argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"sft": sft_main, "eval": eval_main, "preview": preview_main, "export": export_main}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
