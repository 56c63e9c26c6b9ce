"""NeMo RL's converter command, for sftkit checkpoints: a checkpoint step -> an HF model dir.

    uv run examples/converters/convert_dcp_to_hf.py \
        --config results/sft/step_100/config.yaml \
        --dcp-ckpt-path results/sft/step_100/policy/weights \
        --hf-ckpt-path results/sft/step_100/hf

The step directory is found from `--dcp-ckpt-path` (or `--config`); the rest is
`sftkit export <step> <hf-ckpt-path>`: one-rank and sharded checkpoints alike, LoRA merged
(`--adapter` writes the PEFT adapter instead).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sftkit.checkpoint.layout import INFO  # noqa: E402
from sftkit.cli import export_main  # noqa: E402
from sftkit.errors import ArgumentParser, report_error  # noqa: E402


def step_dir(path: Path) -> Path | None:
    """The checkpoint step directory holding `path` (itself or an ancestor)."""
    path = path.resolve()
    return next((p for p in (path, *path.parents) if (p / INFO).is_file()), None)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="the step's config.yaml")
    parser.add_argument("--dcp-ckpt-path", type=Path, help="the step's policy/weights")
    parser.add_argument("--hf-ckpt-path", type=Path, required=True, help="output directory")
    parser.add_argument("--adapter", action="store_true", help="write a PEFT adapter (LoRA)")
    args = parser.parse_args(argv)
    given = [p for p in (args.dcp_ckpt_path, args.config) if p is not None]
    if not given:
        parser.error("give --dcp-ckpt-path (or --config) inside a checkpoint step directory")
    step = next((s for s in map(step_dir, given) if s is not None), None)
    if step is None:
        error = ValueError(f"no checkpoint step directory (step_N) holds {given[0]}")
        return report_error(error) or 2
    return export_main([str(step), str(args.hf_ckpt_path), *(["--adapter"] * args.adapter)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
