"""`sftkit.log` loads its torch-using modules (flops, gpu, loggers) on first use, so the
config path answers without importing torch: `--print-config` took 1.66 CPU-s with torch
and 0.30 without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_print_config_does_not_import_torch() -> None:
    script = (
        "import sys, io, contextlib\n"
        "from sftkit.cli import sft_main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    code = sft_main(['--config', 'examples/configs/quickstart.yaml', '--print-config'])\n"
        "assert code == 0 and 'policy:' in out.getvalue(), code\n"
        "heavy = [m for m in ('torch', 'transformers', 'torchao', 'matplotlib', 'datasets',\n"
        "                     'pyarrow', 'wandb') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_lazy_names_are_the_modules_own() -> None:
    import sftkit.log as log
    from sftkit.log import flops, loggers

    assert log.flops_per_token is flops.flops_per_token
    assert log.Loggers is loggers.Loggers
    assert set(log._LAZY) <= set(log.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = log.nope
