"""Deferred imports (`sftkit/model/deferred.py`): transformers' start-up import of torchao
waits until a torchao function is used; the stand-in behaves as the real module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sftkit.model import deferred


def _package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package `slowpkg` whose import leaves a mark, with a submodule `sub.tool`."""
    root = tmp_path / "slowpkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("import builtins\nbuiltins.slowpkg_imported = True\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "tool.py").write_text("def double(x):\n    return 2 * x\nVALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("slowpkg", "slowpkg.sub", "slowpkg.sub.tool"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return "slowpkg.sub.tool"


def test_the_stand_in_loads_the_real_module_on_first_use(tmp_path: Path, monkeypatch) -> None:
    import builtins

    name = _package(tmp_path, monkeypatch)
    monkeypatch.setattr(builtins, "slowpkg_imported", False, raising=False)
    assert deferred.defer(name, ("double",))
    from slowpkg.sub.tool import double  # what transformers does at import

    assert not builtins.slowpkg_imported  # nothing imported yet
    assert double(21) == 42  # the real function, imported now
    assert builtins.slowpkg_imported
    assert not getattr(sys.modules[name], "_sftkit_deferred", False)
    assert not deferred.defer(name, ("double",))  # already imported: left alone


def test_other_names_load_the_real_module_at_once(tmp_path: Path, monkeypatch) -> None:
    name = _package(tmp_path, monkeypatch)
    assert deferred.defer(name, ("double",))
    from slowpkg.sub.tool import VALUE

    assert VALUE == 7


@pytest.mark.slow
def test_loading_a_model_does_not_import_torchao(tmp_path: Path) -> None:
    """In a fresh process (this one may hold torchao already): load a tiny model through
    sftkit, then torchao's FP8 API still imports."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    script = (
        "import sys\n"
        "from sftkit.model.load import load_model\n"
        f"load_model({str(tmp_path / 'm')!r})\n"
        "assert 'torchao' not in sys.modules, 'torchao imported'\n"
        "from torchao.float8 import convert_to_float8_training\n"
        "import transformers.quantizers.quantizer_torchao as q\n"
        "state, meta = q.flatten_tensor_state_dict({})\n"
        "print('ok', meta)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok {'tensor_names': '[]'}")
