"""`sftkit.log` loads its torch-using modules (flops, gpu, loggers) on first use, so the
config path answers without importing torch: a config error took 1.66 CPU-s with torch
and 0.30 without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


HEAVY = ("torch", "transformers", "torchao", "matplotlib", "datasets", "pyarrow", "wandb")


def imported_by(args: list[str], expect_code: int) -> list[str]:
    """The heavy modules `sft_main(args)` imports, in a fresh interpreter."""
    script = (
        "import sys, io, contextlib\n"
        "from sftkit.cli import sft_main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        f"    code = sft_main({args!r})\n"
        f"assert code == {expect_code}, code\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip())  # a list literal printed by the script above


@pytest.mark.slow
def test_config_path_does_not_import_torch() -> None:
    """A config error (a typo'd key) answers without torch. `--print-config` imports torch
    and transformers since it ends with the memory estimate (`sftkit.model.memory` builds
    the model on the meta device), and nothing heavier."""
    config = ["--config", "examples/configs/quickstart.yaml"]
    assert imported_by([*config, "sft.max_num_stepz=3"], expect_code=2) == []
    assert set(imported_by([*config, "--print-config"], expect_code=0)) <= {"torch", "transformers"}


def test_the_lazy_names_are_the_modules_own() -> None:
    import sftkit.log as log
    from sftkit.log import flops, loggers

    assert log.flops_per_token is flops.flops_per_token
    assert log.Loggers is loggers.Loggers
    assert set(log._LAZY) <= set(log.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = log.nope
