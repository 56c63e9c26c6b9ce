"""`sftkit sft|preview|eval|export|keys|plot`; `examples/*.py` are thin wrappers over these."""

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
  keys     config keys: sftkit keys [prefix]   e.g. sftkit keys policy.sequence_packing
  plot     curves:      sftkit plot <log_dir/exp_NNN>   (redraws curves.png)

`sftkit <command> --help` for a command's options.
"""

OVERRIDES_HELP = """overrides (after the options, as in Hydra and NeMo RL):
  a.b=1          set a key                       sft.max_num_steps=100
  ++a.b=1        add or set a key                ++policy.hf_config_overrides.rope_theta=1e6
  +a.b=1         add a key that is not set yet
  ~a.b           delete a key (~a.b=v: only if its value is v)
  a.b=[1,2]      lists and mappings: [..], {k: v}; null, true/false, numbers, 'quoted strings'
"""


QUICKSTART_HINT = (
    " (no --config: this is NeMo RL's base, Llama-3.2-1B on SQuAD from the Hugging Face Hub;"
    " offline, try the quick start: uv run examples/run_sft.py --config"
    " examples/configs/quickstart.yaml)"
)


def _sft_epilog() -> str:
    """The config sections, from the schema (their docstrings), and the override grammar."""
    import dataclasses

    from sftkit.config.schema import MasterConfig

    lines = ["config sections (`sftkit keys <section>`: each key's type, default and doc):"]
    for f in dataclasses.fields(MasterConfig):
        section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        lines.append(f"  {f.name:<14} {(type(section).__doc__ or '').strip()}")
    return "\n".join(lines) + "\n\n" + OVERRIDES_HELP


def _config_args(argv: list[str], prog: str) -> tuple[argparse.Namespace, list[str]]:
    from sftkit.errors import ArgumentParser

    parser = ArgumentParser(
        prog=prog,
        add_help=True,
        usage=f"{prog} [--config YAML] [--print-config] [overrides ...]",
        epilog=_sft_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    from sftkit.hub import offline_if_unreachable

    if args.print_config:
        print(config_to_yaml(cfg), end="")
        offline_if_unreachable(cfg)  # the estimate reads the model's config.json
        from sftkit.model.memory import estimate_lines

        print("\n".join(estimate_lines(cfg)))
        return 0
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


def keys_main(argv: list[str]) -> int:
    """`sftkit keys [prefix]`: the documented config keys; 2 when no key has the prefix."""
    return _command(_keys, argv)


def _keys(argv: list[str]) -> int:
    from sftkit.config.errors import ConfigError
    from sftkit.config.keys import format_keys, key_docs
    from sftkit.errors import ArgumentParser

    parser = ArgumentParser(prog="sftkit keys", description="Print the documented config keys.")
    parser.add_argument("prefix", nargs="?", default="", help="a section or key, e.g. sft")
    prefix = parser.parse_args(argv).prefix
    rows = key_docs(prefix)
    if not rows:
        sections = sorted({r.path.split(".")[0] for r in key_docs()})
        raise ConfigError(
            f"no config key is {prefix!r} or below it; sections: {', '.join(sections)}"
            " (`sftkit keys` lists every key)"
        )
    print(format_keys(rows))
    return 0


def plot_main(argv: list[str]) -> int:
    """`sftkit plot <exp_dir>`: redraw the run's curves.png from its metrics.jsonl."""
    return _command(_plot, argv)


def _plot(argv: list[str]) -> int:
    from pathlib import Path

    from sftkit.errors import ArgumentParser
    from sftkit.log.plots import NO_MATPLOTLIB, save_curves

    parser = ArgumentParser(prog="sftkit plot", description="Redraw exp_NNN/curves.png.")
    parser.add_argument("exp_dir", type=Path, help="a run directory, e.g. logs/exp_001")
    exp_dir = parser.parse_args(argv).exp_dir
    if not (exp_dir / "metrics.jsonl").is_file():
        raise ValueError(
            f"{exp_dir}/metrics.jsonl does not exist: give a run directory (logger.log_dir/exp_NNN)"
        )
    try:
        print(save_curves(exp_dir))
    except ImportError:
        raise ImportError(NO_MATPLOTLIB) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `sftkit` console script: this process is the run's
        from sftkit.lifecycle.signals import own_process

        own_process()
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "sft": sft_main,
        "eval": eval_main,
        "preview": preview_main,
        "export": export_main,
        "keys": keys_main,
        "plot": plot_main,
    }
    if argv[:1] in (["--help"], ["-h"]):
        print(USAGE)
        return 0
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
