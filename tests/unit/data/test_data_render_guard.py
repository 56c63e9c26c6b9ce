"""Untrusted chat templates are bounded: a time budget per row and per probe (a data error
naming the row or the template key), and no rendering with a jinja2 below the floor."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import jinja2
import pytest
from conftest import make_tokenizer

from sftkit.config.derive import derive_config
from sftkit.config.schema import MasterConfig
from sftkit.data import DataError, prepare_data, render_guard
from sftkit.data.templates import ChatRenderer, compile_template

# 10^12 iterations when a message says "slow": the probe conversations never do.
NESTED = "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100) %}{% endfor %}{% endfor %}{% endfor %}"
ROW_LOOPS = (
    "{% for m in messages %}{% if 'slow' in m['content'] %}" + NESTED + "{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


@pytest.fixture(autouse=True)
def _short_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render_guard, "RENDER_BUDGET_S", 0.5)


def _cfg(tmp_path: Path, contents: list[str]) -> MasterConfig:
    path = tmp_path / "d.jsonl"
    with path.open("w") as f:
        for text in contents:
            messages = [
                {"role": "user", "content": text},
                {"role": "assistant", "content": "ok"},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    cfg = MasterConfig()
    cfg.data.train = {"dataset_name": "openai_format", "data_path": str(path)}
    cfg.data.cache_dir = str(tmp_path / "cache")
    return derive_config(cfg)  # derived as load_config does


def test_a_row_that_renders_too_long_is_a_data_error_naming_the_row(tmp_path: Path) -> None:
    tokenizer = make_tokenizer("qwen25")
    tokenizer.chat_template = ROW_LOOPS
    cfg = _cfg(tmp_path, ["fine", "also fine", "this one is slow", "fine"])
    start = time.monotonic()
    with pytest.raises(DataError, match=r"d\.jsonl:3: .*took more than 0\.5 s") as err:
        prepare_data(cfg, tokenizer)
    assert time.monotonic() - start < 30
    assert len(str(err.value).splitlines()) == 1


def test_a_template_whose_probe_renders_too_long_names_the_template_key() -> None:
    start = time.monotonic()
    with pytest.raises(DataError, match=r"policy\.tokenizer\.chat_template: .*probe"):
        ChatRenderer(NESTED + "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert time.monotonic() - start < 10


def test_the_budget_restores_the_previous_alarm_handler() -> None:
    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not expected")

    previous = signal.signal(signal.SIGALRM, mine)
    try:
        ChatRenderer("{% for m in messages %}{{ m['content'] }}{% endfor %}").render_spans(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        )
        assert signal.getsignal(signal.SIGALRM) is mine
        assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    finally:
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("installed", ["3.1.5", "3.1.4", "2.11.3", "3.0.0"])
def test_a_jinja_below_the_floor_refuses_to_render(
    monkeypatch: pytest.MonkeyPatch, installed: str
) -> None:
    monkeypatch.setattr(jinja2, "__version__", installed)
    with pytest.raises(ImportError, match=rf"jinja2 {installed} is installed.*>= 3\.1\.6"):
        compile_template("{{ messages }}")
    with pytest.raises(ImportError, match="jinja2>=3.1.6"):
        ChatRenderer("{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.mark.parametrize("installed", ["3.1.6", "3.2.0", "4.0.0rc1", "3.1.7rc1", "3.1.6.post1"])
def test_a_jinja_at_or_above_the_floor_renders(installed: str) -> None:
    render_guard.check_jinja_version(installed)


def test_an_outer_alarm_keeps_its_time_and_the_budget_still_holds(tmp_path: Path) -> None:
    """A caller's longer alarm (a test harness, pytest-timeout) neither disables the budget
    nor is lost: it is re-armed with its remaining time."""
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        tokenizer = make_tokenizer("qwen25")
        tokenizer.chat_template = ROW_LOOPS
        with pytest.raises(DataError, match=r"d\.jsonl:1: .*took more than 0\.5 s"):
            prepare_data(_cfg(tmp_path, ["slow"]), tokenizer)
        assert 20 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired == []


def test_a_single_render_outside_a_row_is_bounded_too() -> None:
    """NeMo RL's mask mode, previews and eval render without `render_spans`."""
    from sftkit.data.templates import TemplateRejected

    renderer = ChatRenderer(ROW_LOOPS)
    start = time.monotonic()
    with pytest.raises(TemplateRejected, match="took more than 0.5 s"):
        renderer.render([{"role": "user", "content": "slow"}])
    assert time.monotonic() - start < 10
